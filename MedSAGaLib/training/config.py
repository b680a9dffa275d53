"""Fine-tuning settings: one dataclass shared by the library, the CLI and the Slicer panel."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .methods import AUTO, METHODS  # noqa: F401 (re-exported)

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENCODER_LAYERS = ("all", "qkv")
SWITCHES = ("auto", "on", "off")  # the settings of --crop, --mirror and (segment, evaluate) --tta
SIDES = ("auto", "off")  # --sides: a pair is learnt as one structure only where one column parts it, so no "on"


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

    # "auto": galore, except decoder-only on a CPU without bf16 units when the painted structures are small enough
    # to crop to
    # (training.methods.choose_method, measured in docs/results/NOTES.md)
    method: str = AUTO
    # None: the data decide (train until the held-out painted slices stop improving, within ``time_budget``
    # seconds and ``max_steps``); a number: exactly that many steps
    steps: Optional[int] = None
    time_budget: float = 240.0  # seconds, preparation included; a 5-slice task finishes within 5 minutes on 2 CPU cores
    max_steps: int = 400
    patience: int = 3  # validation checks (every ``val_every`` steps, 20 when adaptive) without improvement
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
    # which weights of the trained stages train (galore, full): "all", or "qkv": only the fused q/k/v projection
    # of each attention block, the layers LoRA adapts (bench memory's equal-terms rows)
    encoder_layers: str = "all"
    # loss
    dice_weight: float = 0.8
    ce_weight: float = 0.2
    # "balanced": each class (background too) weighted by 1/sqrt(its share of the painted pixels) in CE and Dice
    class_weighting: str = "none"
    dice_background: bool = False  # background in the Dice term (measured: without it the classes emerge sooner)
    # small structures: crop every slice to the box around the painted structures (plus margin) so they
    # reach the model at a higher resolution ("auto": when that box is small; "on", "off")
    crop: str = "auto"
    crop_margin: float = 0.25
    # data
    augment: bool = True
    # left-right mirroring: "auto" only when every painted class lies on both sides (training.data.choose_mirror)
    mirror: str = "auto"
    # classes named as left/right pairs, painted on either side of one column: "auto" learns each pair as one
    # structure and splits it at that midline when segmenting (laterality.choose_sides); "off" learns them apart
    sides: str = "auto"
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
        if self.method not in METHODS + (AUTO,):
            raise TrainingError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS + (AUTO,))}.")
        if self.steps is not None and self.steps < 1:
            raise TrainingError("--steps must be at least 1.")
        if not self.time_budget > 0:
            raise TrainingError("--time-budget must be a positive number of seconds.")
        if self.max_steps < 1:
            raise TrainingError(f"--max-steps must be at least 1 (got {self.max_steps}).")
        if self.patience < 1:
            raise TrainingError("patience must be at least 1.")
        if self.encoder_layers not in ENCODER_LAYERS:
            raise TrainingError(f"Unknown encoder layers {self.encoder_layers!r}; choose one of {', '.join(ENCODER_LAYERS)}.")
        if self.class_weighting not in ("none", "balanced"):
            raise TrainingError(f"Unknown class weighting {self.class_weighting!r}; choose none or balanced.")
        if self.crop not in SWITCHES:
            raise TrainingError(f"Unknown crop mode {self.crop!r}; choose auto, on or off.")
        if not 0 <= self.crop_margin <= 2:
            raise TrainingError("--crop-margin must be between 0 and 2 (a fraction of the box size).")
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
        if self.mirror not in SWITCHES:
            raise TrainingError(f"Unknown --mirror {self.mirror!r}; choose auto, on or off.")
        if self.sides not in SIDES:
            raise TrainingError(f"Unknown --sides {self.sides!r}; choose auto or off.")
        if self.augment_copies < 1:
            raise TrainingError("augment_copies must be at least 1.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
