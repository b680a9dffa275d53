"""``medsaga bench quality``: Dice and HD95 on unseen slices versus the number of training slices.

Tasks (``--task``, see ``MedSAGaLib.samples.tasks``): ``mni152_tissue`` (nilearn's MNI152 2009 T1
template, grey / white matter, axial), and the realistic ones from Debian's ``mricron-data``:
``colin27_aal`` (six deep grey-matter structures of the AAL atlas on the Colin27 T1, axial) and
``colin27_aal_lr`` (the same with left and right apart, 12 classes, coronal); ``all`` runs each.
A fixed set of test slices, evenly spread over the annotated range, is never trained on. For every
seed, ``shots`` training slices are drawn at random from the remaining slices (MNI152: slices that
hold both classes; the others: draws whose slices together hold every class); every method trains
on the same draw, from the same pretrained LiteMedSAM, with the same batch and schedule. With a
fixed ``--steps`` the last weights are scored; with the product default (no ``--steps``: the data
decide, within ``--time-budget``) the run stops on the validation slices, as ``medsaga finetune``
stops on the held-out painted slices. Baselines on the same test slices:

- ``oracle-box``: zero-shot LiteMedSAM prompted with each class's bounding box taken from the
  reference labels (an upper-bound-ish prompt no user would draw for every slice);
- ``unet``: a MONAI 2-D U-Net trained from scratch on the same training slices (the classical
  supervised baseline), same augmentation, same input size;
- ``nearest-slice``: every test slice takes the labels of the nearest training slice, learning
  nothing (:mod:`MedSAGaLib.baselines`): what a user has without any model.

Learning rates: one rate for all methods (``--lr``), fixed rates per method (``--method-lr``), or
each method's best rate from one shared grid (``--tune-lr``), judged by Dice on validation slices
that are neither trained on nor scored. Method-specific settings (GaLore's rank, scale and
projection gap; LoRA's rank and alpha) can then be chosen the same way (``--tune-setting``), one
setting after another at the chosen rate, by mean validation Dice over several draws.

Loss curves with and without warm-up are recorded for one method at one shot count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..baselines import copy_nearest_slices
from ..training.budget import PROBE_STEPS
from .common import machine_info, set_threads, write_json
from ..training.methods import METHODS

DEFAULT_METHODS = ("galore", "lora", "full", "decoder")
# The trainer settings that belong to one family of methods, and so can be tuned for it alone.
SETTING_METHODS = {
    "rank": ("galore", "galore-layerwise"),
    "scale": ("galore", "galore-layerwise"),
    "update_proj_gap": ("galore", "galore-layerwise"),
    "proj_type": ("galore", "galore-layerwise"),
    "lora_rank": ("lora",),
    "lora_alpha": ("lora",),
}


def log(message: str) -> None:
    print(f"[bench quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_task(test_slices: int = 8, val_slices: int = 0, task: str = "mni152_tissue"):
    """(array01 z,y,x, labels, axis, spacing2d, test indices, validation indices, candidate training indices).

    Validation slices (for choosing each method's learning rate) sit between the test slices and,
    like them, are never trained on, so the rate is never chosen on the slices that are scored.
    """
    import SimpleITK as sitk

    from ..samples.tasks import load_sample_task
    from ..slices import annotated_slices, evenly_spread
    from ..volume import normalize_intensity, slice_axis

    sample = load_sample_task(task)
    image, label_image = sample.image, sample.labels
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    labels = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    axis = slice_axis(image, sample.axis)
    array01 = normalize_intensity(array)
    take = lambda vol, z: np.take(vol, z, axis=axis)  # noqa: E731
    if task == "mni152_tissue":
        # Slices where both tissues are present with some area: a 1-shot draw must show both classes.
        rich = [z for z in annotated_slices(labels, axis)
                if min(int((take(labels, z) == c).sum()) for c in (1, 2)) >= 200]
    else:  # small structures: every annotated slice; a draw must hold every class between its slices
        rich = annotated_slices(labels, axis)
    test = evenly_spread(rich, test_slices)
    # Neighbouring slices are near-copies: keep held-out slices more than 2 slices apart from training (MNI152)
    # or at least 2 apart (the small-structure tasks span only 56-70 annotated slices)
    gap = 2 if task == "mni152_tissue" else 1
    far = lambda z, held: min((abs(z - h) for h in held), default=99) > gap  # noqa: E731
    val = evenly_spread([z for z in rich if far(z, test)], val_slices) if val_slices else []
    candidates = [z for z in rich if far(z, test) and far(z, val)]
    spacing_zyx = list(image.GetSpacing())[::-1]
    spacing2d = [s for a, s in enumerate(spacing_zyx) if a != axis]
    return array01, labels, axis, spacing2d, test, val, candidates


def draw_training(candidates: list[int], shots: int, seed: int, present: Optional[dict] = None,
                  num_classes: int = 0, tries: int = 500) -> Optional[list[int]]:
    """``shots`` slices drawn at random; with ``present`` (slice -> classes in it), the first draw whose
    slices hold every class 1..``num_classes`` (None when no draw of that size can)."""
    rng = np.random.default_rng(1000 + seed)
    for _ in range(tries if present is not None else 1):
        picks = sorted(int(z) for z in rng.choice(candidates, size=min(shots, len(candidates)), replace=False))
        if present is None or set().union(*(present[z] for z in picks)) >= set(range(1, num_classes + 1)):
            return picks
    return None


def score(pred: np.ndarray, ref: np.ndarray, spacing2d, names) -> dict:
    from ..metrics import evaluate_labels, mean_finite

    metrics = evaluate_labels(pred, ref, len(names), spacing2d)
    per_class = {names[c - 1]: metrics[c] for c in metrics}
    return {"per_class": per_class, "dice": mean_finite(m["dice"] for m in per_class.values()),
            "hd95_mm": mean_finite(m["hd95_mm"] for m in per_class.values())}


def predict(segmenter, slices01: list[np.ndarray], mirror: bool = False) -> np.ndarray:
    """Label maps of ``slices01``; ``mirror``: averaged with the mirror images, as ``medsaga segment`` does for
    a model trained with mirroring (``inference.mirror_averaging``)."""
    from ..fastpath import inference_copy
    from ..inference import mirror_swap, predict_slices

    fast = inference_copy(segmenter.eval())
    swap = mirror_swap(segmenter) if mirror else None  # as segment_volume does
    out = []
    for i in range(0, len(slices01), 4):
        out.extend(predict_slices(fast, slices01[i : i + 4], mirror=mirror, swap=swap))
    return np.stack(out)


def train_unet(train_images, train_labels, num_classes: int, steps: int, image_size: int, seed: int,
               batch_size: int = 2, lr: float = 1e-3, time_budget: Optional[float] = None,
               mirror: Optional[bool] = None, class_names: Optional[list[str]] = None):
    """A MONAI U-Net from scratch on the same slices (same augmentation and input size as SAM).

    ``mirror``: left-right mirroring in the augmentation; None decides as the product does (``choose_mirror``),
    and a mirrored copy exchanges the classes named as left and right of each other (``class_names``).
    With ``time_budget`` (seconds) the first steps are timed and ``steps`` becomes at most what fits in
    the budget, as the product's own fine-tuning plans its steps, so both get the same wall-clock.
    """
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from ..laterality import mirror_partners
    from ..training.data import BatchSampler, FewShotSlices, augment, build_augmentation, choose_mirror

    torch.manual_seed(seed)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=num_classes + 1, channels=(16, 32, 64, 128, 256),
               strides=(2, 2, 2, 2), num_res_units=2)
    data = FewShotSlices(train_images, train_labels, image_size)
    if mirror is None:
        mirror = choose_mirror(train_labels, class_names=class_names)[0]
    transform = build_augmentation(seed, mirror=mirror, swap=mirror_partners(class_names) if class_names else None)
    sampler = BatchSampler(len(data), batch_size, seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.8, lambda_ce=0.2, batch=True)
    losses = []
    net.train()
    started = time.perf_counter()
    step = 0
    while step < steps:
        if time_budget is not None and step == PROBE_STEPS:
            per_step = (time.perf_counter() - started) / step
            steps = max(step + 1, min(steps, int(time_budget / per_step)))
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps) ** 0.9
        pairs = [augment(transform, data.images[i], data.labels[i]) for i in sampler.next()]
        x = torch.stack([a[:1] for a, _ in pairs])
        y = torch.stack([b for _, b in pairs])[:, None]
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    net.eval()
    return net, losses


def unet_probabilities(net, slices01: list[np.ndarray], image_size: int, mirror: bool = False,
                       swap: Optional[list[int]] = None) -> list[np.ndarray]:
    """Class probabilities [k+1, H, W] of each slice. ``mirror``: averaged with the mirror images (their left
    and right classes exchanged by ``swap``), as MedSAGa's own prediction of a model trained with them."""
    import torch

    from ..inference import mirror_averaged
    from ..preprocess import SliceTransform

    tf = SliceTransform(image_size)
    out = []
    with torch.inference_mode():
        for s in slices01:
            x = tf.to_model(s)[None, :1]
            if mirror:
                out.append(tf.from_model(mirror_averaged(net, x, swap)[0], s.shape).numpy())
            else:  # resized logits, then softmax: the argmax of the resized logits
                out.append(tf.from_model(net(x)[0], s.shape).softmax(0).numpy())
    return out


def predict_unet(net, slices01: list[np.ndarray], image_size: int, mirror: bool = False,
                 swap: Optional[list[int]] = None) -> np.ndarray:
    """Label maps of :func:`unet_probabilities`."""
    return np.stack([p.argmax(0).astype(np.uint8)
                     for p in unet_probabilities(net, slices01, image_size, mirror, swap)])


def unet_baseline(train_images, train_labels, test_images, num_classes: int, steps: int, seed: int,
                  lr: float = 1e-3, crop: str = "auto", time_budget: Optional[float] = None,
                  probabilities: bool = False, class_names: Optional[list[str]] = None):
    """(test label maps, the crop box or None, losses) of a U-Net from scratch on the training slices.

    The U-Net gets the crop the SAM methods' ``crop`` mode picks from the same training labels, so
    both see the same pixels; its predictions are pasted back into whole slices. ``probabilities``:
    class probabilities [N, k+1, H, W] instead of label maps (background outside the crop). ``class_names``:
    mirroring and learning each left/right pair as one structure are decided from them too, as the product
    does (:func:`MedSAGaLib.laterality.choose_sides`; otherwise left and right classes exchanged).
    """
    import torch

    from ..laterality import choose_sides, mirror_partners
    from ..roi import choose_roi
    from ..training.data import choose_mirror

    sides = choose_sides(train_labels, class_names)[0] if class_names else None
    if sides is not None:  # one structure per left/right pair, split at the midline below
        train_labels = [sides.merge(x) for x in train_labels]
        class_names, num_classes = list(sides.names), len(sides.names)
    roi, _ = choose_roi(train_labels, crop)
    cut = roi.crop if roi is not None else (lambda x: x)
    labels = [cut(x) for x in train_labels]
    mirrored = choose_mirror(labels, class_names=class_names)[0]  # as the product decides; trained and predicted alike
    swap = mirror_partners(class_names) if mirrored else None
    net, losses = train_unet([cut(x) for x in train_images], labels, num_classes, steps, 256, seed, lr=lr,
                             time_budget=time_budget, mirror=mirrored, class_names=class_names)
    inside = unet_probabilities(net, [cut(x) for x in test_images], 256, mirror=mirrored, swap=swap)
    if roi is None:
        whole = np.stack(inside)
    else:
        whole = np.zeros((len(inside), num_classes + 1) + tuple(np.shape(test_images[0])), np.float32)
        whole[:, 0] = 1.0
        whole[:, :, roi.y0 : roi.y1, roi.x0 : roi.x1] = np.stack(inside)
    if sides is not None:
        whole = np.stack([sides.split(torch.from_numpy(p)).numpy() for p in whole])
    if probabilities:
        return whole, roi, losses
    return whole.argmax(1).astype(np.uint8), roi, losses


def parse_method_lrs(entries: list[str]) -> dict[str, float]:
    """``["full=3e-4", "lora=1e-2"]`` -> ``{"full": 3e-4, "lora": 1e-2}`` (a clear error for anything else)."""
    out = {}
    for entry in entries or []:
        method, sep, value = entry.partition("=")
        if not sep or method not in METHODS:
            raise SystemExit(f"--method-lr wants METHOD=RATE with METHOD one of {', '.join(METHODS)}; got {entry!r}.")
        try:
            rate = float(value)
        except ValueError:
            raise SystemExit(f"--method-lr {entry!r}: {value!r} is not a number.") from None
        if not rate > 0:
            raise SystemExit(f"--method-lr {entry!r}: the rate must be positive.")
        out[method] = rate
    return out


def parse_setting_grids(entries: list[str]) -> list[tuple[str, list]]:
    """``["scale=0.25,1"]`` -> ``[("scale", [0.25, 1.0])]``, each value of the trainer's own type."""
    from ..training import FinetuneConfig

    defaults = FinetuneConfig()
    out = []
    for entry in entries or []:
        key, sep, values = entry.partition("=")
        if not sep or key not in SETTING_METHODS:
            raise SystemExit(f"--tune-setting wants KEY=V1,V2,... with KEY one of {', '.join(SETTING_METHODS)}; "
                             f"got {entry!r}.")
        kind = type(getattr(defaults, key))
        try:
            grid = [kind(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--tune-setting {entry!r}: the values must be of type {kind.__name__}.") from None
        if not grid:
            raise SystemExit(f"--tune-setting {entry!r}: give at least one value.")
        out.append((key, list(dict.fromkeys(grid))))
    return out


def stale_runs(runs: list[dict], lr_by_method: dict, config_by_method: dict) -> list[dict]:
    """Runs (kept by --resume) of a swept method made at another rate or with other settings than chosen now."""
    return [r for r in runs if r["method"] in lr_by_method
            and (r.get("lr") != lr_by_method[r["method"]] or (r.get("config") or {}) != config_by_method.get(r["method"], {}))]


def task_names(requested: list[str]) -> list[str]:
    from ..samples.tasks import TASKS

    names = list(TASKS) if "all" in requested else list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise SystemExit(f"--task: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} or all.")
    return names


def run(args) -> dict:
    """Every task of ``--task``; returns the last task's payload."""
    payload = {}
    for task in task_names(args.task):
        payload = run_task(args, task)
    return payload


def run_task(args, task: str) -> dict:
    from ..inference import segment_with_boxes
    from ..models import build_base_model
    from ..training import TrainingError
    from ..workflow import finetune_config, finetune_slices, new_segmenter

    from ..samples.tasks import load_sample_task

    set_threads(args.threads)
    started = time.perf_counter()
    sample = load_sample_task(task)
    names = list(sample.class_names)
    k = len(names)
    tune_grid = sorted(set(args.tune_lr or []))
    setting_grids = parse_setting_grids(args.tune_setting)
    adaptive = args.steps is None  # the product default: the validation slices stop each run
    array01, labels, axis, spacing2d, test, val, candidates = load_task(
        args.test_slices, args.val_slices if tune_grid or setting_grids or adaptive else 0, task)
    take = lambda vol, z: np.take(vol, z, axis=axis)  # noqa: E731
    present = None if task == "mni152_tissue" else {
        z: set(int(v) for v in np.unique(take(labels, z)) if v) for z in candidates}
    test_images = [take(array01, z) for z in test]
    test_ref = np.stack([take(labels, z) for z in test])
    log(f"test slices {test}; validation slices {val}; {len(candidates)} candidate training slices; "
        f"shots {args.shots}; seeds {args.seeds}")
    out_dir = Path(args.output)
    name = args.name if task == "mni152_tissue" else f"{args.name}_{task}"
    json_path = out_dir / f"{name}.json"
    settings = {key: getattr(args, key) for key in ("shots", "seeds", "methods", "steps", "time_budget", "batch_size", "lr",
                                                    "warmup", "train_stages", "rank", "test_slices", "unet_steps", "unet_lr",
                                                    "threads")}
    settings.update(tune_lr=tune_grid, tune_shots=args.tune_shots, val_slices=len(val),
                    tune_setting=[f"{k}={','.join(map(str, v))}" for k, v in setting_grids],
                    tune_setting_seeds=args.tune_setting_seeds)
    payload = {
        "benchmark": "quality",
        "task": sample.title,
        "task_name": task,
        "class_names": names,
        "source": sample.source,
        "licence": sample.licence,
        "same_volume": sample.same_volume,
        "command": "medsaga bench quality " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "quality"] else sys.argv[1:]),
        "skipped": [],
        "settings": settings,
        "test_slices": test,
        "validation_slices": val,
        "machine": machine_info("cpu"),
        "runs": [],
        "baselines": {},
        "loss_curves": {},
        "lr_search": [],
        "lr_by_method": {},
        "setting_search": [],
        "config_by_method": {},
    }
    if args.resume and json_path.exists():
        old = json.loads(json_path.read_text(encoding="utf-8"))
        if old.get("test_slices") != test or old.get("validation_slices", []) != val:
            raise SystemExit(f"--resume: {json_path} was made with other test/validation slices; use another --name.")
        for key in ("runs", "baselines", "loss_curves", "lr_search", "setting_search"):
            payload[key] = old.get(key) or payload[key]
        started -= old.get("seconds", 0.0)
        log(f"resuming {json_path}: {len(payload['runs'])} runs, {len(payload['lr_search'])} rate trials and "
            f"{len(payload['setting_search'])} setting trials found")

    def save():
        payload["seconds"] = time.perf_counter() - started
        write_json(json_path, payload)

    if not args.no_oracle and "oracle-box" not in payload["baselines"]:
        t0 = time.perf_counter()
        base = build_base_model("litemedsam")
        pred = segment_with_boxes(base, array01, labels, axis, test, label_values=list(range(1, k + 1)), progress=False)
        payload["baselines"]["oracle-box"] = dict(score(np.stack([take(pred, z) for z in test]), test_ref, spacing2d, names),
                                                   seconds=time.perf_counter() - t0)
        log(f"oracle-box zero-shot: Dice {payload['baselines']['oracle-box']['dice']:.3f}")
        untrained = new_segmenter(names)
        payload["baselines"]["untrained-head"] = score(predict(untrained, test_images), test_ref, spacing2d, names)
        log(f"untrained k-class head: Dice {payload['baselines']['untrained-head']['dice']:.3f}")
        save()

    caches: dict = {}  # frozen-prefix features per training draw, shared by the methods (and curves)

    def draw(shots: int, seed: int):
        train_idx = draw_training(candidates, shots, seed, present, k)
        if train_idx is None:
            return None, None, None, None
        return (train_idx, [take(array01, z) for z in train_idx], [take(labels, z) for z in train_idx],
                caches.setdefault((shots, seed), {}))

    val_images = [take(array01, z) for z in val]
    val_ref = np.stack([take(labels, z) for z in val]) if val else None

    def train(method: str, lr: float, images, labs, cache, seed: int, warmup: int, settings: Optional[dict] = None):
        segmenter = new_segmenter(names)
        config = finetune_config(**{**dict(method=method, steps=args.steps, time_budget=args.time_budget,
                                           batch_size=args.batch_size, lr=lr, warmup=warmup, rank=args.rank, seed=seed,
                                           crop=args.crop, class_weighting=args.class_weighting,
                                           train_stages=args.train_stages), **(settings or {})})
        # the product default stops on held-out slices; fixed-step runs score the last weights
        held = (val_images, [take(labels, z) for z in val]) if args.steps is None else ((), ())
        return segmenter, finetune_slices(segmenter, images, labs, *held, config=config, feature_cache=cache)

    def validation_trial(method: str, lr: float, shots: int, seed: int, settings: Optional[dict] = None) -> dict:
        """Train on one draw and score on the validation slices; a diverging run (non-finite loss) is a
        result of the search, recorded with NaN Dice."""
        train_idx, images, labs, cache = draw(shots, seed)
        if train_idx is None:
            return dict(method=method, lr=lr, shots=shots, seed=seed, train_slices=None, val_dice=float("nan"),
                        val_hd95_mm=float("nan"), seconds=0.0, error=f"no draw of {shots} slices holds every class")
        t0 = time.perf_counter()
        try:
            segmenter, result = train(method, lr, images, labs, cache, seed, args.warmup, settings)
            s = score(predict(segmenter, val_images, result.mirrored), val_ref, spacing2d, names)
        except TrainingError as error:
            s = dict(dice=float("nan"), hd95_mm=float("nan"), error=str(error))
        return dict(method=method, lr=lr, **({} if settings is None else {"config": settings}), shots=shots, seed=seed,
                    train_slices=train_idx, val_dice=s["dice"], val_hd95_mm=s["hd95_mm"], seconds=time.perf_counter() - t0)

    # Each method's learning rate: chosen on the validation slices (never on the test slices) from one
    # grid shared by all methods, so no method is judged at a rate that suits only another.
    fixed = parse_method_lrs(args.method_lr)
    lr_by_method = {m: fixed.get(m, args.lr) for m in args.methods}
    if tune_grid:
        for method in args.methods:
            if method in fixed:
                continue
            for lr in tune_grid:
                if any(t["method"] == method and t["lr"] == lr for t in payload["lr_search"]):
                    continue
                trial = validation_trial(method, lr, args.tune_shots, 0)
                payload["lr_search"].append(trial)
                log(f"rate search {method:16s} lr {lr:g}: validation Dice {trial['val_dice']:.3f}")
                save()
            trials = [t for t in payload["lr_search"] if t["method"] == method and t["lr"] in tune_grid
                      and math.isfinite(t["val_dice"])]
            if trials:
                lr_by_method[method] = max(trials, key=lambda t: t["val_dice"])["lr"]
    payload["lr_by_method"] = lr_by_method
    if tune_grid:
        log("rates chosen on the validation slices: " + ", ".join(f"{m} {v:g}" for m, v in lr_by_method.items()))
    save()

    # Then each method's own settings, one after another at its chosen rate (a coordinate search), by
    # mean validation Dice over several draws: one draw's luck should not pick a setting.
    config_by_method: dict[str, dict] = {m: {} for m in args.methods}
    for key, grid in setting_grids:
        for method in [m for m in args.methods if m in SETTING_METHODS[key]]:
            means = {}
            for value in grid:
                settings = dict(config_by_method[method], **{key: value})
                dices = []
                for seed in range(args.tune_setting_seeds):
                    trial = next((t for t in payload["setting_search"] if t["method"] == method and t["lr"] == lr_by_method[method]
                                  and t["config"] == settings and t["seed"] == seed and t["shots"] == args.tune_shots), None)
                    if trial is None:
                        trial = validation_trial(method, lr_by_method[method], args.tune_shots, seed, settings)
                        payload["setting_search"].append(trial)
                        log(f"setting search {method:16s} {settings}: seed {seed} validation Dice {trial['val_dice']:.3f}")
                        save()
                    dices.append(trial["val_dice"])
                means[value] = float(np.mean(dices)) if all(math.isfinite(d) for d in dices) else float("nan")
            finite = {v: d for v, d in means.items() if math.isfinite(d)}
            if finite:
                config_by_method[method][key] = max(finite, key=finite.get)
                log(f"{method}: {key} = {config_by_method[method][key]} (validation Dice "
                    + ", ".join(f"{v}: {d:.3f}" for v, d in means.items()) + ")")
    payload["config_by_method"] = {m: c for m, c in config_by_method.items() if c}
    save()

    stale = stale_runs(payload["runs"], lr_by_method, config_by_method)
    if stale:
        log(f"dropping {len(stale)} earlier run(s) made with another rate or settings: "
            + ", ".join(sorted({r["method"] for r in stale})))
        payload["runs"] = [r for r in payload["runs"] if r not in stale]

    def done(method: str, shots: int, seed: int) -> bool:
        return any((r["method"], r["shots"], r["seed"]) == (method, shots, seed) for r in payload["runs"])

    # Seeds outermost: a sweep cut short still has whole Dice-versus-shots curves for its first seeds.
    for seed in range(args.seeds):
        for shots in args.shots:
            train_idx, images, labs, cache = draw(shots, seed)
            if train_idx is None:
                note = f"{shots} shot(s), seed {seed}: no draw of {shots} slices holds every class; skipped"
                if note not in payload["skipped"]:
                    payload["skipped"].append(note)
                    log(note)
                continue
            for method in args.methods:
                if done(method, shots, seed):
                    continue
                t0 = time.perf_counter()
                segmenter, result = train(method, lr_by_method[method], images, labs, cache, seed, args.warmup,
                                          config_by_method[method])
                s = score(predict(segmenter, test_images, result.mirrored), test_ref, spacing2d, names)
                row = dict(method=method, shots=shots, seed=seed, lr=lr_by_method[method], config=config_by_method[method],
                           train_slices=train_idx, decisions=result.decisions, stop_reason=result.stop_reason,
                           warnings=result.warnings, roi=result.roi, best_step=result.best_step,
                           steps=result.steps_done, seconds_per_step=result.seconds_per_step,
                           total_seconds=time.perf_counter() - t0, final_loss=result.final_loss,
                           trainable_parameters=result.trainable_parameters, train_stages=result.train_stages,
                           losses=[h["loss"] for h in result.history if "loss" in h], **s)
                payload["runs"].append(row)
                log(f"{method:16s} shots {shots:2d} seed {seed}: Dice {s['dice']:.3f} HD95 {s['hd95_mm']:.1f} mm "
                    f"({result.seconds_per_step:.2f} s/step, {row['total_seconds']:.0f} s)")
                save()
            if args.unet_steps > 0 and not done("unet", shots, seed):
                t0 = time.perf_counter()
                pred, roi, losses = unet_baseline(images, labs, test_images, len(names), args.unet_steps, seed,
                                                  lr=args.unet_lr, crop=args.crop, class_names=names)
                s = score(pred, test_ref, spacing2d, names)
                payload["runs"].append(dict(method="unet", shots=shots, seed=seed, lr=args.unet_lr, train_slices=train_idx,
                                            roi=roi.to_dict() if roi is not None else None,
                                            steps=args.unet_steps, total_seconds=time.perf_counter() - t0,
                                            final_loss=losses[-1], losses=losses, **s))
                log(f"{'unet (scratch)':16s} shots {shots:2d} seed {seed}: Dice {s['dice']:.3f} HD95 {s['hd95_mm']:.1f} mm "
                    f"({time.perf_counter() - t0:.0f} s)")
                save()
            if not done("nearest-slice", shots, seed):
                pred = copy_nearest_slices(dict(zip(train_idx, labs)), test)
                s = score(pred, test_ref, spacing2d, names)
                payload["runs"].append(dict(method="nearest-slice", shots=shots, seed=seed, lr=None, train_slices=train_idx,
                                            steps=0, total_seconds=0.0, **s))
                log(f"{'nearest-slice':16s} shots {shots:2d} seed {seed}: Dice {s['dice']:.3f} HD95 {s['hd95_mm']:.1f} mm")
                save()

    if args.warmup_curve_method:
        method = args.warmup_curve_method
        _, images, labs, cache = draw(args.warmup_curve_shots, 0)
        if images is None:
            raise SystemExit(f"--warmup-curve-shots {args.warmup_curve_shots}: no draw holds every class of {task}.")
        base_lr = lr_by_method.get(method, fixed.get(method, args.lr))
        curve_settings = config_by_method.get(method, {})
        for warm in (args.warmup, 0):
            key = f"warmup {warm}"
            lr = base_lr * args.warmup_curve_lr_factor
            old = payload["loss_curves"].get(key)
            if old and old.get("method") == method and old.get("lr") == lr and old.get("config", {}) == curve_settings:
                continue
            try:
                _, result = train(method, lr, images, labs, cache, 0, warm, curve_settings)
                losses = [h["loss"] for h in result.history if "loss" in h]
            except TrainingError as error:  # without warm-up a high rate may diverge: that is the curve's point
                losses, result = [], None
                log(f"loss curve ({key}, lr {lr:g}) stopped: {error}")
            payload["loss_curves"][key] = dict(method=method, shots=args.warmup_curve_shots, lr=lr, config=curve_settings,
                                               losses=losses)
            if result is not None:
                log(f"loss curve ({key}, lr {lr:g}): final loss {result.final_loss:.3f}")
            save()
    payload["summary"] = summarize(payload)
    save()
    (out_dir / f"{name}.md").write_text(markdown(payload), encoding="utf-8")
    plot(payload, out_dir / f"{name}.png", out_dir / f"{name}_loss.png")
    return payload


def summarize(payload: dict) -> list[dict]:
    rows = []
    keys = sorted({(r["method"], r["shots"]) for r in payload["runs"]}, key=lambda k: (k[0], k[1]))
    for method, shots in keys:
        runs = [r for r in payload["runs"] if r["method"] == method and r["shots"] == shots]
        dice = np.array([r["dice"] for r in runs], dtype=float)
        hd = np.array([r["hd95_mm"] for r in runs], dtype=float)
        rows.append(dict(method=method, shots=shots, seeds=len(runs), lr=runs[0].get("lr"), config=runs[0].get("config") or {},
                         dice_mean=float(np.nanmean(dice)),
                         dice_std=float(np.nanstd(dice)), hd95_mean=float(np.nanmean(hd)), hd95_std=float(np.nanstd(hd)),
                         seconds_per_step=float(np.mean([r.get("seconds_per_step", float("nan")) for r in runs]))))
    return rows


def markdown(payload: dict) -> str:
    s = payload["settings"]
    by_method = payload.get("lr_by_method") or {}
    rate = "each method at its own lr (column `lr`)" if len(set(by_method.values())) > 1 else f"lr {s['lr']}"
    unet = f"U-Net {s['unet_steps']} steps" + (f" at lr {s['unet_lr']:g}" if s.get("unet_lr") and s["unet_steps"] else "")
    steps = (f"{s['steps']} steps" if s.get("steps") else
             f"steps chosen by the data (patience on the validation slices, time budget {s.get('time_budget', 0):g} s)")
    title = payload.get("task") or "MNI152 grey/white matter"
    lines = [f"{title}: {len(payload['test_slices'])} unseen test slices; "
             f"{steps}, batch {s['batch_size']}, {rate}, warm-up {s['warmup']}, "
             f"encoder stages trained {s['train_stages'] or 'default'}, GaLore rank {s['rank']}, "
             f"{s['seeds']} seed(s); {unet}. Dice mean ± std over seeds (HD95 in mm).\n"]
    search = payload.get("lr_search") or []
    if search:
        grid = sorted({t["lr"] for t in search})
        lines.append(f"Learning rates were chosen per method by mean Dice on {len(payload.get('validation_slices', []))} "
                     f"validation slices (disjoint from the test slices), {search[0]['shots']} shots, seed 0:\n")
        lines.append("| method | " + " | ".join(f"lr {g:g}" for g in grid) + " | chosen |")
        lines.append("|---|" + "---:|" * (len(grid) + 1))
        for m in dict.fromkeys(t["method"] for t in search):
            cells = []
            for g in grid:
                t = next((t for t in search if t["method"] == m and t["lr"] == g), None)
                cells.append("-" if t is None else ("diverged" if not math.isfinite(t["val_dice"]) else f"{t['val_dice']:.3f}"))
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {by_method.get(m, float('nan')):g} |")
        lines.append("")
    trials = payload.get("setting_search") or []
    if trials:
        lines.append(f"Then each method's own settings, one at a time at its chosen rate, by mean validation Dice over "
                     f"{s.get('tune_setting_seeds', '?')} draws of {trials[0]['shots']} training slices "
                     "(range over the draws in brackets):\n")
        lines.append("| method | settings | mean validation Dice | chosen |")
        lines.append("|---|---|---:|---|")
        chosen = payload.get("config_by_method") or {}
        for (m, key), group in _by_config(trials).items():
            dices = np.array([t["val_dice"] for t in group], dtype=float)
            text = "diverged" if not np.isfinite(dices).all() else f"{dices.mean():.3f} ({dices.min():.3f}-{dices.max():.3f})"
            mark = "yes" if dict(key) == chosen.get(m) else ""
            lines.append(f"| {m} | {settings_text(dict(key))} | {text} | {mark} |")
        lines.append("")
    shots = sorted({r["shots"] for r in payload["summary"]})
    methods = []
    for r in payload["summary"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    lines.append("| method | lr | " + " | ".join(f"{n} shot{'s' if n > 1 else ''}" for n in shots) + " |")
    lines.append("|---|---:|" + "---:|" * len(shots))
    for m in methods:
        cells = []
        for n in shots:
            row = next((r for r in payload["summary"] if r["method"] == m and r["shots"] == n), None)
            cells.append("-" if row is None else f"{row['dice_mean']:.3f} ± {row['dice_std']:.3f} ({row['hd95_mean']:.1f})")
        rates = {r.get("lr") for r in payload["summary"] if r["method"] == m} - {None}
        lr = ", ".join(f"{v:g}" for v in sorted(rates)) or "-"
        settings = next((r.get("config") for r in payload["summary"] if r["method"] == m and r.get("config")), None)
        lr += f" ({settings_text(settings)})" if settings else ""
        lines.append(f"| {m} | {lr} | " + " | ".join(cells) + " |")
    for name, b in payload["baselines"].items():
        lines.append(f"| {name} (zero-shot) | - | " + " | ".join(f"{b['dice']:.3f} ({b['hd95_mm']:.1f})" for _ in shots) + " |")
    lines += per_class_tables(payload, methods, shots)
    if payload.get("skipped"):
        lines.append("\nNot run: " + "; ".join(payload["skipped"]) + ".")
    return "\n".join(lines) + "\n"


def per_class_tables(payload: dict, methods: list, shots: list) -> list[str]:
    """Dice per class (mean over seeds; HD95 in mm in brackets), one table per shot count."""
    classes = payload.get("class_names") or list(next(iter(payload["runs"]), {}).get("per_class", {}))
    if not classes:
        return []
    lines = []
    for n in shots:
        rows = []
        for m in methods:
            runs = [r for r in payload["runs"] if r["method"] == m and r["shots"] == n and r.get("per_class")]
            if runs:
                rows.append((m, runs))
        if not rows:
            continue
        lines.append(f"\nPer class at {n} shot{'s' if n > 1 else ''} (Dice, HD95 mm):\n")
        lines.append("| method | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---:|" * len(classes))
        def cell(values):
            d = np.nanmean([v["dice"] for v in values]) if values else float("nan")
            h = np.nanmean([v["hd95_mm"] for v in values]) if values and any(math.isfinite(v["hd95_mm"]) for v in values) else float("nan")
            return f"{d:.2f} ({h:.1f})" if math.isfinite(h) else f"{d:.2f}"
        for m, runs in rows:
            lines.append(f"| {m} | " + " | ".join(cell([r["per_class"][c] for r in runs if c in r["per_class"]]) for c in classes) + " |")
        for name, b in payload.get("baselines", {}).items():
            if b.get("per_class"):
                lines.append(f"| {name} (zero-shot) | " + " | ".join(cell([b["per_class"][c]]) if c in b["per_class"] else "-"
                                                                  for c in classes) + " |")
    return lines


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())


def _by_config(trials: list[dict]) -> dict:
    """Setting trials grouped by (method, settings), in the order they were first tried."""
    groups: dict = {}
    for t in trials:
        groups.setdefault((t["method"], tuple(t["config"].items())), []).append(t)
    return groups


def plot(payload: dict, dice_path: Path, loss_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = []
    for r in payload["summary"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        rows = sorted((r for r in payload["summary"] if r["method"] == m), key=lambda r: r["shots"])
        name = f"U-Net from scratch ({payload['settings'].get('unet_steps')} steps)" if m == "unet" else m
        ax.errorbar([r["shots"] for r in rows], [r["dice_mean"] for r in rows], yerr=[r["dice_std"] for r in rows],
                    marker="o", capsize=3, label=name)
    for name, b in payload["baselines"].items():
        ax.axhline(b["dice"], linestyle="--", linewidth=1, color="gray" if name != "oracle-box" else "k",
                   label=f"{name} (zero-shot)")
    ax.set_xscale("log")
    shots = sorted({r["shots"] for r in payload["summary"]})
    ax.set_xticks(shots)
    ax.set_xticklabels([str(s) for s in shots])
    ax.set_xlabel("annotated training slices")
    ax.set_ylabel("mean Dice over the classes, unseen slices")
    steps = payload["settings"].get("steps")
    ax.set_title(f"{payload.get('task_name', 'mni152_tissue')}, "
                 + (f"{steps} fine-tuning steps per SAM run" if steps else "steps chosen by the data"), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dice_path, dpi=110)
    plt.close(fig)
    curves = payload.get("loss_curves") or {}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, c in curves.items():
        ax.plot(range(1, len(c["losses"]) + 1), c["losses"], label=f"{c['method']} {key} (lr {c['lr']:g})")
    if not curves:  # fall back to the sweep's own curves
        for r in [r for r in payload["runs"] if r.get("losses")][:6]:  # the nearest-slice baseline trains nothing
            ax.plot(r["losses"], label=f"{r['method']} {r['shots']} shots")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (0.2 CE + 0.8 Dice)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training import FinetuneConfig
    from ..training.config import SWITCHES

    trainer = FinetuneConfig()  # the same recipe `medsaga finetune` uses, unless overridden here
    parser.add_argument("--task", nargs="+", default=["mni152_tissue"], metavar="TASK",
                        help="task(s): mni152_tissue (default), colin27_aal, colin27_aal_lr (Debian mricron-data), or all")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10],
                        help="training slice counts (default 1 5 10; the full sweep: 1 3 5 10 20)")
    parser.add_argument("--seeds", type=int, default=1, help="draws of training slices per count (default 1; full: 3)")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="methods of the Dice sweep (none: only the baselines and loss curves)")
    parser.add_argument("--steps", type=int, default=trainer.steps,
                        help="fine-tuning steps per run (default: as finetune, chosen by the data within --time-budget "
                             "by patience on the validation slices; the earlier MNI152 sweep used 60)")
    parser.add_argument("--time-budget", type=float, default=trainer.time_budget,
                        help=f"seconds per run when the steps are chosen by the data (default {trainer.time_budget:g}, as finetune)")
    parser.add_argument("--crop", choices=SWITCHES, default=trainer.crop,
                        help=f"crop to the painted structures (default {trainer.crop}, as finetune)")
    parser.add_argument("--class-weighting", choices=("none", "balanced"), default=trainer.class_weighting,
                        help=f"class weights of the loss (default {trainer.class_weighting}, as finetune)")
    parser.add_argument("--batch-size", type=int, default=trainer.batch_size)
    parser.add_argument("--lr", type=float, default=trainer.lr, help=f"learning rate (default {trainer.lr}, as finetune)")
    parser.add_argument("--warmup", type=int, default=trainer.warmup)
    parser.add_argument("--train-stages", type=int, default=1,
                        help="encoder stages trained by the encoder methods (default 1 = the last TinyViT stage, "
                             "as the trainer does on a CPU; on a GPU it trains 3)")
    parser.add_argument("--rank", type=int, default=trainer.rank, help=f"GaLore rank (default {trainer.rank}, as finetune)")
    parser.add_argument("--method-lr", nargs="*", default=[], metavar="METHOD=LR",
                        help="a fixed learning rate for some methods, e.g. full=3e-4 (overrides --lr and --tune-lr)")
    parser.add_argument("--tune-lr", type=float, nargs="*", default=[], metavar="LR",
                        help="choose each method's rate from this grid by Dice on validation slices (e.g. 3e-4 1e-3 3e-3 1e-2)")
    parser.add_argument("--tune-setting", nargs="*", default=[], metavar="KEY=V1,V2",
                        help="after the rate, choose a method setting from these values by validation Dice, e.g. "
                             "scale=0.25,1 (GaLore methods) or lora_rank=4,16; keys: " + ", ".join(SETTING_METHODS))
    parser.add_argument("--tune-setting-seeds", type=int, default=3,
                        help="draws of training slices per setting value; the mean validation Dice decides (default 3)")
    parser.add_argument("--tune-shots", type=int, default=10, help="training slices of the rate and setting searches")
    parser.add_argument("--val-slices", type=int, default=6, help="validation slices of the rate search")
    parser.add_argument("--test-slices", type=int, default=8)
    parser.add_argument("--unet-steps", type=int, default=200, help="U-Net steps (0 skips the U-Net)")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="U-Net learning rate (AdamW, poly decay)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs and rate trials of --name's JSON and run only what is missing")
    parser.add_argument("--no-oracle", action="store_true", help="skip the zero-shot baselines")
    parser.add_argument("--warmup-curve-method", default="galore", help="method of the warm-up loss curves ('' skips)")
    parser.add_argument("--warmup-curve-shots", type=int, default=5)
    parser.add_argument("--warmup-curve-lr-factor", type=float, default=4.0,
                        help="learning-rate multiple for the warm-up curves (warm-up matters at high rates)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", default="quality")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAGaLib.bench.quality", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
