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


# NIfTI datatype codes of floating-point voxels -> numpy dtype (complex types are refused by ITK anyway).
_NIFTI_FLOATS = {16: "f4", 64: "f8", 1536: "f16"}
_CHUNK = 1 << 22


def _nifti_layout(head: bytes, path: Path) -> tuple[int, int, Optional[str]]:
    """(voxel data offset, voxel data bytes, float dtype or None) from a NIfTI-1/2 header."""
    import struct

    if len(head) < 348:
        raise VolumeError(f"Cannot read image {path}: it is {len(head)} bytes long, shorter than a NIfTI header.")
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348 and len(head) >= 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "hh", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if size == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack(order + "hh", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = int(struct.unpack(order + "q", head[168:176])[0])
            break
    else:
        raise VolumeError(f"Cannot read image {path}: its NIfTI header is cut short or damaged.")
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1 : ndim + 1]) or bitpix <= 0:
        raise VolumeError(f"Cannot read image {path}: its NIfTI header has impossible dimensions {dims[1:ndim + 1]}.")
    count = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.float64))
    dtype = _NIFTI_FLOATS.get(datatype)
    return offset, count * bitpix // 8, (order + dtype) if dtype else None


def check_nifti_file(path: str | Path) -> None:
    """Refuse a truncated NIfTI file and one with NaN/Inf voxels.

    ITK's NIfTI reader zero-fills what a truncated .nii.gz lacks and turns NaN and Inf into 0, so
    both have to be seen in the file itself: the voxel data are streamed once and counted.
    """
    import gzip
    import zlib

    path = Path(path)
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    total, bad = 0, 0
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
            offset, expected, dtype = _nifti_layout(head, path)
            total = len(head)
            item = np.dtype(dtype).itemsize if dtype else 1
            carry = head[offset:] if dtype and offset < len(head) else b""
            while True:
                block = handle.read(_CHUNK)
                if not block:
                    break
                before, total = total, total + len(block)
                if dtype:
                    carry += block[max(0, offset - before):]  # header extensions before the voxels are skipped
                    usable = len(carry) // item * item
                    values = np.frombuffer(carry[:usable], dtype=dtype)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    carry = carry[usable:]
            if dtype and carry and len(carry) >= item:
                values = np.frombuffer(carry[: len(carry) // item * item], dtype=dtype)
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    except gzip.BadGzipFile:
        raise VolumeError(f"Cannot read image {path}: it is not a gzip-compressed file, as .gz says.") from None
    except (EOFError, zlib.error) as exc:
        raise VolumeError(f"{path} is truncated or damaged (its compressed data end early: {exc}); copy the file again.") from None
    except OSError as exc:
        raise VolumeError(f"Cannot read image {path}: {exc.strerror or exc}") from None
    if total < offset + expected:
        raise VolumeError(
            f"{path} is truncated: it holds {max(total - offset, 0)} of the {expected} bytes of voxel data its "
            "header announces; copy the file again.")
    if bad:
        raise VolumeError(f"{path} contains {bad} NaN or infinite voxels; fix or mask them first.")


def read_image_file(path: str | Path, what: str = "image") -> sitk.Image:
    """One image file through SimpleITK, with the checks its readers skip (truncation, NaN/Inf in NIfTI)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"No such {what} file: {path}")
    if path.is_file() and str(path).lower().endswith((".nii", ".nii.gz")):
        check_nifti_file(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise VolumeError(f"Cannot read {what} {path}: {lines[-1] if lines else exc}") from None


def check_finite(image: sitk.Image, name: str) -> None:
    """No NaN or infinite voxel (float images only)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        raise VolumeError(f"{name} contains {int(finite.size - np.count_nonzero(finite))} NaN or infinite voxels; "
                          "fix or mask them first.")


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
            image = read_image_file(path, "image")
    except VolumeError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise VolumeError(f"Cannot read image {path}: {first[-1] if first else exc}") from None
    image = check_volume(image, str(path))
    check_finite(image, str(path))
    return image


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
    """``"C,W"`` or a CT preset name -> (centre, width); None, 'auto' or 'percentile' -> None (percentiles).

    'none' and an empty text are refused: they read as "no windowing", which is not what either
    default does.
    """
    if text is None or str(text).strip().lower() in ("auto", "percentile", "percentiles"):
        return None
    if str(text).strip().lower() in ("", "none", "off", "no"):
        raise VolumeError(
            f"--window {text!r}: say 'auto' (the model's setting, else volume percentiles), 'percentile', "
            "a preset or CENTRE,WIDTH.")
    if str(text).lower() in CT_WINDOWS:
        return CT_WINDOWS[str(text).lower()]
    try:
        centre, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise VolumeError(
            f"Window {text!r} is not 'CENTRE,WIDTH' nor a preset ({', '.join(CT_WINDOWS)})."
        ) from None
    if not (np.isfinite(centre) and np.isfinite(width)):
        raise VolumeError(f"--window {text!r}: centre and width must be finite numbers.")
    if width <= 0:
        raise VolumeError(f"--window {text!r}: the width must be positive, got {width:g}.")
    return centre, width


def window_settings(text: Optional[str], model_settings: Optional[dict] = None) -> dict:
    """The preprocessing a ``--window`` value asks for: 'auto'/None -> the model's, else percentiles;
    'percentile' -> volume percentiles even for a model trained with a window."""
    if text is not None and str(text).strip().lower() in ("percentile", "percentiles"):
        return preprocessing_settings(None)
    window = parse_window(text)
    if window is not None:
        return preprocessing_settings(window)
    return model_settings or preprocessing_settings(None)


def check_window_hits(array: np.ndarray, settings: dict, option: str = "--window") -> None:
    """Refuse a window that maps every voxel to one value (all black or all white)."""
    if settings.get("intensity") != "window":
        return
    centre, width = settings["window"]
    low, high = centre - width / 2.0, centre + width / 2.0
    lo, hi = float(np.min(array)), float(np.max(array))
    if hi <= low or lo >= high:
        side = "black" if hi <= low else "white"
        raise VolumeError(
            f"{option} {centre:g},{width:g} covers {low:g} to {high:g}, but the image's intensities are "
            f"{lo:g} to {hi:g}: every voxel would be {side}. Choose a window inside the image's range.")


def normalize_intensity(
    array: np.ndarray,
    window: Optional[tuple[float, float]] = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Intensities -> [0, 1]: a CT window (centre, width), or volume-wide percentiles for MR."""
    check_intensities(array)
    if window is not None:
        check_window_hits(array, preprocessing_settings(window))
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


def percentile_ranks(array: np.ndarray, values: Sequence[float]) -> list[float]:
    """The percentile (0-100) of ``array`` at which each value lies: the inverse of ``np.percentile``.

    Ties (integer MR intensities) count half below and half above, so ``np.percentile`` at the rank
    returns about the value again.
    """
    array = np.asarray(array)
    ranks = []
    for value in values:  # counting, not sorting: no copy of a large volume
        below, upto = int(np.count_nonzero(array < value)), int(np.count_nonzero(array <= value))
        ranks.append(100.0 * max((below + upto - 1) / 2.0, 0.0) / max(array.size - 1, 1))
    return ranks


def region_contrast(array: np.ndarray, region_values: np.ndarray,
                    region_percentiles: tuple[float, float] = (1.0, 99.0)) -> Optional[tuple[float, float]]:
    """Volume percentiles that map a region's own intensity range to [0, 1], or None when it has none.

    A crop around small structures uses only part of the volume's 0.5-99.5 percentile range (in a
    brain MR the bright scalp sets the top), so the structures differ by a few grey levels. Stored as
    volume percentiles, the setting carries over to another scan of the same kind as the default does.
    """
    low, high = np.percentile(np.asarray(region_values, dtype=np.float64), region_percentiles)
    if not high > low:
        return None
    rank_low, rank_high = percentile_ranks(array, [low, high])
    rank_low, rank_high = max(0.0, min(rank_low, 100.0)), max(0.0, min(rank_high, 100.0))
    return (round(rank_low, 3), round(rank_high, 3)) if rank_high - rank_low >= 0.01 else None


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


def _fmt(values, digits: int = 4) -> str:
    return "(" + ", ".join(f"{x:.{digits}g}" for x in values) + ")"


def describe_geometry(image: sitk.Image) -> str:
    return (f"size {image.GetSize()}, spacing {_fmt(image.GetSpacing())}, origin {_fmt(image.GetOrigin())}, "
            f"direction {_fmt(image.GetDirection())}")


def geometry_difference(a: sitk.Image, b: sitk.Image, names=("labels", "image"), tolerance: float = 1e-4) -> str:
    """What differs between two grids, each with its numbers (printed precisely enough to differ)."""
    parts = []
    fields = (("size", a.GetSize(), b.GetSize()), ("spacing", a.GetSpacing(), b.GetSpacing()),
              ("origin", a.GetOrigin(), b.GetOrigin()), ("direction", a.GetDirection(), b.GetDirection()))
    for field, va, vb in fields:
        if field == "size":
            if tuple(va) != tuple(vb):
                parts.append(f"size {tuple(va)} vs {tuple(vb)}")
            continue
        diff = np.abs(np.asarray(va, float) - np.asarray(vb, float))
        if np.any(diff > tolerance):
            # enough digits that the two printed values differ
            digits = 4
            while digits < 17 and _fmt(va, digits) == _fmt(vb, digits):
                digits += 2
            parts.append(f"{field} {_fmt(va, digits)} vs {_fmt(vb, digits)}")
    if not parts:
        return "no difference"
    return f"{names[0]} vs {names[1]}: " + "; ".join(parts)
