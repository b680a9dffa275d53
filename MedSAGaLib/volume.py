"""Volumes: reading (NIfTI, NRRD, MetaImage, DICOM series), slice axis, intensity normalisation.

Arrays follow SimpleITK's order (z, y, x) = voxel axes (k, j, i). The slice axis is chosen from
the image's direction matrix, never from the array index, so oblique and sagittal acquisitions
slice the way the user sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .slices import PLANE_NORMALS, VolumeError, axis_index, get_slice, parse_slices, plane_axes  # noqa: F401 (re-exported)

# CT windows (centre, width) in Hounsfield units.
CT_WINDOWS = {
    "ct-soft": (40.0, 400.0),
    "ct-abdomen": (50.0, 350.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


def read_volume(path: str | Path) -> sitk.Image:
    """Read a 3-D scalar image: a NIfTI/NRRD/MetaImage file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"No such file or folder: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise VolumeError(f"No DICOM series found in folder {path}")
            # The series with the most files is the volume a user means when pointing at a folder.
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except VolumeError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise VolumeError(f"Cannot read image {path}: {first[-1] if first else exc}") from None
    return check_volume(image, str(path))


def check_volume(image: sitk.Image, name: str = "image") -> sitk.Image:
    """A 3-D, single-component image; a trailing 4th axis of length 1 is dropped."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed."
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        what = "a 2-D image" if dim == 2 else f"a {dim}-D image of size {image.GetSize()}"
        raise VolumeError(f"{name} is {what}; MedSAGa needs a 3-D volume.")
    return image


def array_from_image(image: sitk.Image) -> np.ndarray:
    """Voxel array in (z, y, x) order as float32."""
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)


def slice_axis(image: sitk.Image, axis: str | int = "axial") -> int:
    """The numpy axis of the (z, y, x) array to slice along.

    ``axis`` is a plane name (axial, coronal, sagittal) or a voxel axis letter i/j/k or number 0-2.
    """
    return axis_index(image.GetDirection(), axis)


def check_intensities(array: np.ndarray, name: str = "image") -> None:
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise VolumeError(f"{name} contains {bad} NaN or infinite voxels; fix or mask them before segmenting.")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise VolumeError(f"{name} is constant (every voxel is {low}); there is nothing to segment.")


def parse_window(text: Optional[str]) -> Optional[tuple[float, float]]:
    """``"C,W"`` or a CT preset name -> (centre, width); None or 'auto' -> None (percentiles)."""
    if text is None or str(text).lower() in ("", "auto", "percentile", "none"):
        return None
    if str(text).lower() in CT_WINDOWS:
        return CT_WINDOWS[str(text).lower()]
    try:
        centre, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise VolumeError(
            f"Window {text!r} is not 'CENTRE,WIDTH' nor a preset ({', '.join(CT_WINDOWS)})."
        ) from None
    if width <= 0:
        raise VolumeError(f"Window width must be positive, got {width}.")
    return centre, width


def normalize_intensity(
    array: np.ndarray,
    window: Optional[tuple[float, float]] = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Intensities -> [0, 1]: a CT window (centre, width), or volume-wide percentiles for MR."""
    check_intensities(array)
    if window is not None:
        low, high = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
    else:
        low, high = np.percentile(array, percentiles)
        if high <= low:  # mostly-constant volumes (large empty background)
            low, high = float(array.min()), float(array.max())
    out = (array.astype(np.float32) - low) / max(high - low, 1e-6)
    return np.clip(out, 0.0, 1.0, out=out)


def preprocessing_settings(window: Optional[tuple[float, float]], percentiles=(0.5, 99.5)) -> dict:
    if window is not None:
        return {"intensity": "window", "window": [float(window[0]), float(window[1])]}
    return {"intensity": "percentile", "percentiles": [float(p) for p in percentiles]}


def normalize_with(array: np.ndarray, settings: dict) -> np.ndarray:
    """Apply the preprocessing stored in a model's metadata."""
    if settings.get("intensity") == "window":
        return normalize_intensity(array, window=tuple(settings["window"]))
    return normalize_intensity(array, percentiles=tuple(settings.get("percentiles", (0.5, 99.5))))


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance, rtol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(1.0, max(map(abs, a.GetSpacing()))))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def describe_geometry(image: sitk.Image) -> str:
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
    return f"size {image.GetSize()}, spacing {fmt(image.GetSpacing())}, origin {fmt(image.GetOrigin())}"
