"""A region of interest around the painted structures: train and segment at a higher effective resolution.

The model input is 256 px (LiteMedSAM): a whole 217 x 181 mm brain slice shrinks so that a 4 mm
pallidum covers about one cell of the encoder's 64 x 64 feature map. Cropping every slice to the box
that holds what was painted (plus a margin) before the resize gives the same structures 2-3x more
pixels. The box is taken from the training labels only, kept in the model file, and applied again
when segmenting; outside it everything is background. Torch-free (numpy only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Measured on the realistic tasks (docs/results/NOTES.md, "Realistic tasks"): a crop pays off when the
# painted structures fill less than this fraction of the slice's area; large classes (MNI152 GM/WM)
# cover most of it, and cropping gains nothing there.
CROP_BELOW_AREA = 0.5
DEFAULT_MARGIN = 0.25  # of the box's height and width, on every side


@dataclass(frozen=True)
class RegionOfInterest:
    """Rows ``y0:y1`` and columns ``x0:x1`` of slices of shape ``slice_shape``."""

    y0: int
    y1: int
    x0: int
    x1: int
    slice_shape: tuple

    @classmethod
    def around(cls, label_slices: Sequence[np.ndarray], margin: float = DEFAULT_MARGIN) -> Optional["RegionOfInterest"]:
        """The box of every labelled pixel of ``label_slices``, grown by ``margin`` x its size; None if empty."""
        stack = np.stack([np.asarray(s) for s in label_slices])
        mask = np.any(stack > 0, axis=0)
        if not mask.any():
            return None
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        grow_y, grow_x = int(math.ceil(margin * height)), int(math.ceil(margin * width))
        shape = mask.shape
        return cls(max(0, int(rows[0]) - grow_y), min(shape[0], int(rows[-1]) + 1 + grow_y),
                   max(0, int(cols[0]) - grow_x), min(shape[1], int(cols[-1]) + 1 + grow_x), tuple(int(s) for s in shape))

    @property
    def area_fraction(self) -> float:
        return (self.y1 - self.y0) * (self.x1 - self.x0) / float(self.slice_shape[0] * self.slice_shape[1])

    def crop(self, slice2d: np.ndarray) -> np.ndarray:
        self._check(slice2d)
        return np.asarray(slice2d)[self.y0 : self.y1, self.x0 : self.x1]

    def paste(self, cropped_labels: np.ndarray) -> np.ndarray:
        """Labels of the crop -> labels of the whole slice (background outside the box)."""
        out = np.zeros(self.slice_shape, dtype=np.asarray(cropped_labels).dtype)
        out[self.y0 : self.y1, self.x0 : self.x1] = cropped_labels
        return out

    def _check(self, slice2d) -> None:
        if tuple(np.shape(slice2d)) != tuple(self.slice_shape):
            raise ValueError(f"The region of interest was made for slices of shape {tuple(self.slice_shape)}, "
                             f"not {tuple(np.shape(slice2d))}; segment along the axis the model was trained on.")

    def to_dict(self) -> dict:
        return {"y0": self.y0, "y1": self.y1, "x0": self.x0, "x1": self.x1, "slice_shape": list(self.slice_shape)}

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["RegionOfInterest"]:
        if not data:
            return None
        return cls(int(data["y0"]), int(data["y1"]), int(data["x0"]), int(data["x1"]), tuple(int(s) for s in data["slice_shape"]))


def choose_roi(label_slices: Sequence[np.ndarray], mode: str = "auto", margin: float = DEFAULT_MARGIN
               ) -> tuple[Optional[RegionOfInterest], str]:
    """(box or None, why): ``auto`` crops when the painted structures' box is small, ``on`` always, ``off`` never."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"Unknown crop mode {mode!r}; choose auto, on or off.")
    if mode == "off":
        return None, "crop off (asked)"
    roi = RegionOfInterest.around(label_slices, margin)
    if roi is None:
        return None, "no painted pixel"
    if mode == "auto" and roi.area_fraction >= CROP_BELOW_AREA:
        return None, (f"no crop: the painted structures and margin cover {roi.area_fraction:.0%} of the slice "
                      f"(a crop helps below {CROP_BELOW_AREA:.0%})")
    return roi, (f"cropping to rows {roi.y0}-{roi.y1 - 1}, columns {roi.x0}-{roi.x1 - 1} "
                 f"({roi.area_fraction:.0%} of the slice) around the painted structures")
