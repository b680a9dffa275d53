"""Data-parallel fine-tuning under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N $(which medsaga) finetune ...`` starts N copies of the same command;
torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address. Each copy then:

- joins the process group (NCCL on CUDA, gloo on the CPU) and takes GPU ``LOCAL_RANK``;
- draws the same global batch of ``batch_size x WORLD_SIZE`` slices from the same seeded shuffle
  and trains on its own ``batch_size`` of them, so within an epoch the ranks see distinct slices;
- computes the loss of the *global* batch: logits and labels are gathered from every rank (the
  gather passes gradients back), so the Dice term sees the whole batch as in one process;
- lets DDP average the gradients before the optimizer step, so GaLore projects the same averaged
  gradient on every rank and every rank applies the same update.

Rank 0 alone validates, prints progress and writes the model file. The learning rate is used as
given (not scaled with the number of processes). ``galore-layerwise`` steps each parameter inside
the backward pass, before any gradient could be averaged, so it cannot run under DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import TrainingError

DDP_METHODS = ("galore", "full", "lora", "decoder")


@dataclass(frozen=True)
class DistributedEnv:
    """What torchrun (or any launcher setting the same variables) says about this process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Optional["DistributedEnv"]:
        """None unless WORLD_SIZE > 1 (a plain run, or torchrun with one process, stays single-process)."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise TrainingError(f"WORLD_SIZE={environ.get('WORLD_SIZE')!r} is not a number.") from None
        if world <= 1:
            return None
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise TrainingError(
                f"WORLD_SIZE={world} but {', '.join(missing)} are not set: start distributed training with "
                "torchrun (torchrun --nproc_per_node N $(which medsaga) finetune ...).")
        return cls(rank=int(environ["RANK"]), world_size=world, local_rank=int(environ["LOCAL_RANK"]))


def check_method(method: str, world_size: int) -> None:
    if method == "galore-layerwise":
        raise TrainingError(
            f"--method galore-layerwise cannot train under torchrun ({world_size} processes): it updates each "
            "parameter inside the backward pass, before DDP could average its gradient across processes. "
            f"Use --method galore (same GaLore projection, one optimizer step after the averaged backward), "
            f"or {', '.join(m for m in DDP_METHODS if m != 'galore')}; add --checkpointing to save memory.")
    if method not in DDP_METHODS:
        raise TrainingError(f"Method {method!r} is not supported under torchrun; use one of {', '.join(DDP_METHODS)}.")


def is_main_process() -> bool:
    """True outside distributed training, and on rank 0 inside it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    env = DistributedEnv.from_environ()
    return env is None or env.rank == 0


class _SuffixAndHead(nn.Module):
    """The trained part of the forward pass as one module, so DDP can hook its parameters."""

    def __init__(self, segmenter: nn.Module, suffix: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.segmenter = segmenter
        self._suffix = suffix

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.segmenter.decode(self._suffix(features))


class DistributedTraining:
    """One process of a data-parallel run: process group, device, sharding, global-batch loss."""

    def __init__(self, env: DistributedEnv, device: torch.device, backend: str) -> None:
        self.env = env
        self.device = device
        self.backend = backend
        self.module: Optional[nn.Module] = None

    # --- set-up ---------------------------------------------------------------------------------
    @classmethod
    def from_environment(cls, method: str, device_name: str,
                         environ: Mapping[str, str] = os.environ) -> Optional["DistributedTraining"]:
        """None outside torchrun; otherwise joins (or reuses) the process group."""
        env = DistributedEnv.from_environ(environ)
        if env is None:
            return None
        check_method(method, env.world_size)
        import torch.distributed as dist

        if not dist.is_available():
            raise TrainingError("This PyTorch build has no torch.distributed; train in one process.")
        wants_cuda = str(device_name).startswith("cuda") or (device_name in ("auto", None) and torch.cuda.is_available())
        if wants_cuda:
            if torch.cuda.device_count() <= env.local_rank:
                raise TrainingError(
                    f"Process with LOCAL_RANK {env.local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                    "start at most one process per GPU (--nproc_per_node).")
            device = torch.device("cuda", env.local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
        backend = str(dist.get_backend())
        return cls(env, device, backend)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def describe(self, batch_size: int, lr: float) -> str:
        return (f"DistributedDataParallel: {self.world_size} processes ({self.backend}, {self.device.type}); "
                f"global batch {batch_size * self.world_size} = {batch_size} per process x {self.world_size}; "
                f"learning rate {lr:g} as given (not scaled with the number of processes)")

    # --- training pieces -------------------------------------------------------------------------
    def wrap(self, segmenter: nn.Module, suffix: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
        """The trained forward (encoder suffix + decoder) under DDP. Every rank starts from rank 0's weights.

        ``find_unused_parameters``: the decoder's IoU head and the frozen parts stay out of the loss.
        """
        from torch.nn.parallel import DistributedDataParallel

        module = _SuffixAndHead(segmenter, suffix)
        self.module = DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True)
        return self.module

    def shard(self, global_indices: Sequence[int]) -> list[int]:
        """This rank's part of a global batch (equal parts: the global batch is batch_size x world size)."""
        per_rank = len(global_indices) // self.world_size
        return list(global_indices[self.rank * per_rank : (self.rank + 1) * per_rank])

    def global_loss(self, loss_fn: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of the whole global batch, on every rank.

        Logits are gathered with gradient: every rank holds the same loss, and the gradient flowing back
        to each rank's own logits is world_size times the global one; DDP's averaging divides it again,
        so the update equals one process training on the global batch.
        """
        import warnings

        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # the public autograd-aware gather; its suggested successor is a private module
            warnings.simplefilter("ignore", FutureWarning)
            all_logits = torch.cat(all_gather(logits.contiguous()), 0)
        targets = [torch.empty_like(target) for _ in range(self.world_size)]
        dist.all_gather(targets, target.contiguous())
        return loss_fn(all_logits, torch.cat(targets, 0))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (stop requests, non-finite losses): no rank waits alone."""
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank (the planned number of steps: every rank must run as many)."""
        import torch.distributed as dist

        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def unwrap(self) -> None:
        self.module = None


def shutdown() -> None:
    """Leave the process group (end of a torchrun command)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["DDP_METHODS", "DistributedEnv", "DistributedTraining", "check_method", "is_main_process", "shutdown"]
