"""Slice-by-slice segmentation of volumes: k-class fusion and box-prompted (oracle box) prediction."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .backends import INFERENCE_PRECISIONS, make_runner
from .head import ClassSegmenter
from .laterality import mirror_partners
from .models import BaseSam
from .preprocess import SliceTransform
from .slices import bounding_box, get_slice, slice_view  # noqa: F401 (bounding_box re-exported)
from .training.config import SWITCHES

if TYPE_CHECKING:
    from .painted import PaintedSlices

Progress = Union[bool, Callable[[int, int], None], None]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; a named device must be available."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("Device 'cuda' was asked for but PyTorch sees no CUDA GPU here; use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("Device 'mps' was asked for but Apple's Metal backend is not available here.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}; use auto, cpu, cuda or mps.") from None


def default_batch_size(device: torch.device | str) -> int:
    """Slices per forward pass: batching helps GPUs; on a small CPU single slices were faster
    (docs/results/speed.json: 0.77 s/slice at batch 1 against 1.00 s at batch 4, 2 threads)."""
    return 1 if torch.device(device).type == "cpu" else 8


def _progress_iter(batches: list, total: int, progress: Progress, description: str) -> Iterable:
    if callable(progress):
        done = 0
        for batch in batches:
            yield batch
            done += len(batch)
            progress(done, total)
    elif progress:
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=description, unit="slice") as bar:
            for batch in batches:
                yield batch
                bar.update(len(batch))
    else:
        yield from batches


def _batches(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), max(1, size))]


def mirror_averaging(segmenter, setting: str = "auto") -> bool:
    """Whether to average each slice's prediction with that of its left-right mirror image (``--tta``).

    ``"auto"``: only for a model whose training mirrored its slices (``metadata["training"]["mirrored"]``,
    decided by :func:`MedSAGaLib.training.data.choose_mirror`): such a model has learnt both views, and
    averaging them gained about 0.02 mean Dice on colin27_aal (docs/results/NOTES.md). A model trained
    without mirroring (left and right are different classes) would be told the wrong side, so it never
    is by default. It costs a second encoder pass per slice.
    """
    if setting not in SWITCHES:
        raise ValueError(f"Unknown --tta {setting!r}; choose {', '.join(SWITCHES)}.")
    if setting != "auto":
        return setting == "on"
    training = (getattr(segmenter, "metadata", None) or {}).get("training") or {}
    return training.get("mirrored") is True


def mirror_swap(segmenter) -> list[int]:
    """The lookup over the decoder's classes that a mirror image exchanges (left and right, as trained;
    one structure per pair stays itself)."""
    names = getattr(segmenter, "head_names", None) or getattr(segmenter, "class_names", None)
    return mirror_partners(names)


def mirror_averaged(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                    swap: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Class probabilities of ``images`` [B, C, H, W], averaged with those of their left-right mirror images
    (mirrored back). The flip is along the last axis of the whole tensor, padding included, as the training
    augmentation flips a model-size slice (``training.data.build_augmentation``). ``swap``: a lookup over the
    classes (:func:`MedSAGaLib.laterality.mirror_partners`): the mirror image's "left" class is the slice's
    right one, so its channels are exchanged before averaging."""
    mirrored = forward(images.flip(-1)).float().softmax(1).flip(-1)
    if swap is not None:
        mirrored = mirrored[:, list(swap)]
    return (forward(images).float().softmax(1) + mirrored) / 2


