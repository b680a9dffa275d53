"""Few-shot slices -> model tensors, with augmentation suited to a handful of slices (MONAI).

Spatial augmentation (small rotation, zoom and shift) and intensity augmentation (scale, shift,
gamma) are applied to image and labels together. Mirroring left and right is used only where it keeps
every label true (:func:`choose_mirror`): a mirrored slice shows a structure painted as "left" on the
right. When the front of the encoder is frozen, each
training slice is expanded once into a fixed pool of versions (the first unaugmented) whose frozen
features are computed once; steps then sample from that pool.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from ..laterality import mirror_partners, swapped_pairs
from ..preprocess import SliceTransform
from .config import SWITCHES, TrainingError


# a class counts as painted on both sides when at least this share of its pixels lies on its smaller side
MIRROR_MIN_SIDE_SHARE = 0.25


def choose_mirror(labels: Sequence[np.ndarray], setting: str = "auto",
                  class_names: Optional[Sequence[str]] = None) -> tuple[bool, str]:
    """Whether training may mirror slices left-right, and why (a sentence for the run's decisions).

    ``"auto"`` mirrors only when every painted class lies on both sides of the middle of the painted
    structures (caudate left and right as one class; grey matter), or lies on one side and its partner
    by name on the other (``caudate_left`` / ``caudate_right``; :mod:`MedSAGaLib.laterality`), which a
    mirrored copy then swaps (:func:`build_augmentation`'s ``swap``): either way a mirrored slice is
    still labelled truly. A class painted on one side only without such a partner (a single lesion)
    turns it off. Measured on colin27_aal_lr, where each class is one side's structure: mirroring
    without the swap taught "left" on both sides (docs/results/NOTES.md, "Realistic tasks").
    """
    if setting not in SWITCHES:
        raise TrainingError(f"Unknown --mirror {setting!r}; choose {', '.join(SWITCHES)}.")
    if setting != "auto":
        return setting == "on", f"mirroring {setting} (--mirror {setting})"
    arrays = [np.asarray(lab) for lab in labels]
    if len({a.shape for a in arrays}) != 1:
        return False, "no mirroring: the painted slices differ in shape"
    stack = np.stack(arrays)
    columns = np.flatnonzero((stack > 0).any(axis=(0, 1)))
    if columns.size == 0:
        return False, "no mirroring: nothing painted"
    middle = (columns[0] + columns[-1]) / 2.0
    col = np.arange(stack.shape[2])
    side = {}  # value -> -1 (before the middle), +1 (after it) or 0 (both sides)
    for value in np.unique(stack[stack > 0]).tolist():
        per_column = np.count_nonzero(stack == value, axis=(0, 1))
        left, right = per_column[col < middle].sum(), per_column[col > middle].sum()
        side[value] = 0 if min(left, right) >= MIRROR_MIN_SIDE_SHARE * max(1, left + right) else (-1 if left > right else 1)
    partners = mirror_partners(class_names)
    # a one-sided class is still true when mirrored if its partner by name lies on the other side
    one_sided = [v for v, s in side.items()
                 if s != 0 and not (v < len(partners) and partners[v] != v and side.get(partners[v]) == -s)]

    def name(v: int) -> str:
        return class_names[v - 1] if class_names and v <= len(class_names) else f"label {v}"

    if one_sided:
        names = [name(v) for v in one_sided]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return False, (f"no mirroring: {shown} painted on one side only, and a mirrored slice would show "
                       f"{'it' if len(names) == 1 else 'them'} on the other (--mirror on to force it)")
    pairs = [(a, b) for a, b in swapped_pairs(partners) if side.get(a, 0) != 0]
    if pairs:
        shown = ", ".join(f"{name(a)} / {name(b)}" for a, b in pairs[:3]) + (
            f" and {len(pairs) - 3} more pairs" if len(pairs) > 3 else "")
        return True, (f"mirroring left-right, swapping {shown} in a mirrored slice: every class lies on both sides "
                      "of the middle or has its partner by name on the other side")
    return True, "mirroring left-right: every class is painted on both sides of the middle"


def build_augmentation(seed: int = 0, mirror: bool = False, swap: Optional[Sequence[int]] = None):
    """MONAI dictionary transforms for ``{"image": [3,S,S] in [0,1], "label": [1,S,S]}``.

    ``mirror``: also flip left-right half the time (only where :func:`choose_mirror` allows it); ``swap``:
    the label lookup a flipped copy gets (:func:`MedSAGaLib.laterality.mirror_partners`: left and right
    classes exchanged), None or the identity for none.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    flips = [RandMirrorSwapd(swap, prob=0.5)] if mirror else []
    transform = Compose(
        flips + [
            RandAffined(
                keys=("image", "label"),
                prob=0.8,
                rotate_range=(np.pi / 12,),
                scale_range=(0.1, 0.1),
                translate_range=(8, 8),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.5),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


class RandMirrorSwapd(RandomizableTransform, MapTransform):
    """Flip ``image`` and ``label`` left-right (the last axis) with probability ``prob``, and exchange the
    left and right classes of a flipped label by ``swap`` (a lookup over the label values; None: no
    exchange, MONAI's ``RandFlipd`` with the same draws)."""

    def __init__(self, swap: Optional[Sequence[int]] = None, prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, ("image", "label"))
        self.swap = None if swap is None else torch.as_tensor(list(swap), dtype=torch.long)

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        out = dict(data)
        out["image"] = torch.as_tensor(data["image"]).flip(-1)
        label = torch.as_tensor(data["label"]).flip(-1)
        out["label"] = label if self.swap is None else self.swap[label.round().long()].to(label.dtype)
        return out


def augment(transform, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = transform({"image": image.clone(), "label": label[None].float()})
    # plain tensors: MONAI returns MetaTensors, whose bookkeeping on every operation would follow them into
    # the frozen features computed from them and slow each training step that reads those features
    img = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp_(0.0, 1.0)
    lab = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)[0].round().long()
    return img, lab


def check_training_data(
    images01: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int, class_names=None
) -> None:
    """Clear messages for inputs a fine-tuning cannot use."""
    if len(images01) == 0:
        raise TrainingError("No annotated slice to train on: the labels are empty in every selected slice.")
    if len(images01) != len(labels):
        raise TrainingError(f"{len(images01)} image slices but {len(labels)} label slices.")
    present = set()
    for i, (img, lab) in enumerate(zip(images01, labels)):
        if np.shape(img) != np.shape(lab):
            raise TrainingError(f"Training slice {i}: image {np.shape(img)} and labels {np.shape(lab)} differ in shape.")
        values = np.unique(lab)
        if values.min() < 0 or values.max() > num_classes:
            raise TrainingError(f"Training slice {i} has label values {values.tolist()} outside 0..{num_classes}.")
        present.update(int(v) for v in values)
    names = list(class_names or [f"class {c}" for c in range(1, num_classes + 1)])
    missing = [names[c - 1] for c in range(1, num_classes + 1) if c not in present]
    if missing:
        raise TrainingError(
            "These classes appear in no training slice, so the model cannot learn them: "
            + ", ".join(missing)
            + ". Annotate them on at least one training slice, or pick slices that contain them."
        )


class FewShotSlices:
    """Training (or validation) slices as model-size tensors."""

    def __init__(self, images01: Sequence[np.ndarray], labels: Sequence[np.ndarray], image_size: int) -> None:
        tf = SliceTransform(image_size)
        self.images = [tf.to_model(np.asarray(img, dtype=np.float32)) for img in images01]
        self.labels = [tf.to_model_labels(np.asarray(lab)) for lab in labels]

    def __len__(self) -> int:
        return len(self.images)

    def augmented_pool(self, copies: int, augment_enabled: bool, seed: int = 0, mirror: bool = False,
                       swap: Optional[Sequence[int]] = None):
        """``copies`` versions of every slice (the first unaugmented): lists of images and labels."""
        transform = build_augmentation(seed, mirror, swap) if augment_enabled and copies > 1 else None
        images, labels = [], []
        for img, lab in zip(self.images, self.labels):
            images.append(img)
            labels.append(lab)
            if transform is not None:
                # each slice's copies depend on the seed and that slice alone, so a run with one slice
                # more (Slicer's correct-and-retrain loop) makes the same copies of the others and finds
                # their features in the feature store
                transform.set_random_state(seed=_slice_seed(seed, img, lab))
            for _ in range(copies - 1 if transform is not None else 0):
                a, b = augment(transform, img, lab)
                images.append(a)
                labels.append(b)
        return images, labels


def _slice_seed(seed: int, image: torch.Tensor, label: torch.Tensor) -> int:
    import hashlib

    digest = hashlib.sha256(repr(seed).encode())
    digest.update(image.contiguous().numpy().tobytes())
    digest.update(label.contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:4], "little")


class BatchSampler:
    """Shuffled passes over a pool of indices, ``batch_size`` at a time."""

    def __init__(self, count: int, batch_size: int, seed: int = 0) -> None:
        self.count = count
        self.batch_size = min(batch_size, count) if count else batch_size
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(self.rng.permutation(self.count))
            batch.append(int(self.order.pop()))
        return batch


def select_validation(count: int, limit: Optional[int]) -> list[int]:
    """Up to ``limit`` indices evenly spread over ``count`` validation slices."""
    if not limit or count <= limit:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, limit)})
