"""Few-shot fine-tuning of a prompt-free k-class SAM head (GaLore, LoRA, full, decoder-only)."""

from .config import METHODS, FinetuneConfig, TrainingError
from .trainer import FinetuneResult, finetune

__all__ = ["METHODS", "FinetuneConfig", "FinetuneResult", "TrainingError", "finetune"]
