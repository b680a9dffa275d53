"""The painted slices of the volume being segmented, used as evidence for the slices between them.

A model adapted on a few painted slices of a volume is then asked to segment the rest of that same
volume. The painted slices themselves say much about their neighbours: a deep structure one slice
away from a painted one has almost the same outline. So where the user's painted slices are at hand
(the Slicer panel always has them; ``medsaga segment/evaluate --painted``), each unpainted slice's
class probabilities are blended with the painted labels interpolated from its two painted neighbours,
the more the nearer it lies to one, within a few millimetres (:meth:`PaintedSlices.blend`); the painted slices keep their labels;
and a class loses the pieces of the result that are not connected to its painted parts
(:func:`keep_connected_to_painted`, with a rule that leaves separately painted lesions alone), which
removes a structure "seen" on slices far from where it was painted. The measurements behind the weight are in docs/results/NOTES.md.

Use it only on the volume that was painted: on another scan the painted labels mean nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage

from .slices import annotated_slices, slice_view

# The painted labels' share of a slice next to a painted one, falling linearly with the distance to the
# nearest painted slice to 0 at PAINTED_REACH_MM. Chosen on colin27_aal and MNI152 (a longer reach or a larger
# share helped the small structures more but cost MNI152's cortex, painted every 26 mm) and checked on
# colin27_aal_lr: docs/results/NOTES.md, "Segmenting with the painted slices".
PAINTED_WEIGHT = 0.7
PAINTED_REACH_MM = 6.0


@dataclass
class PaintedSlices:
    """Class labels 0..k painted on some slices (``indices``) of a volume, along ``axis``, whose slices lie
    ``slice_spacing_mm`` apart."""

    labels: np.ndarray  # the volume's grid (z, y, x); only the slices in ``indices`` are read
    axis: int
    num_classes: int
    slice_spacing_mm: float
    indices: list = field(default_factory=list)
    weight: float = PAINTED_WEIGHT
    reach_mm: float = PAINTED_REACH_MM

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            raise ValueError(f"Painted labels must be a 3-D volume, not of shape {self.labels.shape}.")
        if not (np.isfinite(self.slice_spacing_mm) and self.slice_spacing_mm > 0 and self.reach_mm > 0):
            raise ValueError(f"Slice spacing ({self.slice_spacing_mm}) and reach ({self.reach_mm}) must be positive.")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"The painted slices' weight must lie in [0, 1], not {self.weight}.")
        if self.labels.size and int(self.labels.max()) > self.num_classes:
            raise ValueError(f"Painted labels hold the value {int(self.labels.max())}, but the model has "
                             f"{self.num_classes} classes.")
        if not self.indices:
            self.indices = annotated_slices(self.labels, self.axis)
        self.indices = sorted(int(i) for i in self.indices)
        if not self.indices:
            raise ValueError("The painted labels hold no painted slice along the model's slice axis.")
        self._one_hot: dict = {}

    def most_pieces(self, value: int) -> int:
        """The most pieces (8-connected regions) class ``value`` has on any one painted slice."""
        return max(ndimage.label(self.slice_labels(i) == value, structure=np.ones((3, 3), dtype=bool))[1]
                   for i in self.indices)

    def slice_labels(self, index: int) -> np.ndarray:
        return self.labels[slice_view(self.axis, index)]

    def _fractions(self, index: int) -> np.ndarray:
        if index not in self._one_hot:
            self._one_hot[index] = np.eye(self.num_classes + 1, dtype=np.float32)[self.slice_labels(index)]
        return self._one_hot[index]  # [H, W, k+1]

    def prior(self, index: int) -> Optional[tuple[np.ndarray, float]]:
        """(class fractions [k+1, H, W], weight) the painted slices give slice ``index``: the labels of its two
        painted neighbours mixed by nearness (the nearest one beyond the outermost), weighted by the distance
        to the nearest painted slice; None where they give nothing (a painted slice, or beyond the reach)."""
        if index in self.indices or self.weight == 0.0:
            return None
        below = [i for i in self.indices if i < index]
        above = [i for i in self.indices if i > index]
        nearest = min(abs(index - i) for i in self.indices)
        weight = self.weight * max(0.0, 1 - nearest * self.slice_spacing_mm / self.reach_mm)
        if weight == 0.0:
            return None
        if below and above:
            lower, upper = below[-1], above[0]
            along = (index - lower) / (upper - lower)
            fractions = (1 - along) * self._fractions(lower) + along * self._fractions(upper)
        else:
            fractions = self._fractions(below[-1] if below else above[0])
        return np.moveaxis(fractions, -1, 0), weight

    def blend(self, probabilities: np.ndarray, index: int) -> np.ndarray:
        """Class probabilities [k+1, H, W] of slice ``index`` blended with :meth:`prior`."""
        prior = self.prior(index)
        if prior is None:
            return probabilities
        fractions, weight = prior
        if fractions.shape != probabilities.shape:
            raise ValueError(f"Painted slice shape {fractions.shape[1:]} does not match the prediction's "
                             f"{probabilities.shape[1:]}.")
        return (1 - weight) * probabilities + weight * fractions

    def finish(self, labels: np.ndarray, segmented=None) -> dict:
        """After every slice is blended: :meth:`restore` the painted slices, then
        :func:`keep_connected_to_painted` (which needs them restored). Returns its {class value: voxels removed}."""
        return keep_connected_to_painted(self.restore(labels), self, segmented)

    def restore(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` with every painted slice set to what was painted (in place; returned)."""
        for index in self.indices:
            labels[slice_view(self.axis, index)] = self.slice_labels(index)
        return labels


