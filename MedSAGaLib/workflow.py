"""The product's operations as library calls: fine-tune, evaluate, segment.

Every front end (the ``medsaga`` CLI, the demo, the benchmarks, the Slicer panel's jobs) calls
these; none repeats their steps. Nothing here prints or parses arguments: progress goes to a
``progress`` callback as events of :mod:`MedSAGaLib.events`, a ``should_stop`` callable ends
training between steps, and each call returns a result object.

    task = load_task("t1.nii.gz", "labels.seg.nrrd", axis="axial")
    run = finetune_volume(task, shots=5, output="brain.medsaga", method="galore", steps=60)
    scores = evaluate_volume("brain.medsaga", task)
    segment_file("t1.nii.gz", "brain.medsaga", "brain.seg.nrrd")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .events import event, jsonable
from .roi import DEFAULT_MARGIN, choose_roi
from .slices import (MIN_SLICES_TO_HOLD_OUT, annotated_slices, get_slice, labels_for_model, parse_slices,
                     plan_slices, select_classes)
from .training.config import FinetuneConfig, TrainingError
from .volume import (array_from_image, normalize_with, preprocessing_settings, read_volume, region_contrast, slice_axis,
                     window_settings)

if TYPE_CHECKING:
    from .painted import PaintedSlices

ProgressCallback = Optional[Callable[[dict], None]]
ImageInput = Union[str, Path, sitk.Image]


# --- the task: an image, its labels and the slice axis ---------------------------------------
@dataclass
class Task:
    """A volume and its (partial) labels on the same grid, classes chosen, slice axis resolved."""

    image: sitk.Image
    array: np.ndarray  # (z, y, x) float32 intensities
    labels: np.ndarray  # (z, y, x) uint8, 0 = unlabelled / background, 1..k the classes
    class_names: list
    class_colors: list
    axis: int  # axis of ``array`` to slice along
    axis_name: str = "axial"
    image_source: str = ""
    labels_source: str = ""

    @property
    def annotated(self) -> list[int]:
        return annotated_slices(self.labels, self.axis)

    def spacing2d(self) -> list[float]:
        """In-plane pixel spacing (mm) of the slices, in the order of a slice's axes."""
        spacing_zyx = list(self.image.GetSpacing())[::-1]
        return [s for a, s in enumerate(spacing_zyx) if a != self.axis]


def _image(image: ImageInput) -> tuple[sitk.Image, str]:
    if isinstance(image, sitk.Image):
        return image, "in memory"
    return read_volume(image), str(image)


def load_task(image: ImageInput, labels: Union[str, Path, sitk.Image], axis: Optional[str] = "axial",
              classes: Optional[Sequence[str]] = None) -> Task:
    """Read an image and its label volume or .seg.nrrd (paths or SimpleITK images), apply a class choice
    (``classes``: see :func:`~MedSAGaLib.slices.select_classes`) and resolve the slice axis."""
    from .segio import compact_labels, read_class_labels

    sitk_image, image_source = _image(image)
    if isinstance(labels, sitk.Image):
        values, kept = compact_labels(sitk.GetArrayFromImage(labels).astype(np.int64))
        label_array, names, colors = values, [f"label_{v}" for v in kept], [None] * len(kept)
        labels_source = "in memory"
    else:
        label_array, names, colors = read_class_labels(labels, sitk_image)
        labels_source = str(labels)
    label_array, names, colors = select_classes(label_array, names, colors, list(classes) if classes else None)
    axis_name = axis or "axial"
    return Task(sitk_image, array_from_image(sitk_image), label_array, names, colors, slice_axis(sitk_image, axis_name),
                axis_name, image_source, labels_source)


def preprocessing_for(window: Optional[str], model_metadata: Optional[dict] = None) -> dict:
    """Intensity preprocessing: the ``window`` asked for, else the model's own setting, else percentiles."""
    # 'percentile' means volume percentiles even for a model trained with a window (volume.window_settings)
    return window_settings(window, (model_metadata or {}).get("preprocessing"))


