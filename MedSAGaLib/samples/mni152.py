"""Real labelled data that ships on disk: nilearn's MNI152 2009 template with tissue maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

TISSUE_CLASSES = ("grey_matter", "white_matter")
TISSUE_COLORS = ((0.690, 0.690, 0.690), (0.941, 0.902, 0.784))


def mni152_files() -> dict[str, Path]:
    """Paths of the bundled T1 template and grey/white-matter probability maps (no download)."""
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).parent / "data"
    files = {
        "t1": folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "gm": folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "wm": folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"nilearn's MNI152 files are missing: {missing}")
    return files


def mni152_tissue_labels(image: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image]:
    """(T1 image, label image): argmax of background / GM / WM probabilities -> 0, 1 (GM), 2 (WM)."""
    files = mni152_files()
    t1 = sitk.ReadImage(str(files["t1"]), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(files["gm"]), sitk.sitkFloat32))
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(files["wm"]), sitk.sitkFloat32))
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(t1)
    return t1, label_image


def write_mni152_task(folder: str | Path) -> tuple[Path, Path]:
    """Write the T1 template and its 2-class tissue labels as NIfTI files; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t1, labels = mni152_tissue_labels()
    image_path, label_path = folder / "mni152_t1.nii.gz", folder / "mni152_tissue_labels.nii.gz"
    sitk.WriteImage(t1, str(image_path), useCompression=True)
    sitk.WriteImage(labels, str(label_path), useCompression=True)
    return image_path, label_path
