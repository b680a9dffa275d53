"""``medsaga bench cohort``: volumes per minute on a local Dask cluster against one process.

The same volumes (sub-volumes of the real MNI152 T1) are segmented with the same model file three
ways: in this process (model loaded once, volumes one after another, PyTorch on every core), on a
``LocalCluster`` of 1 worker (PyTorch on every core) and of 2 workers (the cores shared). The
cluster is started before the clock of its run starts; its start-up and the workers' model loads
are reported on their own. The per-volume overhead of the cluster is the 1-worker run's wall time
minus the in-process run's (model load included in both), divided by the number of volumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import machine_info, write_json


def log(message: str) -> None:
    print(f"[bench cohort {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="litemedsam",
                        help="model file, or a base model whose untrained 2-class head is saved as one (default litemedsam)")
    parser.add_argument("--volumes", type=int, default=6, help="volumes in the cohort (default 6)")
    parser.add_argument("--slices", type=int, default=3, help="axial slices per volume (default 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local cluster sizes (default 1 2)")
    parser.add_argument("--output", default="docs/results")
    parser.add_argument("--name", default="cohort")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. what else ran)")


def _cohort_volumes(folder: Path, count: int, slices: int) -> list[Path]:
    import SimpleITK as sitk

    from ..samples.mni152 import mni152_files

    t1 = sitk.ReadImage(str(mni152_files()["t1"]), sitk.sitkFloat32)
    levels = np.linspace(50, 130, count).astype(int)
    paths = []
    for n, z in enumerate(levels):
        path = folder / f"vol{n:03d}.nii.gz"
        sitk.WriteImage(t1[:, :, int(z) : int(z) + slices], str(path))
        paths.append(path)
    return paths


def _model_file(name: str, folder: Path) -> Path:
    from ..modelfile import is_model_file, load_model, save_model

    if is_model_file(name):
        return Path(name)
    segmenter = load_model(name, class_names=["grey_matter", "white_matter"])
    return save_model(folder / f"{name}_untrained.medsaga", segmenter, {"axis": "axial"})


def in_process(paths: list[Path], model: Path, out: Path, threads: int) -> dict:
    import torch

    from ..cohort import SegmentSettings, expand_inputs, segment_image_file
    from ..modelfile import load_model

    torch.set_num_threads(threads)
    items = expand_inputs([str(p) for p in paths], out)
    t0 = time.perf_counter()
    segmenter = load_model(model)
    load = time.perf_counter() - t0
    per_volume = []
    for it in items:
        t1 = time.perf_counter()
        segment_image_file(segmenter, it.input, it.output, None, SegmentSettings(device="cpu"))
        per_volume.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    return {"torch_threads": threads, "model_load_s": round(load, 2), "wall_s": round(wall, 2),
            "seconds_per_volume": [round(s, 2) for s in per_volume],
            "volumes_per_minute": round(60 * len(items) / wall, 2)}


def on_cluster(paths: list[Path], model: Path, out: Path, workers: int, cores: int) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from ..cohort import SegmentSettings, expand_inputs, run_cohort

    items = expand_inputs([str(p) for p in paths], out)
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    try:
        client.wait_for_workers(workers)
        start = time.perf_counter() - t0
        threads = max(1, cores // workers)
        t1 = time.perf_counter()
        report = run_cohort(items, model, out, SegmentSettings(device="cpu"), scheduler=cluster.scheduler_address,
                            torch_threads=threads, progress="none")
        wall = time.perf_counter() - t1
    finally:
        client.close()
        cluster.close()
    rows = report.rows
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"cohort run failed on {len(failed)} volume(s): {failed[0]['error']}")
    loads = [r["load_seconds"] for r in rows if r.get("load_seconds")]
    return {"workers": workers, "torch_threads_per_worker": threads, "cluster_start_s": round(start, 2),
            "wall_s": round(wall, 2), "model_load_s_per_worker": [round(s, 2) for s in loads],
            "seconds_per_volume": [r["seconds"] for r in rows],
            "volumes_per_minute": round(60 * len(items) / wall, 2),
            "volumes_per_minute_with_start": round(60 * len(items) / (wall + start), 2)}


def run(args) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    command = " ".join(["medsaga bench cohort"] + [shlex.quote(a) for a in sys.argv[3:]])
    result = {"command": command, "machine": machine_info("cpu"), "cores": cores,
              "volumes": args.volumes, "slices_per_volume": args.slices, "note": args.note}
    with tempfile.TemporaryDirectory(prefix="medsaga-bench-cohort-") as tmp:
        tmp = Path(tmp)
        (tmp / "inputs").mkdir()
        paths = _cohort_volumes(tmp / "inputs", args.volumes, args.slices)
        model = _model_file(args.model, tmp)
        result["model"] = args.model
        import SimpleITK as sitk

        result["volume_size"] = list(sitk.ReadImage(str(paths[0])).GetSize())
        log(f"{len(paths)} volumes of {result['volume_size']} voxels, {cores} cores")
        load_before = os.getloadavg()
        path = Path(args.output) / f"{args.name}.json"
        result["in_process"] = in_process(paths, model, tmp / "in_process", cores)
        write_json(path, result)  # each stage is kept, should a later one be stopped
        log(f"in-process: {result['in_process']['volumes_per_minute']} volumes/min")
        result["cluster"] = []
        for workers in args.workers:
            row = on_cluster(paths, model, tmp / f"cluster{workers}", workers, cores)
            result["cluster"].append(row)
            write_json(path, result)
            log(f"{workers} worker(s): {row['volumes_per_minute']} volumes/min (start-up {row['cluster_start_s']} s)")
        result["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    one = next((r for r in result["cluster"] if r["workers"] == 1), None)
    if one is not None:
        result["overhead_per_volume_s"] = round((one["wall_s"] - result["in_process"]["wall_s"]) / args.volumes, 2)
    path = write_json(Path(args.output) / f"{args.name}.json", result)
    log(f"wrote {path}")
    return result
