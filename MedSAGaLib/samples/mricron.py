"""Expert-labelled brain atlases that Debian's ``mricron-data`` package installs (nothing downloads).

``apt-get install mricron-data`` puts the files under ``/usr/share/mricron/templates``; ``make install``
and ``.ci/run`` install it. Two tasks of small structures come from it:

- ``colin27_aal``: the Colin27 single-subject T1 (``ch2.nii.gz``, 1 mm, 181 x 217 x 181) with the AAL
  atlas (``aal.nii.gz``), which was delineated by hand on this same brain (Tzourio-Mazoyer et al.,
  NeuroImage 2002). Six deep grey-matter structures, left and right merged into one class each.
- ``colin27_aal_lr``: the same volume and atlas, the same six structures with left and right apart
  (12 classes), on coronal slices: twelve small classes in symmetric pairs.

Both come from one volume: training and test slices are different slices of the same brain, so
neither says how a model adapted on one scan does on the next. The package ships no second T1 with
expert labels of its own: the other label maps (JHU, Harvard-Oxford, AICHA) sit on templates that are
not in the package, and the macaque template's NeuroMaps labels come without their name table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEMPLATES = Path("/usr/share/mricron/templates")
PACKAGE = "mricron-data"

SOURCE = (
    "Debian package mricron-data (MRIcron templates, Chris Rorden): Colin27 T1 'ch2.nii.gz' (Holmes et al., "
    "J Comput Assist Tomogr 1998, Montreal Neurological Institute) and the AAL atlas 'aal.nii.gz' + 'aal.nii.txt', "
    "manually delineated on that brain (Tzourio-Mazoyer et al., NeuroImage 15:273-289, 2002)."
)
LICENCE = (
    "Debian's copyright file for mricron-data declares BSD-3-clause (Chris Rorden) for every file it ships. "
    "Upstream, AAL is distributed by its authors (GIN, Bordeaux) for research use with citation of the 2002 "
    "paper, and Colin27 by the MNI with a permissive notice; check both before any commercial use."
)

# AAL names (aal.nii.txt) of the six deep grey-matter structures, in class order.
STRUCTURES = ("Caudate", "Putamen", "Pallidum", "Thalamus", "Hippocampus", "Amygdala")
STRUCTURE_COLORS = (
    (0.40, 0.60, 1.00),
    (1.00, 0.55, 0.25),
    (0.25, 0.80, 0.35),
    (0.85, 0.25, 0.30),
    (0.95, 0.85, 0.25),
    (0.70, 0.40, 0.90),
)


class MissingSampleData(FileNotFoundError):
    """The package that ships a sample is not installed; the message says how to install it."""


def template_path(name: str) -> Path:
    path = TEMPLATES / name
    if not path.exists():
        raise MissingSampleData(
            f"{path} is missing: install the Debian package {PACKAGE} (apt-get install -y {PACKAGE}, as root; "
            "`make install` does it where apt-get is available)."
        )
    return path


def aal_names() -> dict[str, int]:
    """AAL region name -> label value, from the package's ``aal.nii.txt`` (lines 'VALUE NAME CODE')."""
    out = {}
    for line in template_path("aal.nii.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[parts[1]] = int(parts[0])
    return out


def _read(name: str, pixel_type):
    import SimpleITK as sitk

    return sitk.ReadImage(str(template_path(name)), pixel_type)


def _same_grid(a, b) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def colin27_aal_volume(split_sides: bool) -> tuple:
    """(T1 image, label image, names, colours): AAL's deep grey matter on Colin27, values 1..k.

    ``aal.nii.gz`` lies on the exact grid of ``ch2.nii.gz`` (checked here; resampled nearest-neighbour
    onto it only if a future package version changes that).
    """
    import SimpleITK as sitk

    t1 = _read("ch2.nii.gz", sitk.sitkFloat32)
    atlas = _read("aal.nii.gz", sitk.sitkUInt8)
    if not _same_grid(t1, atlas):
        atlas = sitk.Resample(atlas, t1, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    values = aal_names()
    aal = sitk.GetArrayFromImage(atlas)
    lookup = np.zeros(256, dtype=np.uint8)
    names, colors = [], []
    for i, structure in enumerate(STRUCTURES):
        for side in ("L", "R"):
            key = f"{structure}_{side}"
            if key not in values:
                raise ValueError(f"aal.nii.txt has no region {key}; the package's label table changed.")
            if split_sides:
                names.append(f"{structure.lower()}_{'left' if side == 'L' else 'right'}")
                shade = 1.0 if side == "L" else 0.7
                colors.append(tuple(round(c * shade, 3) for c in STRUCTURE_COLORS[i]))
                lookup[values[key]] = len(names)
            else:
                lookup[values[key]] = i + 1
        if not split_sides:
            names.append(structure.lower())
            colors.append(STRUCTURE_COLORS[i])
    labels = sitk.GetImageFromArray(lookup[aal])
    labels.CopyInformation(t1)
    return t1, labels, names, colors
