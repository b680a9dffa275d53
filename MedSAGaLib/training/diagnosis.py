"""After training: name every class the model did not learn, and say what to paint (torch-free)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

STUCK_DICE = 0.05  # validation Dice at or below this counts as "not learned"
# With no held-out slice the check falls back to the painted slices themselves, which flatters the model:
# a class below this Dice on the very slices it trained on is not learned. Measured (5 painted slices, 240 s,
# docs/results/NOTES.md): on colin27_aal every class fit at 0.85-0.92; on colin27_aal_lr the two amygdalae
# fit at 0.28 and 0.44 and scored 0.03 and 0.33 on the unpainted slices, every other class fit at >= 0.58.
TRAINING_FIT_DICE = 0.5
# A class painted on fewer pixels than this (all painted slices together, on the image's own grid) is named even
# when it fits its painted slices: there is too little of it to learn its shape from. Measured on colin27_aal_lr
# (5 painted slices, docs/results/NOTES.md): the two amygdalae, painted on 50 and 130 pixels (the edges of
# structures 14-17 slices long), scored 0.07-0.58 on the unpainted slices in five runs and passed the fit check
# in those of 2026-12-01; every other class of the three tasks was painted on 197 pixels or more and scored 0.60 or more.
MIN_PAINTED_PIXELS = 150


def painted_counts(labels: Sequence[np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels per class 1..k over all slices, number of slices holding each class)."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    slices = np.zeros(num_classes, dtype=np.int64)
    for lab in labels:
        counts = np.bincount(np.asarray(lab).ravel().astype(np.int64), minlength=num_classes + 1)[1 : num_classes + 1]
        pixels += counts
        slices += counts > 0
    return pixels, slices


def stuck_classes(
    val_dice: dict,
    train_labels: Sequence[np.ndarray],
    class_names: Sequence[str],
    val_labels: Optional[Sequence[np.ndarray]] = None,
    threshold: Optional[float] = None,
    on_training_slices: bool = False,
) -> list[str]:
    """One sentence per class whose validation Dice is ~0 (or that validation could not score), with advice.

    ``val_dice`` maps class name -> Dice on the held-out painted slices (NaN where the class is in
    neither prediction nor reference). ``on_training_slices``: the Dice was measured on the training
    slices themselves (nothing was held out), judged against :data:`TRAINING_FIT_DICE`.
    """
    if threshold is None:
        threshold = TRAINING_FIT_DICE if on_training_slices else STUCK_DICE
    names = list(class_names)
    pixels, slices = painted_counts(train_labels, len(names))
    total = max(1, int(pixels.sum()))
    in_val = painted_counts(val_labels, len(names))[1] if val_labels is not None else None
    messages = []
    for c, name in enumerate(names):
        dice = val_dice.get(name) if val_dice else None
        share = f"{pixels[c] / total:.1%} of the painted pixels, on {slices[c]} of {len(train_labels)} training slice(s)"
        if dice is None or (isinstance(dice, float) and math.isnan(dice)):
            if in_val is not None and in_val[c] == 0:
                messages.append(f"'{name}' could not be checked: it is painted on no held-out slice. Paint it on one "
                                "more slice that is not used for training, so the run can tell whether it was learned.")
            continue
        if dice <= threshold:
            advice = ("paint it on more slices, where it is largest" if slices[c] < 3 or pixels[c] / total < 0.05
                      else "check that it is painted consistently (same extent on neighbouring slices)")
            measured = (f"Dice {dice:.2f} on the very slices it was painted on" if on_training_slices
                        else f"validation Dice {dice:.2f}")
            messages.append(f"'{name}' was not learned ({measured}; it is {share}): {advice}, "
                            "then fine-tune again.")
    return messages


def thinly_painted_classes(train_labels: Sequence[np.ndarray], class_names: Sequence[str],
                           named: Sequence[str] = (), min_pixels: int = MIN_PAINTED_PIXELS) -> list[str]:
    """One sentence per class painted on fewer than ``min_pixels`` pixels in all (classes in ``named``,
    already warned about, are left out), with what to paint."""
    pixels, slices = painted_counts(train_labels, len(class_names))
    messages = []
    for c, name in enumerate(class_names):
        if 0 < pixels[c] < min_pixels and not any(f"'{name}'" in m for m in named):
            messages.append(f"'{name}' is painted on only {pixels[c]} pixels ({slices[c]} slice(s)), too few to learn its "
                            "shape from; its unpainted slices may be missed. Paint it on a slice where it is largest, "
                            "then fine-tune again.")
    return messages


__all__ = ["stuck_classes", "thinly_painted_classes", "painted_counts", "STUCK_DICE", "TRAINING_FIT_DICE",
           "MIN_PAINTED_PIXELS"]
