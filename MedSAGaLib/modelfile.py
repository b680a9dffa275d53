"""Adapted-model files: safetensors weights + MedSAGa metadata, written atomically, read safely.

Model files travel between sites, so nothing in them is executed: the weights are safetensors and
the metadata is JSON in the safetensors header. A SHA-256 of the tensor payload catches corruption
that the container format itself cannot see.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .fileio import atomic_write
from .head import ClassSegmenter
from .models import BASE_MODELS, Architecture, build_base_model

FORMAT_NAME = "medsaga-model"
FORMAT_VERSION = 1
SUFFIX = ".medsaga"


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt, foreign or does not fit what was asked."""


def _payload_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def model_metadata(segmenter: ClassSegmenter, extra: Optional[dict] = None) -> dict:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": segmenter.base_name,
        "image_size": segmenter.image_size,
        "architecture": segmenter.architecture.to_dict(),
        "class_names": segmenter.class_names,
        "class_colors": [list(c) for c in segmenter.class_colors],
        "preprocessing": {"intensity": "percentile", "percentiles": [0.5, 99.5]},
        "training": None,
    }
    if getattr(segmenter, "roi", None) is not None:
        meta["roi"] = segmenter.roi.to_dict()
    meta.update(extra or {})
    return meta


def save_model(path: str | Path, segmenter: ClassSegmenter, metadata: Optional[dict] = None) -> Path:
    """Write the adapted model (all weights + metadata) to ``path`` atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in segmenter.state_dict().items()}
    meta = model_metadata(segmenter, metadata)
    meta["payload_sha256"] = _payload_digest(state)
    header = {"medsaga": json.dumps(meta)}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))


def _check_complete(path: Path) -> None:
    """Tell a truncated model file (an interrupted copy) from a foreign one."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_size <= 100_000_000:
            return  # not a safetensors layout; safe_open names the problem
        text = handle.read(header_size)
    if len(text) < header_size:
        raise ModelFileError(f"{path} is truncated: its header is cut short ({size} bytes); copy the file again.")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and size < 8 + header_size + max(ends):
        raise ModelFileError(
            f"{path} is truncated: {size} bytes of {8 + header_size + max(ends)}; copy the file again."
        )


def read_metadata(path: str | Path) -> dict:
    """The metadata of a MedSAGa model file; ModelFileError for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file.")
    _check_complete(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:
        raise ModelFileError(
            f"{path} is not a MedSAGa model file (not a readable safetensors file: {exc})."
        ) from None
    if "medsaga" not in header:
        raise ModelFileError(f"{path} is a safetensors file but not a MedSAGa model (no MedSAGa metadata).")
    try:
        meta = json.loads(header["medsaga"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path} has corrupt MedSAGa metadata: {exc}") from None
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a MedSAGa model file.")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer MedSAGa (format {meta['format_version']}); update MedSAGa to read it."
        )
    return meta


def _load_state(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path} is truncated or corrupt: {exc}") from None
    if meta.get("payload_sha256") and _payload_digest(state) != meta["payload_sha256"]:
        raise ModelFileError(f"{path} is corrupt: its weights do not match the checksum written with them.")
    return state


def is_model_file(name: str | Path) -> bool:
    return str(name) not in BASE_MODELS


def load_model(
    path_or_base: str | Path,
    class_names: Optional[Sequence[str]] = None,
    checkpoint: Optional[str | Path] = None,
    image_size: Optional[int] = None,
) -> ClassSegmenter:
    """An adapted model from its file, or an untrained k-class head on a base model's weights.

    ``class_names`` is required for a base model; for a file it is a check (ModelFileError when the
    file's classes differ).
    """
    if not is_model_file(path_or_base):
        if not class_names:
            raise ModelFileError(f"Give the class names to build an untrained head on {path_or_base}.")
        base = build_base_model(str(path_or_base), checkpoint=checkpoint, image_size=image_size)
        segmenter = ClassSegmenter.from_base(base, list(class_names))
        segmenter.metadata = model_metadata(segmenter)
        return segmenter
    path = Path(path_or_base)
    meta = read_metadata(path)
    names = list(meta.get("class_names") or [])
    if class_names is not None and list(class_names) != names:
        raise ModelFileError(
            f"{path} segments {len(names)} classes {names}, not the {len(class_names)} asked for {list(class_names)}."
        )
    arch = Architecture.from_dict(meta["architecture"])
    base = build_base_model(arch.base, pretrained=False, architecture=meta["architecture"], image_size=arch.image_size)
    segmenter = ClassSegmenter.from_base(base, names, meta.get("class_colors"))
    state = _load_state(path, meta)
    token_key = "mask_decoder.mask_tokens.weight"
    if token_key in state and state[token_key].shape[0] != len(names) + 1:
        raise ModelFileError(
            f"{path} is inconsistent: its metadata lists {len(names)} classes but its decoder has "
            f"{state[token_key].shape[0] - 1} class slots."
        )
    try:
        segmenter.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path} does not fit a {arch.base} model: {str(exc)[:300]}") from None
    from .roi import RegionOfInterest

    try:
        segmenter.roi = RegionOfInterest.from_dict(meta.get("roi"))
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"{path} has an unreadable region of interest in its metadata: {meta.get('roi')!r}") from None
    segmenter.metadata = meta
    return segmenter
