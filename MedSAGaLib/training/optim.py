"""Parameter groups, GaLore, layer-wise updates and the warm-up + poly learning-rate schedule.

GaLore (galore-torch's ``GaLoreAdamW``) projects a parameter's gradient only when the parameter's
*group* carries ``rank``; a GaLoreAdamW given a plain parameter list is AdamW. So the encoder's
2-D ``nn.Linear`` weights go into groups with ``rank``/``update_proj_gap``/``scale``/``proj_type``
(one group per rank, the rank capped below each layer's smaller dimension), and everything else
(biases, norms, convolutions, attention biases, decoder, prompt embeddings) into rank-less groups.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FinetuneConfig, TrainingError
from .methods import get_method


def _galore_adamw():
    # galore-torch imports bitsandbytes, which prints a notice on machines without its kernels.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from galore_torch import GaLoreAdamW
    return GaLoreAdamW


def lr_factor(step: int, total: int, warmup: int, power: float = 0.9) -> float:
    """Linear warm-up over ``warmup`` steps, then polynomial decay to 0 at ``total`` (step counts from 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    done = min(max(step - warmup, 0), span)
    return max(0.0, 1.0 - done / span) ** power


def capped_rank(shape: torch.Size, rank: int) -> int:
    """GaLore's rank for one weight: below the weight's smaller dimension (a full-rank 'projection' is none)."""
    return max(1, min(rank, min(shape) - 1))


def linear_weights(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The 2-D ``nn.Linear`` weights inside ``modules`` (GaLore's targets), without duplicates."""
    seen, out = set(), []
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in seen:
                seen.add(id(m.weight))
                out.append(m.weight)
    return out


def galore_groups(weights: list[nn.Parameter], config: FinetuneConfig, lr: float) -> tuple[list[dict], list[str]]:
    """GaLore param groups (one per capped rank) and notes about capped ranks."""
    if not weights:
        return [], []
    largest = max(min(w.shape) for w in weights)
    if config.rank >= largest:
        raise TrainingError(
            f"GaLore rank {config.rank} is not below any trained layer's smaller dimension (largest allowed: "
            f"{largest - 1}); use --rank {min(largest - 1, 64)} or less."
        )
    by_rank: dict[int, list[nn.Parameter]] = {}
    for w in weights:
        by_rank.setdefault(capped_rank(w.shape, config.rank), []).append(w)
    notes = []
    groups = []
    for rank, params in sorted(by_rank.items()):
        if rank < config.rank:
            notes.append(f"GaLore rank capped to {rank} for {len(params)} layer(s) narrower than {config.rank + 1}")
        groups.append(
            dict(
                params=params,
                lr=lr,
                weight_decay=config.weight_decay,
                rank=rank,
                update_proj_gap=config.update_proj_gap,
                scale=config.scale,
                proj_type=config.proj_type,
                name=f"galore_r{rank}",
            )
        )
    return groups, notes


@dataclass
class TrainingOptimizer:
    """One or many optimizers driven as one: LR schedule, step, zero_grad.

    In layer-wise mode every parameter has its own optimizer, stepped by a
    ``register_post_accumulate_grad_hook`` as soon as its gradient is ready; the gradient is freed
    right after, so no full set of gradient buffers exists at any time. ``step()`` is then a no-op.
    """

    optimizers: list[torch.optim.Optimizer]
    layerwise: bool = False
    notes: list[str] = field(default_factory=list)
    hooks: list = field(default_factory=list)
    grad_scaler: object = None

    def __post_init__(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def set_lr_factor(self, factor: float) -> float:
        lr = 0.0
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
                lr = max(lr, group["lr"])
        return lr

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.layerwise:
            return
        for opt in self.optimizers:
            if self.grad_scaler is not None:
                self.grad_scaler.step(opt)
            else:
                opt.step()
            compact_projections(opt)
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def galore_states(self) -> list[dict]:
        """Optimizer states of the parameters that GaLore projects (for tests and reports)."""
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                if "rank" in group:
                    out.extend(opt.state[p] for p in group["params"] if p in opt.state)
        return out


def compact_projections(optimizer: torch.optim.Optimizer) -> None:
    """Keep only the rank-sized part of each GaLore projection matrix.

    galore-torch takes the projection as a slice of the full SVD factor (``Vh[:rank]`` or
    ``U[:, :rank]``), so the whole square factor stays alive behind it: on vit_b that is about
    110 MB of optimizer state that the rank never asked for. A copy holds the same numbers.
    """
    for state in optimizer.state.values():
        projector = state.get("projector") if isinstance(state, dict) else None
        matrix = getattr(projector, "ortho_matrix", None)
        if isinstance(matrix, torch.Tensor) and _oversized(matrix):
            projector.ortho_matrix = matrix.clone(memory_format=torch.contiguous_format)
        elif isinstance(matrix, list):
            projector.ortho_matrix = [m.clone(memory_format=torch.contiguous_format) if _oversized(m) else m
                                      for m in matrix]


def _oversized(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def build_optimizer(groups: list[dict], config: FinetuneConfig, notes=None) -> TrainingOptimizer:
    """Groups with ``rank`` -> GaLoreAdamW; the rest -> AdamW (inside the same GaLoreAdamW for galore)."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainingError("Nothing to train: no parameter requires a gradient.")
    uses_galore = any("rank" in g for g in groups)
    layerwise = get_method(config.method).layerwise
    if not layerwise:
        if uses_galore:
            opt = _galore_adamw()(groups, lr=config.lr, weight_decay=config.weight_decay, no_deprecation_warning=True)
        else:
            opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        return TrainingOptimizer([opt], notes=list(notes or []))
    optimizers, hooks = [], []
    galore_cls = _galore_adamw()
    for group in groups:
        for p in group["params"]:
            single = dict(group, params=[p])
            if "rank" in group:
                opt = galore_cls([single], lr=group["lr"], no_deprecation_warning=True)
            else:
                opt = torch.optim.AdamW([single], lr=group["lr"])
            optimizers.append(opt)

            def hook(param, opt=opt, galore="rank" in group):
                opt.step()
                if galore:
                    compact_projections(opt)
                opt.zero_grad(set_to_none=True)

            hooks.append(p.register_post_accumulate_grad_hook(hook))
    return TrainingOptimizer(optimizers, layerwise=True, notes=list(notes or []), hooks=hooks)


def count(params) -> int:
    return sum(p.numel() for p in params)


def check_finite_lr(config: FinetuneConfig) -> None:
    for value in (config.lr, config.encoder_lr or config.lr):
        if not math.isfinite(value):
            raise TrainingError("Learning rates must be finite.")
