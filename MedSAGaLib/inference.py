"""Slice-by-slice segmentation of volumes: k-class fusion and box-prompted (oracle box) prediction."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .fastpath import inference_copy
from .head import ClassSegmenter, predict_boxes
from .models import BaseSam
from .preprocess import SliceTransform
from .slices import bounding_box, get_slice  # noqa: F401 (bounding_box re-exported)

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


@torch.inference_mode()
def predict_slices(
    segmenter: ClassSegmenter, slices01: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> list[np.ndarray]:
    """k+1-class probabilities are fused by argmax: 2-D slices -> label maps (0 = background)."""
    transform = SliceTransform(segmenter.image_size)
    images = torch.stack([transform.to_model(s) for s in slices01]).to(device)
    logits = segmenter(images).float().cpu()
    return [transform.from_model(logits[n], s.shape).argmax(0).numpy().astype(np.uint8) for n, s in enumerate(slices01)]


def segment_volume(
    segmenter: ClassSegmenter,
    array01: np.ndarray,
    axis: int = 0,
    slices: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    progress: Progress = True,
    fast: bool = True,
) -> np.ndarray:
    """Label every chosen slice of a [0, 1] volume; slices not chosen stay 0. Same shape as the input.

    ``fast`` predicts with :func:`~MedSAGaLib.fastpath.inference_copy` (batch norms folded into
    convolutions, channels-last convolutions): same labels, faster on CPUs; the model is untouched.
    """
    device = torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    segmenter = segmenter.to(device).eval()
    if fast:
        segmenter = inference_copy(segmenter)
    labels = np.zeros(array01.shape, dtype=np.uint8)
    indices = list(range(array01.shape[axis])) if slices is None else list(slices)
    for batch in _progress_iter(_batches(indices, batch_size), len(indices), progress, "Segmenting"):
        predictions = predict_slices(segmenter, [get_slice(array01, axis, i) for i in batch], device)
        for index, prediction in zip(batch, predictions):
            view = [slice(None)] * 3
            view[axis] = index
            labels[tuple(view)] = prediction
    return labels


@torch.inference_mode()
def predict_box_slice(
    base: BaseSam, slice01: np.ndarray, box_xyxy: Sequence[float], device: torch.device | str = "cpu"
) -> np.ndarray:
    """A bool mask for one box prompt (slice pixels) on one slice."""
    transform = SliceTransform(base.image_size)
    image = transform.to_model(slice01)[None].to(device)
    box = torch.tensor([transform.box_to_model(box_xyxy, slice01.shape)])
    logits = predict_boxes(base, image, box).float().cpu()
    return transform.from_model(logits[0], slice01.shape)[0].numpy() > 0


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
) -> np.ndarray:
    """Box prompts from an existing label volume, per slice and per label (the oracle-box baseline).

    Each label's box on a slice prompts SAM; where prompts overlap, the later label wins.
    """
    device = torch.device(device)
    base = base.to(device).eval()
    if fast:
        base = inference_copy(base)
    values = list(label_values) if label_values is not None else [int(v) for v in np.unique(box_labels) if v != 0]
    indices = list(range(array01.shape[axis])) if slices is None else list(slices)
    jobs = []
    for index in indices:
        label_slice = get_slice(box_labels, axis, index)
        for value in values:
            box = bounding_box(label_slice == value, margin)
            if box is not None:
                jobs.append((index, value, box))
    out = np.zeros(array01.shape, dtype=np.uint8)
    for batch in _progress_iter(_batches(jobs, 1), len(jobs), progress, "Box prompts"):
        for index, value, box in batch:
            mask = predict_box_slice(base, get_slice(array01, axis, index), box, device)
            view = [slice(None)] * 3
            view[axis] = index
            target = out[tuple(view)]
            target[mask] = value
    return out