# --- fine-tuning -------------------------------------------------------------------------------
CROP_CONTRAST_PERCENTILES = (1.0, 99.0)  # the crop's own range mapped to black and white


def training_preprocessing(task: Task, train_idx: Sequence[int], window: Optional[str] = None,
                           model_metadata: Optional[dict] = None, crop: str = "auto",
                           crop_margin: float = DEFAULT_MARGIN) -> tuple[dict, Optional[str]]:
    """(intensity settings, why) for fine-tuning: what ``window`` asks, a resumed model's own setting, else
    volume percentiles stretched to the crop's own intensities when training crops to small structures.

    Measured (docs/results/NOTES.md, "Contrast of the crop"): in a brain MR crop the deep nuclei differ by a
    few grey levels of the volume's 0.5-99.5 percentile range, whose top is set by the scalp outside the crop.
    """
    asked = None if window is None or str(window).strip().lower() == "auto" else window
    if asked is not None or model_metadata is not None:
        return preprocessing_for(asked, model_metadata), None
    default = preprocessing_for(None)
    labels = [get_slice(task.labels, task.axis, i) for i in train_idx]
    roi, _ = choose_roi(labels, crop, crop_margin)
    if roi is None:
        return default, None
    inside = np.concatenate([roi.crop(get_slice(task.array, task.axis, i)).ravel() for i in train_idx])
    ranks = region_contrast(task.array, inside, CROP_CONTRAST_PERCENTILES)
    if ranks is None:
        return default, None
    low, high = CROP_CONTRAST_PERCENTILES
    return preprocessing_settings(None, ranks), (
        f"intensities: the crop's own {low:g}-{high:g}th percentiles set black and white (the volume's "
        f"{ranks[0]:.1f}-{ranks[1]:.1f}th percentiles, kept in the model file), for contrast between the "
        "structures; --window percentile keeps the volume's 0.5-99.5th")


def finetune_config(train_count: int = 1, epochs: Optional[float] = None, **settings: Any) -> FinetuneConfig:
    """A checked :class:`FinetuneConfig` from settings (None = the default). ``epochs`` (passes over
    ``train_count`` slices) replaces ``steps``; the warm-up is clamped below the number of steps."""
    settings = {k: v for k, v in settings.items() if v is not None}
    if epochs is not None:
        if settings.get("steps") is not None:
            raise ValueError("Give steps or epochs, not both.")
        if epochs <= 0:
            raise ValueError("--epochs must be positive.")
        batch = settings.get("batch_size", FinetuneConfig.batch_size)
        settings["steps"] = max(1, math.ceil(epochs * train_count / max(1, batch)))
    if settings.get("device") == "auto":
        from .inference import resolve_device

        settings["device"] = str(resolve_device("auto"))
    config = FinetuneConfig(**settings).validate()
    if config.steps is not None:  # None: the data choose the steps (the warm-up stays as set)
        config.warmup = min(config.warmup, max(0, config.steps - 1))
    return config


def new_segmenter(class_names: Sequence[str], class_colors: Optional[Sequence] = None, base: Optional[str] = None,
                  checkpoint: Optional[str] = None, image_size: Optional[int] = None):
    """An untrained k-class head on a base model (default LiteMedSAM)."""
    from .head import ClassSegmenter
    from .models import build_base_model

    colors = list(class_colors) if class_colors and all(c is not None for c in class_colors) else None
    base_model = build_base_model(base or "litemedsam", checkpoint=checkpoint, image_size=image_size)
    return ClassSegmenter.from_base(base_model, list(class_names), colors)


