"""``medsaga bench speed``: inference seconds per slice and training seconds per step.

Inference: the optimised path (:func:`MedSAGaLib.fastpath.inference_copy`) and the unoptimised
model, interleaved so that both see the same load, with wall-clock and process CPU time (on a
shared machine the CPU time is the steadier figure: wall time divided by the threads only when
nothing else runs). The outputs of both paths are compared on the same inputs.

Training: seconds per step of each method with the real trainer, and the FLOPs of one step
(``torch.utils.flop_counter``, difference of two runs with different step counts, so the frozen
prefix computed once per run cancels out).

``--backends torch-plain torch-fast openvino``: every inference backend side by side on a real
MNI152 slice, runs interleaved, min and median of encoder, decoder and encoder+decoder per slice,
and the box path (one embedding, 1 and 6 boxes decoded), at each of ``--backend-threads``; the
CPU's vector flags and the load average are recorded with them.

Both are set against the machine's measured matmul throughput (fp32 ``torch.mm`` at the same thread
count): achieved FLOP/s / matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import machine_info, set_threads, write_json
from ..training.config import PRECISIONS
from ..training.methods import METHODS



def log(message: str) -> None:
    print(f"[bench speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def matmul_throughput(size: int = 2048, repeats: int = 20) -> float:
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


def precision_that_runs(precision: str, method: str, device: str = "cpu") -> str:
    """``fp32``, ``bf16`` or ``fp16``: what the trainer's autocast does for ``precision`` (``auto`` decides by the
    device and whether the encoder trains, :func:`MedSAGaLib.training.precision.choose_autocast`)."""
    import torch

    from ..training.precision import choose_autocast

    dtype, _ = choose_autocast(precision, torch.device(device), trains_encoder=method != "decoder")
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def bench_training(model: str, image_size, methods, steps: int, batch_size: int, train_stages, peak: float,
                   precisions: Sequence[str] = ("auto",)) -> list[dict]:
    from ..bench.memory import _synthetic_slices
    from ..training import FinetuneConfig, finetune

    rows = []
    for precision in precisions:
        for method in methods:
            def run(n):
                seg = build_segmenter(model, image_size)
                imgs, labs = _synthetic_slices(batch_size, seg.image_size, 2)
                cfg = FinetuneConfig(method=method, steps=n, batch_size=batch_size, warmup=0, augment=False,
                                     train_stages=None if method == "decoder" else train_stages, precision=precision)
                holder = {}
                flops = count_flops(lambda: holder.setdefault("r", finetune(seg, imgs, labs, cfg)))
                return flops, holder["r"]

            ran = precision_that_runs(precision, method)
            if ran != precision and any(r["method"] == method and r["precision"] == ran for r in rows):
                continue  # ``auto`` chose a precision already timed for this method
            f1, _ = run(1)
            f2, result = run(1 + steps)
            per_step = (f2 - f1) / steps
            rows.append(dict(model=model, method=method, batch_size=batch_size, train_stages=result.train_stages,
                             precision=ran, steps=result.steps_done, seconds_per_step=result.seconds_per_step,
                             flops_per_step=per_step,
                             fraction_of_matmul=(per_step / result.seconds_per_step) / peak if peak else None,
                             prepare_seconds=result.prepare_seconds))
            log(f"training {model} {method} {ran}: {result.seconds_per_step:.2f} s/step (batch {batch_size}, "
                f"stages {result.train_stages}), {per_step / 1e9:.0f} GFLOP/step")
    return rows


def cpu_flags() -> list[str]:
    """The vector/matrix extensions this CPU reports in /proc/cpuinfo (avx2, avx512*, amx*, ...)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    words = line.split(":", 1)[1].split()
                    return sorted(w for w in set(words) if w in ("avx2", "fma", "f16c") or w.startswith(("avx512", "amx", "avx_vnni")))
    except OSError:
        pass
    return []


def _real_volume():
    """The MNI152 T1 in [0, 1] (real anatomy) and its GM/WM labels, axial slices first; slice 90 is the timed one."""
    import SimpleITK as sitk

    from ..samples.mni152 import mni152_tissue_labels
    from ..volume import normalize_intensity

    t1, labels = mni152_tissue_labels()
    return normalize_intensity(sitk.GetArrayFromImage(t1).astype(np.float32)), sitk.GetArrayFromImage(labels)


# --backends names: (backend, fast path, inference precision)
BACKEND_RUNS = {"torch-plain": ("torch", False, "f32"), "torch-fast": ("torch", True, "f32"),
                "openvino": ("openvino", True, "f32"), "openvino-int8": ("openvino", True, "int8"),
                "openvino-bf16": ("openvino", True, "bf16")}


