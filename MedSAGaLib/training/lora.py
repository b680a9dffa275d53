"""SAMed-style LoRA: low-rank updates of the query and value projections of every attention block.

Both encoders fuse q, k and v into one ``qkv`` Linear, laid out differently: SAM ViT puts all
queries, then all keys, then all values; TinyViT interleaves them per head (q, k, v of head 0, then
head 1, ...). :func:`qv_indices` finds the output rows of q and v for either layout. After training,
:func:`merge_lora` folds the update into the Linear weights, so a model file never holds LoRA parts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .encoder import attention_blocks, encoder_kind


def qv_indices(attn: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = attn.qkv.out_features
    if kind == "vit":
        dim = out // 3
        return torch.arange(0, dim), torch.arange(2 * dim, 3 * dim)
    heads, key_dim, d = attn.num_heads, attn.key_dim, attn.d
    per_head = 2 * key_dim + d
    if per_head * heads != out:
        raise ValueError("Unexpected TinyViT attention layout.")
    q = torch.cat([torch.arange(h * per_head, h * per_head + key_dim) for h in range(heads)])
    v = torch.cat([torch.arange(h * per_head + 2 * key_dim, (h + 1) * per_head) for h in range(heads)])
    return q, v


class LoRAQKV(nn.Module):
    """``qkv(x) + scaling * (B_q A_q x -> q rows, B_v A_v x -> v rows)``; the base Linear is frozen."""

    def __init__(self, base: nn.Linear, q_index: torch.Tensor, v_index: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.register_buffer("q_index", q_index, persistent=False)
        self.register_buffer("v_index", v_index, persistent=False)
        self.a_q = nn.Linear(base.in_features, rank, bias=False)
        self.b_q = nn.Linear(rank, len(q_index), bias=False)
        self.a_v = nn.Linear(base.in_features, rank, bias=False)
        self.b_v = nn.Linear(rank, len(v_index), bias=False)
        for a in (self.a_q, self.a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.b_q, self.b_v):
            nn.init.zeros_(b.weight)  # starts as the pretrained layer exactly

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        out = out.index_add(-1, self.q_index, self.b_q(self.a_q(x)), alpha=self.scaling)
        return out.index_add(-1, self.v_index, self.b_v(self.a_v(x)), alpha=self.scaling)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        weight = self.base.weight
        weight.index_add_(0, self.q_index, (self.b_q.weight @ self.a_q.weight) * self.scaling)
        weight.index_add_(0, self.v_index, (self.b_v.weight @ self.a_v.weight) * self.scaling)
        return self.base


def apply_lora(encoder: nn.Module, rank: int = 4, alpha: float = 4.0, blocks=None) -> list[LoRAQKV]:
    """Wrap the qkv Linear of every attention block (or of ``blocks``) with LoRA on q and v."""
    kind = encoder_kind(encoder)
    wrapped = []
    for blk in blocks if blocks is not None else attention_blocks(encoder):
        attn = blk.attn
        if isinstance(attn.qkv, LoRAQKV):
            wrapped.append(attn.qkv)
            continue
        q, v = qv_indices(attn, kind)
        lora = LoRAQKV(attn.qkv, q, v, rank, alpha).to(attn.qkv.weight.device)
        attn.qkv = lora
        wrapped.append(lora)
    return wrapped


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRAQKV under ``module`` back into a plain Linear; returns how many were merged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRAQKV):
                setattr(parent, name, child.merged())
                count += 1
    return count


def lora_parameters(wrapped: list[LoRAQKV]) -> list[nn.Parameter]:
    return [p for w in wrapped for m in (w.a_q, w.b_q, w.a_v, w.b_v) for p in m.parameters()]
