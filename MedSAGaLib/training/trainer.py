"""``finetune``: one trainer for every method (galore, galore-layerwise, lora, full, decoder).

The segmenter is trained in place and ends holding the best weights seen (by mean validation Dice
when validation slices are given, else the last). Training can be stopped between steps through
``should_stop``; the result then holds what was reached so far.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..events import event
from ..inference import resolve_device
from .config import FinetuneConfig, TrainingError
from .distributed import DistributedTraining
from .data import BatchSampler, FewShotSlices, augment, build_augmentation, check_training_data, select_validation
from .encoder import EncoderSplit, checkpoint_units, set_checkpointing
from .lora import LoRAQKV, apply_lora, lora_parameters, merge_lora
from .optim import build_optimizer, count, galore_groups, linear_weights, lr_factor

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
    best_step: int = 0
    steps_done: int = 0
    stopped: bool = False
    seconds_per_step: float = 0.0
    prepare_seconds: float = 0.0
    total_seconds: float = 0.0
    final_loss: float = float("nan")
    train_stages: int = 0
    trainable_parameters: int = 0
    galore_parameters: int = 0
    notes: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

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
            "config": cfg,
        }


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


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


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of classes 1..k over all given pixels (nan where a class is in neither)."""
    out = []
    for c in range(1, num_classes + 1):
        p, g = pred == c, target == c
        denom = int(p.sum() + g.sum())
        out.append(float(2 * int((p & g).sum()) / denom) if denom else float("nan"))
    return out


def _set_train_modes(segmenter: nn.Module) -> None:
    """Eval mode everywhere (batch norms keep their statistics: batches of 2 cannot estimate them),
    except TinyViT attention, whose eval mode reads a cached copy of its trainable position biases."""
    segmenter.eval()
    for m in segmenter.modules():
        if hasattr(m, "attention_biases") and hasattr(m, "attention_bias_idxs"):
            m.train(True)


