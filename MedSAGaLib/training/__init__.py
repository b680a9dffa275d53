"""Few-shot fine-tuning of a prompt-free k-class SAM head (GaLore, LoRA, full, decoder-only).

``config`` (settings, errors) and ``methods`` (the method registry) import without PyTorch; the
trainer is loaded on first use of ``finetune`` / ``FinetuneResult``.
"""

from .config import METHODS, FinetuneConfig, TrainingError

__all__ = ["METHODS", "FinetuneConfig", "FinetuneResult", "TrainingError", "finetune"]


def __getattr__(name):
    if name in ("finetune", "FinetuneResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