def finetune_slices(segmenter, train_images: Sequence[np.ndarray], train_labels: Sequence[np.ndarray],
                    val_images: Sequence[np.ndarray] = (), val_labels: Sequence[np.ndarray] = (), *,
                    config: Optional[FinetuneConfig] = None, progress: ProgressCallback = None,
                    should_stop: Optional[Callable[[], bool]] = None, hooks: Sequence = (),
                    feature_cache: Optional[dict] = None, feature_store=None):
    """Fine-tune ``segmenter`` in place on 2-D slices in [0, 1]; out-of-memory becomes a TrainingError.
    ``feature_store``: a folder (or FeatureStore; "auto": the default folder) for frozen features across runs."""
    from .training import finetune

    try:
        return finetune(segmenter, train_images, train_labels, config or finetune_config(), val_images, val_labels,
                        callback=progress, should_stop=should_stop, feature_cache=feature_cache, hooks=hooks,
                        feature_store=open_feature_store(feature_store))
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise TrainingError(f"Out of memory: {exc}") from None
        raise


def open_feature_store(where):
    """None/"none"/"off": no store; "auto": the default folder (``MEDSAGA_FEATURE_CACHE=none`` turns it off); a path:
    that folder; a FeatureStore as is."""
    if where is None or (isinstance(where, str) and where.strip().lower() in ("none", "off", "")):
        return None
    from .training.feature_store import FeatureStore, default_folder

    if isinstance(where, FeatureStore):
        return where
    if str(where).strip().lower() == "auto":
        folder = default_folder()
        return None if folder.name.lower() in ("none", "off") and len(folder.parts) == 1 else FeatureStore(folder)
    return FeatureStore(Path(where))


@dataclass
class FinetuneRun:
    """What :func:`finetune_volume` did: the trained segmenter, the trainer's result, the slices used,
    the metadata stored with the model, and the file written (None when nothing was written)."""

    segmenter: Any
    result: Any
    train_slices: list
    val_slices: list
    config: FinetuneConfig
    metadata: dict = field(default_factory=dict)
    model_path: Optional[Path] = None


def _resumed_segmenter(resume: str, names: list, base: Optional[str], names_given: bool):
    from .modelfile import ModelFileError, load_model, read_metadata

    meta = read_metadata(resume)
    if base is not None and meta.get("base_model") != base:
        raise ModelFileError(
            f"{resume} was adapted from {meta.get('base_model')}, not {base}; "
            "drop --base or start from the matching base model.")
    model_names = list(meta.get("class_names") or [])
    if not names_given and model_names != names and len(model_names) == len(names) and all(
            n.startswith("label_") for n in names):
        names = model_names  # a plain label volume: values 1..k are the model's classes in order
    if model_names != names:
        raise ModelFileError(
            f"{resume} segments {model_names}, but the labels hold {names}; "
            "resume with labels of the same classes (or --classes to name them).")
    return load_model(resume, class_names=names), meta, names


