"""Label volumes in and out: Slicer's .seg.nrrd (slicerio, with names and colours) and label maps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .fileio import atomic_write
from .safety import LABELMAP_SUFFIXES, InputError, check_class_colors, check_class_names, has_suffix
from .slices import annotated_slices  # noqa: F401 (re-exported)
from .volume import VolumeError, check_volume, describe_geometry, geometry_difference, read_image_file, same_geometry

# Label values above this are not labels (uint16 label maps end here); refused before any allocation.
MAX_LABEL_VALUE = 65535


def is_seg_nrrd(path: str | Path) -> bool:
    return str(path).lower().endswith(".seg.nrrd")


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> physical LPS matrix of a SimpleITK image."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing())[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_seg_nrrd(
    path: str | Path,
    labels: np.ndarray,
    reference: sitk.Image,
    class_names: Sequence[str],
    class_colors: Optional[Sequence[Sequence[float]]] = None,
) -> Path:
    """Write a (z, y, x) label array as a Slicer segmentation: one segment per class, on the reference grid."""
    import slicerio

    if labels.shape != tuple(reversed(reference.GetSize())):
        raise VolumeError(f"Label array {labels.shape} does not match the image grid {tuple(reversed(reference.GetSize()))}.")
    # Names and colours go into the NRRD header as text: a newline would start a header field of its own.
    class_names = check_class_names(list(class_names), f"{path}: class names")
    colors = check_class_colors(list(class_colors) if class_colors is not None else None, len(class_names),
                                f"{path}: class colours") or [None] * len(class_names)
    segmentation = slicerio.create_segmentation(reference.GetSize(), ijk_to_lps(reference))
    voxels_ijk = np.ascontiguousarray(labels.transpose(2, 1, 0))
    for value, (name, color) in enumerate(zip(class_names, colors), start=1):
        segment = {"id": f"Segment_{value}", "name": str(name)}
        if color is not None:
            segment["color"] = [float(c) for c in color]
        slicerio.add_segment(segmentation, voxels_ijk == value, segment)
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation))


def write_labelmap(path: str | Path, labels: np.ndarray, reference: sitk.Image) -> Path:
    if not has_suffix(path, LABELMAP_SUFFIXES):
        raise InputError(f"--labelmap {path}: the file name must end in {' or '.join(LABELMAP_SUFFIXES)}.")
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(reference)
    suffix = "".join(Path(path).suffixes[-2:]) if str(path).endswith(".gz") else Path(path).suffix

    def write(tmp: str) -> None:
        # SimpleITK picks its writer from the extension, so write under it, then take the bytes over.
        try:
            sitk.WriteImage(image, tmp + suffix, useCompression=True)
            os.replace(tmp + suffix, tmp)
        finally:
            if os.path.exists(tmp + suffix):
                os.unlink(tmp + suffix)

    return atomic_write(path, write)


def _read_seg_nrrd(path: Path, reference: sitk.Image) -> tuple[np.ndarray, list[str], list]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:
        raise VolumeError(f"Cannot read segmentation {path}: {exc}") from None
    segments = segmentation.get("segments") or []
    if not segments:
        raise VolumeError(f"Segmentation {path} has no segments.")
    matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
    size = segmentation["voxels"].shape[-3:]
    ref_matrix = ijk_to_lps(reference)
    if not np.allclose(matrix[:3, :3], ref_matrix[:3, :3], atol=1e-4):
        digits = 4
        fmt = lambda m, d: np.array2string(m[:3, :3], precision=d, separator=",").replace("\n", "")  # noqa: E731
        while digits < 16 and fmt(matrix, digits) == fmt(ref_matrix, digits):
            digits += 2
        raise VolumeError(
            f"Segmentation {path} has other voxel axes or spacing than the image: voxel-to-LPS matrix "
            f"{fmt(matrix, digits)} vs the image's {fmt(ref_matrix, digits)}.")
    # Slicer may crop a .seg.nrrd to the segments' extent: place it back on the image grid.
    offset = np.linalg.solve(ref_matrix[:3, :3], matrix[:3, 3] - ref_matrix[:3, 3])
    if not np.allclose(offset, np.round(offset), atol=1e-3):
        raise VolumeError(f"Segmentation {path} is not aligned with the image's voxels.")
    offset = np.round(offset).astype(int)
    ref_size = np.asarray(reference.GetSize())
    if (offset < 0).any() or (offset + np.asarray(size) > ref_size).any():
        raise VolumeError(f"Segmentation {path} reaches outside the image ({describe_geometry(reference)}).")
    labels_ijk = np.zeros(tuple(ref_size), dtype=np.uint8)
    names, colors = [], []
    for value, segment in enumerate(segments, start=1):
        mask = slicerio.segment_mask(segmentation, segment)
        region = labels_ijk[offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1], offset[2] : offset[2] + size[2]]
        region[mask] = value
        names.append(segment.get("name") or segment.get("id") or f"class_{value}")
        colors.append(segment.get("color"))
    names = check_class_names(names, f"Segmentation {path}: segment names")
    try:
        colors = check_class_colors(colors, len(names), f"Segmentation {path}: segment colours")
    except InputError:
        colors = [None] * len(names)  # a colour is cosmetic: an odd one is dropped, not fatal
    return labels_ijk.transpose(2, 1, 0).copy(), names, colors


def read_class_labels(
    path: str | Path, reference: sitk.Image
) -> tuple[np.ndarray, list[str], list]:
    """A label volume or .seg.nrrd on the reference grid -> ((z, y, x) uint8 labels 0..k, names, colours).

    Segments become classes 1..k in their order. A plain label volume's values are renumbered 1..k
    in increasing order, named ``label_<value>``, with no colour.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"No such label file: {path}")
    if is_seg_nrrd(path):
        return _read_seg_nrrd(path, reference)
    if path.is_dir():
        raise VolumeError(f"Label file {path} is a folder; give a label volume or a .seg.nrrd file.")
    image = check_volume(read_image_file(path, "label volume"), str(path))
    if not same_geometry(image, reference):
        raise VolumeError(
            f"Label volume {path} does not lie on the image's grid: {geometry_difference(image, reference)}."
        )
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.isfinite(array).all():
            raise VolumeError(f"Label volume {path} holds NaN or infinite values; a label map is needed.")
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise VolumeError(f"Label volume {path} holds non-integer values; a label map is needed.")
    if array.size and array.min() < 0:
        raise VolumeError(f"Label volume {path} has negative values; a label map is needed.")
    if array.size and array.max() > MAX_LABEL_VALUE:
        raise VolumeError(
            f"Label volume {path} holds the value {array.max():.6g}; label values above {MAX_LABEL_VALUE} are "
            "not labels (is it an intensity image?).")
    if np.unique(array).size > 256:
        raise VolumeError(f"Label volume {path} has more than 255 labels; is it an intensity image?")
    array, values = compact_labels(array.astype(np.int64))
    return array, [f"label_{v}" for v in values], [None] * len(values)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Renumber label values to 1..k in increasing order; returns the new array and the old values."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        return labels.astype(np.uint8), []
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    for new, old in enumerate(values, start=1):
        lookup[old] = new
    return lookup[labels], values