@torch.inference_mode()
def slice_probabilities(
    segmenter: ClassSegmenter, slices01: Sequence[np.ndarray], device: torch.device | str = "cpu",
    mirror: bool = False, swap: Optional[Sequence[int]] = None,
) -> list[torch.Tensor]:
    """2-D slices -> k+1-class probabilities [k+1, H, W] on each slice's own grid (0 = background).

    ``segmenter`` is a k-class segmenter or a runner of one (:func:`MedSAGaLib.backends.make_runner`).
    A model fine-tuned on a region of interest (``segmenter.roi``) sees only that box of each slice;
    the rest of the slice is background. ``mirror``: the probabilities are the mean of the slice's and
    of its left-right mirror image's (mirrored back), as the model saw in training (:func:`mirror_averaging`),
    with the left and right classes exchanged by ``swap`` (a lookup over the decoder's classes,
    :func:`mirror_averaged`). A model that learnt each left/right pair as one structure (``segmenter.sides``)
    has it split at its midline on the slice's own grid (:class:`MedSAGaLib.laterality.SideSplit`).
    """
    sides = getattr(segmenter, "sides", None)
    roi = getattr(segmenter, "roi", None)
    if roi is not None:
        crops = [roi.crop(s) for s in slices01]
        inside = slice_probabilities(_without_roi(segmenter), crops, device, mirror, swap)
        pasted = []
        for probabilities in inside:
            whole = torch.zeros((probabilities.shape[0],) + tuple(roi.slice_shape), dtype=probabilities.dtype)
            whole[0] = 1.0
            whole[:, roi.y0 : roi.y1, roi.x0 : roi.x1] = probabilities
            pasted.append(whole)
    else:
        transform = SliceTransform(segmenter.image_size)
        images = torch.stack([transform.to_model(s) for s in slices01]).to(device)
        if mirror:  # averaged probabilities, resized
            scores = mirror_averaged(segmenter, images, swap).cpu()
            pasted = [transform.from_model(scores[n], s.shape) for n, s in enumerate(slices01)]
        else:
            scores = segmenter(images).float().cpu()  # logits resized, then softmax: the argmax of the resized logits
            pasted = [transform.from_model(scores[n], s.shape).softmax(0) for n, s in enumerate(slices01)]
    # one structure per left/right pair: each pixel goes to the class on its side of the midline
    return [sides.split(p) for p in pasted] if sides is not None else pasted


def predict_slices(
    segmenter: ClassSegmenter, slices01: Sequence[np.ndarray], device: torch.device | str = "cpu",
    mirror: bool = False, swap: Optional[Sequence[int]] = None,
) -> list[np.ndarray]:
    """k+1-class probabilities (:func:`slice_probabilities`) are fused by argmax: 2-D slices -> label maps
    (0 = background)."""
    return [p.argmax(0).numpy().astype(np.uint8)
            for p in slice_probabilities(segmenter, slices01, device, mirror, swap)]


class _without_roi:
    """The same model seen without its region of interest (the crop is already applied)."""

    def __init__(self, segmenter) -> None:
        self._segmenter = segmenter
        self.roi = None
        self.sides = None  # split once, on the whole slice
        self.image_size = segmenter.image_size

    def __call__(self, images):
        return self._segmenter(images)


def calibration_images(
    segmenter, array01: np.ndarray, axis: int, indices: Sequence[int], count: Optional[int] = None
) -> torch.Tensor:
    """Model inputs [N, 3, S, S] of up to ``count`` slices evenly spread over ``indices`` (the model's crop
    applied), which calibrate an int8 encoder on the volume it will segment."""
    from .backends.openvino_backend import CALIBRATION_SLICES

    count = count or CALIBRATION_SLICES
    indices = list(indices)
    if not indices:
        raise ValueError("No slices to calibrate an int8 encoder on.")
    picks = sorted({indices[int(round(p))] for p in np.linspace(0, len(indices) - 1, min(count, len(indices)))})
    roi = getattr(segmenter, "roi", None)
    transform = SliceTransform(segmenter.image_size)
    crops = [get_slice(array01, axis, i) for i in picks]
    return torch.stack([transform.to_model(roi.crop(c) if roi is not None else c) for c in crops])


