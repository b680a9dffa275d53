"""Left and right classes: which class of a label map is the mirror image of which, read from the names.

A slice mirrored left-right shows the right caudate where the left one was. Where the classes come in
named pairs (``caudate_left`` / ``caudate_right``, ``Left-Caudate`` / ``Right-Caudate``, ``Caudate_L`` /
``Caudate_R``, ``lh.insula`` / ``rh.insula``), a mirrored slice is still labelled truly once each class
is swapped with its partner, so training may mirror and inference may average both views
(:func:`MedSAGaLib.training.data.choose_mirror`, :func:`MedSAGaLib.inference.mirror_averaged`).

Where each pair lies on either side of one column, the pair can also be learnt as one structure
(:class:`SideSplit`): the model segments "caudate", and each pixel of it becomes the left or the right
caudate by the side of the midline it lies on. A few-shot model then learns each structure from both
sides' paint and never has to tell the sides apart by appearance (measured in docs/results/NOTES.md,
"Left and right learnt as one structure").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# one word of a name that says the side, and the word of the other side (case-insensitive)
SIDE_WORDS = {"left": "right", "right": "left", "l": "r", "r": "l", "lh": "rh", "rh": "lh", "lt": "rt", "rt": "lt"}
_WORDS = re.compile(r"[A-Za-z]+|[^A-Za-z]+")


def partner_name(name: str) -> Optional[str]:
    """``name`` with its one side word swapped (``Caudate_L`` -> ``Caudate_R``), or None when it names no side,
    or more than one."""
    parts = _WORDS.findall(name)
    sides = [i for i, part in enumerate(parts) if part.lower() in SIDE_WORDS]
    if len(sides) != 1:
        return None
    i = sides[0]
    other = SIDE_WORDS[parts[i].lower()]
    parts[i] = other.upper() if parts[i].isupper() else other.capitalize() if parts[i][0].isupper() else other
    return "".join(parts)


def mirror_partners(class_names: Optional[Sequence[str]]) -> list[int]:
    """A lookup over label values 0..k: each class's partner on the other side (itself when it has none).
    Names match case-insensitively; background (0) is its own partner."""
    names = list(class_names or [])
    index = {str(n).strip().lower(): value for value, n in enumerate(names, start=1)}
    lookup = list(range(len(names) + 1))
    for value, name in enumerate(names, start=1):
        other = partner_name(str(name).strip())
        partner = index.get(other.lower()) if other else None
        if partner is not None and partner != value:
            lookup[value] = partner
    # only mutual pairs (two classes spelt alike would otherwise pair three ways)
    return [value if lookup[lookup[value]] != value else partner for value, partner in enumerate(lookup)]


def swapped_pairs(lookup: Sequence[int]) -> list[tuple[int, int]]:
    """The (left, right) value pairs a lookup of :func:`mirror_partners` swaps, each once."""
    return [(value, partner) for value, partner in enumerate(lookup) if value < partner]


# a pair is split cleanly when at most this share of either class's painted pixels lies on the wrong side
SIDE_SPLIT_TOLERANCE = 0.005


@dataclass(frozen=True)
class SideSplit:
    """Classes learnt as one structure per left/right pair, and split again at a midline.

    ``merged``: a lookup over the user's label values 0..k -> the head's classes 0..k'; ``first`` and
    ``second``: for each head class 0..k', the user's class on the columns before ``midline`` and on those
    from it (the same value for a class without a partner); ``names``: the head's k' class names. Columns
    are those of a whole slice, along the model's slice axis, ``width`` columns wide (the grid the model was
    fine-tuned on: like the crop's box, the midline is not moved to fit another grid).
    """

    merged: tuple
    first: tuple
    second: tuple
    midline: float
    names: tuple
    width: Optional[int] = None

    @property
    def num_classes(self) -> int:
        """The user's classes (k)."""
        return len(self.merged) - 1

    def merge(self, labels: np.ndarray) -> np.ndarray:
        """The user's label values -> the head's (each pair becomes its one structure)."""
        return np.asarray(self.merged, dtype=np.uint8)[np.asarray(labels)]

    def split(self, probabilities):
        """Head probabilities [k'+1, H, W] of a whole slice -> the user's [k+1, H, W]: each structure's
        probability goes to the class on its side of the midline, its partner gets 0 there."""
        import torch

        height, width = probabilities.shape[-2:]
        if self.width is not None and width != self.width:
            raise ValueError(f"The model splits left from right at column {self.midline:.1f} of slices {self.width} "
                             f"columns wide, and these are {width}: segment scans on the grid it was fine-tuned on "
                             "(or fine-tune with --sides off).")
        before = (torch.arange(width) < self.midline).to(probabilities.dtype).expand(height, width)
        out = probabilities.new_zeros((self.num_classes + 1, height, width))
        for head, (a, b) in enumerate(zip(self.first, self.second)):
            if a == b:
                out[a] = probabilities[head]
            else:
                out[a] = probabilities[head] * before
                out[b] = probabilities[head] * (1 - before)
        return out

    def to_dict(self) -> dict:
        return {"merged": list(self.merged), "first": list(self.first), "second": list(self.second),
                "midline": float(self.midline), "names": list(self.names), "width": self.width}

    @classmethod
    def from_dict(cls, data, num_classes: int) -> "SideSplit":
        """A split read from a model file (untrusted): ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("it is not a mapping")
        try:
            merged, first, second = (tuple(data[key]) for key in ("merged", "first", "second"))
            names, midline = tuple(str(n) for n in data["names"]), data["midline"]
        except (KeyError, TypeError):
            raise ValueError("it lacks merged, first, second, midline or names") from None
        values = merged + first + second
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("its class values are not whole numbers")
        heads = len(names)
        if (len(merged) != num_classes + 1 or len(first) != heads + 1 or len(second) != heads + 1
                or merged[0] != 0 or first[0] != 0 or second[0] != 0):
            raise ValueError(f"its lookups do not fit {num_classes} classes and {heads} structures")
        if not isinstance(midline, (int, float)) or isinstance(midline, bool) or not np.isfinite(midline):
            raise ValueError(f"its midline is {midline!r}")
        width = data.get("width")
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or not 0 <= midline <= width):
            raise ValueError(f"its slice width is {width!r} (midline {midline!r})")
        # every user class comes from exactly the head class it merges into, on one side
        for value in range(1, num_classes + 1):
            head = merged[value]
            if not 1 <= head <= heads or value not in (first[head], second[head]):
                raise ValueError(f"class {value} is not split back from the structure it merges into")
        if sorted(v for h in range(1, heads + 1) for v in {first[h], second[h]}) != list(range(1, num_classes + 1)):
            raise ValueError("its structures do not give back every class once")
        return cls(merged, first, second, float(midline), names, width)


def pair_stem(name: str) -> str:
    """The name without its side word (``caudate_left`` -> ``caudate``, ``Left-Caudate`` -> ``Caudate``);
    empty for a name that is only a side (``left``)."""
    parts = _WORDS.findall(name)
    return "".join(p for p in parts if p.lower() not in SIDE_WORDS).strip(" _-.")


def choose_sides(labels: Sequence[np.ndarray], class_names: Optional[Sequence[str]], setting: str = "auto"
                 ) -> tuple[Optional[SideSplit], str]:
    """(split or None, why): learn each left/right pair (named as one structure on two sides) as one structure
    when every such pair is painted on either side of one column (``auto``); ``off`` learns the sides
    apart. Labels are whole slices, values 1..k named ``class_names``."""
    if setting == "off":
        return None, "left and right learnt apart (--sides off)"
    names = [str(n) for n in (class_names or [])]
    partners = mirror_partners(names)
    pairs = [(a, b) for a, b in swapped_pairs(partners) if pair_stem(names[a - 1])]
    if not pairs:
        return None, ""  # no structure named on both sides: nothing to say
    arrays = [np.asarray(lab) for lab in labels]
    if len({a.shape for a in arrays}) != 1:
        return None, "left and right learnt apart: the painted slices differ in shape"
    stack = np.stack(arrays)
    columns = {}
    for a, b in pairs:
        cols_a, cols_b = np.nonzero(stack == a)[-1], np.nonzero(stack == b)[-1]
        if not (cols_a.size and cols_b.size):
            painted = names[(a if cols_a.size else b) - 1]
            return None, f"left and right learnt apart: {painted} is painted without its other side"
        columns[(a, b)] = (cols_a, cols_b)
    midline = float(np.mean([(ca.mean() + cb.mean()) / 2 for ca, cb in columns.values()]))
    low_side, crossing = {}, []
    for (a, b), (ca, cb) in columns.items():
        (low, cl), (high, ch) = sorted(((a, ca), (b, cb)), key=lambda item: item[1].mean())
        if np.mean(cl >= midline) > SIDE_SPLIT_TOLERANCE or np.mean(ch < midline) > SIDE_SPLIT_TOLERANCE:
            crossing.append(names[a - 1])
        low_side[a] = low_side[b] = (low, high)
    if crossing:
        return None, (f"left and right learnt apart: {', '.join(crossing[:3])} and the other side are not painted "
                      f"on either side of one column (the midline of the painted pairs is column {midline:.1f})")
    merged, first, second, heads = [0], [0], [0], []
    head_of = {}
    for value, name in enumerate(names, start=1):
        low, high = low_side.get(value, (value, value))
        if low not in head_of:
            head_of[low] = len(heads) + 1
            heads.append(pair_stem(name) if low != high else name)
            first.append(low)
            second.append(high)
        merged.append(head_of[low])
    if len({h.lower() for h in heads}) != len(heads):
        return None, "left and right learnt apart: a structure's name without its side is already another class's"
    split = SideSplit(tuple(merged), tuple(first), tuple(second), midline, tuple(heads), int(stack.shape[-1]))
    shown = ", ".join(heads[h - 1] for h in range(1, len(heads) + 1) if first[h] != second[h])
    return split, (f"left and right learnt as one structure each ({shown}), split at column {midline:.1f} of the "
                   "slice, the midline of the painted pairs (--sides off to learn them apart)")
