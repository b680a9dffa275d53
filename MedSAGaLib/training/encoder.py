"""Split an image encoder into a frozen prefix (computed once, cached) and a trainable suffix.

TinyViT (LiteMedSAM): ``patch_embed``, four ``layers`` (a convolutional stage at full resolution,
then three attention stages), ``neck``. SAM ViT: ``patch_embed`` + ``pos_embed``, ``blocks`` (grouped
into four stages of equal depth), ``neck``. Training the last ``n`` stages means everything in front
of them is frozen; ``n == num_stages`` trains the patch embedding too (nothing is cached), ``n == 0``
freezes the whole encoder (its output is cached).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import set_chunked_attention

NUM_STAGES = 4


def encoder_kind(encoder: nn.Module) -> str:
    if hasattr(encoder, "layers") and hasattr(encoder, "patch_embed"):
        return "tinyvit"
    if hasattr(encoder, "blocks") and hasattr(encoder, "patch_embed"):
        return "vit"
    raise TypeError(f"Unsupported image encoder {type(encoder).__name__}.")


def _stage_groups(encoder: nn.Module) -> list[list[nn.Module]]:
    """The encoder's 4 stages, each a list of sequential modules."""
    if encoder_kind(encoder) == "tinyvit":
        return [[layer] for layer in encoder.layers]
    blocks = list(encoder.blocks)
    bounds = [round(i * len(blocks) / NUM_STAGES) for i in range(NUM_STAGES + 1)]
    return [blocks[bounds[i] : bounds[i + 1]] for i in range(NUM_STAGES)]


def attention_blocks(encoder: nn.Module) -> list[nn.Module]:
    """Blocks whose ``.attn.qkv`` is the fused q/k/v projection (LoRA targets), in order."""
    if encoder_kind(encoder) == "tinyvit":
        return [blk for layer in encoder.layers for blk in getattr(layer, "blocks", []) if hasattr(blk, "attn")]
    return list(encoder.blocks)


class EncoderSplit:
    """Run an encoder as ``suffix(prefix(x))`` with only the suffix trainable."""

    def __init__(self, encoder: nn.Module, train_stages: int) -> None:
        self.encoder = encoder
        self.kind = encoder_kind(encoder)
        self.stages = _stage_groups(encoder)
        self.num_stages = len(self.stages)
        self.train_stages = max(0, min(int(train_stages), self.num_stages))
        first = self.num_stages - self.train_stages
        self.frozen_stages = [m for group in self.stages[:first] for m in group]
        self.trainable_stages = [m for group in self.stages[first:] for m in group]

    @property
    def whole(self) -> bool:
        """True when the whole encoder trains (no prefix to cache)."""
        return self.train_stages == self.num_stages

    @property
    def frozen(self) -> bool:
        return self.train_stages == 0

    def _stem(self) -> list[nn.Module]:
        return [self.encoder.patch_embed]

    def trainable_modules(self) -> list[nn.Module]:
        """Modules whose parameters train (empty when the encoder is frozen)."""
        if self.frozen:
            return []
        mods = list(self.trainable_stages) + [self.encoder.neck]
        if self.whole:
            mods = self._stem() + mods
        return mods

    def trainable_attention_blocks(self) -> list[nn.Module]:
        """Blocks of the trainable stages whose ``.attn.qkv`` is the fused q/k/v projection (LoRA's targets)."""
        return [m for stage in self.trainable_stages for m in stage.modules() if hasattr(m, "attn") and hasattr(m.attn, "qkv")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for m in self.trainable_modules() for p in m.parameters()]
        if self.whole and self.kind == "vit" and getattr(self.encoder, "pos_embed", None) is not None:
            params.append(self.encoder.pos_embed)
        seen, unique = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        return unique

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder.patch_embed(x)
        if self.kind == "vit" and getattr(self.encoder, "pos_embed", None) is not None:
            x = x + self.encoder.pos_embed
        return x

    def _finish(self, x: torch.Tensor, neck: nn.Module | None = None) -> torch.Tensor:
        neck = self.encoder.neck if neck is None else neck
        if self.kind == "tinyvit":
            batch, tokens, channels = x.shape
            side = int(round(tokens**0.5))
            x = x.view(batch, side, side, channels).permute(0, 3, 1, 2)
            return neck(x)
        return neck(x.permute(0, 3, 1, 2))

    def prefix(self, normalized: torch.Tensor) -> torch.Tensor:
        """Frozen part: normalised images -> features entering the first trainable stage."""
        if self.whole:
            return normalized
        x = self._embed(normalized)
        for m in self.frozen_stages:
            x = m(x)
        if self.frozen:
            x = self._finish(x)
        return x

    def inference_prefix(self):
        """``prefix`` for preparing training slices, run on an inference copy of the frozen modules
        (:mod:`MedSAGaLib.fastpath`: TinyViT's conv+BN folded, channels-last convolutions): the same
        features up to float rounding, about 1.3x faster on a CPU. The encoder itself is not touched.
        A SAM ViT has nothing to fold, and a whole-encoder split no prefix: both get ``prefix``."""
        if self.whole or self.kind != "tinyvit":
            return self.prefix
        from ..fastpath import inference_copy

        frozen = nn.Module()  # only the frozen modules are copied, never the trained ones or their hooks
        frozen.patch_embed = self.encoder.patch_embed
        frozen.layers = nn.ModuleList(self.frozen_stages)
        frozen.neck = self.encoder.neck if self.frozen else nn.Identity()
        fast = inference_copy(frozen)

        def prefix(normalized: torch.Tensor) -> torch.Tensor:
            x = fast.patch_embed(normalized)
            for m in fast.layers:
                x = m(x)
            return self._finish(x, fast.neck) if self.frozen else x

        return prefix

    @property
    def frozen_depth(self) -> int:
        """Stages the prefix applies (after the patch embedding)."""
        return self.num_stages - self.train_stages

    def prefix_from(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        """Continue the frozen prefix from features that already went through ``depth`` stages."""
        if self.whole or depth > self.frozen_depth:
            raise ValueError("Cached features are deeper than this split's frozen prefix.")
        x = features
        for group in self.stages[depth : self.frozen_depth]:
            for m in group:
                x = m(x)
        if self.frozen:
            x = self._finish(x)
        return x

    def suffix(self, features: torch.Tensor) -> torch.Tensor:
        """Trainable part: prefix features -> image embeddings."""
        if self.frozen:
            return features
        x = self._embed(features) if self.whole else features
        for m in self.trainable_stages:
            x = m(x)
        return self._finish(x)


def _checkpointed_forward(module: nn.Module, original, *args):
    if torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False)
    return original(*args)


def set_checkpointing(blocks: list[nn.Module], enabled: bool) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    A recomputed global-attention block (SAM ViT) also computes its attention a chunk of query rows
    at a time, so its backward pass never holds the whole attention map (see ``attention.py``).
    """
    for blk in blocks:
        if enabled and "forward" not in blk.__dict__:
            blk.forward = functools.partial(_checkpointed_forward, blk, blk.forward)
        elif not enabled and "forward" in blk.__dict__:
            del blk.forward
    set_chunked_attention(blocks, enabled)


def checkpoint_units(split: EncoderSplit) -> list[nn.Module]:
    """The blocks inside the trainable stages (the unit of activation checkpointing)."""
    units = []
    for m in split.trainable_stages:
        if hasattr(m, "blocks"):
            units.extend(m.blocks)
            if getattr(m, "downsample", None) is not None:
                units.append(m.downsample)
        else:
            units.append(m)
    return units
