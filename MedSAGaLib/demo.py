"""``make demo``: few-shot grey/white-matter segmentation of the MNI152 template on a CPU.

Five annotated axial slices train the pretrained LiteMedSAM with GaLore (the paper's method) and,
as the baseline, with the encoder frozen (``decoder``); both are scored on annotated slices they
never saw, next to the untrained k-class head. The GaLore model then segments the whole volume.
Then a realistic task (``--realistic-task``, default ``colin27_aal``: six small deep grey-matter
structures of the AAL atlas on the Colin27 T1, from Debian's ``mricron-data``; skipped with a note
when the package is absent) is fine-tuned as ``medsaga finetune`` does with no flags (5 painted
slices, the steps chosen by the data within ``--realistic-budget`` seconds) and scored on every
other annotated slice, segmented as the Slicer panel does: with the painted slices kept and leaned on
(:mod:`MedSAGaLib.painted`). Everything lands in ``--output``: the model files, a ``.seg.nrrd``,
``report.json``, PNG overlays and the loss curves.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .events import ConsoleProgress, format_dice, jsonable
from .slices import evenly_spread
from .training import FinetuneConfig

DEMO_DEFAULTS = dict(steps=60, baseline_steps=60, shots=5, val_slices=8)


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m MedSAGaLib.demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="demo-output", help="folder for the results (default demo-output)")
    p.add_argument("--method", default="galore", help="method of the main model (default galore)")
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["steps"], help="fine-tuning steps of the main model")
    p.add_argument("--baseline-steps", type=int, default=DEMO_DEFAULTS["baseline_steps"],
                   help="steps of the decoder-only baseline (0 skips it)")
    p.add_argument("--shots", type=int, default=DEMO_DEFAULTS["shots"], help="annotated training slices (default 5)")
    p.add_argument("--val-slices", type=int, default=DEMO_DEFAULTS["val_slices"],
                   help="unseen annotated slices scored during training and in the comparison (default 8)")
    p.add_argument("--train-stages", type=int, default=None, help="encoder stages trained (default: the trainer's)")
    p.add_argument("--lr", type=float, default=FinetuneConfig().lr,
                   help="learning rate of both runs (default %(default)s, the trainer's)")
    p.add_argument("--augment-copies", type=int, default=FinetuneConfig().augment_copies,
                   help="versions of each training slice whose frozen encoder features are cached (default %(default)s)")
    p.add_argument("--segment", choices=("volume", "none"), default="volume",
                   help="segment the whole volume with the main model (default) or skip it")
    p.add_argument("--realistic-task", default="colin27_aal",
                   help="realistic task fine-tuned at the product defaults after GM/WM (default colin27_aal; none skips)")
    p.add_argument("--realistic-budget", type=float, default=FinetuneConfig().time_budget,
                   help="its time budget in seconds (default %(default)s, as medsaga finetune)")
    p.add_argument("--realistic-steps", type=int, default=None,
                   help="a fixed number of steps for it instead of the time budget (tests)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


# Overlay colours that stand out on a grey MR image and from each other (the segmentation keeps the
# classes' own colours); beyond eight classes they repeat.
OVERLAY_COLORS = [(0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                  (0.58, 0.40, 0.74), (0.09, 0.75, 0.81), (0.89, 0.47, 0.76), (0.74, 0.74, 0.13)]


def overlay_png(path: Path, image2d, columns: list[tuple[str, np.ndarray]], colors, names=(), title="") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cmap = np.zeros((len(colors) + 1, 4))
    for i in range(1, len(colors) + 1):
        cmap[i, :3], cmap[i, 3] = OVERLAY_COLORS[(i - 1) % len(OVERLAY_COLORS)], 0.45
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.9))
    for ax, (heading, lab) in zip(np.atleast_1d(axes), columns):
        ax.imshow(image2d, cmap="gray", origin="lower")
        ax.imshow(cmap[lab], origin="lower", interpolation="nearest")
        ax.set_title(heading, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if len(names):  # a legend of colour patches under the panels, not a long title that runs off the figure
        handles = [Patch(color=OVERLAY_COLORS[i % len(OVERLAY_COLORS)], label=n) for i, n in enumerate(names)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.08 * ((len(handles) + 5) // 6), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def loss_png(path: Path, histories: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, hist in histories.items():
        steps = [h["step"] for h in hist if "loss" in h]
        ax.plot(steps, [h["loss"] for h in hist if "loss" in h], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("Dice + CE loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def realistic_task(name: str, out: Path, device: str, budget: float, steps=None, shots: int = 5):
    """Fine-tune ``name`` at the product defaults on ``shots`` evenly spread annotated slices and score
    every other annotated slice: a report dict, or None (with a logged reason) when its data are absent."""
    from .samples.mricron import MissingSampleData
    from .samples.tasks import load_sample_task
    from .painted import PaintedSlices
    from .workflow import evaluate_volume, finetune_volume, load_task

    try:
        sample = load_sample_task(name)
    except MissingSampleData as exc:
        log(f"realistic task {name!r} skipped: {exc}")
        return None
    task = load_task(sample.image, sample.labels, sample.axis)
    task.class_names, task.class_colors = list(sample.class_names), list(sample.class_colors)
    task.image_source = sample.title
    painted = evenly_spread(task.annotated, shots)
    log(f"realistic task: {sample.title}; painted slices {painted}, the steps chosen by the data within "
        f"{budget:.0f} s (as medsaga finetune with no flags)")
    # what a user hands over: labels on the painted slices only (all of them train: too few to hold one out)
    import copy

    painted_task = copy.copy(task)
    painted_task.labels = np.zeros_like(task.labels)
    for z in painted:
        index = [slice(None)] * 3
        index[task.axis] = z
        painted_task.labels[tuple(index)] = task.labels[tuple(index)]
    progress = ConsoleProgress("auto")
    t0 = time.perf_counter()
    try:
        run = finetune_volume(painted_task, output=out / f"{name}.medsaga", progress=progress, device=device,
                              time_budget=budget, steps=steps)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    for line in run.result.decisions + run.result.warnings:
        log(line)
    unseen = [z for z in task.annotated if z not in set(painted)]
    # segmented as the Slicer panel does: the painted slices kept and leaned on between them (--painted)
    hint = PaintedSlices(painted_task.labels, task.axis, len(task.class_names),
                         slice_spacing_mm=task.image.GetSpacing()[::-1][task.axis])
    scores = evaluate_volume(run.segmenter, task, slices=unseen, device=device, backend="torch", painted=hint)
    dice = {r["name"]: r["dice"] for r in scores.classes}
    log(f"{name}: Dice on {len(unseen)} unseen annotated slices, segmented with the painted ones (--painted): "
        f"{format_dice(dice)} (mean {scores.mean_dice:.3f}); fine-tuning took {seconds:.0f} s")
    z = unseen[len(unseen) // 2]
    from .slices import get_slice

    image01 = get_slice(normalize_volume(task), task.axis, z)
    png = out / f"overlay_{name}_{z:03d}.png"
    overlay_png(png, image01, [("reference", get_slice(task.labels, task.axis, z)),
                               ("MedSAGa (5 painted slices)", get_slice(scores.prediction, task.axis, z))],
                task.class_colors, task.class_names, f"{name}: slice {z} (not painted)")
    return {"task": sample.title, "source": sample.source, "painted_slices": painted, "unseen_slices": len(unseen),
            "dice": dice, "hd95_mm": {r["name"]: r["hd95_mm"] for r in scores.classes}, "mean_dice": scores.mean_dice,
            "segmented_with_painted_slices": True, "removed_voxels": scores.ran.get("removed", {}),
            "steps": run.result.steps_done, "best_step": run.result.best_step, "seconds": seconds,
            "decisions": run.result.decisions, "warnings": run.result.warnings, "timings": run.result.timings,
            "model": f"{name}.medsaga", "overlay": png.name}


def normalize_volume(task):
    """The task's intensities in [0, 1] by volume percentiles (the pictures; a cropping fine-tune narrows them)."""
    from .volume import normalize_with, preprocessing_settings

    return normalize_with(task.array, preprocessing_settings(None))


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    start = time.perf_counter()
    import torch

    torch.set_num_threads(max(1, args.threads))
    from .inference import predict_slices
    from .metrics import evaluate_labels, mean_finite
    from .samples.mni152 import TISSUE_CLASSES, TISSUE_COLORS, mni152_tissue_labels
    from .slices import get_slice
    from .workflow import finetune_volume, load_task, new_segmenter, segment_file

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    log("loading the MNI152 T1 template and its grey/white-matter maps (nilearn, on disk)")
    image, label_image = mni152_tissue_labels()
    task = load_task(image, label_image, "axial", classes=TISSUE_CLASSES)
    task.class_colors = list(TISSUE_COLORS)
    task.image_source = "nilearn MNI152 2009 T1 template"
    array01 = normalize_volume(task)
    labels, axis, names, colors = task.labels, task.axis, task.class_names, task.class_colors
    annotated = task.annotated
    train_idx = evenly_spread(annotated, args.shots)
    unseen = [z for z in annotated if z not in set(train_idx)]
    val_idx = evenly_spread(unseen, args.val_slices)
    sl = lambda vol, z: get_slice(vol, axis, z)  # noqa: E731
    log(f"k=2 task ({', '.join(names)}); training slices {train_idx}; unseen validation slices {val_idx}")
    timings["load"] = time.perf_counter() - start

    runs = {}
    feature_cache = {}  # frozen-encoder features shared by the runs (same pretrained encoder, same slices)
    models = {}
    model_path = out / "mni152_tissue.medsaga"
    plan = [(args.method, args.steps)] + ([("decoder", args.baseline_steps)] if args.baseline_steps > 0 else [])
    for method, steps in plan:
        t0 = time.perf_counter()
        log(f"fine-tuning with {method!r}: {steps} steps on {len(train_idx)} slices (CPU, {args.threads} threads)")
        progress = ConsoleProgress("auto")
        try:
            run = finetune_volume(task, slices=train_idx, val_slices=val_idx, feature_cache=feature_cache,
                                  output=model_path if method == args.method else None, progress=progress,
                                  method=method, steps=steps, lr=args.lr, device=args.device,
                                  max_val_slices=len(val_idx), augment_copies=args.augment_copies,
                                  train_stages=args.train_stages)
        finally:
            progress.close()
        result = runs[method] = run.result
        models[method] = run.segmenter
        timings[f"train_{method}"] = time.perf_counter() - t0
        log(f"{method}: {result.seconds_per_step:.2f} s/step, loss {result.final_loss:.3f}, "
            f"unseen-slice Dice {format_dice(result.val_dice)} (kept step {result.best_step})")
        if run.model_path is not None:
            log(f"wrote {run.model_path}")

    main_run = runs[args.method]
    main_model = models[args.method]

    # Overlays of three unseen slices: reference, untrained head, baseline, main model.
    t0 = time.perf_counter()
    show = [val_idx[len(val_idx) // 4], val_idx[len(val_idx) // 2], val_idx[(3 * len(val_idx)) // 4]] if val_idx else []
    untrained = new_segmenter(names, colors).eval()
    shown = {}
    for z in show:
        img = sl(array01, z)
        cols = [("reference", sl(labels, z)), ("untrained head", predict_slices(untrained, [img])[0])]
        for method in runs:
            cols.append((f"{method} ({runs[method].steps_done} steps)", predict_slices(models[method], [img])[0]))
        png = out / f"overlay_axial_{z:03d}.png"
        overlay_png(png, img, cols, colors, names, f"axial slice {z} (not used for training)")
        shown[z] = png.name
    loss_png(out / "loss_curves.png", {m: r.history for m, r in runs.items()})
    timings["overlays"] = time.perf_counter() - t0

    whole = None
    if args.segment == "volume":
        t0 = time.perf_counter()
        with_signal = [z for z in range(task.array.shape[axis]) if sl(task.array, z).max() > sl(task.array, z).min()]
        log(f"segmenting the volume with the {args.method} model: {len(with_signal)} slices with signal "
            f"(of {task.array.shape[axis]}; slices without any signal stay empty)")
        progress = ConsoleProgress("auto")
        try:
            seg = segment_file(image, main_model, out / "mni152_tissue.seg.nrrd", slices=with_signal,
                               device=args.device, progress=progress)
        finally:
            progress.close()
        timings["segment_volume"] = time.perf_counter() - t0
        log(f"wrote {seg.output}")
        unseen_all = [z for z in annotated if z not in set(train_idx)]
        take = lambda vol, zs: np.moveaxis(vol, axis, 0)[zs]  # noqa: E731
        metrics = evaluate_labels(take(seg.labels, unseen_all), take(labels, unseen_all), len(names), task.spacing2d())
        whole = {
            "slices": len(unseen_all),
            "dice": {n: metrics[c]["dice"] for c, n in enumerate(names, start=1)},
            "hd95_mm": {n: metrics[c]["hd95_mm"] for c, n in enumerate(names, start=1)},
            "seconds_per_slice": timings["segment_volume"] / max(1, len(with_signal)),
        }
        log(f"{args.method} model on all {len(unseen_all)} unseen annotated slices: Dice {format_dice(whole['dice'])}")

    realistic = None
    if args.realistic_task and args.realistic_task != "none":
        t0 = time.perf_counter()
        realistic = realistic_task(args.realistic_task, out, args.device, args.realistic_budget, args.realistic_steps)
        timings["realistic_task"] = time.perf_counter() - t0

    def mean(d):
        value = mean_finite(d)
        return value if math.isfinite(value) else None

    comparison = {"untrained head": {"val_dice": main_run.initial_val_dice, "mean": mean(main_run.initial_val_dice)}}
    for method, r in runs.items():
        comparison[method] = {
            "val_dice": r.val_dice, "mean": mean(r.val_dice), "steps": r.steps_done, "best_step": r.best_step,
            "seconds_per_step": r.seconds_per_step, "final_loss": r.final_loss, "train_stages": r.train_stages,
            "trainable_parameters": r.trainable_parameters, "galore_parameters": r.galore_parameters,
            "seconds": r.total_seconds, "loss_history": [round(h["loss"], 4) for h in r.history if "loss" in h],
        }
    timings["total"] = time.perf_counter() - start
    report = {
        "task": "MNI152 2009 template, axial slices, k=2: grey matter, white matter (argmax of bg/GM/WM probabilities)",
        "base_model": "litemedsam (pretrained)",
        "train_slices": train_idx,
        "unseen_validation_slices": val_idx,
        "comparison_on_unseen_slices": comparison,
        "main_model_on_all_unseen_slices": whole,
        "realistic_task": realistic,
        "files": {"model": model_path.name, "segmentation": "mni152_tissue.seg.nrrd" if whole else None,
                  "overlays": list(shown.values()), "loss_curves": "loss_curves.png"},
        "seconds": timings,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
    }
    (out / "report.json").write_text(json.dumps(jsonable(report), indent=2), encoding="utf-8")
    lines = [f"{'model':<18} {'GM':>6} {'WM':>6} {'mean':>6}"]
    for name, row in comparison.items():
        d = row["val_dice"]
        cell = lambda v: f"{v:6.3f}" if isinstance(v, float) and math.isfinite(v) else "   n/a"  # noqa: E731
        lines.append(f"{name:<18} {cell(d.get(names[0]))} {cell(d.get(names[1]))} {cell(row['mean'])}")
    print(f"\nDice on {len(val_idx)} unseen annotated slices:\n" + "\n".join(lines))
    if realistic:
        print(f"\n{realistic['task']}: 5 painted slices, product defaults ({realistic['steps']} steps, "
              f"{realistic['seconds']:.0f} s); Dice on {realistic['unseen_slices']} unseen annotated slices, "
              "segmented as the Slicer panel does (the painted slices kept and leaned on, --painted):")
        for name, value in realistic["dice"].items():
            print(f"  {name:<14} {value:6.3f}" if isinstance(value, float) and math.isfinite(value) else f"  {name:<14}    n/a")
        print(f"  {'mean':<14} {realistic['mean_dice']:6.3f}")
    print(f"\nWrote {out}/ (report.json, {model_path.name}, overlays) in {timings['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
