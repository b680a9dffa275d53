"""Baselines that learn nothing, for the quality benchmarks: what a user gets without MedSAGa.

Torch-free. ``copy_nearest_slices`` is the simplest thing a Slicer user can do with painted slices:
take each unpainted slice's labels from the nearest painted one (Slicer's *Fill between slices*
interpolates instead; this is its crude cousin). On whole-volume tasks with smooth structures it is
a strong baseline, and a model fine-tuned on the same painted slices should beat it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def nearest_painted(painted: Sequence[int], index: int) -> int:
    """The painted slice index nearest to ``index`` (the lower one on a tie)."""
    if not len(painted):
        raise ValueError("No painted slice to copy from.")
    return min(sorted(int(p) for p in painted), key=lambda p: abs(p - int(index)))


def copy_nearest_slices(painted_labels: Mapping[int, np.ndarray], indices: Sequence[int]) -> np.ndarray:
    """Label slices for ``indices``, each a copy of the nearest painted slice's labels: [len(indices), H, W]."""
    painted = list(painted_labels)
    if not painted:
        raise ValueError("No painted slice to copy from.")
    shapes = {np.shape(v) for v in painted_labels.values()}
    if len(shapes) != 1:
        raise ValueError(f"The painted slices differ in shape: {sorted(shapes)}.")
    return np.stack([np.asarray(painted_labels[nearest_painted(painted, i)]) for i in indices]).astype(np.uint8)


__all__ = ["copy_nearest_slices", "nearest_painted"]
