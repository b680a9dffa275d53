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
from .models import BASE_MODELS, SAM_PATCH, SAM_WINDOW, Architecture, build_base_model
from .safety import InputError, check_class_colors, check_class_names

FORMAT_NAME = "medsaga-model"
FORMAT_VERSION = 1
SUFFIX = ".medsaga"


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt, foreign or does not fit what was asked."""


# Bounds on what a model file may ask to be built (SAM ViT-H is depth 32, width 1280, 16 heads).
# A file is untrusted input: nothing is allocated for it before its metadata passes these bounds
# and agrees with the shapes of the weights it carries.
LIMITS = dict(depth=(1, 40), embed_dim=(16, 1600), num_heads=(1, 32), image_size=(SAM_PATCH * SAM_WINDOW, 2048))
MAX_TENSORS = 4000
AXES = ("axial", "coronal", "sagittal", "i", "j", "k", "0", "1", "2")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(path, field: str, value, bounds: tuple[int, int]) -> int:
    if not _is_int(value) or not bounds[0] <= value <= bounds[1]:
        raise ModelFileError(
            f"{path}: metadata field {field} is {value!r}; expected a whole number from {bounds[0]} to {bounds[1]}.")
    return value


def validate_architecture(path, meta: dict) -> Architecture:
    """The architecture a model file asks for, within bounds, or ModelFileError naming the file and field."""
    base = meta.get("base_model")
    if base not in BASE_MODELS:
        raise ModelFileError(f"{path}: metadata base_model is {base!r}; expected one of {', '.join(BASE_MODELS)}.")
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ModelFileError(f"{path}: metadata has no architecture (a mapping of base, image_size, ...); "
                             "the file is damaged or was not written by MedSAGa.")
    if arch.get("base") != base:
        raise ModelFileError(f"{path}: metadata architecture.base {arch.get('base')!r} differs from base_model {base!r}.")
    unknown = sorted(set(arch) - set(Architecture.__dataclass_fields__))
    if unknown:
        raise ModelFileError(f"{path}: metadata architecture has unknown fields {unknown}.")
    size = arch.get("image_size")
    if base == "litemedsam":
        if size != 256:
            raise ModelFileError(f"{path}: metadata architecture.image_size is {size!r}; LiteMedSAM works at 256 px.")
        return Architecture(base=base, image_size=256)
    _check_range(path, "architecture.image_size", size, LIMITS["image_size"])
    if size % SAM_PATCH:
        raise ModelFileError(f"{path}: metadata architecture.image_size {size} is not a multiple of {SAM_PATCH}.")
    depth = _check_range(path, "architecture.depth", arch.get("depth"), LIMITS["depth"])
    width = _check_range(path, "architecture.embed_dim", arch.get("embed_dim"), LIMITS["embed_dim"])
    heads = _check_range(path, "architecture.num_heads", arch.get("num_heads"), LIMITS["num_heads"])
    if width % heads or (width // heads) % 2:
        raise ModelFileError(f"{path}: metadata architecture.embed_dim {width} does not split into {heads} heads.")
    blocks = arch.get("global_attn_indexes")
    if (not isinstance(blocks, list) or not all(_is_int(b) and 0 <= b < depth for b in blocks)
            or len(set(blocks)) != len(blocks)):
        raise ModelFileError(
            f"{path}: metadata architecture.global_attn_indexes is {blocks!r}; expected distinct block numbers 0-{depth - 1}.")
    return Architecture(base=base, image_size=size, embed_dim=width, depth=depth, num_heads=heads,
                        global_attn_indexes=list(blocks))


def _check_preprocessing(path, settings) -> None:
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ModelFileError(f"{path}: metadata preprocessing is {type(settings).__name__}, not a mapping.")
    kind = settings.get("intensity")
    if kind == "window":
        window = settings.get("window")
        if not (isinstance(window, list) and len(window) == 2 and all(_is_number(v) for v in window) and window[1] > 0):
            raise ModelFileError(f"{path}: metadata preprocessing.window is {window!r}; expected [centre, width > 0].")
    elif kind == "percentile":
        pct = settings.get("percentiles", [0.5, 99.5])
        if not (isinstance(pct, list) and len(pct) == 2 and all(_is_number(v) for v in pct) and 0 <= pct[0] < pct[1] <= 100):
            raise ModelFileError(f"{path}: metadata preprocessing.percentiles is {pct!r}; expected [low, high] in 0-100.")
    else:
        raise ModelFileError(f"{path}: metadata preprocessing.intensity is {kind!r}; expected 'percentile' or 'window'.")


def validate_metadata(path, meta) -> dict:
    """Check every field that steers loading or reaches another file; ModelFileError naming the file and field."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: MedSAGa metadata is {type(meta).__name__}, not a mapping.")
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a MedSAGa model file.")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise ModelFileError(f"{path}: metadata format_version is {version!r}; expected a whole number from 1.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer MedSAGa (format {version}); update MedSAGa to read it.")
    digest = meta.get("payload_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ModelFileError(
            f"{path} has no valid weight checksum (payload_sha256): its weights cannot be verified, so it is not loaded.")
    arch = validate_architecture(path, meta)
    if "image_size" in meta and meta["image_size"] != arch.image_size:
        raise ModelFileError(f"{path}: metadata image_size {meta['image_size']!r} differs from "
                             f"architecture.image_size {arch.image_size}.")
    try:
        names = check_class_names(meta.get("class_names"), f"{path}: metadata class_names")
        check_class_colors(meta.get("class_colors"), len(names), f"{path}: metadata class_colors")
    except InputError as exc:
        raise ModelFileError(str(exc)) from None
    _check_preprocessing(path, meta.get("preprocessing"))
    read_sides(path, meta)
    axis = meta.get("axis")
    if axis is not None and (not isinstance(axis, str) or axis.lower() not in AXES):
        raise ModelFileError(f"{path}: metadata axis is {axis!r}; expected one of {', '.join(AXES)}.")
    return meta


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading any weight."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) > MAX_TENSORS:
                raise ModelFileError(f"{path} holds {len(keys)} tensors; a MedSAGa model has far fewer.")
            return {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path} is truncated or corrupt: {exc}") from None