def segment_volume(
    segmenter: ClassSegmenter,
    array01: np.ndarray,
    axis: int = 0,
    slices: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    progress: Progress = True,
    fast: bool = True,
    backend: str = "auto",
    cache_dir: Optional[str | Path] = None,
    tta: str = "auto",
    precision: str = "auto",
    ran: Optional[dict] = None,
    painted: Optional["PaintedSlices"] = None,
) -> np.ndarray:
    """Label every chosen slice of a [0, 1] volume; slices not chosen stay 0. Same shape as the input.

    ``painted`` (:class:`MedSAGaLib.painted.PaintedSlices`, the labels painted on this same volume): each
    slice's probabilities are blended with the painted slices near it, the painted slices keep their
    labels (chosen or not), and each class loses the pieces not connected to its painted parts
    (:func:`MedSAGaLib.painted.keep_connected_to_painted` says when); ``ran["removed"]`` receives
    {class value: voxels removed}.

    ``tta`` (``auto``, ``on``, ``off``): average each slice with its mirror image (:func:`mirror_averaging`).
    ``precision="auto"`` (the default): bf16 where OpenVINO runs on a CPU with bf16 units, else f32
    (:func:`MedSAGaLib.backends.resolve_precision`); ``"f32"`` the reference; ``"int8"``: OpenVINO with an int8
    encoder calibrated on :func:`calibration_images` of these slices; ``"bf16"``: OpenVINO at bf16 on a CPU with
    bf16 units (their agreement with f32 is measured in docs/results/NOTES.md, not guaranteed). ``ran``, a dict
    if given, receives the ``backend`` and ``precision`` that ran.

    ``backend`` (``auto``, ``torch``, ``openvino``) runs the model; see :mod:`MedSAGaLib.backends`.
    ``cache_dir`` is where an OpenVINO export is kept (the CLI passes the folder next to the model
    file); None uses the user cache. ``fast`` predicts in PyTorch with
    :func:`~MedSAGaLib.fastpath.inference_copy` (same labels, faster on CPUs); ``fast=False`` runs
    the model exactly as it is in PyTorch. The model is never changed.
    """
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    indices = list(range(array01.shape[axis])) if slices is None else list(slices)
    mirrored = mirror_averaging(segmenter, tta)
    swap = mirror_swap(segmenter) if mirrored else None
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"Unknown --inference-precision {precision!r}; choose {', '.join(INFERENCE_PRECISIONS)}.")
    calibration = calibration_images(segmenter, array01, axis, indices) if precision == "int8" else None
    runner = make_runner(segmenter, "classes", backend, device, fast, cache_dir,
                         slices=len(indices) * (2 if mirrored else 1), precision=precision, calibration=calibration)
    if ran is not None:
        ran.update(backend=runner.name, precision=runner.precision)
    if painted is not None:
        if painted.labels.shape != array01.shape or painted.axis != axis:
            raise ValueError(f"The painted labels (shape {painted.labels.shape}, axis {painted.axis}) do not match the "
                             f"volume being segmented (shape {array01.shape}, axis {axis}).")
        if painted.num_classes != segmenter.num_classes:
            raise ValueError(f"The painted labels have {painted.num_classes} classes, the model {segmenter.num_classes}.")
    labels = np.zeros(array01.shape, dtype=np.uint8)
    for batch in _progress_iter(_batches(indices, batch_size), len(indices), progress, "Segmenting"):
        probabilities = slice_probabilities(runner, [get_slice(array01, axis, i) for i in batch], device, mirrored,
                                            swap)
        for index, scores in zip(batch, probabilities):
            if painted is not None:
                scores = torch.from_numpy(painted.blend(scores.numpy(), index))
            labels[slice_view(axis, index)] = scores.argmax(0).numpy().astype(np.uint8)
    if painted is not None:
        removed = painted.finish(labels, indices)
        if ran is not None:
            ran["removed"] = removed
    return labels