def finetune_volume(
    task: Union[Task, ImageInput],
    labels: Union[str, Path, sitk.Image, None] = None,
    *,
    output: Union[str, Path, None] = None,
    axis: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    slices: Union[str, Sequence[int], None] = None,
    shots: Optional[int] = None,
    val_slices: Optional[Sequence[int]] = None,
    val_fraction: float = 0.0,
    window: Optional[str] = None,
    base: Optional[str] = None,
    checkpoint: Optional[str] = None,
    image_size: Optional[int] = None,
    resume: Union[str, Path, None] = None,
    epochs: Optional[float] = None,
    progress: ProgressCallback = None,
    should_stop: Optional[Callable[[], bool]] = None,
    hooks: Sequence = (),
    feature_cache: Optional[dict] = None,
    feature_store=None,
    **settings: Any,
) -> FinetuneRun:
    """Fine-tune on the annotated slices of a volume and (with ``output``) write the adapted model.

    ``task`` is a :class:`Task` or an image (path / SimpleITK image) with ``labels``. Training slices:
    ``slices`` (a list or the CLI's text), else ``shots`` evenly spread annotated slices, else all;
    the other annotated slices validate (or ``val_slices``). ``resume`` continues a model file.
    ``feature_store``: where frozen encoder features are kept between runs (see :func:`open_feature_store`;
    None, the library default, keeps nothing; ``medsaga finetune`` passes its ``--feature-cache``).
    ``settings`` are :class:`FinetuneConfig` fields (method, steps, lr, rank, ...). Progress events:
    ``start``, then the trainer's, then ``done`` once the model file is written.
    """
    if not isinstance(task, Task):
        if labels is None:
            raise ValueError("Give the labels with the image.")
        task = load_task(task, labels, axis, classes)
    if slices is not None and shots is not None:
        raise ValueError("Give --slices or --shots, not both.")
    output = Path(output) if output is not None else None
    if output is not None and output.is_dir():
        raise ValueError(f"Output {output} is a folder; give a model file name.")
    names, colors = list(task.class_names), list(task.class_colors)
    if not names:
        raise TrainingError(f"{task.labels_source or 'The labels'} holds no label: annotate at least one slice.")
    annotated = task.annotated
    requested = parse_slices(slices, task.array.shape[task.axis]) if isinstance(slices, str) else (
        None if slices is None else sorted(int(s) for s in slices))
    train_idx, val_idx = plan_slices(annotated, requested, shots, val_fraction)
    if val_slices is not None:
        val_idx = [int(s) for s in val_slices]

    resumed_meta = None
    if resume:
        segmenter, resumed_meta, names = _resumed_segmenter(str(resume), names, base, bool(classes))
    else:
        segmenter = new_segmenter(names, colors, base, checkpoint, image_size)
    config = finetune_config(len(train_idx), epochs, **settings)
    preprocessing, contrast_why = training_preprocessing(task, train_idx, window, resumed_meta, config.crop,
                                                         config.crop_margin)
    emit = progress or (lambda ev: None)
    emit(event("start", train_slices=train_idx, val_slices=val_idx, classes=names, method=config.method,
               steps=config.steps))

    array01 = normalize_with(task.array, preprocessing)
    take = lambda volume, indices: [get_slice(volume, task.axis, i) for i in indices]  # noqa: E731
    result = finetune_slices(segmenter, take(array01, train_idx), take(task.labels, train_idx), take(array01, val_idx),
                             take(task.labels, val_idx), config=config, progress=progress, should_stop=should_stop,
                             hooks=hooks, feature_cache=feature_cache, feature_store=feature_store)
    if not val_idx and val_slices is None and requested is None and shots is None:
        why = (f"with fewer than {MIN_SLICES_TO_HOLD_OUT} annotated slices none is held out to validate"
               if val_fraction > 0 else
               f"none is held out (--val-fraction 0.2 holds a fifth out to stop early, from {MIN_SLICES_TO_HOLD_OUT} "
               "annotated slices on)")
        result.decisions.insert(0, f"every painted slice trains ({len(train_idx)}): {why}")
    if contrast_why:  # next to the crop it comes from
        cropped = [i for i, line in enumerate(result.decisions) if line.startswith("cropping to")]
        result.decisions.insert(cropped[0] + 1 if cropped else len(result.decisions), contrast_why)
    training = result.metadata()
    training.update(
        train_slices=train_idx, val_slices=val_idx, labels=task.labels_source, image=task.image_source,
        resumed_from=str(resume) if resume else None, previous_training=(resumed_meta or {}).get("training"),
        rank=config.rank, lr=config.lr,
    )
    if task.labels_source and Path(task.labels_source).is_file():
        from .painted import labels_fingerprint, volume_fingerprint

        # hashes only (no voxels or labels): `segment` on this same scan finds the painted slices by itself
        training["painted_from"] = dict(labels=str(Path(task.labels_source).resolve()),
                                        image_sha256=volume_fingerprint(task.image, task.array),
                                        train_labels_sha256=labels_fingerprint(task.labels, task.axis, train_idx))
    metadata = {"preprocessing": preprocessing, "axis": task.axis_name, "training": jsonable(training),
                "validation_dice": jsonable(result.val_dice)}
    from .modelfile import model_metadata, save_model

    # the segmenter in memory (the demo) segments as its model file would: same intensities, mirroring, crop
    segmenter.metadata = model_metadata(segmenter, metadata)
    run = FinetuneRun(segmenter, result, train_idx, val_idx, config, metadata)
    if output is not None and result.steps_done > 0:
        run.model_path = save_model(output, segmenter, metadata)
        emit(event("done", model=str(output), steps=result.steps_done, stopped=result.stopped,
                   best_step=result.best_step, val_dice=result.val_dice, initial_val_dice=result.initial_val_dice,
                   seconds_per_step=round(result.seconds_per_step, 3), seconds=round(result.total_seconds, 1),
                   decisions=result.decisions, stop_reason=result.stop_reason, warnings=result.warnings,
                   timings={k: round(float(v), 1) for k, v in result.timings.items()}))
    return run