def keep_connected_to_painted(labels: np.ndarray, painted: PaintedSlices, segmented=None) -> dict:
    """Remove, class by class, the pieces of ``labels`` (in place) not connected to that class's painted
    parts (face, edge or corner neighbours in 3-D), where those parts lie in no more connected regions of
    the result than the class has pieces on its most divided painted slice: one structure, or a structure on
    each side painted on the same slices, is judged; a class painted on different slices in pieces the
    result does not join (separate lesions, say) is left alone, as is a class with nothing painted.

    ``labels`` must hold the painted slices as painted (:meth:`PaintedSlices.restore`). Only the pieces within a run of consecutive labelled slices (``segmented``, default all, and the
    painted ones) that reaches a painted slice are judged: a slice segmented on its own, away from the
    painted ones, is never emptied. Returns {class value: voxels removed} for the classes that lost any.
    """
    count = labels.shape[painted.axis]
    covered = np.zeros(count, dtype=bool)
    covered[list(range(count)) if segmented is None else [int(i) for i in segmented]] = True
    covered[painted.indices] = True
    run = np.cumsum(np.concatenate([[True], ~covered[:-1] | ~covered[1:]]))  # a new run id after each gap
    judged = np.zeros(count, dtype=bool)
    judged_runs = set(run[painted.indices])
    judged[[i for i in range(count) if covered[i] and run[i] in judged_runs]] = True
    shape = [1, 1, 1]
    shape[painted.axis] = count
    judged = judged.reshape(shape)
    seeds = np.zeros(labels.shape, dtype=bool)
    for index in painted.indices:
        seeds[slice_view(painted.axis, index)] = True
    removed = {}
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in range(1, painted.num_classes + 1):
        mask = labels == value
        regions, pieces = ndimage.label(mask, structure=structure)
        if pieces <= 1:
            continue
        touched = np.unique(regions[seeds & mask])
        touched = touched[touched > 0]
        if len(touched) == 0 or len(touched) > painted.most_pieces(value):
            continue
        stray = mask & ~np.isin(regions, touched) & judged
        if stray.any():
            removed[value] = int(stray.sum())
            labels[stray] = 0
    return removed


def painted_along(labels: np.ndarray, axis: int, class_names, names, slice_spacing_mm: float,
                  what: str = "--painted") -> PaintedSlices:
    """PaintedSlices from a label volume (values 1..n named ``names``, as :func:`MedSAGaLib.segio.read_class_labels`
    gives) for a model with ``class_names``, along the model's slice ``axis``: segments are matched by name; a
    plain label volume's value v is the model's class v. Refuses labels painted along another axis: along the model's axis
    the painted slices must be the fewest."""
    from .slices import labels_for_model

    values = [re.fullmatch(r"label_(\d+)", str(n)) for n in names]
    if all(values) and not all(n in names for n in class_names):
        # a plain label volume: its value v is the model's class v (read_class_labels numbered them 1..n)
        original = [int(v.group(1)) for v in values]
        if max(original) > len(class_names):
            raise ValueError(f"{what}: label value {max(original)} is not a class of the model "
                             f"({len(class_names)} classes: {', '.join(class_names)}).")
        lookup = np.zeros(len(names) + 1, dtype=np.uint8)
        lookup[1:] = original
        labels = lookup[labels]
    else:
        labels = labels_for_model(list(class_names), list(names), labels)
    along = [annotated_slices(labels, a) for a in range(3)]
    counts = [len(indices) for indices in along]
    if counts[axis] == 0:
        raise ValueError(f"{what}: no class of the model is painted.")
    if any(counts[axis] > counts[a] for a in range(3) if a != axis):
        raise ValueError(f"{what}: the labels lie on {counts[axis]} slices along the model's slice axis but on fewer "
                         f"along another ({counts}); paint whole slices along the axis the model segments.")
    return PaintedSlices(labels.astype(np.uint8), axis, len(class_names), slice_spacing_mm, indices=along[axis])


# --- the scan a model was fine-tuned on ------------------------------------------------------------
# A model file records fingerprints (hashes, no voxel or label content) of the scan it was fine-tuned on and of its
# training slices' labels, so that `medsaga segment` on that same scan can find the painted slices by itself.
def volume_fingerprint(image, array: np.ndarray) -> str:
    """A hash of a volume's voxels and grid (spacing, origin, direction): equal for the same scan in any file format
    that keeps its voxel values."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(repr((tuple(array.shape), tuple(round(float(v), 6) for v in image.GetSpacing()),
                        tuple(round(float(v), 4) for v in image.GetOrigin()),
                        tuple(round(float(v), 6) for v in image.GetDirection()))).encode())
    digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def labels_fingerprint(labels: np.ndarray, axis: int, indices) -> str:
    """A hash of the class labels (in the model's class order) on slices ``indices`` along ``axis``."""
    import hashlib

    digest = hashlib.sha256()
    for index in sorted(int(i) for i in indices):
        digest.update(str(index).encode())
        digest.update(np.ascontiguousarray(labels[slice_view(axis, index)], dtype=np.uint8).tobytes())
    return digest.hexdigest()
