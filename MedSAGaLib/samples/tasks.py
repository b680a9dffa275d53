"""Registry of the labelled sample tasks that ``bench quality --task NAME`` and the demo use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class SampleTask:
    """A real volume with reference labels 1..k on its own grid, and where it comes from."""

    name: str
    title: str
    image: object  # SimpleITK image (T1)
    labels: object  # SimpleITK image, values 0..k, same grid as ``image``
    class_names: list
    class_colors: list
    axis: str  # slice orientation of the task: axial, coronal or sagittal
    source: str
    licence: str
    same_volume: bool = True  # training and test slices come from one volume (no cross-subject test)


def _mni152() -> SampleTask:
    from .mni152 import TISSUE_CLASSES, TISSUE_COLORS, mni152_tissue_labels

    image, labels = mni152_tissue_labels()
    return SampleTask(
        name="mni152_tissue", title="MNI152 2009 T1 template, grey/white matter (nilearn)", image=image, labels=labels,
        class_names=list(TISSUE_CLASSES), class_colors=list(TISSUE_COLORS), axis="axial",
        source="nilearn's bundled MNI152 ICBM 2009a nonlinear symmetric T1 template and its GM/WM probability maps "
               "(labels: argmax of background/GM/WM).",
        licence="MNI ICBM 2009 templates: copyright McConnell Brain Imaging Centre, free use with its notice; "
                "shipped inside nilearn (BSD-3-clause).",
    )


def _colin27(split_sides: bool, axis: str, name: str, title: str) -> Callable[[], SampleTask]:
    def load() -> SampleTask:
        from .mricron import LICENCE, SOURCE, colin27_aal_volume

        image, labels, names, colors = colin27_aal_volume(split_sides)
        return SampleTask(name=name, title=title, image=image, labels=labels, class_names=names, class_colors=colors,
                          axis=axis, source=SOURCE, licence=LICENCE)

    return load


TASKS: dict[str, Callable[[], SampleTask]] = {
    "mni152_tissue": _mni152,
    "colin27_aal": _colin27(False, "axial", "colin27_aal",
                            "Colin27 T1, AAL deep grey matter (6 classes, left+right merged), axial slices"),
    "colin27_aal_lr": _colin27(True, "coronal", "colin27_aal_lr",
                               "Colin27 T1, AAL deep grey matter left/right apart (12 classes), coronal slices"),
}
REALISTIC_TASKS = ("colin27_aal", "colin27_aal_lr")


def load_sample_task(name: str) -> SampleTask:
    """The task called ``name`` (one of :data:`TASKS`); a clear error for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name]()