# --- evaluation --------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores of a model against reference labels on some slices (see :mod:`MedSAGaLib.metrics`)."""

    model: str
    slices: list
    classes: list  # one dict per class: name, dice, hd95_mm, slices, slices_one_empty
    training_slices_included: list
    prediction: Optional[np.ndarray] = None  # the label volume predicted on ``slices``
    ran: dict = field(default_factory=dict)  # the inference backend and precision that ran (and painted slices used)

    @property
    def mean_dice(self) -> Optional[float]:
        values = [r["dice"] for r in self.classes if math.isfinite(r["dice"])]
        return float(np.mean(values)) if values else None

    @property
    def mean_hd95_mm(self) -> Optional[float]:
        values = [r["hd95_mm"] for r in self.classes if math.isfinite(r["hd95_mm"])]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict:
        return {"model": self.model, "slices": self.slices, "classes": self.classes, "mean_dice": self.mean_dice,
                "mean_hd95_mm": self.mean_hd95_mm, "training_slices_included": self.training_slices_included,
                "inference": dict(self.ran)}


def _segment_progress(progress: ProgressCallback):
    if progress is None:
        return False
    return lambda done, total: progress(event("segment", done=done, total=total))


def _load(model):
    from .modelfile import load_model

    return model if hasattr(model, "class_names") else load_model(model)


def evaluate_volume(
    model,
    task: Union[Task, ImageInput],
    labels: Union[str, Path, sitk.Image, None] = None,
    *,
    axis: Optional[str] = None,
    slices: Union[str, Sequence[int], None] = None,
    window: Optional[str] = None,
    batch_size: Optional[int] = None,
    device: str = "auto",
    progress: ProgressCallback = None,
    backend: str = "auto",
    tta: str = "auto",
    precision: str = "auto",
    painted: Union[str, Path, "PaintedSlices", None] = None,
) -> Evaluation:
    """Segment the annotated slices (or ``slices``) with ``model`` (a file or a segmenter) and score
    them against the reference labels, class by class (matched by name, else by order). ``tta``: test-time
    mirroring, as :func:`MedSAGaLib.inference.mirror_averaging` decides; ``precision``: ``auto``, ``f32``,
    ``int8`` or ``bf16`` (:func:`MedSAGaLib.inference.segment_volume`); ``painted``: the labels painted on this
    volume, used between the painted slices as :mod:`MedSAGaLib.painted` describes (score other slices)."""
    from .inference import resolve_device, segment_volume
    from .metrics import evaluate_labels

    segmenter = _load(model)
    meta = getattr(segmenter, "metadata", {}) or {}
    if not isinstance(task, Task):
        task = load_task(task, labels, axis or meta.get("axis") or "axial")
    elif axis is not None:
        task.axis, task.axis_name = slice_axis(task.image, axis), axis
    ref = labels_for_model(segmenter.class_names, task.class_names, task.labels)
    if isinstance(slices, str):
        slices = parse_slices(slices, task.array.shape[task.axis])
    slices = list(slices) if slices else annotated_slices(ref, task.axis)
    if not slices:
        raise ValueError("The labels have no annotated slice to evaluate on; give --slices.")
    array01 = normalize_with(task.array, preprocessing_for(window, meta))
    ran: dict = {}
    hint = read_painted(painted, task.image, task.axis, segmenter.class_names) if painted else None
    pred = segment_volume(segmenter, array01, task.axis, slices, batch_size, resolve_device(device),
                          progress=_segment_progress(progress), backend=backend, cache_dir=_export_cache(model),
                          tta=tta, precision=precision, ran=ran, painted=hint)
    stack = lambda volume: np.moveaxis(volume, task.axis, 0)[slices]  # noqa: E731
    metrics = evaluate_labels(stack(pred), stack(ref), segmenter.num_classes, task.spacing2d())
    rows = [dict(name=n, **metrics[c]) for c, n in enumerate(segmenter.class_names, start=1)]
    trained = set((meta.get("training") or {}).get("train_slices") or [])
    included = trained
    if hint is not None:  # the painted slices are copied into the prediction: scoring them flatters it
        included = trained | set(hint.indices)
        ran["painted_slices"] = list(hint.indices)
        ran["removed"] = {segmenter.class_names[v - 1]: n for v, n in (ran.get("removed") or {}).items()}
    return Evaluation(str(model) if not hasattr(model, "class_names") else "in memory", slices, rows,
                      sorted(included & set(slices)), pred, ran)


