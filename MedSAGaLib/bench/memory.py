"""``medsaga bench memory``: training memory of every method, one fresh process per measurement.

A worker (``python -m MedSAGaLib.bench.memory --worker ...``) builds one model, makes synthetic
training slices, and runs N steps of the real trainer (:func:`MedSAGaLib.training.finetune`, no
validation, no augmentation, the whole encoder trained unless ``--train-stages`` says otherwise).
It reports, in bytes:

- ``weights``: every parameter and buffer of the model while it trains (LoRA adapters included).
- ``trainable``: the parameters that receive gradients.
- ``grads_peak``: the most gradient bytes alive at once, read from ``.grad`` tensors in a gradient
  hook that runs before the optimizer's own hooks (all trainable parameters for the plain methods;
  about one parameter's worth for ``galore-layerwise``, which steps and frees each gradient at once).
- ``optimizer_state``: exact bytes of the optimizer state tensors after training (Adam moments,
  step counters, GaLore projection matrices).
- ``activations_saved``: the most bytes held for backward at the end of a forward pass:
  unique storages passed to ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded)
  plus the block inputs that activation checkpointing keeps for its recomputation. The recompute
  itself briefly re-creates one block's activations; that shows in the tracker and RSS, not here.
- ``tracker_peak``: torch's memory tracker. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the
  model's tensors plus the peak increase of torch's CPU allocator during training, from the
  allocation events of ``torch.profiler`` (``profile_memory=True``): weights + grads + states +
  activations + temporaries, without allocator caching or library code.
- ``rss_peak``: resident memory of the process (``/proc/self/status`` VmHWM) after training minus
  VmRSS just before training. The high-water mark is reset (``/proc/self/clear_refs``) at that
  point, the libraries the trainer imports lazily (monai, galore-torch) are imported before, and
  the model is already built: so this is what training adds, as the OS sees it (glibc keeps freed
  memory, so it is an upper bound of what the same training needs). On CPU the profiler behind
  ``tracker_peak`` adds hundreds of MB of its own, so the sweep measures it in a second fresh
  process and takes every other figure from a process without it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .common import MB, emit_json, machine_info, proc_status_kb, reset_peak_rss, run_worker, set_threads, write_json
from ..training.config import ENCODER_LAYERS
from ..training.methods import METHODS, get_method

# (model, image size) pairs of the issue; vit_b uses random weights (memory does not depend on them).
DEFAULT_MODELS = ("litemedsam:256", "vit_b:512", "vit_b:1024")


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _state_bytes(optimizers) -> int:
    import torch

    total = 0
    seen = set()

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for opt in optimizers:
        for state in opt.state.values():
            for value in state.values():
                add(value)
                ortho = getattr(value, "ortho_matrix", None)  # galore-torch's GaLoreProjector
                if isinstance(ortho, (list, tuple)):
                    for o in ortho:
                        add(o)
                else:
                    add(ortho)
    return total


def _synthetic_slices(count: int, size: int, num_classes: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        img = rng.random((size, size), dtype=np.float32) * 0.2
        lab = np.zeros((size, size), dtype=np.uint8)
        for c in range(1, num_classes + 1):
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = size // (4 + c)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            lab[disk] = c
            img[disk] += 0.3 * c
        images.append(np.clip(img, 0, 1))
        labels.append(lab)
    return images, labels


def measure(
    model: str = "litemedsam",
    image_size: Optional[int] = None,
    method: str = "galore",
    checkpointing: bool = False,
    batch_size: int = 1,
    steps: int = 2,
    precision: str = "fp32",
    rank: int = 128,
    train_stages: Optional[int] = None,
    device: str = "cpu",
    tracker: bool = True,
    classes: int = 2,
    pretrained: Optional[bool] = None,
    vit_spec: Optional[dict] = None,
    encoder_layers: str = "all",
) -> dict:
    """One measurement in *this* process (call it from a fresh one: see :func:`run_measurement`)."""
    import torch

    from ..head import ClassSegmenter
    from ..models import build_base_model, build_sam_vit
    from ..training import FinetuneConfig, finetune
    from ..training import optim as optim_mod
    from ..training.trainer import TrainingHook

    # Libraries the trainer imports lazily: load them now so they do not count as training memory.
    import monai.losses  # noqa: F401

    optim_mod._galore_adamw()

    if pretrained is None:
        pretrained = model == "litemedsam"
    if vit_spec is not None:
        base = build_sam_vit(model, None, image_size, vit_spec)
    else:
        base = build_base_model(model, image_size=image_size, pretrained=pretrained)
    segmenter = ClassSegmenter.from_base(base, [f"class{c}" for c in range(1, classes + 1)])
    del base
    size = segmenter.image_size
    images, labels = _synthetic_slices(max(batch_size, 1), size, classes)
    stages = 0 if method == "decoder" else (4 if train_stages is None else train_stages)
    config = FinetuneConfig(
        method=method,
        steps=steps,
        batch_size=batch_size,
        lr=1e-4,
        warmup=0,
        rank=rank,
        update_proj_gap=200,
        train_stages=stages if method != "decoder" else None,
        augment=False,
        augment_copies=1,
        checkpointing=checkpointing,
        precision=precision,
        device=device,
        encoder_layers=encoder_layers if encoder_layers in layer_choices(method, ENCODER_LAYERS) else "all",
    )
    config.validate()
    dev = torch.device(device)
    segmenter.to(dev)

    record: dict = {"weights": 0, "trainable": 0, "grads_peak": 0, "activations_saved": 0, "per_step_saved": []}
    captured: dict = {}
    handles: list = []
    param_ptrs: set = set()
    live_saved: dict = {}

    class MemoryProbe(TrainingHook):
        """Gradient bytes alive (a hook ahead of the optimizer's own), and the block inputs that
        activation checkpointing keeps for its recomputation (a forward pre-hook on each block)."""

        def on_parameters_selected(self, trainer):
            params = [p for g in trainer.groups for p in g["params"]]
            tensors = list(itertools.chain(segmenter.parameters(), segmenter.buffers()))
            record["trainable"] = sum(_tensor_bytes(p) for p in params)
            record["weights"] = sum(_tensor_bytes(t) for t in tensors)
            param_ptrs.update(t.untyped_storage().data_ptr() for t in tensors)

            def grad_hook(_param):
                alive = sum(_tensor_bytes(q.grad) for q in params if q.grad is not None)
                record["grads_peak"] = max(record["grads_peak"], alive)

            handles.extend(p.register_post_accumulate_grad_hook(grad_hook) for p in params)

        def on_optimizer_built(self, trainer):
            captured["optimizer"] = trainer.optimizer

            def keep_inputs(_module, args):
                if not torch.is_grad_enabled():
                    return  # checkpointing only runs with gradients
                for a in args:
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        storage = a.untyped_storage()
                        if storage.data_ptr() not in param_ptrs:
                            live_saved[storage.data_ptr()] = storage.nbytes()

            handles.extend(blk.register_forward_pre_hook(keep_inputs) for blk in trainer.checkpointed)

        def on_step_end(self, trainer, entry):
            saved = sum(live_saved.values())
            record["per_step_saved"].append(saved)
            record["activations_saved"] = max(record["activations_saved"], saved)
            live_saved.clear()

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and t.device.type != "meta":
            live_saved[ptr] = max(live_saved.get(ptr, 0), storage.nbytes())
        return t

    def unpack(t):
        return t

    gc.collect()
    rss_before = proc_status_kb("VmRSS")
    hwm_reset = reset_peak_rss()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    prof = None
    t0 = time.perf_counter()
    try:
        if tracker and not cuda:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            prof.__enter__()
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            result = finetune(segmenter, images, labels, config, hooks=[MemoryProbe()])
        if cuda:
            torch.cuda.synchronize()
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    hwm = proc_status_kb("VmHWM")
    opt = captured["optimizer"]
    record["optimizer_state"] = _state_bytes(opt.optimizers)
    record["rss_before"] = (rss_before or 0) * 1024
    record["rss_peak"] = ((hwm - rss_before) * 1024) if (hwm_reset and hwm and rss_before) else None
    if cuda:
        record["tracker"] = "torch.cuda.max_memory_allocated"
        record["tracker_peak"] = torch.cuda.max_memory_allocated()
        record["tracker_before"] = cuda_before
    elif prof is not None:
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        record["tracker"] = "torch.profiler CPU allocation events + model tensors"
        record["tracker_peak"] = record["weights"] + peak
        record["tracker_before"] = record["weights"]
    else:
        record["tracker"] = None
        record["tracker_peak"] = None
    record["accounted"] = record["weights"] + record["grads_peak"] + record["optimizer_state"] + record["activations_saved"]
    record.update(
        model=model,
        image_size=size,
        method=method,
        checkpointing=checkpointing,
        batch_size=batch_size,
        steps=result.steps_done,
        precision=precision,
        rank=rank if method.startswith("galore") else None,
        lora_rank=config.lora_rank if method == "lora" else None,
        train_stages=result.train_stages,
        encoder_layers=config.encoder_layers,
        trainable_parameters=result.trainable_parameters,
        galore_parameters=result.galore_parameters,
        seconds=seconds,
        seconds_per_step=result.seconds_per_step,
        device=str(dev),
        machine=machine_info(device),
    )
    return record


def label(method: str, checkpointing: bool, rank: Optional[int] = None, layers: str = "all") -> str:
    rank_part = f" r{rank}" if rank and method.startswith("galore") else ""
    layers_part = " [qkv]" if layers == "qkv" and method != "lora" else ""
    return method + rank_part + layers_part + ("+ckpt" if checkpointing else "")


def row_label(r: dict) -> str:
    return label(r.get("method", "?"), r.get("checkpointing", False), r.get("rank"), r.get("encoder_layers", "all"))


def layer_choices(method: str, layers: Sequence[str]) -> list[str]:
    """The ``--encoder-layers`` settings that differ for ``method``: only methods that train encoder weights
    themselves (GaLore, full) can be limited to some layers; LoRA and decoder-only have one setting."""
    return list(layers) if get_method(method).encoder in ("galore", "adamw") else ["all"]


def worker_args(model: str, size: Optional[int], method: str, ckpt: bool, args, rank: Optional[int] = None,
                layers: str = "all") -> list[str]:
    out = ["--model", model, "--method", method, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--precision", args.precision, "--rank", str(rank or args.rank), "--device", args.device, "--threads", str(args.threads),
           "--encoder-layers", layers]
    if size:
        out += ["--image-size", str(size)]
    if ckpt:
        out.append("--checkpointing")
    if args.train_stages is not None:
        out += ["--train-stages", str(args.train_stages)]
    if getattr(args, "no_tracker", False):
        out.append("--no-tracker")
    return out


def run_measurement(model: str, size: Optional[int], method: str, ckpt: bool, args, timeout: Optional[float] = None,
                    rank: Optional[int] = None, layers: str = "all") -> dict:
    """Fresh processes for one configuration. On CPU the allocator tracker (torch.profiler) costs
    hundreds of MB of resident memory itself, so it runs in a second fresh process and only its
    tracker figure is kept; every other figure comes from a process without the profiler."""
    base = worker_args(model, size, method, ckpt, args, rank, layers)
    cpu = not str(args.device).startswith("cuda")
    use_tracker = not getattr(args, "no_tracker", False)
    plain = run_worker("MedSAGaLib.bench.memory", base + (["--no-tracker"] if cpu and use_tracker else []), timeout=timeout)
    if "error" in plain or not (cpu and use_tracker):
        return plain
    tracked = run_worker("MedSAGaLib.bench.memory", base, timeout=timeout)
    if "error" in tracked:
        plain["tracker_error"] = tracked["error"]
        return plain
    plain["tracker"] = tracked["tracker"]
    plain["tracker_peak"] = tracked["tracker_peak"]
    plain["tracker_process_rss_peak"] = tracked["rss_peak"]
    return plain


def parse_model(spec: str) -> tuple[str, Optional[int]]:
    name, _, size = spec.partition(":")
    return name, (int(size) if size else None)


# --- reports --------------------------------------------------------------------------------


def _mb(value) -> str:
    return "-" if value is None else f"{value / MB:,.0f}"


def markdown_table(results: list[dict]) -> str:
    lines = []
    for (model, size), rows in itertools.groupby(results, key=lambda r: (r.get("model"), r.get("image_size"))):
        rows = list(rows)
        ok = [r for r in rows if "error" not in r]
        full = next((r for r in ok if r["method"] == "full" and not r["checkpointing"]), None)
        device = ok[0]["device"] if ok else "?"
        first = ok[0] if ok else {}
        lines.append(f"\n**{model}, {size} px** — batch {first.get('batch_size')}, {first.get('precision')}, "
                     f"{first.get('steps')} steps, {device}; MB (2^20 bytes)\n")
        lines.append("| method | trainable params | weights | grads (peak) | optimizer state | activations saved (peak) "
                     "| tracker peak | x full | RSS peak - before | x full | s/step |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            name = row_label(r)
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} |" + " |" * 10)
                continue
            ratio_t = (r["tracker_peak"] / full["tracker_peak"]) if full and full.get("tracker_peak") and r.get("tracker_peak") else None
            ratio_r = (r["rss_peak"] / full["rss_peak"]) if full and full.get("rss_peak") and r.get("rss_peak") else None
            lines.append(
                f"| {name} | {r['trainable_parameters'] / 1e6:.2f}M | {_mb(r['weights'])} | {_mb(r['grads_peak'])} "
                f"| {_mb(r['optimizer_state'])} | {_mb(r['activations_saved'])} | {_mb(r['tracker_peak'])} "
                f"| {'-' if ratio_t is None else f'{ratio_t:.2f}'} | {_mb(r['rss_peak'])} "
                f"| {'-' if ratio_r is None else f'{ratio_r:.2f}'} | {r['seconds_per_step']:.1f} |"
            )
    return "\n".join(lines).strip() + "\n"


def bar_chart(results: list[dict], path: str | Path) -> Path:
    """Stacked bars per method (weights, gradients, optimizer state, activations) + tracker peak marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(k, list(v)) for k, v in itertools.groupby(results, key=lambda r: (r.get("model"), r.get("image_size")))]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.8), squeeze=False)
    parts = [("weights", "weights", "#9e9e9e"), ("grads_peak", "gradients", "#ef8a62"),
             ("optimizer_state", "optimizer state", "#67a9cf"), ("activations_saved", "saved activations", "#a1d76a")]
    for ax, ((model, size), rows) in zip(axes[0], groups):
        rows = [r for r in rows if "error" not in r]
        names = [row_label(r) for r in rows]
        bottom = [0.0] * len(rows)
        for key, name, color in parts:
            vals = [r[key] / MB for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, color=color, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        peaks = [(r.get("tracker_peak") or 0) / MB for r in rows]
        ax.scatter(range(len(rows)), peaks, marker="_", s=400, color="k", zorder=3, label="tracker peak")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("MB")
        ax.set_title(f"{model} {size} px")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Training memory per method (same batch, input size, precision)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_sweep(args) -> dict:
    methods = args.methods or list(METHODS)
    ckpts = (False, True) if not args.no_ckpt_variants else (False,)
    if getattr(args, "ckpt_only", False):
        ckpts = (True,)
    variants = [(m, c, None) for m in methods for c in ckpts]
    variants += [(m, c, r) for r in (getattr(args, "extra_ranks", None) or []) for m in methods if m.startswith("galore")
                 for c in ckpts]
    results = []
    out = Path(args.output)
    done = set()
    if getattr(args, "resume", False) and (out / f"{args.name}.json").exists():
        # Keep the finished measurements of an interrupted sweep; measure only what is missing.
        results = [r for r in json.loads((out / f"{args.name}.json").read_text(encoding="utf-8")).get("results", []) if "error" not in r]
        done = {(r["model"], r["image_size"], r["method"], r["checkpointing"], r.get("rank"), r.get("encoder_layers", "all"))
                for r in results}
    variants = [(m, c, r, layers) for m, c, r in variants for layers in layer_choices(m, args.encoder_layers)]
    for spec in args.models:
        model, size = parse_model(spec)
        for method, ckpt, rank, layers in variants:
            if method == "decoder" and ckpt:
                continue  # the frozen encoder runs without gradients: nothing to checkpoint
            key_rank = (rank or args.rank) if method.startswith("galore") else None
            if any((model, k, method, ckpt, key_rank, layers) in done for k in (size, size or 256)):
                continue
            t0 = time.perf_counter()
            res = run_measurement(model, size, method, ckpt, args, timeout=args.timeout, rank=rank, layers=layers)
            res.setdefault("model", model)
            res.setdefault("image_size", size)
            res.setdefault("method", method)
            res.setdefault("checkpointing", ckpt)
            res.setdefault("encoder_layers", layers)
            results.append(res)
            status = res.get("error") or f"tracker {_mb(res.get('tracker_peak'))} MB, RSS +{_mb(res.get('rss_peak'))} MB"
            print(f"[bench memory] {model} {size or ''} {label(method, ckpt, rank, layers)}: {status} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            payload = {"benchmark": "memory", "settings": _settings(args), "results": results}
            write_json(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(markdown_table(results), encoding="utf-8")
    bar_chart(results, out / f"{args.name}.png")
    return payload


def _settings(args) -> dict:
    return {k: getattr(args, k, None) for k in ("batch_size", "steps", "precision", "rank", "extra_ranks", "device", "threads",
                                                "train_stages", "encoder_layers")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="MODEL:SIZE entries (default: litemedsam:256 vit_b:512 vit_b:1024)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: all")
    parser.add_argument("--no-ckpt-variants", action="store_true", help="skip the activation-checkpointing variants")
    parser.add_argument("--ckpt-only", action="store_true", help="only the activation-checkpointing variants")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished rows of NAME.json and measure only the missing configurations")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement (>= 2: states exist from step 1)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument("--extra-ranks", type=int, nargs="*", default=[],
                        help="also measure the GaLore methods at these ranks (e.g. 32 8)")
    parser.add_argument("--train-stages", type=int, default=None, help="encoder stages trained (default: all 4)")
    parser.add_argument("--encoder-layers", nargs="+", choices=ENCODER_LAYERS, default=["all"],
                        help="galore and full: train all weights of the trained stages, or only the q/k/v projections "
                             "LoRA adapts ('qkv': equal terms with LoRA); several values measure each")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--no-tracker", action="store_true", help="CPU: skip the torch.profiler allocation tracker")
    parser.add_argument("--output", default="docs/results", help="folder for NAME.json/.md/.png")
    parser.add_argument("--name", default="memory", help="file name stem (default: memory)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAGaLib.bench.memory")
    parser.add_argument("--worker", action="store_true", help="measure once in this process and print JSON")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--method", default="galore", choices=METHODS)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--vit-spec", default=None, help="JSON ViT spec (tests: a tiny ViT)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        set_threads(args.threads)
        spec = json.loads(args.vit_spec) if args.vit_spec else None
        try:
            emit_json(measure(args.model, args.image_size, args.method, args.checkpointing, args.batch_size, args.steps,
                              args.precision, args.rank, args.train_stages, args.device, not args.no_tracker,
                              vit_spec=spec, encoder_layers=args.encoder_layers[0]))
        except Exception as exc:  # reported to the parent as data
            emit_json({"error": f"{type(exc).__name__}: {exc}", "model": args.model, "image_size": args.image_size,
                       "method": args.method, "checkpointing": args.checkpointing})
            return 1
        return 0
    run_sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
