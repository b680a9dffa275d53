"""The OpenVINO backend: the image encoder and decoders exported to OpenVINO IR, compiled for the CPU.

This is the runtime MedSAM-Lite's Slicer extension uses on CPUs. Each part is converted from the
torch module with example inputs (``openvino.convert_model``), saved as IR with f32 weights, and
compiled with an explicit f32 inference precision by default: on CPUs with bf16 units OpenVINO's own
default is bf16, which moved mean Dice by up to 0.004 and about 5% of small structures' pixels on the
tasks measured (docs/results/NOTES.md), so it is offered (``precision="bf16"``) but not chosen silently.

The encoder and the decoder are exported and cached apart (:mod:`.cache`), each keyed by the
checksum of its own weights, the OpenVINO and torch versions, the precision and this module's
export version: fine-tuned weights, a new runtime or a changed export never reuse a stale IR, while
a k-class head and box prompts on the same base model share one encoder export.

``precision="int8"`` (opt-in, k-class models) quantises the encoder's f32 export with NNCF's
post-training quantisation, calibrated on slices of the volume being segmented; TinyViT's leading
convolutions (everything before the first matrix multiplication) stay f32: quantising them too
lowered the labels' agreement with f32 on colin27_aal's crop from 99.2% to 98.6% and its Dice by 0.01
(docs/results/NOTES.md). The decoder stays f32. The int8 export is cached like the others, keyed also by the calibration slices.

``precision="bf16"`` (opt-in, CPUs with bf16 units only) compiles the same f32 export with OpenVINO's
bf16 inference precision: no calibration, nothing new on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..head import decode_boxes
from .cache import cache_key, cached_entry, user_cache_dir, valid_entry, weights_checksum

# Raise when the exported graphs change (their inputs, outputs or what they compute).
EXPORT_VERSION = 1
PRECISIONS = ("f32", "int8", "bf16")
# Slices of the volume that calibrate an int8 encoder (evenly spread over the slices to segment).
CALIBRATION_SLICES = 16
KINDS = ("classes", "boxes")
# The user cache keeps this many exports (least recently used go first).
USER_CACHE_ENTRIES = 16


def openvino_version() -> Optional[str]:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


class _Encoder(nn.Module):
    """Images [1, 3, S, S] in [0, 1] -> image embeddings (pixel normalisation included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model.image_encoder(self.model.normalize(images01))


class _ClassDecoder(nn.Module):
    """Image embeddings -> k+1 class logits at the model's input size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.decode(embeddings)


class _BoxDecoder(nn.Module):
    """One image embedding and N boxes -> N mask logits at the model's input size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        return decode_boxes(self.model, embeddings, boxes_xyxy)


def _part_modules(model: nn.Module, part: str) -> nn.Module:
    """The modules whose weights an exported part holds (what its key's checksum covers)."""
    if part == "encoder":
        return nn.ModuleDict({"image_encoder": model.image_encoder})
    return nn.ModuleDict({"prompt_encoder": model.prompt_encoder, "mask_decoder": model.mask_decoder})


def part_key(model: nn.Module, part: str, precision: str, calibration: Optional[np.ndarray] = None) -> str:
    """The cache key of one exported part; ``calibration`` (the int8 encoder's slices) is part of it."""
    import openvino

    fields = {
        "part": part,
        "weights": weights_checksum(_part_modules(model, part)),
        "precision": precision,
        "openvino": openvino.__version__,
        "torch": torch.__version__.split("+")[0],
        "export_version": EXPORT_VERSION,
        "architecture": model.architecture.to_dict(),
    }
    if part == "encoder":
        fields["pixel_mean"] = model.pixel_mean.flatten().tolist()
        fields["pixel_std"] = model.pixel_std.flatten().tolist()
    if calibration is not None:
        array = np.ascontiguousarray(calibration, dtype=np.float32)
        fields["calibration"] = hashlib.sha256(array.tobytes()).hexdigest() + str(array.shape)
        fields["nncf"] = nncf_version()
    return cache_key(fields)


def nncf_version() -> Optional[str]:
    try:
        import nncf
    except ImportError:
        return None
    return nncf.__version__


def leading_convolutions(ov_model) -> list[str]:
    """Names of the convolutions that run before the encoder's first matrix multiplication (TinyViT's
    convolutional stage, SAM ViT's patch embedding): the layers an int8 encoder keeps in f32."""
    names = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() == "MatMul":
            break
        if op.get_type_name() in ("Convolution", "GroupConvolution"):
            names.append(op.get_friendly_name())
    return names


def quantize_encoder(f32_xml: Path, calibration: np.ndarray, folder: Path) -> dict:
    """Post-training int8 quantisation of an exported f32 encoder (``encoder.xml`` in ``folder``).

    ``calibration``: model inputs [N, 3, S, S] in [0, 1], real slices of the task. NNCF's transformer model
    type leaves softmax and normalisation unquantised; its mixed preset quantises activations asymmetrically."""
    import logging

    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    started = time.perf_counter()
    f32 = ov.Core().read_model(f32_xml)
    samples = [np.ascontiguousarray(calibration[n : n + 1], dtype=np.float32) for n in range(len(calibration))]
    with contextlib.redirect_stdout(sys.stderr):  # NNCF draws progress bars; stdout may carry --progress json
        quantized = nncf.quantize(
            f32, nncf.Dataset(samples), subset_size=len(samples), preset=nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(names=leading_convolutions(f32)))
    ov.save_model(quantized, str(folder / "encoder.xml"), compress_to_fp16=False)
    return {"part": "encoder", "precision": "int8", "calibration_slices": len(samples), "nncf": nncf.__version__,
            "export_seconds": round(time.perf_counter() - started, 2), "openvino": ov.__version__}


def parts_for(kind: str) -> tuple[str, str]:
    if kind not in KINDS:
        raise ValueError(f"Unknown export kind {kind!r}; expected one of {KINDS}.")
    return ("encoder", "decoder" if kind == "classes" else "box_decoder")


def cache_location(model: nn.Module, part: str, cache_dir: Optional[str | Path], key: str) -> tuple[Path, str]:
    """(root, entry name): ``cache_dir`` (next to a model file) holds one entry per part; the user
    cache, shared by many models, names its entries by key too."""
    name = f"{model.base_name}-{model.image_size}-{part}"
    if cache_dir is not None:
        return Path(cache_dir), name
    return user_cache_dir() / "openvino", f"{name}-{key[:12]}"


def is_cached(model: nn.Module, kind: str, cache_dir: Optional[str | Path] = None, precision: str = "f32") -> bool:
    """Whether valid exports of exactly these weights are on disk for ``kind`` (nothing is built)."""
    for part in parts_for(kind):
        key = part_key(model, part, precision)
        root, name = cache_location(model, part, cache_dir, key)
        if not valid_entry(root / name, key):
            return False
    return True


def cpu_has_bf16() -> bool:
    """Whether OpenVINO finds bf16 units on this CPU (without them it would emulate bf16, slower than f32)."""
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an older runtime without the property: no claim of bf16
        return False


def check_int8_request(kind: str, calibration) -> np.ndarray:
    """The calibration slices of an int8 encoder as float32 [N, 3, S, S], or a clear error."""
    if kind != "classes":
        raise ValueError("int8 inference is offered for adapted k-class models only; box prompts run in f32.")
    if nncf_version() is None:
        raise ValueError("int8 inference needs the 'nncf' package (pip install nncf), or use --inference-precision f32.")
    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 inference needs calibration slices of the volume to segment.")
    array = calibration.detach().cpu().float().numpy() if isinstance(calibration, torch.Tensor) else np.asarray(calibration, np.float32)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"Calibration slices must be model inputs [N, 3, S, S]; got shape {tuple(array.shape)}.")
    return array


