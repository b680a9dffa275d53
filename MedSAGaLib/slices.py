"""Slices and classes of a label volume: which slices are annotated, which to train on, boxes, axes.

numpy and the standard library only, so the Slicer panel can import it before PyTorch (or even
SimpleITK's readers) are needed. Arrays are (z, y, x) = voxel axes (k, j, i), as SimpleITK and
``slicer.util.arrayFromVolume`` give them; "axis" below is an axis of that array.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import numpy as np

# Physical axis (LPS or RAS: only the sign differs) each anatomical plane is perpendicular to.
PLANE_NORMALS = {"sagittal": 0, "coronal": 1, "axial": 2}


class VolumeError(ValueError):
    """An image or label volume that cannot be used, with the reason."""


# --- which slices ---------------------------------------------------------------------------
def annotated_slices(labels: np.ndarray, axis: int) -> list[int]:
    """Slices along ``axis`` that hold any non-zero label."""
    other = tuple(a for a in range(labels.ndim) if a != axis)
    return [int(i) for i in np.flatnonzero(np.any(labels != 0, axis=other))]


def evenly_spread(candidates: Sequence[int], count: int) -> list[int]:
    """``count`` of ``candidates`` spread evenly, ends excluded (all of them when fewer)."""
    candidates = list(candidates)
    if count >= len(candidates):
        return candidates
    picks = np.linspace(0, len(candidates) - 1, count + 2)[1:-1] if count > 1 else [len(candidates) / 2 - 0.5]
    return sorted({candidates[int(round(x))] for x in picks})


def format_ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3,7"``."""
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)


# When a fraction is asked for (--val-fraction; the default is 0, nothing held out), fewer annotated slices than this
# all train regardless. Measured (docs/results/NOTES.md): holding one of 5 out, and stopping on it, cost 0.34 mean
# Dice on colin27_aal and 0.10 on colin27_aal_lr; holding 2 of 10 out cost 0.17 on colin27_aal (0.656 against 0.826
# with all ten training). So by default nothing is held out; 10 is where an asked-for fifth still leaves 8 to train.
MIN_SLICES_TO_HOLD_OUT = 10


def holdout_wanted(requested: Optional[Sequence[int]], shots: Optional[int], val_fraction: float) -> bool:
    """Whether the user left the choice of training slices to :func:`plan_slices` with a fraction to hold out
    (it then holds out only from ``MIN_SLICES_TO_HOLD_OUT`` annotated slices on)."""
    return requested is None and shots is None and val_fraction > 0


def plan_slices(
    annotated: Sequence[int], requested: Optional[Sequence[int]], shots: Optional[int], val_fraction: float,
    min_holdout: int = MIN_SLICES_TO_HOLD_OUT,
) -> tuple[list[int], list[int]]:
    """(training slices, validation slices) from the annotated slices and the user's choice.

    ``requested`` slices train as given; else ``shots`` evenly spread ones; else all. The other
    annotated slices validate. When every annotated slice would train (no choice made) and at least
    ``min_holdout`` are annotated, ``val_fraction`` of them are held out for validation; with fewer,
    every one trains (each painted slice is worth more as training data than as a judge).
    """
    from .training.config import TrainingError  # torch-free module

    annotated = list(annotated)
    if not annotated:
        raise TrainingError("The labels have no annotated slice along this axis: draw at least one slice first.")
    if requested is not None:
        missing = [s for s in requested if s not in set(annotated)]
        if missing:
            raise TrainingError(
                f"Slices {missing[:10]} hold no annotation. Annotated slices: {format_ranges(annotated)}.")
        train = list(requested)
    elif shots is not None:
        if shots < 1:
            raise TrainingError("--shots must be at least 1.")
        if shots > len(annotated):
            raise TrainingError(
                f"--shots {shots}: the labels have only {len(annotated)} annotated slice(s) along this axis "
                f"({format_ranges(annotated)}); give --shots {len(annotated)} or fewer, or annotate more slices.")
        train = evenly_spread(annotated, shots)
    else:
        train = list(annotated)
    val = [s for s in annotated if s not in set(train)]
    if not val and holdout_wanted(requested, shots, val_fraction) and len(annotated) >= max(3, min_holdout):
        count = max(1, int(round(len(annotated) * val_fraction)))
        val = evenly_spread(annotated, count)
        train = [s for s in annotated if s not in set(val)]
    return train, val


