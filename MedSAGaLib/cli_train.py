"""``medsaga finetune`` and ``medsaga evaluate`` (wired into ``cli.py``)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .commands import EVALUATE_OPTIONS, FINETUNE_OPTIONS, add_options
from .events import describe, event, format_dice, jsonable, to_json_line
from .slices import evenly_spread, labels_for_model, format_ranges, plan_slices, select_classes  # noqa: F401 (evenly_spread re-exported)
from .training.config import FinetuneConfig, TrainingError


def add_finetune_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="adapt SAM to k classes from a few annotated slices",
        description="Fine-tune a SAM model (GaLore on the image encoder by default) on a few annotated slices "
                    "and write an adapted model file. Annotated slices not used for training measure validation Dice.")
    add_options(p, FINETUNE_OPTIONS)
    p.set_defaults(func=run_finetune)


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice and HD95 per class against reference labels",
        description="Segment the annotated slices (or --slices) with a model and compare with reference labels.")
    add_options(p, EVALUATE_OPTIONS)
    p.set_defaults(func=run_evaluate)


# --------------------------------------------------------------------------------------------
def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        if threads < 1:
            raise ValueError("--threads must be at least 1.")
        torch.set_num_threads(threads)


class StopFlag:
    """SIGINT/SIGTERM ask the trainer to stop at the next step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmedsaga finetune: stopping after this step (Ctrl-C again to abort at once)...", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested


class Progress:
    """Reports progress events (``MedSAGaLib.events``): a tqdm bar, text lines, JSON lines on stdout, or quiet."""

    def __init__(self, mode: str, steps: int) -> None:
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        self.steps = steps
        self.last_line = 0.0

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event", "step")
        if self.mode == "json":
            print(to_json_line(ev), flush=True)
            return
        if self.mode == "none" or kind in ("start", "done"):
            return
        if kind in ("prepare", "prepare-validation"):
            if self.mode == "lines" and ev["done"] == ev["total"]:
                print(f"{describe(ev)} ({ev['elapsed']:.0f} s)", file=sys.stderr, flush=True)
            return
        if kind != "step":
            print(describe(ev), file=sys.stderr, flush=True)
            return
        if self.mode == "tqdm":
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=ev["steps"], desc="Fine-tuning", unit="step")
            self.bar.update(1)
            post = {"loss": f"{ev['loss']:.4f}", "lr": f"{ev['lr']:.2e}"}
            if ev.get("val_dice"):
                post["val"] = format_dice(ev["val_dice"])
            self.bar.set_postfix(post)
        else:
            now = time.monotonic()
            if now - self.last_line > 10 or ev["step"] == ev["steps"] or ev.get("val_dice") and ev["step"] % 10 == 0:
                self.last_line = now
                print(describe(ev), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_task(args):
    """Image, [0,1] array, labels, names, colours, slice axis, as asked on the command line."""
    from .segio import read_labels
    from .volume import array_from_image, read_volume, slice_axis

    image = read_volume(args.image)
    array = array_from_image(image)
    labels, names, colors = read_labels(args.labels, image)
    axis = slice_axis(image, args.axis or "axial")
    return image, array, labels, names, colors, axis


def run_finetune(args) -> int:
    import torch

    from .head import ClassSegmenter
    from .modelfile import ModelFileError, load_model, read_metadata, save_model
    from .models import build_base_model
    from .slices import annotated_slices
    from .training import finetune
    from .slices import get_slice, parse_slices
    from .volume import normalize_with, parse_window, preprocessing_settings

    _set_threads(args.threads)
    if args.slices is not None and args.shots is not None:
        raise ValueError("Give --slices or --shots, not both.")
    output = Path(args.output)
    if output.is_dir():
        raise ValueError(f"Output {output} is a folder; give a model file name.")
    image, array, labels, names, colors, axis = load_task(args)
    labels, names, colors = select_classes(labels, names, colors, args.classes)
    if not names:
        raise TrainingError(f"{args.labels} holds no label: annotate at least one slice.")
    annotated = annotated_slices(labels, axis)
    requested = parse_slices(args.slices, array.shape[axis])
    train_idx, val_idx = plan_slices(annotated, requested, args.shots, args.val_fraction)

    window = parse_window(args.window)
    resumed_meta = None
    if args.resume:
        resumed_meta = read_metadata(args.resume)
        if args.base is not None and resumed_meta.get("base_model") != args.base:
            raise ModelFileError(
                f"{args.resume} was adapted from {resumed_meta.get('base_model')}, not {args.base}; "
                "drop --base or start from the matching base model.")
        model_names = list(resumed_meta.get("class_names") or [])
        if args.classes is None and model_names != names and len(model_names) == len(names) and all(
                n.startswith("label_") for n in names):
            names = model_names  # a plain label volume: values 1..k are the model's classes in order
        if model_names != names:
            raise ModelFileError(
                f"{args.resume} segments {model_names}, but the labels hold {names}; "
                "resume with labels of the same classes (or --classes to name them).")
        segmenter = load_model(args.resume, class_names=names)
        settings = resumed_meta.get("preprocessing") if window is None else preprocessing_settings(window)
    else:
        base = build_base_model(args.base or "litemedsam", checkpoint=args.checkpoint, image_size=args.image_size)
        colors = colors if all(c is not None for c in colors) else None
        segmenter = ClassSegmenter.from_base(base, names, colors)
        settings = preprocessing_settings(window)
    array01 = normalize_with(array, settings or preprocessing_settings(None))
    train_images = [get_slice(array01, axis, i) for i in train_idx]
    train_labels = [get_slice(labels, axis, i) for i in train_idx]
    val_images = [get_slice(array01, axis, i) for i in val_idx]
    val_labels = [get_slice(labels, axis, i) for i in val_idx]

    steps = args.steps
    if args.epochs is not None:
        if args.epochs <= 0:
            raise ValueError("--epochs must be positive.")
        steps = max(1, math.ceil(args.epochs * len(train_idx) / max(1, args.batch_size)))
    config = FinetuneConfig(
        method=args.method, steps=steps or FinetuneConfig().steps, batch_size=args.batch_size, lr=args.lr,
        encoder_lr=args.encoder_lr, warmup=args.warmup, rank=args.rank, update_proj_gap=args.update_proj_gap,
        scale=args.scale, proj_type=args.proj_type, lora_rank=args.lora_rank, train_stages=args.train_stages,
        augment=not args.no_augment, checkpointing=args.checkpointing, precision=args.precision,
        device=_device_name(args.device), seed=args.seed, max_val_slices=args.max_val_slices,
    ).validate()
    config.warmup = min(config.warmup, max(0, config.steps - 1))

    from .training.distributed import is_main_process, shutdown

    main_rank = is_main_process()  # under torchrun, rank 0 alone reports and writes the model
    progress = Progress(args.progress if main_rank else "none", config.steps)
    if not main_rank:
        pass
    elif progress.mode != "json":
        scored = min(len(val_idx), config.max_val_slices or len(val_idx))
        print(f"Training on {len(train_idx)} slice(s) {format_ranges(train_idx)}; validating on {scored} of the "
              f"{len(val_idx)} other annotated slice(s) ({format_ranges(val_idx) or 'none'}), evenly spread; "
              f"classes: {', '.join(names)}; method {config.method}, "
              f"{config.steps} steps", file=sys.stderr, flush=True)
    else:
        progress(event("start", train_slices=train_idx, val_slices=val_idx, classes=names, method=config.method,
                       steps=config.steps))
    with StopFlag() as stop:
        try:
            result = finetune(segmenter, train_images, train_labels, config, val_images, val_labels,
                              callback=progress, should_stop=stop)
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise TrainingError(f"Out of memory: {exc}") from None
            raise
        finally:
            progress.close()
    if not main_rank:
        shutdown()
        return 0
    if result.steps_done == 0:
        kept = " (the existing file is unchanged)" if output.exists() else ""
        print(f"medsaga finetune: stopped before the first step; nothing written{kept}.", file=sys.stderr)
        return 130
    training = result.metadata()
    training.update(
        train_slices=train_idx, val_slices=val_idx, labels=str(args.labels), image=str(args.image),
        resumed_from=str(args.resume) if args.resume else None,
        previous_training=(resumed_meta or {}).get("training"),
        rank=config.rank, lr=config.lr,
    )
    metadata = {
        "preprocessing": settings or preprocessing_settings(None),
        "axis": args.axis or "axial",
        "training": jsonable(training),
        "validation_dice": jsonable(result.val_dice),
    }
    save_model(output, segmenter, metadata)
    summary = event(
        "done", model=str(output), steps=result.steps_done, stopped=result.stopped, best_step=result.best_step,
        val_dice=result.val_dice, initial_val_dice=result.initial_val_dice,
        seconds_per_step=round(result.seconds_per_step, 3), seconds=round(result.total_seconds, 1))
    if progress.mode == "json":
        progress(summary)
    else:
        state = "stopped early at step" if result.stopped else "finished"
        print(f"Fine-tuning {state} {result.steps_done}; {result.seconds_per_step:.2f} s/step, "
              f"{result.total_seconds:.0f} s in all.", file=sys.stderr)
        if result.val_dice:
            print(f"Validation Dice (step {result.best_step}, kept): {format_dice(result.val_dice)}", file=sys.stderr)
            if result.initial_val_dice:
                print(f"Validation Dice before training:   {format_dice(result.initial_val_dice)}", file=sys.stderr)
        for note in result.notes:
            print(f"Note: {note}", file=sys.stderr)
        print(f"Wrote {output}")
    shutdown()
    return 0


def _device_name(name: str) -> str:
    from .inference import resolve_device

    return str(resolve_device(name))


# --------------------------------------------------------------------------------------------
def evaluate_labels(pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing2d) -> dict:
    """Per class: Dice over all given slices (MONAI), HD95 in mm averaged over slices where both are non-empty."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred, dtype=torch.long)[:, None], num_classes + 1)
    g = one_hot(torch.as_tensor(ref, dtype=torch.long)[:, None], num_classes + 1)
    # Dice over the stack of slices as one volume: [1, C, n, H, W]
    dice = compute_dice(p.permute(1, 0, 2, 3)[None], g.permute(1, 0, 2, 3)[None], include_background=False,
                        ignore_empty=True)[0]
    out = {}
    for c in range(1, num_classes + 1):
        both = [i for i in range(pred.shape[0]) if (pred[i] == c).any() and (ref[i] == c).any()]
        hd = float("nan")
        if both:
            values = compute_hausdorff_distance(p[both][:, [0, c]], g[both][:, [0, c]], include_background=False,
                                                percentile=95, spacing=list(spacing2d))
            hd = float(torch.nanmean(values.float()))
        only = sum(1 for i in range(pred.shape[0]) if (pred[i] == c).any() != (ref[i] == c).any())
        out[c] = {"dice": float(dice[c - 1]), "hd95_mm": hd, "slices": len(both), "slices_one_empty": only}
    return out


def run_evaluate(args) -> int:
    from .inference import resolve_device, segment_volume
    from .modelfile import load_model
    from .slices import annotated_slices
    from .slices import parse_slices
    from .volume import normalize_with, parse_window, preprocessing_settings

    _set_threads(args.threads)
    segmenter = load_model(args.model)
    meta = getattr(segmenter, "metadata", {}) or {}
    image, array, labels, names, colors, _ = load_task(args)
    from .volume import slice_axis

    axis = slice_axis(image, args.axis or meta.get("axis") or "axial")
    labels = labels_for_model(segmenter.class_names, names, labels)
    slices = parse_slices(args.slices, array.shape[axis]) or annotated_slices(labels, axis)
    if not slices:
        raise ValueError("The labels have no annotated slice to evaluate on; give --slices.")
    window = parse_window(args.window)
    settings = preprocessing_settings(window) if window is not None else meta.get("preprocessing") or preprocessing_settings(None)
    array01 = normalize_with(array, settings)
    pred = segment_volume(segmenter, array01, axis, slices, args.batch_size, resolve_device(args.device),
                          progress=not args.json and sys.stderr.isatty())
    take = lambda vol: np.moveaxis(vol, axis, 0)[slices]  # noqa: E731
    spacing_zyx = list(image.GetSpacing())[::-1]
    spacing2d = [s for a, s in enumerate(spacing_zyx) if a != axis]
    metrics = evaluate_labels(take(pred), take(labels), segmenter.num_classes, spacing2d)
    train_slices = set((meta.get("training") or {}).get("train_slices") or [])
    overlap = sorted(train_slices & set(slices))
    rows = [dict(name=n, **metrics[c]) for c, n in enumerate(segmenter.class_names, start=1)]
    dices = [r["dice"] for r in rows if math.isfinite(r["dice"])]
    hds = [r["hd95_mm"] for r in rows if math.isfinite(r["hd95_mm"])]
    summary = {"model": str(args.model), "slices": slices, "classes": rows,
               "mean_dice": float(np.mean(dices)) if dices else None,
               "mean_hd95_mm": float(np.mean(hds)) if hds else None, "training_slices_included": overlap}
    if args.json:
        print(json.dumps(jsonable(summary), indent=2))
        return 0
    width = max(8, *(len(r["name"]) for r in rows))
    print(f"{'class':<{width}}  {'Dice':>6}  {'HD95 mm':>8}  slices")
    for r in rows:
        dice = f"{r['dice']:.3f}" if math.isfinite(r["dice"]) else "n/a"
        hd = f"{r['hd95_mm']:.2f}" if math.isfinite(r["hd95_mm"]) else "n/a"
        print(f"{r['name']:<{width}}  {dice:>6}  {hd:>8}  {r['slices']}")
    if dices:
        print(f"{'mean':<{width}}  {np.mean(dices):>6.3f}  {(np.mean(hds) if hds else float('nan')):>8.2f}")
    print(f"{len(slices)} slices evaluated; HD95 is per slice (in-plane, mm), averaged over slices where both are non-empty.")
    if overlap:
        print(f"Note: {len(overlap)} of these slices were used for training ({format_ranges(overlap)}); "
              "their scores are not an honest estimate.")
    return 0