def export_part(model: nn.Module, part: str, folder: Path) -> dict:
    """Convert one part to OpenVINO IR (``<part>.xml`` + ``.bin``, f32 weights) in ``folder``."""
    import openvino as ov

    size = model.image_size
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side shape arithmetic
            image = torch.rand(1, 3, size, size)
            if part == "encoder":
                converted = ov.convert_model(_Encoder(model), example_input=image)
            else:
                embeddings = _Encoder(model)(image)
                if part == "decoder":
                    converted = ov.convert_model(_ClassDecoder(model), example_input=embeddings)
                else:
                    boxes = torch.tensor([[0.1 * size, 0.1 * size, 0.6 * size, 0.7 * size],
                                          [0.3 * size, 0.2 * size, 0.9 * size, 0.8 * size]])
                    converted = ov.convert_model(
                        _BoxDecoder(model), example_input=(embeddings, boxes),
                        input=[ov.PartialShape(list(embeddings.shape)), ov.PartialShape([-1, 4])],
                    )
            ov.save_model(converted, str(folder / f"{part}.xml"), compress_to_fp16=False)
    finally:
        model.train(was_training)
    return {"part": part, "export_seconds": round(time.perf_counter() - started, 2), "openvino": ov.__version__}


def compile_config(precision: str = "f32", threads: Optional[int] = None) -> dict:
    """CPU settings: explicit inference precision (f32 unless asked), one latency stream, torch's thread count."""
    return {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
    }