def _check_shapes(path: Path, meta: dict, arch: Architecture, shapes: dict, sides=None) -> None:
    """The weights must be those of the architecture and class count the metadata names (one token per
    structure where ``sides``, the model's :func:`read_sides`, learns left and right as one)."""
    names = meta["class_names"]
    slots = len(sides.names) if sides is not None else len(names)
    tokens = shapes.get("mask_decoder.mask_tokens.weight")
    if tokens is None or len(tokens) != 2:
        raise ModelFileError(f"{path} has no k-class mask decoder (mask_decoder.mask_tokens.weight).")
    if tokens[0] != slots + 1:
        what = f"{slots} structures (left and right as one)" if sides is not None else f"{len(names)} classes"
        raise ModelFileError(
            f"{path} is inconsistent: its metadata lists {what} but its decoder has {tokens[0] - 1} class slots.")
    if arch.base == "litemedsam":
        return  # fixed architecture: the strict load below checks every shape
    try:
        width = shapes["image_encoder.patch_embed.proj.weight"][0]
        grid = shapes["image_encoder.pos_embed"][1]
        blocks = {int(k.split(".")[2]) for k in shapes if k.startswith("image_encoder.blocks.")}
        head_dim = shapes["image_encoder.blocks.0.attn.rel_pos_h"][1]
        rel = {b: shapes[f"image_encoder.blocks.{b}.attn.rel_pos_h"][0] for b in blocks}
    except (KeyError, IndexError, ValueError):
        raise ModelFileError(f"{path}: its weights are not those of a SAM ViT encoder.") from None
    found = dict(embed_dim=width, depth=len(blocks), num_heads=width // max(head_dim, 1),
                 image_size=grid * SAM_PATCH,
                 global_attn_indexes=sorted(b for b, n in rel.items() if n == 2 * grid - 1))
    if grid == SAM_WINDOW:  # windows cover the whole image: global and windowed tables look alike
        found["global_attn_indexes"] = arch.global_attn_indexes
    for field, value in found.items():
        if getattr(arch, field) != value or blocks != set(range(len(blocks))):
            raise ModelFileError(
                f"{path}: metadata architecture.{field} is {getattr(arch, field)!r} but the weights have {value!r}; "
                "the metadata was edited or the file is damaged.")


def read_sides(path, meta: dict):
    """The model's :class:`~MedSAGaLib.laterality.SideSplit` (None when its classes are learnt apart)."""
    from .laterality import SideSplit

    if meta.get("sides") is None:
        return None
    try:
        return SideSplit.from_dict(meta["sides"], len(meta.get("class_names") or []))
    except ValueError as exc:
        raise ModelFileError(f"{path}: metadata sides (left and right learnt as one structure) is unreadable: "
                             f"{exc}.") from None


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
    if getattr(segmenter, "sides", None) is not None:
        meta["sides"] = segmenter.sides.to_dict()
    meta.update(extra or {})
    return meta


def save_model(path: str | Path, segmenter: ClassSegmenter, metadata: Optional[dict] = None) -> Path:
    """Write the adapted model (all weights + metadata) to ``path`` atomically."""
    from safetensors.torch import save_file

    meta = model_metadata(segmenter, metadata)
    # What this writes, a reader checks: refuse names and colours no reader would accept.
    check_class_names(meta["class_names"], f"{path}: class names")
    check_class_colors(meta["class_colors"], len(meta["class_names"]), f"{path}: class colours")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in segmenter.state_dict().items()}
    meta["payload_sha256"] = _payload_digest(state)
    header = {"medsaga": json.dumps(meta)}
    try:
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=header))
    except OSError as exc:
        # The weights may be hours of training: keep them somewhere before reporting the failure.
        from .safety import rescue_path

        reason = exc.strerror or str(exc)
        rescue = rescue_path(path)
        try:
            atomic_write(rescue, lambda tmp: save_file(state, tmp, metadata=header))
        except OSError:
            raise ModelFileError(f"Cannot write the model file {path} ({reason}), nor a copy in {rescue.parent}; "
                                 "the model is lost.") from None
        raise ModelFileError(f"Cannot write the model file {path} ({reason}); the model was kept at {rescue}: "
                             "move it where you want it.") from None


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
    return validate_metadata(path, meta)


def _load_state(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path} is truncated or corrupt: {exc}") from None
    if _payload_digest(state) != meta["payload_sha256"]:
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
        try:
            class_names = check_class_names(list(class_names), "--classes")
        except InputError as exc:
            raise ModelFileError(str(exc)) from None
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
    # Untrusted file: metadata bounds (read_metadata), then the weights' shapes from the header,
    # then the checksum over the weights; only then is anything built.
    arch = validate_architecture(path, meta)
    sides = read_sides(path, meta)
    _check_shapes(path, meta, arch, _header_shapes(path), sides)
    state = _load_state(path, meta)
    base = build_base_model(arch.base, pretrained=False, architecture=arch.to_dict(), image_size=arch.image_size)
    segmenter = ClassSegmenter.from_base(base, names, meta.get("class_colors"), sides=sides)
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