def read_painted(path, image: sitk.Image, axis: int, class_names: Sequence[str]):
    """The labels painted on ``image`` (a .seg.nrrd or label volume on its grid), as
    :class:`MedSAGaLib.painted.PaintedSlices` for a model with ``class_names`` along ``axis``
    (a PaintedSlices is returned as it is: :func:`MedSAGaLib.inference.segment_volume` checks it)."""
    from .painted import PaintedSlices, painted_along
    from .segio import read_class_labels

    if isinstance(path, PaintedSlices):
        return path
    labels, names, _ = read_class_labels(path, image)
    return painted_along(labels, axis, class_names, names, slice_spacing_mm=image.GetSpacing()[::-1][axis])


def own_painted(meta: dict, image: sitk.Image, array: np.ndarray, axis: int, class_names: Sequence[str],
                outputs: Sequence = ()):
    """``segment``'s default (``--painted auto``): the labels an adapted model was fine-tuned from, as
    :class:`MedSAGaLib.painted.PaintedSlices`, when ``image`` is the very scan it was fine-tuned on (same voxels
    and grid) and the labels file still holds the training slices as they were (hashes recorded by
    :func:`finetune_file`). Returns (painted or None, a note for the user or None); another scan gives (None, None).
    Refuses, by name, an output that would replace those labels."""
    from .painted import labels_fingerprint, volume_fingerprint

    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    source = training.get("painted_from") if isinstance(training.get("painted_from"), dict) else {}
    if not isinstance(source.get("image_sha256"), str) or volume_fingerprint(image, array) != source["image_sha256"]:
        return None, None  # not the scan it was fine-tuned on (or a model file without the record)
    path = Path(str(source.get("labels") or ""))
    why = "segmented with the model alone; --painted LABELS gives them."
    if not path.is_file():
        return None, f"this model was fine-tuned on this scan, but its labels file {path} is gone: {why}"
    for out in outputs:
        if out is not None and Path(out).resolve() == path.resolve():
            raise ValueError(f"Output {out} would replace {path}, the labels this model was fine-tuned from (used "
                             "as --painted on this scan): write elsewhere, or pass --painted none.")
    try:
        hint = read_painted(path, image, axis, class_names)
    except (ValueError, OSError, RuntimeError) as exc:
        return None, f"the labels this model was fine-tuned from ({path}) could not be used ({exc}): {why}"
    trained = training.get("train_slices")
    if (not isinstance(trained, list) or not all(isinstance(i, int) and 0 <= i < hint.labels.shape[axis] for i in trained)
            or labels_fingerprint(hint.labels, axis, trained) != source.get("train_labels_sha256")):
        return None, f"{path}, the labels this model was fine-tuned from, changed on its training slices: {why}"
    return hint, (f"this model was fine-tuned on this scan: the slices painted in {path} were used as --painted "
                  "(kept, and leaned on near them); --painted none segments with the model alone.")