class OpenVinoRunner:
    """Encoder and decoder of a segmenter (``kind='classes'``) or base model (``'boxes'``) in OpenVINO.

    Same interface as :class:`~MedSAGaLib.backends.torch_backend.TorchRunner`: tensors in, CPU
    tensors out. ``built`` lists the parts exported now (the others came from the cache).
    """

    name = "openvino"

    def __init__(
        self,
        model: nn.Module,
        kind: str = "classes",
        cache_dir: Optional[str | Path] = None,
        precision: str = "f32",
        threads: Optional[int] = None,
        calibration: Optional[torch.Tensor | np.ndarray] = None,
    ) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(
                f"OpenVINO precision {precision!r} is not offered: only {' and '.join(PRECISIONS)}, whose masks are "
                "measured against PyTorch's f32.")
        if precision == "int8":
            calibration = check_int8_request(kind, calibration)
        if precision == "bf16" and not cpu_has_bf16():
            raise ValueError("--inference-precision bf16 needs a CPU with bf16 units (AVX-512 BF16 or AMX), which "
                             "OpenVINO does not find here; use f32 or int8.")
        self.image_size = model.image_size
        self.roi = getattr(model, "roi", None)  # a crop the model was fine-tuned on (predict_slices applies it)
        self.sides = getattr(model, "sides", None)  # left/right pairs learnt as one structure (split there too)
        self.kind = kind
        self.precision = precision
        started = time.perf_counter()
        core = ov.Core()
        # The int8 IR carries its own quantised layers; every other layer runs f32, as in the f32 export.
        config = compile_config("bf16" if precision == "bf16" else "f32", threads)
        keep = 4 if cache_dir is not None else USER_CACHE_ENTRIES
        compiled, self.built, self.folders = [], [], []
        for part in parts_for(kind):
            key = part_key(model, part, "f32")
            root, name = cache_location(model, part, cache_dir, key)
            folder, built = cached_entry(root, name, key, lambda f, part=part: export_part(model, part, f),
                                         keep_entries=keep)
            if built:
                self.built.append(part)
            if part == "encoder" and precision == "int8":  # quantised from the f32 export, cached beside it
                key = part_key(model, part, "int8", calibration)
                root, name = cache_location(model, "encoder-int8", cache_dir, key)
                folder, built = cached_entry(root, name, key,
                                             lambda f, source=folder: quantize_encoder(source / "encoder.xml", calibration, f),
                                             keep_entries=keep)
                if built:
                    self.built.append("encoder-int8")
            compiled.append(core.compile_model(core.read_model(folder / f"{part}.xml"), "CPU", config))
            self.folders.append(folder)
        self.encoder, self.decoder = compiled
        self.prepare_seconds = time.perf_counter() - started
        self.threads = config["INFERENCE_NUM_THREADS"]
        self.description = f"OpenVINO {ov.__version__} ({'int8 encoder' if precision == 'int8' else precision}, {self.threads} threads)"
        self._encoder_request = self.encoder.create_infer_request()
        self._decoder_request = self.decoder.create_infer_request()

    @staticmethod
    def _run(request, inputs: list[np.ndarray]) -> torch.Tensor:
        request.infer([np.ascontiguousarray(a, dtype=np.float32) for a in inputs])
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> image embeddings (the IR takes one image at a time)."""
        images = images01.detach().cpu().float().numpy()
        return torch.cat([self._run(self._encoder_request, [images[n : n + 1]]) for n in range(images.shape[0])])

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.kind != "classes":
            raise TypeError("This OpenVINO runner holds a box decoder, not a k-class decoder.")
        array = embeddings.detach().cpu().float().numpy()
        return torch.cat([self._run(self._decoder_request, [array[n : n + 1]]) for n in range(array.shape[0])])

    def decode_boxes(self, embeddings: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        if self.kind != "boxes":
            raise TypeError("This OpenVINO runner holds a k-class decoder, not a box decoder.")
        boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4).numpy()
        return self._run(self._decoder_request, [embeddings.detach().cpu().float().numpy(), boxes])

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images01))