def _boxes_for(labels: np.ndarray, count: int) -> list[list[float]]:
    """``count`` boxes on a real slice: GM and WM, then the left/right and front/back halves of the brain."""
    from ..slices import bounding_box

    height, width = labels.shape
    masks = [labels == 1, labels == 2, (labels > 0) & (np.arange(width) < width // 2),
             (labels > 0) & (np.arange(width) >= width // 2), (labels > 0) & (np.arange(height)[:, None] < height // 2),
             (labels > 0) & (np.arange(height)[:, None] >= height // 2)]
    return [bounding_box(m) for m in masks[:count]]


def bench_backends(model: str, backends, threads_list, repeats: int, box_counts) -> list[dict]:
    """Every backend on the same real slice, runs interleaved (each repeat runs every backend once, so a
    load change hits all alike): encoder, decoder and encoder+decoder per slice; the box path per slice."""
    import torch

    from ..backends import make_runner
    from ..preprocess import SliceTransform

    from ..head import ClassSegmenter
    from ..models import build_base_model

    volume01, label_volume = _real_volume()  # read once: slice 90 is timed, others calibrate int8
    slice01, labels = volume01[90], label_volume[90]
    base_model = build_base_model(model, pretrained=(model == "litemedsam"))
    seg = ClassSegmenter.from_base(base_model, ["grey_matter", "white_matter"]).eval()
    transform = SliceTransform(seg.image_size)
    image = transform.to_model(slice01)[None]
    with torch.inference_mode():
        flops = count_flops(lambda: seg(image))  # encoder + decoder, one slice
    rows = []
    for threads in threads_list:
        set_threads(threads)
        peak = matmul_throughput()  # what this CPU can do at all at f32: the floor any backend's time sits above
        log(f"fp32 matmul: {peak / 1e9:.0f} GFLOP/s at {threads} thread(s); the model needs {flops / 1e9:.1f} GFLOP per slice")
        runners, box_runners = {}, {}
        for name in backends:
            backend, fast, precision = BACKEND_RUNS[name]
            t0 = time.perf_counter()
            calibration = None
            if precision == "int8":  # calibrated on 16 other axial slices of the volume (slice 90 is not one)
                from ..inference import calibration_images

                calibration = calibration_images(seg, volume01, 0, range(40, 160))
            runners[name] = make_runner(seg, "classes", backend, "cpu", fast, precision=precision, calibration=calibration)
            # lower precisions are offered for k-class models only: their box path is f32, not timed again
            box_runners[name] = make_runner(base_model, "boxes", backend, "cpu", fast) if precision == "f32" else None
            log(f"{name} at {threads} thread(s) ready in {time.perf_counter() - t0:.1f} s")
        reference = runners[backends[0]](image)
        boxes = {n: torch.tensor([transform.box_to_model(b, labels.shape) for b in _boxes_for(labels, n)]) for n in box_counts}
        times = {name: {"encoder": [], "decoder": [], "total": [], "cpu_total": [], **{f"boxes_{n}": [] for n in box_counts}}
                 for name in backends}
        load_before = os.getloadavg()
        for _ in range(repeats):
            for name in backends:
                runner, record = runners[name], times[name]
                w0, c0 = time.perf_counter(), time.process_time()
                embeddings = runner.encode(image)
                w1 = time.perf_counter()
                runner.decode(embeddings)
                w2, c2 = time.perf_counter(), time.process_time()
                record["encoder"].append(w1 - w0)
                record["decoder"].append(w2 - w1)
                record["total"].append(w2 - w0)
                record["cpu_total"].append(c2 - c0)
                for n, box in boxes.items():
                    if box_runners[name] is None:
                        record[f"boxes_{n}"].append(float("nan"))
                        continue
                    w0 = time.perf_counter()
                    box_runners[name].decode_boxes(box_runners[name].encode(image), box)
                    record[f"boxes_{n}"].append(time.perf_counter() - w0)
        load_after = os.getloadavg()
        for name in backends:
            out = runners[name](image)
            record = times[name]
            row = dict(model=model, image_size=seg.image_size, backend=name, threads=threads, repeats=repeats,
                       description=runners[name].description,
                       flops_per_slice=flops, matmul_flops=peak,
                       max_abs_logit_diff=float((out - reference).abs().max()),
                       argmax_agreement=float((out.argmax(1) == reference.argmax(1)).float().mean()),
                       load_average_before=load_before, load_average_after=load_after, runs=record)
            for key, values in record.items():
                row[f"{key}_min"] = float(np.min(values))
                row[f"{key}_median"] = float(np.median(values))
            rows.append(row)
            log(f"{name} {threads} thr: enc+dec min {row['total_min']:.3f} s, median {row['total_median']:.3f} s; "
                + ", ".join(f"{n} box(es) {row[f'boxes_{n}_min']:.3f} s" for n in box_counts))
    return rows


def backends_markdown(payload: dict) -> str:
    machine = payload["machine"]
    flags = payload["cpu_flags"]
    missing = [name for name, prefix in (("AVX-512", "avx512"), ("AMX", "amx")) if not any(f.startswith(prefix) for f in flags)]
    lines = [f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), CPU flags: {', '.join(flags) or 'none'}"
             f"{' (no ' + ', no '.join(missing) + ')' if missing else ''}; "
             f"torch {machine['torch']}, OpenVINO {payload.get('openvino') or 'not installed'}. Every backend ran on the same "
             f"real MNI152 slice, interleaved ({payload['settings']['repeats']} rounds, each running every backend once); "
             "the CPU was shared with other jobs: the load average (1 min) before/after each thread setting is given.\n",
             f"Command: `{payload['command']}`\n",
             "| model | backend | threads | enc+dec s/slice min | median | CPU-s min | encoder min | decoder min | "
             + " | ".join(f"{n} box(es) s/slice min" for n in payload["settings"]["box_counts"])
             + " | max logit diff | argmax agree | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(payload["settings"]["box_counts"]) + "---:|---:|---|"]
    for r in payload["backends"]:
        boxes = " | ".join("-" if np.isnan(r[f"boxes_{n}_min"]) else f"{r[f'boxes_{n}_min']:.3f}"
                           for n in payload["settings"]["box_counts"])
        lines.append(f"| {r['model']} {r['image_size']} | {r['backend']} | {r['threads']} | {r['total_min']:.3f} | "
                     f"{r['total_median']:.3f} | {r['cpu_total_min']:.3f} | {r['encoder_min']:.3f} | {r['decoder_min']:.3f} | {boxes} | "
                     f"{r['max_abs_logit_diff']:.1e} | {100 * r['argmax_agreement']:.3f}% | "
                     f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f} |")
    lines.append("")
    for threads in sorted({r["threads"] for r in payload["backends"]}):
        by = {r["backend"]: r for r in payload["backends"] if r["threads"] == threads}
        if "openvino" in by and "torch-fast" in by:
            ov, fast = by["openvino"], by["torch-fast"]
            ratio = fast["total_min"] / ov["total_min"]
            lines.append(f"- {threads} thread(s): OpenVINO f32 is {ratio:.2f}x the fast path's speed (min; "
                         f"{fast['total_median'] / ov['total_median']:.2f}x by median): target >= 1.5x "
                         f"{'met' if ratio >= 1.5 else 'missed'}.")
            if threads == 2:
                floor = ""
                if ov.get("matmul_flops") and ov.get("flops_per_slice"):
                    floor = (f" The model needs {ov['flops_per_slice'] / 1e9:.1f} GFLOP per slice; at this CPU's best fp32 "
                             f"matmul rate in this run ({ov['matmul_flops'] / 1e9:.0f} GFLOP/s at 2 threads) that alone takes "
                             f"{ov['flops_per_slice'] / ov['matmul_flops']:.2f} s, and 0.45 s would need "
                             f"{ov['flops_per_slice'] / 0.45 / 1e9:.0f} GFLOP/s (OpenVINO ran at "
                             f"{100 * ov['flops_per_slice'] / ov['matmul_flops'] / ov['total_min']:.0f}% of the matmul rate).")
                lines.append(f"- 2 threads: OpenVINO encoder+decoder {ov['total_min']:.3f} s/slice (min), "
                             f"{ov['total_median']:.3f} s (median): target <= 0.45 s "
                             f"{'met' if ov['total_min'] <= 0.45 else 'missed'} in this run (load average "
                             f"{ov['load_average_before'][0]:.1f}; {ov['cpu_total_min']:.3f} CPU-s per slice).{floor}")
        for name, what in (("openvino-int8", "with an int8 encoder (opt-in, `--inference-precision int8`)"),
                           ("openvino-bf16", "at bf16 (`--inference-precision bf16`, and what the default `auto` "
                                             "runs on a CPU with bf16 units)")):
            if name not in by:
                continue
            q = by[name]
            lines.append(f"- {threads} thread(s): OpenVINO {what} "
                         f"{q['total_min']:.3f} s/slice (min), {q['total_median']:.3f} s (median), argmax agreement "
                         f"{100 * q['argmax_agreement']:.3f}% with {payload['settings']['backends'][0]} on this slice"
                         + (f": <= 0.45 s {'met' if q['total_min'] <= 0.45 else 'missed'}" if threads == 2 else "") + ".")
    return "\n".join(lines) + "\n"


def markdown(payload: dict) -> str:
    if payload.get("backends"):
        return backends_markdown(payload)
    lines = [f"Machine: {payload['machine']['cpu']}, {payload['machine']['torch_threads']} threads; fp32 matmul peak "
             f"measured {payload['matmul_flops'] / 1e9:.0f} GFLOP/s.\n",
             "| model | path | batch | s/slice (wall) | CPU-s/slice | GFLOP/slice | % of matmul peak | max logit diff | argmax agree |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in payload["inference"]:
        lines.append(f"| {r['model']} {r['image_size']} | {r['path']} | {r['batch_size']} | {r['seconds_per_slice_wall']:.2f} "
                     f"| {r['cpu_seconds_per_slice']:.2f} | {r['flops_per_slice'] / 1e9:.1f} | {100 * r['fraction_of_matmul']:.0f}% "
                     f"| {r['max_abs_logit_diff']:.1e} | {100 * r['argmax_agreement']:.3f}% |")
    if payload["training"]:
        lines += ["", "| model | method | precision | batch | stages trained | s/step | GFLOP/step | % of fp32 matmul peak |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in payload["training"]:
            lines.append(f"| {r['model']} | {r['method']} | {r.get('precision', 'fp32')} | {r['batch_size']} | {r['train_stages']} "
                         f"| {r['seconds_per_step']:.2f} | {r['flops_per_step'] / 1e9:.0f} | {100 * r['fraction_of_matmul']:.0f}% |")
    return "\n".join(lines) + "\n"


def run_backends(args) -> dict:
    """``--backends``: every inference backend side by side (this mode measures nothing else)."""
    from ..backends.openvino_backend import openvino_version

    payload = {"benchmark": "speed", "machine": machine_info("cpu"), "cpu_flags": cpu_flags(), "openvino": openvino_version(),
               "command": "medsaga bench speed " + " ".join(sys.argv[sys.argv.index("speed") + 1:] if "speed" in sys.argv else []),
               "settings": {"models": args.models, "backends": args.backends, "threads": args.backend_threads,
                            "repeats": args.repeats, "box_counts": args.box_counts},
               "inference": [], "training": [], "backends": []}
    out = Path(args.output)
    for spec in args.models:
        payload["backends"] += bench_backends(spec.partition(":")[0], args.backends, args.backend_threads, args.repeats,
                                              args.box_counts)
        write_json(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(markdown(payload), encoding="utf-8")
    return payload


def run(args) -> dict:
    if getattr(args, "backends", None):
        return run_backends(args)
    set_threads(args.threads)
    peak = matmul_throughput()
    log(f"fp32 matmul: {peak / 1e9:.0f} GFLOP/s at {args.threads} threads")
    payload = {"benchmark": "speed", "machine": machine_info(args.device), "matmul_flops": peak,
               "settings": {k: getattr(args, k) for k in ("models", "batch_sizes", "repeats", "methods", "train_steps",
                                                           "train_batch_size", "train_stages", "train_precisions",
                                                           "threads")},
               "inference": [], "training": []}
    out = Path(args.output)
    for spec in args.models:
        name, _, size = spec.partition(":")
        payload["inference"] += bench_inference(name, int(size) if size else None, args.batch_sizes, args.repeats, peak)
        write_json(out / f"{args.name}.json", payload)
    if args.methods:
        payload["training"] = bench_training(args.train_model, None, args.methods, args.train_steps, args.train_batch_size,
                                             args.train_stages, peak, args.train_precisions)
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
    parser.add_argument("--train-precisions", nargs="+", default=["auto"], choices=list(PRECISIONS),
                        help="training precisions timed (auto: what the trainer picks here; fp32 bf16: both side by side)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="*", default=None, choices=list(BACKEND_RUNS),
                        help="compare these inference backends side by side (interleaved) instead of the default runs")
    parser.add_argument("--backend-threads", type=int, nargs="+", default=[2, 1], help="thread counts for --backends")
    parser.add_argument("--box-counts", type=int, nargs="+", default=[1, 6], help="boxes per slice timed by --backends")
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", default="speed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAGaLib.bench.speed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