def parse_slices(text: Optional[str], count: int) -> Optional[list[int]]:
    """``"A:B"`` / ``"A:B:STEP"`` (B exclusive), ``"12,40,77"`` or None -> sorted slice indices, checked against ``count``."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3:
                raise ValueError
            start, stop = parts[0], parts[1]
            step = int(parts[2]) if len(parts) == 3 and parts[2] else 1
            if step < 1:
                raise ValueError
            indices = list(range(int(start or 0), int(stop) if stop else count, step))
        else:
            indices = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VolumeError(f"Slices {text!r} are not 'A:B', 'A:B:STEP' or a comma-separated list of numbers.") from None
    if not indices:
        raise VolumeError(f"Slices {text!r} select no slice.")
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise VolumeError(f"Slices {bad[:5]} are outside the volume, which has slices 0 to {count - 1} on this axis.")
    return sorted(set(indices))


# --- which classes --------------------------------------------------------------------------
def select_classes(labels: np.ndarray, names: list, colors: list, wanted: Optional[list]) -> tuple:
    """Apply a class choice (``--classes``): pick named segments (others become background) or
    rename the values 1..k. Returns (labels, names, colours)."""
    if not wanted:
        return labels, list(names), list(colors)
    if len(set(wanted)) != len(wanted):
        raise ValueError("--classes lists a name twice.")
    if all(w in names for w in wanted) and list(wanted) != list(names):
        return renumber_classes(labels, names, wanted), list(wanted), [colors[names.index(w)] for w in wanted]
    if len(wanted) != len(names):
        raise ValueError(
            f"--classes names {len(wanted)} classes but the labels hold {len(names)} ({', '.join(names)}); "
            "give one name per label value, or names of segments in the .seg.nrrd.")
    return labels, list(wanted), list(colors)


def renumber_classes(labels: np.ndarray, names: Sequence[str], order: Sequence[str]) -> np.ndarray:
    """Labels 1..len(names) (class ``names[v-1]``) -> 1..len(order) in ``order``; classes not in ``order`` -> 0."""
    lookup = np.zeros(len(names) + 1, dtype=np.uint8)
    for new, name in enumerate(order, start=1):
        lookup[list(names).index(name) + 1] = new
    return lookup[labels]


def labels_for_model(model_names: Sequence[str], label_names: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """A label array renumbered to a model's class order: by name, else by order when the counts match."""
    if all(n in label_names for n in model_names):
        extra = [n for n in label_names if n not in model_names]
        if extra:
            import warnings

            warnings.warn(f"the reference labels hold class(es) {extra} that the model does not segment; "
                          "they are left out of the scores.")
        return renumber_classes(labels, label_names, model_names)
    if len(model_names) == len(label_names):
        return labels
    raise ValueError(
        f"The model segments {list(model_names)}, the labels hold {list(label_names)}: name the segments as the "
        "model's classes, or give a label volume with one value per class.")


# --- geometry -------------------------------------------------------------------------------
def bounding_box(mask: np.ndarray, margin: int = 0) -> Optional[list[float]]:
    """(x0, y0, x1, y1) of a 2-D mask's foreground (x1, y1 exclusive), grown by ``margin`` pixels; None when empty."""
    mask = np.asarray(mask) != 0
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return [
        float(max(cols[0] - margin, 0)),
        float(max(rows[0] - margin, 0)),
        float(min(cols[-1] + 1 + margin, width)),
        float(min(rows[-1] + 1 + margin, height)),
    ]


def plane_axes(direction: Sequence[float]) -> dict[str, int]:
    """Map each plane to the voxel axis (i=0, j=1, k=2) closest to its normal.

    ``direction`` is a row-major 3x3 matrix whose columns are the voxel axes in LPS or RAS (ITK's
    direction, or an IJK-to-RAS matrix with spacing: columns are normalised). The best one-to-one
    assignment is used, so a strongly oblique volume still gets three distinct axes.
    """
    matrix = np.abs(np.asarray(direction, dtype=float).reshape(3, 3))
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=0, keepdims=True), 1e-12)
    best = max(itertools.permutations(range(3)), key=lambda perm: sum(matrix[phys, perm[phys]] for phys in range(3)))
    return {plane: best[phys] for plane, phys in PLANE_NORMALS.items()}


def axis_index(direction: Sequence[float], name: str | int = "axial") -> int:
    """The axis of the (z, y, x) array to slice along.

    ``name`` is a plane (axial, coronal, sagittal: from ``direction``), a voxel axis letter i/j/k,
    or a voxel axis number 0-2 (i, j, k).
    """
    if isinstance(name, str) and name.lower() in PLANE_NORMALS:
        voxel_axis = plane_axes(direction)[name.lower()]
    elif str(name).lower() in ("i", "j", "k"):
        voxel_axis = "ijk".index(str(name).lower())
    else:
        try:
            voxel_axis = int(name)
        except (TypeError, ValueError):
            raise VolumeError(f"Unknown slice axis {name!r}; use axial, coronal, sagittal, i, j, k or 0-2.") from None
        if voxel_axis not in (0, 1, 2):
            raise VolumeError(f"Slice axis {voxel_axis} is out of range; a volume has voxel axes 0, 1 and 2.")
    return 2 - voxel_axis


def get_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2-D slice ``index`` along ``axis`` (a copy)."""
    return np.take(array, index, axis=axis)


def slice_view(axis: int, index: int, ndim: int = 3) -> tuple:
    """An index tuple selecting slice ``index`` along ``axis`` (to write into a volume in place)."""
    view: list = [slice(None)] * ndim
    view[axis] = index
    return tuple(view)