def _export_cache(model) -> Optional[Path]:
    """Where the OpenVINO export of a model file lives (next to it); None for segmenters in memory and
    base models (the user cache)."""
    from .backends.cache import model_cache_dir
    from .modelfile import is_model_file

    if hasattr(model, "class_names") or not is_model_file(model):
        return None
    return model_cache_dir(model)


# --- segmentation ------------------------------------------------------------------------------
@dataclass
class Segmentation:
    """What :func:`segment_file` wrote: label volume, class names and colours, the files, notes."""

    labels: np.ndarray
    class_names: list
    class_colors: list
    output: Path
    labelmap: Optional[Path] = None
    notes: list = field(default_factory=list)

    def voxel_counts(self) -> dict:
        return {name: int((self.labels == value).sum()) for value, name in enumerate(self.class_names, start=1)}


def _painted_note(painted, removed: dict, class_names: Sequence[str]) -> str:
    text = (f"the {len(painted.indices)} painted slices were kept as painted, and the slices within "
            f"{painted.reach_mm:g} mm of them lean on them (weight {painted.weight:g} next to a painted slice)")
    if removed:
        text += "; pieces not connected to what was painted were removed: " + ", ".join(
            f"{class_names[value - 1]} {count} voxels" for value, count in sorted(removed.items()))
    return text + "."


