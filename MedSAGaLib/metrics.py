"""Segmentation metrics in one place (MONAI's Dice and Hausdorff distance): training validation,
``medsaga evaluate``, the demo and the benchmarks all score with these.

Dice of a class is pooled over all given pixels (the slices as one volume): NaN where the class is
in neither prediction nor reference, 0 where only one of them holds it. HD95 is per slice (in-plane,
mm) and averaged over the slices where both hold the class.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

ArrayLike = "np.ndarray | torch.Tensor"


def _flat(masks: Sequence) -> torch.Tensor:
    return torch.cat([torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).reshape(-1)
                      for m in masks])


def dice_per_class(pred: Sequence, ref: Sequence, num_classes: int) -> list[float]:
    """Dice of classes 1..k between label maps ``pred`` and ``ref`` (stacks or lists of arrays of any
    shapes, pairwise equal), pooled over all their pixels."""
    p, g = _flat(pred), _flat(ref)
    if p.shape != g.shape:
        raise ValueError(f"Prediction and reference differ in size: {tuple(p.shape)} vs {tuple(g.shape)}.")
    out = []
    for c in range(1, num_classes + 1):
        pc, gc = p == c, g == c
        if not (pc.any() or gc.any()):
            out.append(float("nan"))
            continue
        # [batch 1, channels (not c, c), pixels] in float64: the ratio of exact counts, rounded once
        one_hot = lambda m: torch.stack([~m, m]).to(torch.float64)[None]  # noqa: E731
        out.append(float(compute_dice(one_hot(pc), one_hot(gc), include_background=False, ignore_empty=False)[0, 0]))
    return out


def hd95_per_slice(pred: np.ndarray, ref: np.ndarray, label: int, spacing2d: Sequence[float]) -> list[float]:
    """HD95 (mm) of class ``label`` on each slice of (n, H, W) stacks where both hold it."""
    both = [i for i in range(pred.shape[0]) if (pred[i] == label).any() and (ref[i] == label).any()]
    if not both:
        return []
    p = torch.as_tensor(np.stack([pred[i] == label for i in both]))[:, None]
    g = torch.as_tensor(np.stack([ref[i] == label for i in both]))[:, None]
    values = compute_hausdorff_distance(torch.cat([~p, p], 1).float(), torch.cat([~g, g], 1).float(),
                                        include_background=False, percentile=95, spacing=list(spacing2d))
    return [float(v) for v in values.reshape(-1)]


def evaluate_labels(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing2d: Sequence[float]) -> dict:
    """Per class 1..k of (n, H, W) label stacks: Dice (pooled), HD95 in mm (mean over slices where both
    hold the class), how many slices that was, and on how many slices only one of them holds it."""
    dice = dice_per_class(pred, ref, num_classes)
    out = {}
    for c in range(1, num_classes + 1):
        hd = hd95_per_slice(pred, ref, c, spacing2d)
        finite = [v for v in hd if math.isfinite(v)]
        only = sum(1 for i in range(pred.shape[0]) if (pred[i] == c).any() != (ref[i] == c).any())
        out[c] = {"dice": dice[c - 1], "hd95_mm": float(np.mean(finite)) if finite else float("nan"),
                  "slices": len(hd), "slices_one_empty": only}
    return out


def mean_finite(values) -> float:
    """Mean of the finite values (a dict's values or a sequence); NaN when there is none."""
    values = [float(v) for v in (values.values() if isinstance(values, dict) else values)
              if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")