def finetune(
    segmenter: nn.Module,
    images01: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    config: Optional[FinetuneConfig] = None,
    val_images: Optional[Sequence[np.ndarray]] = None,
    val_labels: Optional[Sequence[np.ndarray]] = None,
    callback: Optional[Callable[[dict], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    feature_cache: Optional[dict] = None,
) -> FinetuneResult:
    """Fine-tune ``segmenter`` (a ClassSegmenter) on 2-D slices in [0, 1] with labels 0..k.

    ``feature_cache``: a dict shared between runs that start from the *same pretrained encoder* on
    the same slices (e.g. a method and its baseline); frozen-prefix features computed by one run are
    reused (or continued to a deeper prefix) by the next.
    """
    config = (config or FinetuneConfig()).validate()
    k = segmenter.num_classes
    check_training_data(images01, labels, k, getattr(segmenter, "class_names", None))
    val_images = list(val_images or [])
    val_labels = list(val_labels or [])
    if len(val_images) != len(val_labels):
        raise TrainingError("Give one label slice per validation image slice.")
    # under torchrun: join the process group; rank 0 alone validates and reports (None in one process)
    ddp = DistributedTraining.from_environment(config.method, config.device)
    device = ddp.device if ddp is not None else resolve_device(config.device)
    if ddp is not None and not ddp.is_main:
        val_images, val_labels, callback = [], [], None
    amp_dtype = _autocast_dtype(config.precision, device)
    if amp_dtype is not None and config.method == "galore-layerwise" and amp_dtype == torch.float16:
        amp_dtype = torch.bfloat16  # a gradient scaler cannot unscale inside per-parameter hooks
    emit = callback or (lambda info: None)
    stop = should_stop or (lambda: False)
    start_time = time.perf_counter()
    torch.manual_seed(config.seed)
    result = FinetuneResult(config=config.to_dict())
    if ddp is not None:
        result.config["distributed"] = {"world_size": ddp.world_size, "backend": ddp.backend,
                                        "global_batch": config.batch_size * ddp.world_size}
        result.notes.append(ddp.describe(config.batch_size, config.lr))

    segmenter.to(device)
    for p in segmenter.parameters():
        p.requires_grad_(False)
    encoder = segmenter.image_encoder

    # --- what trains ---------------------------------------------------------------------------
    split_kind = EncoderSplit(encoder, 0).kind
    if config.method == "decoder":
        stages = 0
        if config.train_stages:
            result.notes.append("method 'decoder' freezes the whole encoder; train_stages ignored")
    else:
        defaults = DEFAULT_TRAIN_STAGES["cpu" if device.type == "cpu" else "gpu"]
        stages = defaults[split_kind] if config.train_stages is None else config.train_stages
        if stages == 0:
            raise TrainingError(f"Method {config.method!r} trains the encoder: train_stages must be at least 1.")
    split = EncoderSplit(encoder, stages)
    result.train_stages = split.train_stages
    enc_lr = config.encoder_lr or config.lr

    head_params = list(segmenter.mask_decoder.parameters()) + [segmenter.prompt_encoder.no_mask_embed.weight]
    groups = [dict(params=head_params, lr=config.lr, weight_decay=config.weight_decay, name="head")]
    notes: list[str] = []
    galore_weights: list[nn.Parameter] = []
    wrapped: list[LoRAQKV] = []
    if config.method in ("galore", "galore-layerwise", "full"):
        enc_params = split.trainable_parameters()
        for p in enc_params:
            p.requires_grad_(True)
        if config.method == "full":
            groups.append(dict(params=enc_params, lr=enc_lr, weight_decay=config.weight_decay, name="encoder"))
        else:
            galore_weights = linear_weights(split.trainable_modules())
            ids = {id(w) for w in galore_weights}
            gal, notes = galore_groups(galore_weights, config, enc_lr)
            groups.extend(gal)
            rest = [p for p in enc_params if id(p) not in ids]
            groups.append(dict(params=rest, lr=enc_lr, weight_decay=config.weight_decay, name="encoder_other"))
    elif config.method == "lora":
        blocks = [m for stage in split.trainable_stages for m in stage.modules() if hasattr(m, "attn") and hasattr(m.attn, "qkv")]
        wrapped = apply_lora(encoder, config.lora_rank, config.lora_alpha, blocks=blocks)
        if not wrapped:
            raise TrainingError("LoRA found no attention block in the trained encoder stages.")
        groups.append(dict(params=lora_parameters(wrapped), lr=enc_lr, weight_decay=config.weight_decay, name="lora"))
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    result.notes.extend(notes)
    result.galore_parameters = count(galore_weights)
    trainable = [p for g in groups for p in g["params"]]
    result.trainable_parameters = count(trainable)
    optimizer = build_optimizer(groups, config, notes)
    scaler = None
    if amp_dtype == torch.float16 and not optimizer.layerwise:
        scaler = torch.amp.GradScaler(device.type)
        optimizer.grad_scaler = scaler
    units = checkpoint_units(split) if config.checkpointing else []
    set_checkpointing(units, True)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    )

    try:
        # --- data: frozen prefix computed once per (augmented) slice --------------------------
        _set_train_modes(segmenter)
        train = FewShotSlices(images01, labels, segmenter.image_size)
        mean = segmenter.pixel_mean.to(device)
        std = segmenter.pixel_std.to(device)

        def prefix_features(images: list[torch.Tensor], phase: str) -> list[torch.Tensor]:
            stacked = torch.stack(images)
            signature = (phase, len(images), round(float(stacked.sum()), 3), round(float(stacked.square().sum()), 3))
            depth = split.frozen_depth + (1 if split.frozen else 0)
            if feature_cache is not None:
                if (signature, depth) in feature_cache:
                    return feature_cache[(signature, depth)]
                usable = [d for (sig, d) in feature_cache if sig == signature and d <= split.frozen_depth]
                if usable:
                    start = max(usable)
                    cached = feature_cache[(signature, start)]
                    with torch.no_grad(), autocast():
                        feats = [split.prefix_from(cached[i : i + 2].to(device), start).float() for i in range(0, len(cached), 2)]
                    feats = torch.cat(feats)
                    feature_cache[(signature, depth)] = feats
                    return feats
            feats = []
            with torch.no_grad(), autocast():
                for i in range(0, len(images), 2):
                    if stop():
                        raise KeyboardInterrupt
                    batch = torch.stack(images[i : i + 2]).to(device)
                    out = split.prefix((batch - mean) / std).float()
                    feats.extend(out.unbind(0))
                    emit(event(phase, done=min(i + 2, len(images)), total=len(images),
                               elapsed=time.perf_counter() - start_time))
            feats = torch.stack(feats)
            if feature_cache is not None:
                feature_cache[(signature, depth)] = feats
            return feats

        online = None
        if split.whole:
            pool_images, pool_labels = train.images, train.labels
            pool_feats = None
            online = build_augmentation(config.seed) if config.augment else None
        else:
            pool_images, pool_labels = train.augmented_pool(config.augment_copies, config.augment, config.seed)
            pool_feats = prefix_features(pool_images, "prepare")
        val_idx = select_validation(len(val_images), config.max_val_slices)
        val = FewShotSlices([val_images[i] for i in val_idx], [val_labels[i] for i in val_idx], segmenter.image_size)
        from ..preprocess import SliceTransform

        tf = SliceTransform(segmenter.image_size)
        val_shapes = [tf.resized_shape(np.shape(val_images[i])) for i in val_idx]
        val_feats = prefix_features(val.images, "prepare-validation") if (len(val) and not split.whole) else None
        result.prepare_seconds = time.perf_counter() - start_time

        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=config.dice_weight, lambda_ce=config.ce_weight, batch=True,
            include_background=config.dice_background,
        )

        def forward(feats: torch.Tensor) -> torch.Tensor:
            with autocast():
                return segmenter.decode(split.suffix(feats)).float()

        train_module = ddp.wrap(segmenter, split.suffix) if ddp is not None else None

        def train_forward(feats: torch.Tensor) -> torch.Tensor:
            if train_module is None:
                return forward(feats)
            with autocast():
                return train_module(feats).float()

        def validate() -> dict:
            if not len(val):
                return {}
            totals = np.zeros((k, 2))
            with torch.no_grad():
                for i in range(0, len(val), 2):
                    if val_feats is not None:
                        feats = val_feats[i : i + 2]
                    else:
                        feats = (torch.stack(val.images[i : i + 2]).to(device) - mean) / std
                    pred = forward(feats).argmax(1).cpu()
                    for j in range(pred.shape[0]):
                        h, w = val_shapes[i + j]
                        p, g = pred[j, :h, :w], val.labels[i + j][:h, :w]
                        for c in range(1, k + 1):
                            pc, gc = p == c, g == c
                            totals[c - 1, 0] += int((pc & gc).sum())
                            totals[c - 1, 1] += int(pc.sum() + gc.sum())
            names = list(segmenter.class_names)
            return {names[c]: (float(2 * totals[c, 0] / totals[c, 1]) if totals[c, 1] else float("nan")) for c in range(k)}

        def mean_of(d: dict) -> float:
            vals = [v for v in d.values() if not math.isnan(v)]
            return float(np.mean(vals)) if vals else float("nan")

        val_every = config.val_every or max(1, math.ceil(config.steps / 4))
        best_state = None
        best_score = -1.0
        if len(val):
            result.initial_val_dice = validate()
            best_score = mean_of(result.initial_val_dice)
            best_state = plain_state_dict(segmenter)
            result.val_dice = dict(result.initial_val_dice)
            result.history.append({"step": 0, "val_dice": result.initial_val_dice})
            emit(event("validate", step=0, steps=config.steps, val_dice=result.initial_val_dice,
                       elapsed=time.perf_counter() - start_time))
            _set_train_modes(segmenter)

        world = ddp.world_size if ddp is not None else 1
        if world > 1 and len(pool_images) < config.batch_size * world:
            raise TrainingError(
                f"The global batch ({config.batch_size} x {world} processes) is larger than the {len(pool_images)} "
                "training slices (with augmented copies): lower --batch-size or --nproc_per_node.")
        # every rank draws the same global batch from the same shuffle and trains on its own part of it
        sampler = BatchSampler(len(pool_images), config.batch_size * world, config.seed)
        step_times: list[float] = []
        train_start = time.perf_counter()
        last_val = result.initial_val_dice or None
        for step in range(config.steps):
            if ddp.any(stop()) if ddp is not None else stop():
                result.stopped = True
                break
            t0 = time.perf_counter()
            lr = optimizer.set_lr_factor(lr_factor(step, config.steps, config.warmup, config.poly_power))
            idx = sampler.next() if ddp is None else ddp.shard(sampler.next())
            if pool_feats is not None:
                feats = torch.stack([pool_feats[i] for i in idx])
                target = torch.stack([pool_labels[i] for i in idx])
            else:
                pairs = [
                    augment(online, pool_images[i], pool_labels[i]) if online is not None else (pool_images[i], pool_labels[i])
                    for i in idx
                ]
                feats = (torch.stack([a for a, _ in pairs]).to(device) - mean) / std
                target = torch.stack([b for _, b in pairs])
            target = target.to(device)[:, None]
            logits = train_forward(feats)
            loss = loss_fn(logits, target) if ddp is None else ddp.global_loss(loss_fn, logits, target)
            if not torch.isfinite(loss):
                raise TrainingError(f"The loss became {loss.item()} at step {step + 1}; lower --lr.")
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_times.append(time.perf_counter() - t0)
            result.steps_done = step + 1
            result.final_loss = float(loss.item())
            entry = {"step": step + 1, "steps": config.steps, "loss": result.final_loss, "lr": lr}
            val_now = None
            if len(val) and ((step + 1) % val_every == 0 or step + 1 == config.steps):
                val_now = validate()
                _set_train_modes(segmenter)
                score = mean_of(val_now)
                if score > best_score:  # ties keep the earlier model
                    best_score, best_state = score, plain_state_dict(segmenter)
                    result.best_step = step + 1
                    result.val_dice = dict(val_now)
                last_val = val_now
                entry["val_dice"] = val_now
            elapsed_train = time.perf_counter() - train_start
            done = step + 1
            entry["elapsed"] = time.perf_counter() - start_time
            entry["eta"] = elapsed_train / done * (config.steps - done)
            entry["val_dice"] = entry.get("val_dice", last_val)
            result.history.append(entry)
            emit(event("step", **entry))
    except KeyboardInterrupt:
        result.stopped = True
        best_state = locals().get("best_state")
    except RuntimeError as exc:
        if _is_oom(exc):
            raise TrainingError(
                f"Out of memory on {device}: try --checkpointing, fewer --train-stages, a smaller batch, "
                "--method galore-layerwise, or the CPU."
            ) from exc
        raise
    finally:
        optimizer.remove_hooks()
        set_checkpointing(units, False)
        for p in segmenter.parameters():
            p.grad = None
        if wrapped:
            merge_lora(segmenter)
    if best_state is not None and (len(val_images) and result.best_step >= 0):
        segmenter.load_state_dict(best_state)
    else:
        result.best_step = result.steps_done
    for p in segmenter.parameters():
        p.requires_grad_(False)
    segmenter.eval()
    result.seconds_per_step = float(np.mean(step_times)) if result.steps_done and step_times else 0.0
    result.total_seconds = time.perf_counter() - start_time
    return result


__all__ = ["FinetuneResult", "finetune", "plain_state_dict", "dice_per_class", "DEFAULT_TRAIN_STAGES"]