def segment_file(
    image: ImageInput,
    model,
    output: Union[str, Path],
    *,
    labelmap: Union[str, Path, None] = None,
    axis: Optional[str] = None,
    slices: Union[str, Sequence[int], None] = None,
    window: Optional[str] = None,
    classes: Optional[Sequence[str]] = None,
    checkpoint: Optional[str] = None,
    image_size: Optional[int] = None,
    boxes_from: Union[str, Path, None] = None,
    box_margin: int = 0,
    batch_size: Optional[int] = None,
    device: str = "auto",
    progress: ProgressCallback = None,
    backend: str = "auto",
    tta: str = "auto",
    precision: str = "auto",
    painted: Union[str, Path, "PaintedSlices", None] = None,
) -> Segmentation:
    """Segment a volume slice by slice and write a .seg.nrrd (and ``labelmap``, a plain label volume).

    ``model`` is an adapted model file or a segmenter in memory, or a base model name with ``classes``
    (an untrained head) or with ``boxes_from`` (a label volume whose per-slice bounding boxes prompt SAM, zero-shot).
    ``tta``: test-time mirroring of an adapted model (:func:`MedSAGaLib.inference.mirror_averaging`).
    ``precision``: ``auto``, ``f32``, ``int8`` or ``bf16`` for an adapted model
    (:func:`MedSAGaLib.inference.segment_volume`); box prompts run in f32. ``painted``: the labels painted on
    this same volume (for an adapted model): they are kept, and the slices between them lean on them
    (:mod:`MedSAGaLib.painted`); ``"auto"`` (the CLI's default): the labels the model was fine-tuned from, when
    this is the scan it was fine-tuned on (:func:`own_painted`); None or ``"none"``: the model alone.
    """
    from .inference import mirror_averaging, resolve_device, segment_volume, segment_with_boxes
    from .modelfile import is_model_file, load_model
    from .segio import read_class_labels, write_labelmap, write_seg_nrrd

    if not str(output).lower().endswith(".seg.nrrd"):
        raise ValueError(f"Output {output} must end in .seg.nrrd (use --labelmap for a plain label volume).")
    if batch_size is not None and batch_size < 1:
        raise ValueError("--batch-size must be at least 1.")
    sitk_image, _ = _image(image)
    array = array_from_image(sitk_image)
    torch_device = resolve_device(device)
    notes = []
    segmenter, meta = None, {}
    if painted == "none":
        painted = None
    if boxes_from and painted not in (None, "auto"):
        raise ValueError("--painted is for an adapted model; box prompts (--boxes-from) do not use it.")
    if boxes_from:
        if precision not in ("f32", "auto"):
            raise ValueError(f"--inference-precision {precision} is for adapted models; box prompts run in f32.")
        if hasattr(model, "class_names") or is_model_file(model):
            raise ValueError("--boxes-from prompts a base model; give --model litemedsam or vit_b/vit_l/vit_h with --checkpoint.")
        box_labels, names, colors = read_class_labels(boxes_from, sitk_image)
    elif hasattr(model, "class_names"):  # a segmenter in memory (the demo, the Slicer panel)
        segmenter = model
    else:
        if not is_model_file(model) and not classes:
            raise ValueError(
                f"{model} is a base model: fine-tune it first (medsaga finetune), prompt it with --boxes-from, "
                "or name --classes for an untrained head.")
        segmenter = load_model(model, class_names=None if is_model_file(model) else classes,
                               checkpoint=checkpoint, image_size=image_size)
        if not is_model_file(model):
            notes.append("an untrained k-class head gives SAM's prompt-free guess; fine-tune for real results.")
    if segmenter is not None:
        meta = getattr(segmenter, "metadata", None) or {}
    axis_index = slice_axis(sitk_image, axis or meta.get("axis") or "axial")
    chosen = parse_slices(slices, array.shape[axis_index]) if isinstance(slices, str) else slices
    array01 = normalize_with(array, preprocessing_for(window, meta))
    if segmenter is None:
        from .models import build_base_model

        base = build_base_model(model, checkpoint=checkpoint, image_size=image_size)
        labels = segment_with_boxes(base, array01, box_labels, axis_index, chosen, margin=box_margin,
                                    device=torch_device, progress=_segment_progress(progress), backend=backend)
    else:
        if mirror_averaging(segmenter, tta):
            why = "--tta on" if tta == "on" else "the model was trained with mirroring; --tta off skips it"
            notes.append(f"each slice was also segmented mirrored left-right and the two averaged ({why}).")
        if precision == "int8":
            notes.append("the image encoder ran in int8, quantised on slices of this volume (about 99% of pixels "
                         "agree with f32 on the tasks measured); --inference-precision f32 is the reference.")
        ran: dict = {}
        if painted == "auto":
            hint, note = own_painted(meta, sitk_image, array, axis_index, segmenter.class_names, (output, labelmap))
            notes.extend([note] if note else [])
        else:
            hint = read_painted(painted, sitk_image, axis_index, segmenter.class_names) if painted else None
        labels = segment_volume(segmenter, array01, axis_index, chosen, batch_size, torch_device,
                                progress=_segment_progress(progress), backend=backend, cache_dir=_export_cache(model),
                                tta=tta, precision=precision, ran=ran, painted=hint)
        if hint is not None:
            notes.append(_painted_note(hint, ran.get("removed") or {}, segmenter.class_names))
        if precision == "auto" and ran.get("precision") == "bf16":
            notes.append("the model ran in OpenVINO at bf16, as this CPU has bf16 units (labels agree with f32 on "
                         "about 99.8% of pixels on the tasks measured); --inference-precision f32 is the reference.")
        names, colors = segmenter.class_names, segmenter.class_colors
    written = write_seg_nrrd(output, labels, sitk_image, names, colors)
    plain = write_labelmap(labelmap, labels, sitk_image) if labelmap else None
    return Segmentation(labels, list(names), list(colors or []), written, plain, notes)
