"""``finetune``: one trainer for every registered method (``methods.METHOD_REGISTRY``).

The segmenter is trained in place and ends holding the best weights seen (by mean validation Dice
when validation slices are given, else the last). Training can be stopped between steps through
``should_stop`` (or a hook's ``trainer.request_stop()``); the result then holds what was reached.

:class:`Trainer` runs the loop in small methods (set up what trains, prepare data, validate, one
step) and fires hook events as MONAI's engines do (:class:`TrainingHook`), so benchmarks and tests
observe training (optimizer, gradients, checkpointed blocks, steps) without patching internals.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..events import event, format_timings
from ..inference import resolve_device
from ..metrics import dice_per_class, mean_finite
from ..preprocess import SliceTransform
from ..roi import choose_roi
from .budget import LATE_REPLAN_STEPS, PROBE_STEPS, REPLAN_STEPS, StepBudget
from .config import FinetuneConfig, TrainingError
from .diagnosis import stuck_classes, thinly_painted_classes
from .distributed import DistributedTraining
from ..laterality import choose_sides, mirror_partners
from .data import (BatchSampler, FewShotSlices, augment, build_augmentation, check_training_data, choose_mirror,
                   select_validation)
from .encoder import EncoderSplit, checkpoint_units, set_checkpointing
from .lora import LoRAQKV, apply_lora, lora_parameters, merge_lora
from .methods import AUTO, Method, choose_method, get_method
from .optim import build_optimizer, count, galore_groups, linear_weights, lr_factor
from .precision import choose_autocast, encoder_on_bf16_units

# Stages trained by default (of 4), by measurement on a shared 2-core CPU (LiteMedSAM, batch 2):
# the last stage (52% of TinyViT's Linear weights, GaLore on all of them) costs about twice a
# decoder-only step, all three attention stages about five times (the early stages run at high
# resolution). On a GPU the cost is small: every attention stage of TinyViT, the whole SAM ViT.
DEFAULT_TRAIN_STAGES = {"cpu": {"tinyvit": 1, "vit": 1}, "gpu": {"tinyvit": 3, "vit": 4}}


@dataclass
class FinetuneResult:
    history: list = field(default_factory=list)  # one dict per step (+ validation entries)
    val_dice: dict = field(default_factory=dict)  # per class, at the kept (best) step
    initial_val_dice: dict = field(default_factory=dict)  # before training
    train_dice: dict = field(default_factory=dict)  # on the training slices themselves, when none was held out
    best_step: int = 0
    steps_done: int = 0
    stopped: bool = False
    seconds_per_step: float = 0.0
    prepare_seconds: float = 0.0
    # where the time went (seconds): model set-up, training and validation slices prepared (frozen
    # features computed), optimizer steps, validation passes; see :meth:`time_summary`
    timings: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    final_loss: float = float("nan")
    train_stages: int = 0
    trainable_parameters: int = 0
    galore_parameters: int = 0
    notes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    decisions: list = field(default_factory=list)  # what the run decided (crop, step plan), as sentences
    stop_reason: str = ""
    warnings: list = field(default_factory=list)  # classes not learned, with what to paint
    roi: Optional[dict] = None  # the crop box on the input slices, if any
    # the augmentation mirrored slices left-right (so inference may average both views: inference.mirror_averaging)
    mirrored: bool = False

    def time_summary(self) -> str:
        """Where the time went, as one sentence (``events.format_timings``)."""
        return format_timings(self.timings, self.steps_done)

    @property
    def mean_val_dice(self) -> float:
        values = [v for v in self.val_dice.values() if v is not None and not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def metadata(self) -> dict:
        """What a model file stores about its training."""
        cfg = self.config
        return {
            "method": cfg.get("method"),
            "steps": self.steps_done,
            "best_step": self.best_step,
            "stopped": self.stopped,
            "train_stages": self.train_stages,
            "trainable_parameters": self.trainable_parameters,
            "galore_parameters": self.galore_parameters,
            "seconds_per_step": round(self.seconds_per_step, 3),
            "final_loss": None if math.isnan(self.final_loss) else round(self.final_loss, 5),
            "decisions": list(self.decisions),
            "stop_reason": self.stop_reason,
            "warnings": list(self.warnings),
            "train_dice": dict(self.train_dice),
            "roi": self.roi,
            "mirrored": self.mirrored,
            "timings": {k: round(float(v), 1) for k, v in self.timings.items()},
            "config": cfg,
        }


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() or (
        hasattr(torch.cuda, "OutOfMemoryError") and isinstance(exc, torch.cuda.OutOfMemoryError)
    )


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict with any LoRA folded into its Linear (model unchanged)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, LoRAQKV):
            prefix = name + "."
            weight = state.pop(prefix + "base.weight").clone()
            weight.index_add_(0, module.q_index, (module.b_q.weight @ module.a_q.weight).detach() * module.scaling)
            weight.index_add_(0, module.v_index, (module.b_v.weight @ module.a_v.weight).detach() * module.scaling)
            state[prefix + "weight"] = weight
            if prefix + "base.bias" in state:
                state[prefix + "bias"] = state.pop(prefix + "base.bias")
            for part in ("a_q", "b_q", "a_v", "b_v"):
                state.pop(prefix + part + ".weight", None)
    return state


def class_balance_weights(labels: Sequence[np.ndarray], num_classes: int, cap: float = 10.0) -> list[float]:
    """1/sqrt(pixel share) per class 0..k over the painted slices, mean 1, at most ``cap`` x the smallest."""
    counts = np.zeros(num_classes + 1)
    for lab in labels:
        counts += np.bincount(np.asarray(lab).ravel().astype(np.int64), minlength=num_classes + 1)[: num_classes + 1]
    raw = 1.0 / np.sqrt(np.maximum(counts, 1.0) / counts.sum())
    raw = np.minimum(raw, cap * raw.min())
    return (raw / raw.mean()).tolist()


class StepBudgetHook:
    """The data-chosen length of a run (``config.steps`` None): plans the steps from the measured time per
    step within ``config.time_budget``, and ends the run when validation stops improving (patience) or
    the time is spent. A :class:`TrainingHook`; the decisions land in the result."""

    def __init__(self, config: FinetuneConfig, has_validation: bool) -> None:
        self.budget = StepBudget(config.time_budget, config.max_steps, patience=config.patience,
                                 val_every=config.val_every or 20)
        self.has_validation = has_validation
        self.validation_seconds = 0.0
        self.step_times: list[float] = []
        self.last = None

    def on_step_end(self, trainer, entry: dict) -> None:
        now = time.perf_counter()
        done = entry["step"]
        if self.last is not None:
            self.step_times.append(now - self.last)
        self.last = now
        # the first step pays one-off costs (GaLore's first SVD): plan from the later ones, then again from more,
        # and last from the steady steps after the first REPLAN_STEPS
        late = done == LATE_REPLAN_STEPS and self.budget.planned_steps > done
        if done == PROBE_STEPS or (done == REPLAN_STEPS and self.budget.planned_steps > done) or late:
            # a validation pass every val_every steps is part of the cost of a step (the pass at step 0 is timed)
            timings = trainer.result.timings
            passes = timings.get("validation_passes", 0)
            self.validation_seconds = timings.get("validation", 0.0) / passes if passes else 0.0
            times = self.step_times[REPLAN_STEPS - 1:] if late else self.step_times
            per_step = float(np.mean(times)) if times else trainer.result.seconds_per_step
            trainer.total_steps = self.budget.plan(trainer.elapsed(), per_step, done, self.validation_seconds)
        recent = float(np.mean(self.step_times[-5:])) if self.step_times else 0.0
        if self.budget.finished(done) or self.budget.out_of_time(trainer.elapsed(), recent):
            trainer.total_steps = done  # the loop ends after this step; not a user stop

    def on_validation_end(self, trainer, step: int, dice: dict) -> None:
        if step > 0:
            self.budget.observe(step, mean_finite(dice))
        self.last = time.perf_counter()  # validation time is not step time

    def on_finished(self, trainer, result) -> None:
        result.decisions.extend(self.budget.decisions)
        if not self.has_validation:
            result.decisions.append("no held-out painted slice, so no early stopping: trained for the steps that "
                                    "fit in the time budget")
        if not result.stopped and self.budget.stop_reason:
            result.stop_reason = self.budget.stop_reason
            result.decisions.append(f"stopped after {result.steps_done} steps: {self.budget.stop_reason}")


def _set_train_modes(segmenter: nn.Module) -> None:
    """Eval mode everywhere (batch norms keep their statistics: batches of 2 cannot estimate them),
    except TinyViT attention, whose eval mode reads a cached copy of its trainable position biases."""
    segmenter.eval()
    for m in segmenter.modules():
        if hasattr(m, "attention_biases") and hasattr(m, "attention_bias_idxs"):
            m.train(True)


class TrainingHook:
    """Observer of a :class:`Trainer` run; override the events you need (all no-ops here).

    Events, in order: ``on_parameters_selected`` (what trains is set, ``trainer.groups``; before the
    optimizer, so gradient hooks registered here run ahead of a layer-wise optimizer's),
    ``on_optimizer_built`` (``trainer.optimizer``, ``trainer.checkpointed`` blocks), then per run
    ``on_validation_end(trainer, step, dice)`` (step 0 before training), ``on_best_saved(trainer, step)``,
    ``on_step_end(trainer, entry)`` (``entry`` is the step's history record), and
    ``on_finished(trainer, result)`` (after the best weights are restored; also after a stop).
    A hook may call ``trainer.request_stop()`` to end training after the current step.
    """

    def on_parameters_selected(self, trainer: "Trainer") -> None: ...
    def on_optimizer_built(self, trainer: "Trainer") -> None: ...
    def on_validation_end(self, trainer: "Trainer", step: int, dice: dict) -> None: ...
    def on_best_saved(self, trainer: "Trainer", step: int) -> None: ...
    def on_step_end(self, trainer: "Trainer", entry: dict) -> None: ...
    def on_finished(self, trainer: "Trainer", result: FinetuneResult) -> None: ...


def parameter_groups(method: Method, segmenter: nn.Module, split: EncoderSplit, config: FinetuneConfig):
    """Optimizer parameter groups for ``method``: (groups, GaLore weights, LoRA wrappers, notes).

    The mask decoder and the prompt encoder's no-mask embedding always train (AdamW, ``config.lr``);
    the encoder's trained stages as the method says (``encoder_lr``, default ``lr``).
    """
    enc_lr = config.encoder_lr or config.lr
    head_params = list(segmenter.mask_decoder.parameters()) + [segmenter.prompt_encoder.no_mask_embed.weight]
    groups = [dict(params=head_params, lr=config.lr, weight_decay=config.weight_decay, name="head")]
    notes: list[str] = []
    galore_weights: list[nn.Parameter] = []
    wrapped: list[LoRAQKV] = []
    if method.encoder in ("galore", "adamw"):
        if config.encoder_layers == "qkv":  # the layers LoRA adapts: a comparison on equal terms
            qkv = [blk.attn.qkv for blk in split.trainable_attention_blocks()]
            if not qkv:
                raise TrainingError("The trained encoder stages hold no attention block; train more stages or use all layers.")
            enc_params, trained_modules = [m.weight for m in qkv], qkv
        else:
            enc_params, trained_modules = split.trainable_parameters(), split.trainable_modules()
        for p in enc_params:
            p.requires_grad_(True)
        if method.encoder == "adamw":
            groups.append(dict(params=enc_params, lr=enc_lr, weight_decay=config.weight_decay, name="encoder"))
        else:
            galore_weights = linear_weights(trained_modules)
            ids = {id(w) for w in galore_weights}
            gal, notes = galore_groups(galore_weights, config, enc_lr)
            groups.extend(gal)
            rest = [p for p in enc_params if id(p) not in ids]
            if rest:
                groups.append(dict(params=rest, lr=enc_lr, weight_decay=config.weight_decay, name="encoder_other"))
    elif method.encoder == "lora":
        wrapped = apply_lora(segmenter.image_encoder, config.lora_rank, config.lora_alpha, blocks=split.trainable_attention_blocks())
        if not wrapped:
            raise TrainingError("LoRA found no attention block in the trained encoder stages.")
        groups.append(dict(params=lora_parameters(wrapped), lr=enc_lr, weight_decay=config.weight_decay, name="lora"))
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups, galore_weights, wrapped, notes


class Trainer:
    """One fine-tuning run of a ClassSegmenter on 2-D slices in [0, 1] with labels 0..k.

    ``callback`` receives progress events (``MedSAGaLib.events``); ``hooks`` are
    :class:`TrainingHook` objects. ``feature_cache``: a dict shared between runs that start from the
    *same pretrained encoder* on the same slices (e.g. a method and its baseline); frozen-prefix
    features computed by one run are reused (or continued to a deeper prefix) by the next.
    ``feature_store``: a :class:`~MedSAGaLib.training.feature_store.FeatureStore` that keeps those
    features on disk per slice, keyed by the slice and the frozen weights (``--resume``, Slicer's
    correct-and-retrain loop); it takes the place of ``feature_cache``.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        images01: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        config: Optional[FinetuneConfig] = None,
        val_images: Optional[Sequence[np.ndarray]] = None,
        val_labels: Optional[Sequence[np.ndarray]] = None,
        callback: Optional[Callable[[dict], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        feature_cache: Optional[dict] = None,
        hooks: Sequence[TrainingHook] = (),
        feature_store=None,
    ) -> None:
        self.config = config = (config or FinetuneConfig()).validate()
        self.segmenter = segmenter
        self.num_classes = segmenter.num_classes
        check_training_data(images01, labels, self.num_classes, getattr(segmenter, "class_names", None))
        self.val_images = list(val_images or [])
        self.val_labels = list(val_labels or [])
        if len(self.val_images) != len(self.val_labels):
            raise TrainingError("Give one label slice per validation image slice.")
        self.result = FinetuneResult(config=config.to_dict())
        # left/right pairs painted on either side of one column are learnt as one structure each (decided on the
        # whole slices: the midline is a column of the slice, as the crop's box is)
        sides = getattr(segmenter, "sides", None)
        if sides is not None:
            self.result.decisions.append(f"left and right learnt as one structure each, split at column "
                                         f"{sides.midline:.1f} as the model was trained")
        elif (getattr(segmenter, "metadata", None) or {}).get("training"):
            pass  # a model resumed as it was trained: its left and right classes stay apart
        elif hasattr(segmenter, "merge_sides"):
            sides, why = choose_sides(list(labels) + self.val_labels, segmenter.class_names, config.sides)
            if sides is not None:
                segmenter.merge_sides(sides)
            if why:
                self.result.decisions.append(why)
        if sides is not None:
            labels = [sides.merge(x) for x in labels]
            self.val_labels = [sides.merge(x) for x in self.val_labels]
            self.num_classes = len(sides.names)
        self.class_names = list(getattr(segmenter, "head_names", None) or getattr(segmenter, "class_names", None)
                                or [f"class {c}" for c in range(1, self.num_classes + 1)])
        self.painted_labels = list(labels)
        # small structures: crop to the painted region (the model keeps the box for segmenting)
        roi = getattr(segmenter, "roi", None)
        if roi is not None and config.crop != "off" and tuple(roi.slice_shape) == tuple(np.shape(images01[0])):
            why = "cropping to the region of interest the model was trained with"
        elif len({tuple(np.shape(x)) for x in list(labels) + self.val_labels}) > 1:
            roi, why = None, "no crop: the slices differ in shape"
        else:
            roi, why = choose_roi(labels, config.crop, config.crop_margin)
        segmenter.roi = roi
        self.result.roi = roi.to_dict() if roi is not None else None
        self.result.decisions.append(why)
        if roi is not None:
            images01, labels = [roi.crop(x) for x in images01], [roi.crop(x) for x in labels]
            self.val_images = [roi.crop(x) for x in self.val_images]
            self.val_labels = [roi.crop(x) for x in self.val_labels]
        self.images01, self.labels = images01, labels
        class_names = self.class_names
        self.mirror, why = choose_mirror(labels, config.mirror, class_names)
        # a mirrored copy exchanges the classes named as each other's other side (caudate_left / caudate_right)
        self.swap = mirror_partners(class_names) if self.mirror else None
        if config.augment:
            self.result.decisions.append(why)
        self.result.mirrored = bool(self.mirror and config.augment)
        if config.method == AUTO:  # the product default: the method that did best on tasks like this one
            device = resolve_device(config.device)
            # GaLore's steps are cheap on a CPU where its encoder would run on bf16 units
            name, why = choose_method(device.type, roi is not None, config.train_stages,
                                      encoder_on_bf16_units(config.precision, device))
            self.config = config = replace(config, method=name)
            self.result.config["method"] = name
            self.result.decisions.append(why)
        self.method = get_method(config.method)
        self.total_steps = config.steps if config.steps is not None else config.max_steps
        # under torchrun: join the process group; rank 0 alone validates and reports (None in one process)
        self.ddp = DistributedTraining.from_environment(config.method, config.device)
        self.device = self.ddp.device if self.ddp is not None else resolve_device(config.device)
        if self.ddp is not None and not self.ddp.is_main:
            self.val_images, self.val_labels, callback = [], [], None
        amp_dtype, why = choose_autocast(config.precision, self.device, trains_encoder=config.method != "decoder")
        if config.precision == "auto":
            self.result.decisions.append(why)
        if amp_dtype is not None and self.method.layerwise and amp_dtype == torch.float16:
            amp_dtype = torch.bfloat16  # a gradient scaler cannot unscale inside per-parameter hooks
        self.amp_dtype = amp_dtype
        self.emit = callback or (lambda info: None)
        self._should_stop = should_stop or (lambda: False)
        self.stop_requested = False
        self.feature_cache = feature_cache
        self.feature_store = feature_store  # a FeatureStore: frozen-prefix features on disk, across runs
        self._prefix_identity: Optional[str] = None
        self.hooks = list(hooks)
        self.budget_hook = None
        if config.steps is None:
            self.budget_hook = StepBudgetHook(config, bool(self.val_images))
            self.hooks.append(self.budget_hook)
        if self.ddp is not None:
            self.result.config["distributed"] = {"world_size": self.ddp.world_size, "backend": self.ddp.backend,
                                                 "global_batch": config.batch_size * self.ddp.world_size}
            self.result.notes.append(self.ddp.describe(config.batch_size, config.lr))
        self.train_module: Optional[nn.Module] = None  # the DDP-wrapped trained forward under torchrun
        self.best_state = None
        self.best_score = -1.0
        self.wrapped: list[LoRAQKV] = []
        self.checkpointed: list[nn.Module] = []
        self.optimizer = None
        self.scaler = None

    # --- plumbing ------------------------------------------------------------------------------
    def fire(self, name: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, name, lambda *a: None)(self, *args)

    def request_stop(self) -> None:
        """End training after the current step (the best weights so far are kept)."""
        self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested or bool(self._should_stop())

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- what trains ---------------------------------------------------------------------------
    def setup_model(self) -> None:
        config, segmenter, result = self.config, self.segmenter, self.result
        segmenter.to(self.device)
        for p in segmenter.parameters():
            p.requires_grad_(False)
        encoder = segmenter.image_encoder
        split_kind = EncoderSplit(encoder, 0).kind
        if not self.method.trains_encoder:
            stages = 0
            if config.train_stages:
                result.notes.append(f"method {config.method!r} freezes the whole encoder; train_stages ignored")
        else:
            defaults = DEFAULT_TRAIN_STAGES["cpu" if self.device.type == "cpu" else "gpu"]
            stages = defaults[split_kind] if config.train_stages is None else config.train_stages
            if stages == 0:
                raise TrainingError(f"Method {config.method!r} trains the encoder: train_stages must be at least 1.")
        self.split = split = EncoderSplit(encoder, stages)
        result.train_stages = split.train_stages
        self.groups, galore_weights, self.wrapped, notes = parameter_groups(self.method, segmenter, split, config)
        result.notes.extend(notes)
        result.galore_parameters = count(galore_weights)
        result.trainable_parameters = count([p for g in self.groups for p in g["params"]])
        self.fire("on_parameters_selected")
        self.optimizer = build_optimizer(self.groups, config, notes)
        if self.amp_dtype == torch.float16 and not self.optimizer.layerwise:
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.optimizer.grad_scaler = self.scaler
        self.checkpointed = checkpoint_units(split) if config.checkpointing else []
        set_checkpointing(self.checkpointed, True)
        if self.ddp is not None:
            self.train_module = self.ddp.wrap(segmenter, split.suffix)
        self.fire("on_optimizer_built")

    # --- data: frozen prefix computed once per (augmented) slice --------------------------------
    def compute_prefix(self, images: list[torch.Tensor], indices: Sequence[int], phase: str, done_before: int = 0):
        """Frozen-prefix features of ``images[i]`` for ``indices`` in order, computed two at a time with ``phase``
        progress events; a generator, so a caller can keep each batch before the next (a stop keeps them)."""
        indices = list(indices)
        for j in range(0, len(indices), 2):
            if self.should_stop():
                raise KeyboardInterrupt
            with torch.no_grad(), self.autocast():
                batch = torch.stack([images[i] for i in indices[j : j + 2]]).to(self.device)
                out = self.fast_prefix((batch - self.mean) / self.std).float().unbind(0)
            self.emit(event(phase, done=done_before + min(j + 2, len(indices)), total=len(images), elapsed=self.elapsed()))
            yield from out

    @functools.cached_property
    def fast_prefix(self):
        """The frozen prefix on an inference copy of its modules (same features up to rounding, faster)."""
        return self.split.inference_prefix()

    def prefix_identity(self) -> str:
        """What the frozen prefix's features depend on besides the slice: its weights, depth, normalisation, precision."""
        from .feature_store import tensors_digest

        split = self.split
        modules = split._stem() + list(split.frozen_stages) + ([split.encoder.neck] if split.frozen else [])
        tensors = [t for m in modules for t in m.state_dict().values()]
        pos = getattr(split.encoder, "pos_embed", None) if split.kind == "vit" else None
        return tensors_digest(tensors + [self.mean, self.std] + ([pos] if pos is not None else []), split.kind,
                              split.frozen_depth, split.frozen, str(self.amp_dtype), torch.__version__)

    def stored_prefix_features(self, images: list[torch.Tensor], phase: str) -> torch.Tensor:
        """Frozen-prefix features through the on-disk store: read what is there, compute and store the rest."""
        store = self.feature_store
        if self._prefix_identity is None:  # the frozen weights do not change: hash them once
            self._prefix_identity = self.prefix_identity()
        identity = self._prefix_identity
        keys = [store.key(img, identity) for img in images]
        feats: list = [store.get(k) for k in keys]
        shapes = {tuple(f.shape) for f in feats if f is not None}
        if len(shapes) > 1:  # only a tampered folder can hold two shapes for one prefix: recompute all
            feats = [None] * len(images)
        missing = [i for i, f in enumerate(feats) if f is None]
        reused = len(images) - len(missing)
        for i, out in zip(missing, self.compute_prefix(images, missing, phase, done_before=reused)):
            feats[i] = out
            store.put(keys[i], out)
        if not missing:
            self.emit(event(phase, done=len(images), total=len(images), elapsed=self.elapsed()))
        if len({tuple(f.shape) for f in feats}) > 1:
            raise TrainingError(f"The feature cache {store.folder} holds features of another shape; delete it and retry.")
        if reused:
            what = "validation" if phase == "prepare-validation" else "training"
            self.result.decisions.append(
                f"reused the frozen encoder features of {reused} of {len(images)} {what} slice(s) from an earlier run "
                f"(feature cache {store.folder})")
        return torch.stack([f.to(self.device) for f in feats])

    def prefix_features(self, images: list[torch.Tensor], phase: str) -> torch.Tensor:
        if self.feature_store is not None:
            return self.stored_prefix_features(images, phase)
        split, cache = self.split, self.feature_cache
        stacked = torch.stack(images)
        signature = (phase, len(images), round(float(stacked.sum()), 3), round(float(stacked.square().sum()), 3))
        depth = split.frozen_depth + (1 if split.frozen else 0)
        if cache is not None:
            if (signature, depth) in cache:
                return cache[(signature, depth)]
            usable = [d for (sig, d) in cache if sig == signature and d <= split.frozen_depth]
            if usable:
                start = max(usable)
                cached = cache[(signature, start)]
                with torch.no_grad(), self.autocast():
                    feats = [split.prefix_from(cached[i : i + 2].to(self.device), start).float()
                             for i in range(0, len(cached), 2)]
                feats = torch.cat(feats)
                cache[(signature, depth)] = feats
                return feats
        feats = torch.stack(list(self.compute_prefix(images, range(len(images)), phase)))
        if cache is not None:
            cache[(signature, depth)] = feats
        return feats

    def prepare_data(self) -> None:
        config, segmenter, split = self.config, self.segmenter, self.split
        _set_train_modes(segmenter)
        train = FewShotSlices(self.images01, self.labels, segmenter.image_size)
        self.mean = segmenter.pixel_mean.to(self.device)
        self.std = segmenter.pixel_std.to(self.device)
        self.online = None
        if split.whole:
            self.pool_images, self.pool_labels = train.images, train.labels
            self.pool_feats = None
            self.online = build_augmentation(config.seed, self.mirror, self.swap) if config.augment else None
        else:
            self.pool_images, self.pool_labels = train.augmented_pool(config.augment_copies, config.augment, config.seed,
                                                                      self.mirror, self.swap)
            self.pool_feats = self.prefix_features(self.pool_images, "prepare")
        timings = self.result.timings
        timings["prepare_slices"] = len(self.pool_images)
        timings["prepare_training"] = self.elapsed() - timings.get("setup", 0.0)
        val_idx = select_validation(len(self.val_images), config.max_val_slices)
        self.val = FewShotSlices([self.val_images[i] for i in val_idx], [self.val_labels[i] for i in val_idx],
                                 segmenter.image_size)
        tf = SliceTransform(segmenter.image_size)
        self.val_shapes = [tf.resized_shape(np.shape(self.val_images[i])) for i in val_idx]
        self.val_feats = (self.prefix_features(self.val.images, "prepare-validation")
                          if (len(self.val) and not split.whole) else None)
        self.result.prepare_seconds = self.elapsed()
        timings["prepare_validation"] = self.result.prepare_seconds - timings["prepare_training"] - timings.get("setup", 0.0)

        from monai.losses import DiceCELoss

        weight = None
        if config.class_weighting == "balanced":
            weight = torch.as_tensor(class_balance_weights(self.labels, self.num_classes), dtype=torch.float32,
                                     device=self.device)
            self.result.decisions.append("class weights " + ", ".join(
                f"{n} {w:.2f}" for n, w in zip(["background"] + self.class_names, weight.tolist())))
        self.loss_fn = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=config.dice_weight, lambda_ce=config.ce_weight, batch=True,
            include_background=config.dice_background, weight=weight,
        )
        world = self.ddp.world_size if self.ddp is not None else 1
        if world > 1 and len(self.pool_images) < config.batch_size * world:
            raise TrainingError(
                f"The global batch ({config.batch_size} x {world} processes) is larger than the "
                f"{len(self.pool_images)} training slices (with augmented copies): lower --batch-size or --nproc_per_node.")
        # every rank draws the same global batch from the same shuffle and trains on its own part of it
        self.sampler = BatchSampler(len(self.pool_images), config.batch_size * world, config.seed)

    # --- model, validation, one step -------------------------------------------------------------
    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.segmenter.decode(self.split.suffix(feats)).float()

    def validate(self) -> dict:
        """Dice per class (by name) on the validation slices, pooled over their pixels."""
        val = self.val
        if not len(val):
            return {}
        started = time.perf_counter()
        try:
            return self._validate(val, self.val_feats, self.val_shapes)
        finally:
            timings = self.result.timings
            timings["validation"] = timings.get("validation", 0.0) + time.perf_counter() - started
            timings["validation_passes"] = timings.get("validation_passes", 0) + 1

    def _validate(self, val, cached_feats, shapes) -> dict:
        """Dice per class of ``val`` (its frozen-prefix features ``cached_feats``, or None to run the whole
        encoder), each prediction cut to its slice's ``shapes`` entry."""
        preds, refs = [], []
        with torch.no_grad():
            for i in range(0, len(val), 2):
                if cached_feats is not None:
                    feats = cached_feats[i : i + 2]
                else:
                    feats = (torch.stack(val.images[i : i + 2]).to(self.device) - self.mean) / self.std
                pred = self.forward(feats).argmax(1).cpu()
                for j in range(pred.shape[0]):
                    h, w = shapes[i + j]
                    preds.append(pred[j, :h, :w])
                    refs.append(val.labels[i + j][:h, :w])
        _set_train_modes(self.segmenter)
        return dict(zip(self.class_names, dice_per_class(preds, refs, self.num_classes)))

    def training_fit(self) -> dict:
        """Dice per class on the training slices themselves, unaugmented: how much of what was painted the
        model learned (the only check there is when no painted slice was held out)."""
        train = FewShotSlices(self.images01, self.labels, self.segmenter.image_size)
        feats = None
        if self.pool_feats is not None:  # each slice's unaugmented copy comes first among its copies
            feats = self.pool_feats[:: len(self.pool_images) // len(train)]
        tf = SliceTransform(self.segmenter.image_size)
        return self._validate(train, feats, [tf.resized_shape(np.shape(x)) for x in self.images01])

    def consider(self, step: int, dice: dict) -> None:
        """Keep the model of ``step`` when its mean validation Dice beats the best so far (ties keep the earlier)."""
        self.fire("on_validation_end", step, dice)
        score = mean_finite(dice)
        if self.best_state is None or score > self.best_score:
            self.best_score, self.best_state = score, plain_state_dict(self.segmenter)
            self.result.best_step = step
            self.result.val_dice = dict(dice)
            self.fire("on_best_saved", step)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch: (encoder input or frozen-prefix features, labels [B, 1, S, S])."""
        idx = self.sampler.next() if self.ddp is None else self.ddp.shard(self.sampler.next())
        if self.pool_feats is not None:
            feats = torch.stack([self.pool_feats[i] for i in idx])
            target = torch.stack([self.pool_labels[i] for i in idx])
        else:
            pairs = [
                augment(self.online, self.pool_images[i], self.pool_labels[i]) if self.online is not None
                else (self.pool_images[i], self.pool_labels[i])
                for i in idx
            ]
            feats = (torch.stack([a for a, _ in pairs]).to(self.device) - self.mean) / self.std
            target = torch.stack([b for _, b in pairs])
        return feats, target.to(self.device)[:, None]

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (``step`` counts from 0): (loss, learning rate)."""
        config = self.config
        lr = self.optimizer.set_lr_factor(lr_factor(step, self.total_steps, config.warmup, config.poly_power))
        feats, target = self.batch()
        if self.ddp is None:
            loss = self.loss_fn(self.forward(feats), target)
        else:
            with self.autocast():
                logits = self.train_module(feats).float()
            loss = self.ddp.global_loss(self.loss_fn, logits, target)
        if not torch.isfinite(loss):
            raise TrainingError(f"The loss became {loss.item()} at step {step + 1}; lower --lr.")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.item()), lr

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        config, result = self.config, self.result
        self.start_time = time.perf_counter()
        torch.manual_seed(config.seed)
        self.setup_model()
        result.timings["setup"] = self.elapsed()
        step_times: list[float] = []
        try:
            self.prepare_data()
            last_val = None
            if len(self.val):
                result.initial_val_dice = last_val = self.validate()
                self.consider(0, result.initial_val_dice)
                result.history.append({"step": 0, "val_dice": result.initial_val_dice})
                self.emit(event("validate", step=0, steps=self.total_steps, val_dice=result.initial_val_dice,
                                elapsed=self.elapsed()))
            val_every = config.val_every or (self.budget_hook.budget.val_every if self.budget_hook
                                             else max(1, math.ceil(config.steps / 4)))
            train_start = time.perf_counter()
            step = -1
            while step + 1 < self.total_steps:
                step += 1
                if self.ddp.any(self.should_stop()) if self.ddp is not None else self.should_stop():
                    result.stopped = True
                    break
                t0 = time.perf_counter()
                loss, lr = self.train_step(step)
                step_times.append(time.perf_counter() - t0)
                done = result.steps_done = step + 1
                result.final_loss = loss
                entry = {"step": done, "steps": self.total_steps, "loss": loss, "lr": lr}
                if len(self.val) and (done % val_every == 0 or done == self.total_steps):
                    last_val = entry["val_dice"] = self.validate()
                    self.consider(done, last_val)
                entry["elapsed"] = self.elapsed()
                entry["eta"] = (time.perf_counter() - train_start) / done * (self.total_steps - done)
                entry["val_dice"] = entry.get("val_dice", last_val)
                result.history.append(entry)
                self.emit(event("step", **entry))
                self.fire("on_step_end", entry)
                if self.ddp is not None and self.budget_hook is not None:  # each rank times itself: rank 0's plan holds
                    self.total_steps = self.ddp.broadcast_int(self.total_steps)
        except KeyboardInterrupt:
            result.stopped = True
        except RuntimeError as exc:
            if _is_oom(exc):
                raise TrainingError(
                    f"Out of memory on {self.device}: try --checkpointing, fewer --train-stages, a smaller batch, "
                    "--method galore-layerwise, or the CPU."
                ) from exc
            raise
        finally:
            self.teardown()
        self.finish(step_times)
        self.fire("on_finished", result)
        if self.budget_hook is None:
            result.stop_reason = "stopped by the user" if result.stopped else f"the {config.steps} steps asked for"
        elif result.stopped:
            result.stop_reason = "stopped by the user"
        if self.val_images:
            result.decisions.append(f"kept the model of step {result.best_step} (best mean validation Dice)")
        names = list(self.class_names)
        if self.val_images:
            result.warnings = stuck_classes(result.val_dice, self.painted_labels, names, val_labels=self.val_labels)
        elif result.steps_done > 0 and (self.ddp is None or self.ddp.is_main):
            result.train_dice = self.training_fit()
            result.warnings = stuck_classes(result.train_dice, self.painted_labels, names, on_training_slices=True)
        if self.ddp is None or self.ddp.is_main:
            result.warnings += thinly_painted_classes(self.painted_labels, names, named=result.warnings)
        return result

    def teardown(self) -> None:
        self.optimizer.remove_hooks()
        set_checkpointing(self.checkpointed, False)
        for p in self.segmenter.parameters():
            p.grad = None
        if self.wrapped:
            merge_lora(self.segmenter)

    def finish(self, step_times: list[float]) -> None:
        """Restore the best weights (validated runs), freeze, and fill in the timings."""
        result, segmenter = self.result, self.segmenter
        if self.best_state is not None:
            segmenter.load_state_dict(self.best_state)
        else:
            result.best_step = result.steps_done
        for p in segmenter.parameters():
            p.requires_grad_(False)
        segmenter.eval()
        result.seconds_per_step = float(np.mean(step_times)) if result.steps_done and step_times else 0.0
        result.total_seconds = self.elapsed()
        result.timings["steps"] = float(np.sum(step_times)) if step_times else 0.0
        result.timings["total"] = result.total_seconds


def finetune(*args: Any, **kwargs: Any) -> FinetuneResult:
    """Fine-tune a ClassSegmenter on 2-D slices in [0, 1] with labels 0..k: ``Trainer(...).run()``
    (``segmenter, images01, labels, config, val_images, val_labels, callback, should_stop,
    feature_cache, hooks``; see :class:`Trainer`)."""
    return Trainer(*args, **kwargs).run()


__all__ = ["FinetuneResult", "StepBudgetHook", "Trainer", "TrainingHook", "class_balance_weights", "finetune", "parameter_groups", "plain_state_dict",
           "DEFAULT_TRAIN_STAGES"]
