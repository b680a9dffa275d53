"""Fine-tuning settings: one dataclass shared by the library, the CLI and the Slicer panel."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .methods import METHODS  # noqa: F401 (re-exported)

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TrainingError(ValueError):
    """Bad training input or settings; the message says what to change."""


@dataclass
class FinetuneConfig:
    """How to fine-tune a :class:`~MedSAGaLib.head.ClassSegmenter`.

    ``train_stages`` is the number of trailing encoder stages that are trained (TinyViT has 4: the
    convolutional stage and three attention stages; a SAM ViT is split into 4 groups of blocks).
    The stages in front of them are frozen and computed once per (augmented) training slice, which
    is what makes encoder fine-tuning affordable on a CPU. ``None`` picks the method's default.
    """

    method: str = "galore"
    steps: int = 60
    batch_size: int = 2
    # decoder, prompt embeddings and non-GaLore encoder parameters; chosen by the validation search of
    # docs/results/quality_sweep.json: at 3e-3 every method scored far lower and most collapsed, so the
    # earlier default of 2e-3 sat near that edge
    lr: float = 1e-3
    encoder_lr: Optional[float] = None  # encoder parameters; None = lr
    weight_decay: float = 0.01
    warmup: int = 10  # linear warm-up steps, then poly decay
    poly_power: float = 0.9
    # GaLore
    rank: int = 32
    update_proj_gap: int = 50
    # multiplies GaLore's projected update. galore-torch's 0.25 comes from LLM pre-training at a 10x higher rate;
    # at lr 1e-3 the validation search of docs/results/quality_sweep.json chose 1 from 0.25, 0.5, 1 and 2
    scale: float = 1.0
    proj_type: str = "std"
    # LoRA (SAMed)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # what trains, and how much of the encoder is cached
    train_stages: Optional[int] = None
    # loss
    dice_weight: float = 0.8
    ce_weight: float = 0.2
    dice_background: bool = False  # background in the Dice term (measured: without it the classes emerge sooner)
    # data
    augment: bool = True
    augment_copies: int = 4  # versions of each training slice (the first unaugmented) when stages are cached
    # validation
    val_every: int = 0  # 0: about four times per run
    max_val_slices: int = 8
    # memory / speed
    checkpointing: bool = False
    precision: str = "auto"
    device: str = "cpu"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> "FinetuneConfig":
        if self.method not in METHODS:
            raise TrainingError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.steps < 1:
            raise TrainingError("--steps must be at least 1.")
        if self.batch_size < 1:
            raise TrainingError("The batch size must be at least 1.")
        if not self.lr > 0 or (self.encoder_lr is not None and not self.encoder_lr > 0):
            raise TrainingError("Learning rates must be positive.")
        if self.warmup < 0:
            raise TrainingError("--warmup cannot be negative.")
        if self.rank < 1:
            raise TrainingError("--rank must be at least 1.")
        if self.update_proj_gap < 1:
            raise TrainingError("--update-proj-gap must be at least 1.")
        if self.proj_type not in PROJ_TYPES:
            raise TrainingError(f"Unknown GaLore projection {self.proj_type!r}; choose one of {', '.join(PROJ_TYPES)}.")
        if self.lora_rank < 1:
            raise TrainingError("The LoRA rank must be at least 1.")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"Unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if self.train_stages is not None and self.train_stages < 0:
            raise TrainingError("--train-stages cannot be negative.")
        if self.augment_copies < 1:
            raise TrainingError("augment_copies must be at least 1.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
