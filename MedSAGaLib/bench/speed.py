"""``medsaga bench speed``: inference seconds per slice and training seconds per step.

Inference: the optimised path (:func:`MedSAGaLib.fastpath.inference_copy`) and the unoptimised
model, interleaved so that both see the same load, with wall-clock and process CPU time (on a
shared machine the CPU time is the steadier figure: wall time divided by the threads only when
nothing else runs). The outputs of both paths are compared on the same inputs.

Training: seconds per step of each method with the real trainer, and the FLOPs of one step
(``torch.utils.flop_counter``, difference of two runs with different step counts, so the frozen
prefix computed once per run cancels out).

Both are set against the machine's measured matmul throughput (fp32 ``torch.mm`` at the same thread
count): achieved FLOP/s / matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .common import machine_info, set_threads, write_json
from ..training.methods import METHODS



def log(message: str) -> None:
    print(f"[bench speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def matmul_throughput(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process at its thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def build_segmenter(model: str, image_size=None):
    from ..head import ClassSegmenter
    from ..models import build_base_model

    base = build_base_model(model, image_size=image_size, pretrained=(model == "litemedsam"))
    return ClassSegmenter.from_base(base, ["grey_matter", "white_matter"]).eval()


def bench_inference(model: str, image_size, batch_sizes, repeats: int, peak: float) -> list[dict]:
    import torch

    from ..fastpath import inference_copy

    seg = build_segmenter(model, image_size)
    fast = inference_copy(seg)
    size = seg.image_size
    rows = []
    with torch.inference_mode():
        x1 = torch.rand(1, 3, size, size)
        flops = count_flops(lambda: seg(x1))
        for batch in batch_sizes:
            x = torch.rand(batch, 3, size, size)
            ref = seg(x)
            out = fast(x)
            diff = float((out - ref).abs().max())
            agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
            times = {"plain": [], "fast": []}
            for _ in range(repeats):
                for name, m in (("plain", seg), ("fast", fast)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    m(x)
                    times[name].append(((time.perf_counter() - w0) / batch, (time.process_time() - c0) / batch))
            for name, vals in times.items():
                wall = min(v[0] for v in vals)
                cpu = min(v[1] for v in vals)
                rows.append(dict(model=model, image_size=size, path=name, batch_size=batch, threads=torch.get_num_threads(),
                                 seconds_per_slice_wall=wall, cpu_seconds_per_slice=cpu,
                                 wall_all=[v[0] for v in vals], flops_per_slice=flops,
                                 fraction_of_matmul=(flops / wall) / peak if peak else None,
                                 max_abs_logit_diff=diff, argmax_agreement=agree))
                log(f"inference {model} {size}px batch {batch} {name}: {wall:.2f} s/slice wall, {cpu:.2f} CPU-s/slice, "
                    f"{flops / 1e9:.1f} GFLOP, {100 * (flops / wall) / peak:.0f}% of matmul peak")
    return rows


def bench_training(model: str, image_size, methods, steps: int, batch_size: int, train_stages, peak: float) -> list[dict]:
    from ..bench.memory import _synthetic_slices
    from ..training import FinetuneConfig, finetune

    rows = []
    for method in methods:
        def run(n):
            seg = build_segmenter(model, image_size)
            imgs, labs = _synthetic_slices(batch_size, seg.image_size, 2)
            cfg = FinetuneConfig(method=method, steps=n, batch_size=batch_size, warmup=0, augment=False,
                                 train_stages=None if method == "decoder" else train_stages)
            holder = {}
            flops = count_flops(lambda: holder.setdefault("r", finetune(seg, imgs, labs, cfg)))
            return flops, holder["r"]

        f1, _ = run(1)
        f2, result = run(1 + steps)
        per_step = (f2 - f1) / steps
        rows.append(dict(model=model, method=method, batch_size=batch_size, train_stages=result.train_stages,
                         steps=result.steps_done, seconds_per_step=result.seconds_per_step, flops_per_step=per_step,
                         fraction_of_matmul=(per_step / result.seconds_per_step) / peak if peak else None,
                         prepare_seconds=result.prepare_seconds))
        log(f"training {model} {method}: {result.seconds_per_step:.2f} s/step (batch {batch_size}, "
            f"stages {result.train_stages}), {per_step / 1e9:.0f} GFLOP/step")
    return rows


def markdown(payload: dict) -> str:
    lines = [f"Machine: {payload['machine']['cpu']}, {payload['machine']['torch_threads']} threads; fp32 matmul peak "
             f"measured {payload['matmul_flops'] / 1e9:.0f} GFLOP/s.\n",
             "| model | path | batch | s/slice (wall) | CPU-s/slice | GFLOP/slice | % of matmul peak | max logit diff | argmax agree |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["inference"]:
        lines.append(f"| {r['model']} {r['image_size']} | {r['path']} | {r['batch_size']} | {r['seconds_per_slice_wall']:.2f} "
                     f"| {r['cpu_seconds_per_slice']:.2f} | {r['flops_per_slice'] / 1e9:.1f} | {100 * r['fraction_of_matmul']:.0f}% "
                     f"| {r['max_abs_logit_diff']:.1e} | {100 * r['argmax_agreement']:.3f}% |")
    if payload["training"]:
        lines += ["", "| model | method | batch | stages trained | s/step | GFLOP/step | % of matmul peak |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in payload["training"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['batch_size']} | {r['train_stages']} | {r['seconds_per_step']:.2f} "
                         f"| {r['flops_per_step'] / 1e9:.0f} | {100 * r['fraction_of_matmul']:.0f}% |")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    set_threads(args.threads)
    peak = matmul_throughput()
    log(f"fp32 matmul: {peak / 1e9:.0f} GFLOP/s at {args.threads} threads")
    payload = {"benchmark": "speed", "machine": machine_info(args.device), "matmul_flops": peak,
               "settings": {k: getattr(args, k) for k in ("models", "batch_sizes", "repeats", "methods", "train_steps",
                                                           "train_batch_size", "train_stages", "threads")},
               "inference": [], "training": []}
    out = Path(args.output)
    for spec in args.models:
        name, _, size = spec.partition(":")
        payload["inference"] += bench_inference(name, int(size) if size else None, args.batch_sizes, args.repeats, peak)
        write_json(out / f"{args.name}.json", payload)
    if args.methods:
        payload["training"] = bench_training(args.train_model, None, args.methods, args.train_steps, args.train_batch_size,
                                             args.train_stages, peak)
    write_json(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(markdown(payload), encoding="utf-8")
    return payload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["litemedsam:256"], help="MODEL:SIZE for inference (vit_*: random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="training methods timed ('' for none)")
    parser.add_argument("--train-model", default="litemedsam")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--train-stages", type=int, default=None, help="default: the trainer's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", default="speed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAGaLib.bench.speed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
