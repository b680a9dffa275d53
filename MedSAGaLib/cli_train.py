"""``medsaga finetune`` and ``medsaga evaluate`` (wired into ``cli.py``)."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path
from typing import Optional

from .commands import EVALUATE_OPTIONS, FINETUNE_OPTIONS, add_command
from .events import ConsoleProgress, format_dice, jsonable
from .slices import format_ranges
from .training.config import FinetuneConfig


def add_finetune_parser(subparsers) -> None:
    add_command(subparsers, "finetune", FINETUNE_OPTIONS, run_finetune,
                help="adapt SAM to k classes from a few annotated slices",
                description="Fine-tune a SAM model (GaLore on the image encoder by default) on a few annotated slices "
                            "and write an adapted model file. Annotated slices not used for training measure "
                            "validation Dice.")


def add_evaluate_parser(subparsers) -> None:
    add_command(subparsers, "evaluate", EVALUATE_OPTIONS, run_evaluate,
                help="Dice and HD95 per class against reference labels",
                description="Segment the annotated slices (or --slices) with a model and compare with reference labels.")


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


def _settings(args) -> dict:
    """The FinetuneConfig fields the command line sets (None: the default)."""
    return dict(
        method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr, encoder_lr=args.encoder_lr,
        warmup=args.warmup, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale,
        proj_type=args.proj_type, lora_rank=args.lora_rank, train_stages=args.train_stages,
        augment=not args.no_augment, checkpointing=args.checkpointing, precision=args.precision, device=args.device,
        seed=args.seed, max_val_slices=args.max_val_slices, time_budget=args.time_budget, max_steps=args.max_steps,
        crop=args.crop, crop_margin=args.crop_margin, mirror=args.mirror, sides=args.sides,
        class_weighting=args.class_weighting,
    )


def run_finetune(args) -> int:
    from .training.distributed import is_main_process, shutdown
    from .workflow import finetune_volume

    _set_threads(args.threads)
    output = Path(args.output)
    main_rank = is_main_process()  # under torchrun, rank 0 alone reports and writes the model
    progress = ConsoleProgress(args.progress if main_rank else "none")
    with StopFlag() as stop:
        try:
            run = finetune_volume(
                args.image, args.labels, output=output if main_rank else None, axis=args.axis, classes=args.classes,
                slices=args.slices, shots=args.shots, val_fraction=args.val_fraction, window=args.window, base=args.base,
                checkpoint=args.checkpoint, image_size=args.image_size, resume=args.resume, epochs=args.epochs,
                progress=progress, should_stop=stop, feature_store=args.feature_cache or "auto", **_settings(args))
        finally:
            progress.close()
    if not main_rank:
        shutdown()
        return 0
    result = run.result
    if run.model_path is None:
        kept = " (the existing file is unchanged)" if output.exists() else ""
        print(f"medsaga finetune: stopped before the first step; nothing written{kept}.", file=sys.stderr)
        return 130
    if progress.mode != "json":
        state = "stopped early at step" if result.stopped else "finished after step"
        print(f"Fine-tuning {state} {result.steps_done}; {result.seconds_per_step:.2f} s/step, "
              f"{result.total_seconds:.0f} s in all.", file=sys.stderr)
        summary = result.time_summary()
        if summary:
            print(summary[:1].upper() + summary[1:] + ".", file=sys.stderr)
        if result.val_dice:
            print(f"Validation Dice (step {result.best_step}, kept): {format_dice(result.val_dice)}", file=sys.stderr)
            if result.initial_val_dice:
                print(f"Validation Dice before training:   {format_dice(result.initial_val_dice)}", file=sys.stderr)
        for decision in result.decisions:
            print(f"Decided: {decision}", file=sys.stderr)
        for warning in result.warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        for note in result.notes:
            print(f"Note: {note}", file=sys.stderr)
        print(f"Wrote {output}")
    shutdown()
    return 0


# --------------------------------------------------------------------------------------------
def run_evaluate(args) -> int:
    from .workflow import evaluate_volume

    _set_threads(args.threads)
    progress = ConsoleProgress("tqdm") if not args.json and sys.stderr.isatty() else None
    try:
        evaluation = evaluate_volume(args.model, args.image, args.labels, axis=args.axis, slices=args.slices,
                                     window=args.window, batch_size=args.batch_size, device=args.device,
                                     progress=progress, backend=args.backend, tta=args.tta,
                                     precision=args.inference_precision, painted=args.painted)
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        print(json.dumps(jsonable(evaluation.summary()), indent=2))
        return 0
    rows = evaluation.classes
    width = max(8, *(len(r["name"]) for r in rows))
    print(f"{'class':<{width}}  {'Dice':>6}  {'HD95 mm':>8}  slices")
    for r in rows:
        dice = f"{r['dice']:.3f}" if math.isfinite(r["dice"]) else "n/a"
        hd = f"{r['hd95_mm']:.2f}" if math.isfinite(r["hd95_mm"]) else "n/a"
        print(f"{r['name']:<{width}}  {dice:>6}  {hd:>8}  {r['slices']}")
    if evaluation.mean_dice is not None:
        hd = evaluation.mean_hd95_mm
        print(f"{'mean':<{width}}  {evaluation.mean_dice:>6.3f}  {(hd if hd is not None else float('nan')):>8.2f}")
    print(f"{len(evaluation.slices)} slices evaluated; HD95 is per slice (in-plane, mm), averaged over slices where "
          "both are non-empty.")
    painted = evaluation.ran.get("painted_slices")
    if painted:
        removed = evaluation.ran.get("removed") or {}
        print(f"Note: the {len(painted)} painted slices ({format_ranges(painted)}) were kept, and the slices near "
              "them lean on them" + ("; removed pieces not connected to what was painted: " + ", ".join(
                  f"{k} {v} voxels" for k, v in removed.items()) if removed else "") + ".")
    overlap = evaluation.training_slices_included
    if overlap:
        what = "used for training or copied from --painted" if painted else "used for training"
        print(f"Note: {len(overlap)} of these slices were {what} ({format_ranges(overlap)}); "
              "their scores are not an honest estimate.")
    return 0
