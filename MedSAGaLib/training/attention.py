"""Row-chunked global attention for SAM ViT blocks trained with activation checkpointing.

A checkpointed block is recomputed in the backward pass. For a SAM ViT global-attention block at
1024 px (64 x 64 tokens) that recomputation builds a 4096 x 4096 attention map per head, and its
backward pass holds the map, its softmax and their gradients at once: about 2.3 GB in fp32 for
vit_b, more than everything GaLore saves. Softmax is taken row by row, so the same result can be
computed a block of query rows at a time, each block checkpointed on its own: only one block's map
is alive at a time. Same numbers as segment-anything's ``Attention.forward`` up to float rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# bytes of one chunk's fp32 attention map; small enough to vanish next to the block's other tensors
CHUNK_BYTES = 64 * 2**20


def is_global_attention_block(block: nn.Module) -> bool:
    """A segment-anything ViT block whose attention spans the whole image (``window_size == 0``)."""
    attn = getattr(block, "attn", None)
    return getattr(block, "window_size", None) == 0 and attn is not None and hasattr(attn, "qkv") \
        and hasattr(attn, "proj") and hasattr(attn, "num_heads")


def _rows(q, k, v, rel_h, rel_w, scale: float, k_hw: tuple[int, int]) -> torch.Tensor:
    """softmax(q k^T * scale + relative positions) v for a block of query rows."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        bh, n, _ = attn.shape
        attn = (attn.view(bh, n, *k_hw) + rel_h[:, :, :, None] + rel_w[:, :, None, :]).view(bh, n, -1)
    return attn.softmax(dim=-1) @ v


def chunked_attention_forward(attn: nn.Module, x: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """segment-anything ``Attention.forward``, computed ``chunk_bytes`` of attention map at a time."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
    rel_h = rel_w = None
    if attn.use_rel_pos:
        r_q = q.reshape(b * heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, attn.rel_pos_h)).reshape(b * heads, h * w, h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, attn.rel_pos_w)).reshape(b * heads, h * w, w)
    rows = max(1, chunk_bytes // (b * heads * h * w * x.element_size()))
    grad = torch.is_grad_enabled()
    out = []
    for s in range(0, h * w, rows):
        args = (q[:, s : s + rows], k, v, None if rel_h is None else rel_h[:, s : s + rows],
                None if rel_w is None else rel_w[:, s : s + rows], attn.scale, (h, w))
        out.append(checkpoint(_rows, *args, use_reentrant=False) if grad else _rows(*args))
    y = torch.cat(out, dim=1).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(y)


def set_chunked_attention(blocks: list[nn.Module], enabled: bool) -> None:
    """Route the global-attention blocks among ``blocks`` through :func:`chunked_attention_forward`."""
    for blk in blocks:
        if not is_global_attention_block(blk):
            continue
        if enabled and "forward" not in blk.attn.__dict__:
            blk.attn.forward = functools.partial(chunked_attention_forward, blk.attn)
        elif not enabled and "forward" in blk.attn.__dict__:
            del blk.attn.forward
