"""Inference backends: PyTorch (any device) and OpenVINO (CPUs), behind one small runner interface.

A runner has ``image_size``, ``encode(images01) -> embeddings``, ``decode(embeddings) -> k+1
logits`` (k-class segmenters), ``decode_boxes(embedding, boxes) -> logits`` (base models) and
``__call__(images01) -> logits``; inputs are torch tensors, outputs CPU tensors.

``auto`` (the default) takes OpenVINO on a CPU when the ``openvino`` package is installed and the
export pays for itself: the model's export is already cached, or the job has at least
:data:`AUTO_MIN_SLICES` slices (the one-off export of LiteMedSAM costs about as much as that many
slices save). Anything else, and any failure of the export under ``auto``, runs PyTorch.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "openvino")
# auto (resolve_precision) and the precisions OpenVINO offers (the module imports nothing heavy)
from .openvino_backend import PRECISIONS as RUNNER_PRECISIONS  # noqa: E402
INFERENCE_PRECISIONS = ("auto",) + RUNNER_PRECISIONS
AUTO_MIN_SLICES = 24


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_backend(
    name: str = "auto",
    device: torch.device | str = "cpu",
    model=None,
    kind: str = "classes",
    slices: Optional[int] = None,
    cache_dir: Optional[str | Path] = None,
    precision: str = "f32",
) -> str:
    """Resolve ``auto`` to ``torch`` or ``openvino``; check that a named backend can run here."""
    name = (name or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; use one of {', '.join(BACKENDS)}.")
    on_cpu = torch.device(device).type == "cpu"
    precision = "f32" if precision == "auto" else precision  # auto follows the backend, not the other way round
    if precision != "f32":  # only OpenVINO offers a lower precision: auto means it, torch cannot
        if name == "torch":
            raise ValueError(f"--inference-precision {precision} runs on the OpenVINO backend; use --backend openvino or auto.")
        name = "openvino"
    if name == "openvino":
        if not on_cpu:
            raise ValueError(f"The OpenVINO backend runs on the CPU; it cannot run on device {device}. Use --device cpu.")
        if not openvino_available():
            raise ValueError("The OpenVINO backend was asked for but the 'openvino' package is not installed "
                             "(pip install openvino), or use --backend torch.")
        return name
    if name == "torch" or not on_cpu or not openvino_available():
        return "torch"
    if slices is not None and slices >= AUTO_MIN_SLICES:
        return "openvino"
    if model is not None:
        from .openvino_backend import is_cached

        if is_cached(model, kind, cache_dir, precision):
            return "openvino"
    return "openvino" if slices is None and model is None else "torch"


def resolve_precision(precision: str, backend: str, kind: str = "classes") -> str:
    """What ``--inference-precision auto`` runs: bf16 for an adapted model in OpenVINO on a CPU with bf16 units
    (its labels agree with f32 on 99.8% of pixels, mean Dice within 0.004, on the three painted-slice tasks;
    docs/results/NOTES.md), f32 anywhere else (PyTorch, box prompts, CPUs without bf16 units). Other values
    are returned as they are."""
    if precision != "auto":
        return precision
    if backend != "openvino" or kind != "classes":
        return "f32"
    from .openvino_backend import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "f32"


def make_runner(
    model,
    kind: str = "classes",
    backend: str = "auto",
    device: torch.device | str = "cpu",
    fast: bool = True,
    cache_dir: Optional[str | Path] = None,
    slices: Optional[int] = None,
    precision: str = "f32",
    calibration: Optional[torch.Tensor] = None,
):
    """A runner for a k-class segmenter (``kind='classes'``) or a base model's box prompts (``'boxes'``).

    ``fast=False`` with ``auto`` means the model exactly as it is: the plain PyTorch reference.
    ``precision="int8"``: OpenVINO with an int8 encoder calibrated on ``calibration`` (model inputs
    [N, 3, S, S] of the volume to segment); ``"bf16"``: OpenVINO at bf16 (CPUs with bf16 units). Neither
    falls back to PyTorch silently. ``"auto"``: :func:`resolve_precision` of the backend chosen; the runner's
    ``precision`` says what ran.
    """
    requested = (backend or "auto").lower()
    if requested == "auto" and not fast:
        requested = "torch"
    chosen = choose_backend(requested, device, model, kind, slices, cache_dir, precision)
    if chosen == "openvino":
        from .openvino_backend import OpenVinoRunner

        try:
            return OpenVinoRunner(model, kind, cache_dir=cache_dir, precision=resolve_precision(precision, chosen, kind),
                                  calibration=calibration)
        except Exception as exc:  # an op the converter lacks, a broken install: PyTorch still works
            if requested == "openvino" or precision not in ("f32", "auto"):
                raise
            warnings.warn(f"OpenVINO export failed ({type(exc).__name__}: {exc}); running PyTorch instead.")
            print(f"Note: OpenVINO export failed ({exc}); using PyTorch.", file=sys.stderr)
    from .torch_backend import TorchRunner

    return TorchRunner(model, device, fast=fast)


__all__ = ["BACKENDS", "INFERENCE_PRECISIONS", "RUNNER_PRECISIONS", "AUTO_MIN_SLICES", "choose_backend", "make_runner",
           "openvino_available", "resolve_precision"]