def fuse_box_logits(logits: torch.Tensor, values: Sequence[int]) -> np.ndarray:
    """Per-box mask logits [N, H, W] -> one label map: each pixel takes the label of its highest
    logit, background where no logit is above 0 (so a structure nested in another's box keeps its
    label where its own mask is the more confident)."""
    if logits.shape[0] == 0:
        return np.zeros(tuple(logits.shape[1:]), dtype=np.uint8)
    best, which = logits.max(dim=0)
    lookup = torch.as_tensor([int(v) for v in values], dtype=torch.long)
    return torch.where(best > 0, lookup[which], torch.zeros_like(which)).numpy().astype(np.uint8)


@torch.inference_mode()
def predict_box_labels(
    runner, slice01: np.ndarray, boxes_xyxy: Sequence[Sequence[float]], values: Sequence[int]
) -> np.ndarray:
    """All box prompts of one slice from one image embedding: boxes (slice pixels) and their label
    values -> a label map on the slice's grid, overlaps fused by :func:`fuse_box_logits`.

    ``runner`` comes from ``make_runner(base, "boxes", ...)``.
    """
    if len(boxes_xyxy) != len(values):
        raise ValueError(f"Give one label value per box ({len(boxes_xyxy)} boxes, {len(values)} values).")
    if not len(boxes_xyxy):
        return np.zeros(slice01.shape, dtype=np.uint8)
    transform = SliceTransform(runner.image_size)
    embedding = runner.encode(transform.to_model(slice01)[None])
    boxes = torch.tensor([transform.box_to_model(box, slice01.shape) for box in boxes_xyxy], dtype=torch.float32)
    logits = runner.decode_boxes(embedding, boxes).float().cpu()[:, 0]
    return fuse_box_logits(transform.from_model(logits, slice01.shape), values)


def predict_box_slice(
    base: BaseSam, slice01: np.ndarray, box_xyxy: Sequence[float], device: torch.device | str = "cpu",
    backend: str = "torch",
) -> np.ndarray:
    """A bool mask for one box prompt (slice pixels) on one slice.

    Each call builds its runner: for many prompts, hold ``make_runner(base, "boxes")`` and call
    :func:`predict_box_labels` (PyTorch by default here, as a single prompt never repays an export).
    """
    runner = make_runner(base, "boxes", backend, device)
    return predict_box_labels(runner, slice01, [box_xyxy], [1]) > 0


def segment_with_boxes(
    base: BaseSam,
    array01: np.ndarray,
    box_labels: np.ndarray,
    axis: int = 0,
    slices: Optional[Sequence[int]] = None,
    label_values: Optional[Sequence[int]] = None,
    margin: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress = True,
    fast: bool = True,
    backend: str = "auto",
    cache_dir: Optional[str | Path] = None,
) -> np.ndarray:
    """Box prompts from an existing label volume, per slice and per label (the oracle-box baseline).

    Each slice is embedded once and all its labels' boxes are decoded from that embedding in one
    batch; overlapping masks are fused by their logits (:func:`fuse_box_logits`).
    """
    device = torch.device(device)
    values = list(label_values) if label_values is not None else [int(v) for v in np.unique(box_labels) if v != 0]
    indices = list(range(array01.shape[axis])) if slices is None else list(slices)
    jobs = []
    for index in indices:
        label_slice = get_slice(box_labels, axis, index)
        prompts = [(value, bounding_box(label_slice == value, margin)) for value in values]
        prompts = [(value, box) for value, box in prompts if box is not None]
        if prompts:
            jobs.append((index, prompts))
    runner = make_runner(base, "boxes", backend, device, fast, cache_dir, slices=len(jobs))
    out = np.zeros(array01.shape, dtype=np.uint8)
    for batch in _progress_iter(_batches(jobs, 1), len(jobs), progress, "Box prompts"):
        for index, prompts in batch:
            labels = predict_box_labels(runner, get_slice(array01, axis, index),
                                        [box for _, box in prompts], [value for value, _ in prompts])
            view = [slice(None)] * 3
            view[axis] = index
            out[tuple(view)] = labels
    return out
