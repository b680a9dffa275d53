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


__all__ = ["stuck_classes", "painted_counts", "STUCK_DICE", "TRAINING_FIT_DICE"]
