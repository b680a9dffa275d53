"""Left and right classes: which class of a label map is the mirror image of which, read from the names.

A slice mirrored left-right shows the right caudate where the left one was. Where the classes come in
named pairs (``caudate_left`` / ``caudate_right``, ``Left-Caudate`` / ``Right-Caudate``, ``Caudate_L`` /
``Caudate_R``, ``lh.insula`` / ``rh.insula``), a mirrored slice is still labelled truly once each class
is swapped with its partner, so training may mirror and inference may average both views
(:func:`MedSAGaLib.training.data.choose_mirror`, :func:`MedSAGaLib.inference.mirror_averaged`).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

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
