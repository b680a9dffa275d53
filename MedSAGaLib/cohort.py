"""Segment a cohort of volumes on Dask distributed: a local cluster by default, or any scheduler.

One task per volume. A task gets paths, not arrays: each worker reads its volume, segments it
with the model it loaded once (cached per process, keyed by the model file's SHA-256) and writes
the outputs atomically, so volumes stream through the workers and a worker holds one volume at a
time (one Dask thread per worker; PyTorch gets the worker's share of the cores).

Every output gets a small JSON sidecar written *after* it: the input, its grid, the model's
checksum, the segmentation settings and the voxel counts. A re-run skips an input only when its
sidecar matches the current model and settings and the outputs read back on the input's grid;
everything else (never done, failed, killed half-way) is segmented again. A failing input is a
row in the summary, never the end of the run.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .fileio import atomic_write

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEG_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIX = ".labels.nii.gz"
SIDECAR_SUFFIX = ".medsaga.json"
SIDECAR_FORMAT = "medsaga-cohort-output"
SUMMARY_NAME = "summary"
STATUSES = ("done", "skipped", "failed")


class CohortError(ValueError):
    """Inputs or settings a cohort run cannot use; the message says what to change."""


# --------------------------------------------------------------------------------------------
# inputs and output names


@dataclass
class CohortItem:
    """One input volume and where its outputs go."""

    input: str
    output: str
    labelmap: Optional[str] = None

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.output)


def sidecar_path(output: str | Path) -> Path:
    name = Path(output).name
    stem = name[: -len(SEG_SUFFIX)] if name.lower().endswith(SEG_SUFFIX) else name
    return Path(output).with_name(stem + SIDECAR_SUFFIX)


def image_stem(path: str | Path) -> str:
    """``scan.nii.gz`` -> ``scan``; a DICOM folder keeps its folder name."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.endswith(SEG_SUFFIX)


def _expand_one(arg: str) -> list[Path]:
    path = Path(arg)
    if path.is_dir():
        # A folder of image files is a cohort; a folder without any is taken as one DICOM series.
        files = sorted(p for p in path.rglob("*") if is_image_file(p))
        return files or [path]
    if path.exists():
        return [path]
    if glob.has_magic(arg):
        matches = sorted(Path(p) for p in glob.glob(arg, recursive=True))
        matches = [p for p in matches if is_image_file(p) or p.is_dir()]
        if not matches:
            raise CohortError(f"The pattern {arg!r} matches no image file.")
        return matches
    raise CohortError(f"No such file or folder: {arg}")


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names from the inputs' stems; inputs with the same stem get their parent folders in front
    (``patient1/image.nii.gz`` -> ``patient1_image``) until the names differ."""
    paths = [Path(p).resolve() for p in paths]
    names = [image_stem(p) for p in paths]
    for depth in range(1, 64):
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        clashes = [i for i, n in enumerate(names) if counts[n] > 1]
        if not clashes:
            return names
        for i in clashes:
            parents = paths[i].parents
            prefix = "_".join(p.name for p in reversed(list(parents)[:depth]) if p.name)
            names[i] = f"{prefix}_{image_stem(paths[i])}" if prefix else image_stem(paths[i])
    # identical paths given twice
    raise CohortError("The same input is listed twice: " + ", ".join(sorted({str(p) for p in paths if paths.count(p) > 1})))


def _read_inputs_csv(csv_path: Path) -> list[tuple[Path, Optional[str], Optional[str]]]:
    """(image, output or None, labelmap or None) rows; relative image paths are relative to the CSV."""
    if not csv_path.exists():
        raise CohortError(f"No such CSV file: {csv_path}")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in columns:
            raise CohortError(f"{csv_path} needs an 'image' column (optional: 'output', 'labelmap'); it has {columns}.")
        rows = []
        for number, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get("image"):
                raise CohortError(f"{csv_path} line {number}: the image column is empty.")
            image = Path(row["image"])
            if not image.is_absolute():
                image = csv_path.parent / image
            rows.append((image, row.get("output") or None, row.get("labelmap") or None))
    if not rows:
        raise CohortError(f"{csv_path} lists no image.")
    return rows


def expand_inputs(
    inputs: Sequence[str] = (),
    output_dir: str | Path = ".",
    inputs_csv: Optional[str | Path] = None,
    labelmaps: bool = False,
) -> list[CohortItem]:
    """Paths, folders, glob patterns and a CSV -> one item per volume with predictable output names:
    ``DIR/<name>.seg.nrrd`` (and ``DIR/<name>.labels.nii.gz`` with ``labelmaps``)."""
    output_dir = Path(output_dir)
    paths: list[Path] = []
    explicit: dict[int, tuple[Optional[str], Optional[str]]] = {}
    for arg in inputs:
        paths.extend(_expand_one(str(arg)))
    if inputs_csv is not None:
        for image, output, labelmap in _read_inputs_csv(Path(inputs_csv)):
            explicit[len(paths)] = (output, labelmap)
            paths.append(image)
    if not paths:
        raise CohortError("No input volume: give image files, folders, glob patterns or --inputs-csv.")
    seen: dict[Path, int] = {}
    unique: list[Path] = []
    kept: dict[int, tuple] = {}
    for i, p in enumerate(paths):
        key = p.resolve()
        if key in seen:
            continue  # a folder and a glob may name the same file
        seen[key] = len(unique)
        if i in explicit:
            kept[len(unique)] = explicit[i]
        unique.append(p)
    names = unique_names(unique)
    items = []
    for i, (path, name) in enumerate(zip(unique, names)):
        output, labelmap = kept.get(i, (None, None))
        out = Path(output) if output else Path(name + SEG_SUFFIX)
        out = out if out.is_absolute() else output_dir / out
        if not out.name.lower().endswith(SEG_SUFFIX):
            raise CohortError(f"Output {out} for {path} must end in {SEG_SUFFIX}.")
        lab = None
        if labelmap:
            lab = Path(labelmap) if Path(labelmap).is_absolute() else output_dir / labelmap
        elif labelmaps:
            lab = out.with_name(out.name[: -len(SEG_SUFFIX)] + LABELMAP_SUFFIX)
        items.append(CohortItem(str(path.resolve()), str(out.resolve()), str(lab.resolve()) if lab else None))
    outputs = [it.output for it in items] + [it.labelmap for it in items if it.labelmap]
    if len(set(outputs)) != len(outputs):
        raise CohortError("Two inputs would write the same output file; give distinct outputs in the CSV.")
    return items


# --------------------------------------------------------------------------------------------
# settings, checksums, validity of earlier outputs


@dataclass
class SegmentSettings:
    """What decides a volume's segmentation besides the model (part of the skip check)."""

    axis: Optional[str] = None
    slices: Optional[str] = None
    window: Optional[str] = None
    batch_size: Optional[int] = None  # not part of the result: excluded from the key
    device: str = "cpu"
    tta: str = "auto"  # test-time mirroring (inference.mirror_averaging)
    precision: str = "f32"  # f32, int8 or bf16 (inference.segment_volume)

    def key(self) -> dict:
        key = {"axis": self.axis, "slices": self.slices, "window": self.window, "tta": self.tta}
        if self.precision != "f32":  # f32 keeps the key of cohorts segmented before this setting existed
            key["precision"] = self.precision
        return key


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def geometry_of(image) -> dict:
    return {
        "size": [int(v) for v in image.GetSize()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def _input_geometry(path: str) -> dict:
    """The input's grid from its header alone where the format allows (a DICOM folder is read whole)."""
    import SimpleITK as sitk

    from .volume import check_volume, read_volume

    if Path(path).is_dir():
        return geometry_of(read_volume(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = list(reader.GetSize())
    if len(size) == 4 and size[3] == 1:  # read_volume drops a trailing axis of length 1
        return geometry_of(check_volume(sitk.ReadImage(path)))
    return {
        "size": size,
        "spacing": list(reader.GetSpacing()),
        "origin": list(reader.GetOrigin()),
        "direction": list(reader.GetDirection()),
    }


def _same_grid(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return (
        list(a["size"]) == list(b["size"])
        and np.allclose(a["spacing"], b["spacing"], atol=tol, rtol=tol)
        and np.allclose(a["origin"], b["origin"], atol=tol * max(1.0, max(map(abs, a["spacing"]))))
        and np.allclose(a["direction"], b["direction"], atol=tol)
    )


def _seg_matches(path: str, geometry: dict) -> bool:
    """The .seg.nrrd reads (voxels included) and covers the input's grid."""
    import slicerio

    from .segio import ijk_to_lps

    segmentation = slicerio.read_segmentation(path)
    voxels = segmentation["voxels"]
    if list(voxels.shape[-3:]) != list(geometry["size"]):
        return False
    import SimpleITK as sitk

    reference = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    reference.SetSpacing(geometry["spacing"])
    reference.SetOrigin(geometry["origin"])
    reference.SetDirection(geometry["direction"])
    return bool(np.allclose(np.asarray(segmentation["ijkToLPS"], float), ijk_to_lps(reference), atol=1e-4))


def _labelmap_matches(path: str, geometry: dict) -> bool:
    import SimpleITK as sitk

    image = sitk.ReadImage(path)  # reads the voxels: a truncated file fails here
    return _same_grid(geometry_of(image), geometry)


def completed_row(item: CohortItem, model_sha256: str, settings: SegmentSettings) -> Optional[dict]:
    """The summary row of an earlier run when ``item``'s outputs are complete and valid for this model
    and these settings; None when it must be (re)done."""
    try:
        sidecar = json.loads(item.sidecar.read_text())
        if (
            sidecar.get("format") != SIDECAR_FORMAT
            or sidecar.get("model_sha256") != model_sha256
            or sidecar.get("settings") != settings.key()
            or sidecar.get("input") != item.input
            or sidecar.get("labelmap") != item.labelmap
        ):
            return None
        geometry = _input_geometry(item.input)
        if not _same_grid(geometry, sidecar["geometry"]) or not _seg_matches(item.output, geometry):
            return None
        if item.labelmap and not _labelmap_matches(item.labelmap, geometry):
            return None
    except Exception:  # missing, unreadable, foreign or half-written: do it again
        return None
    return _row(item, "skipped", sidecar.get("seconds"), sidecar.get("voxels"), None, sidecar.get("worker"))


def _row(item: CohortItem, status: str, seconds=None, voxels=None, error=None, worker=None) -> dict:
    return {
        "input": item.input, "output": item.output if status != "failed" else None,
        "labelmap": item.labelmap if status != "failed" else None, "status": status,
        "seconds": None if seconds is None else round(float(seconds), 3),
        "voxels": voxels or {}, "error": error, "worker": worker, "load_seconds": None,
    }


# --------------------------------------------------------------------------------------------
# one volume (runs on a worker, or in-process)

_MODEL_CACHE: dict[tuple, object] = {}


def cached_model(model_path: str, model_sha256: str):
    """The segmenter of ``model_path``, loaded once per process and kept while the same file is asked for.

    The key includes the SHA-256 the driver computed, and the file read here must have it: a worker
    on another node, or a model replaced during the run, never segments with the wrong weights.
    """
    key = (str(model_path), model_sha256)
    if key not in _MODEL_CACHE:
        from .modelfile import ModelFileError, load_model

        found = file_sha256(model_path)
        if found != model_sha256:
            raise ModelFileError(f"{model_path} on this worker differs from the driver's copy (SHA-256 {found[:12]}).")
        _MODEL_CACHE.clear()  # one model per worker: memory stays bounded
        _MODEL_CACHE[key] = load_model(model_path)
    return _MODEL_CACHE[key]


def segment_image_file(
    segmenter, image_path: str, output: str, labelmap: Optional[str], settings: SegmentSettings, progress=None
) -> dict:
    """Segment one image file with a loaded model and write its outputs through the same
    :func:`MedSAGaLib.workflow.segment_file` that ``medsaga segment`` calls for one input.

    Returns the class names, voxel counts per class and the input's grid.
    """
    from .volume import read_volume
    from .workflow import segment_file

    image = read_volume(image_path)
    result = segment_file(image, segmenter, output, labelmap=labelmap, axis=settings.axis, slices=settings.slices,
                          window=settings.window, batch_size=settings.batch_size, device=settings.device,
                          progress=progress, tta=settings.tta, precision=settings.precision)
    return {"class_names": list(result.class_names), "voxels": result.voxel_counts(), "geometry": geometry_of(image)}


def _torch_threads(host_threads: dict) -> int:
    """This process's share of the host's cores (all Dask threads of the workers on the host counted)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        from distributed import get_worker

        worker = get_worker()
        host = worker.address.rsplit(":", 1)[0]
        share = host_threads.get(host) or worker.state.nthreads
        return max(1, cores // max(1, share))
    except (ImportError, ValueError):
        return cores


def process_item(
    item: dict, model_path: str, model_sha256: str, settings: dict, torch_threads: Optional[int] = None,
    host_threads: Optional[dict] = None,
) -> dict:
    """One volume, start to end; never raises for a bad input (the error becomes the row)."""
    import torch

    it = CohortItem(**item)
    worker_name = None
    try:
        from distributed import get_worker

        worker_name = str(get_worker().name)
    except (ImportError, ValueError):
        pass
    torch.set_num_threads(torch_threads or _torch_threads(host_threads or {}))
    config = SegmentSettings(**settings)
    start = time.perf_counter()
    load_seconds = 0.0
    try:
        segmenter = cached_model(model_path, model_sha256)
        load_seconds = time.perf_counter() - start  # 0 once the worker holds the model
        start = time.perf_counter()
        out = segment_image_file(segmenter, it.input, it.output, it.labelmap, config)
    except Exception as exc:  # noqa: BLE001 - the summary names every failure
        message = str(exc).strip().splitlines()
        row = _row(it, "failed", time.perf_counter() - start, None,
                   f"{type(exc).__name__}: {message[-1] if message else exc}", worker_name)
        row["load_seconds"] = round(load_seconds, 3)
        return row
    seconds = time.perf_counter() - start
    sidecar = {
        "format": SIDECAR_FORMAT, "input": it.input, "output": it.output, "labelmap": it.labelmap,
        "model": str(model_path), "model_sha256": model_sha256, "settings": config.key(),
        "geometry": out["geometry"], "class_names": out["class_names"], "voxels": out["voxels"],
        "seconds": round(seconds, 3), "worker": worker_name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # written last: its presence says the outputs before it are whole
    atomic_write(it.sidecar, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1)))
    row = _row(it, "done", seconds, out["voxels"], None, worker_name)
    row["load_seconds"] = round(load_seconds, 3)
    return row


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class CohortReport:
    rows: list = field(default_factory=list)
    model: str = ""
    model_sha256: str = ""
    workers: int = 0
    scheduler: Optional[str] = None
    seconds: float = 0.0
    summary_csv: Optional[str] = None
    summary_json: Optional[str] = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["status"] == "failed"]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "model_sha256": self.model_sha256, "workers": self.workers,
            "scheduler": self.scheduler, "seconds": round(self.seconds, 3),
            "counts": {s: self.count(s) for s in STATUSES}, "items": self.rows,
        }


def default_workers(pending: int, cores: Optional[int] = None, memory_bytes: Optional[int] = None) -> int:
    """Worker processes for a local cluster: one per 4 cores (each runs PyTorch on its share) and per
    3 GiB of memory (a model plus one volume and its slices), never more than there are volumes."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if memory_bytes is None:
        try:
            import psutil

            memory_bytes = psutil.virtual_memory().total
        except ImportError:
            memory_bytes = 8 << 30
    return max(1, min(pending, max(1, cores // 4), max(1, memory_bytes // (3 << 30))))


class _Progress:
    """A bar over volumes (tqdm), JSON lines on stdout, or nothing."""

    def __init__(self, mode: str, total: int, skipped: int) -> None:
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "none"
        self.mode, self.total, self.done = mode, total, skipped
        self.bar = None
        if mode == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=skipped, desc="Volumes", unit="vol")

    def emit(self, kind: str, **fields) -> None:
        if self.mode == "json":
            from .events import event, to_json_line

            print(to_json_line(event(kind, **fields)), flush=True)

    def row(self, row: dict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if row["status"] == "failed":
                self.bar.write(f"failed: {row['input']}: {row['error']}")
        self.emit("volume", done=self.done, total=self.total, **{k: row[k] for k in ("input", "output", "status", "seconds", "error")})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _remove_stale_parts(items: Sequence[CohortItem]) -> None:
    """A worker killed while writing leaves its temporary file (``.NAME.*.part``) behind: remove those of
    this run's outputs once no task of the run is writing any more."""
    for it in items:
        for target in filter(None, (it.output, it.labelmap, str(it.sidecar))):
            target = Path(target)
            for part in target.parent.glob(f".{glob.escape(target.name)}.*.part"):
                try:
                    part.unlink()
                except OSError:
                    pass


def write_summary(report: CohortReport, output_dir: str | Path) -> tuple[Path, Path]:
    """``summary.csv`` (one row per input, a voxels column per class) and ``summary.json``, atomically."""
    output_dir = Path(output_dir)
    classes: list[str] = []
    for r in report.rows:
        for name in r["voxels"]:
            if name not in classes:
                classes.append(name)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "output", "labelmap", "status", "seconds"] + [f"voxels_{c}" for c in classes] + ["error", "worker", "model_load_seconds"])
    for r in report.rows:
        writer.writerow([r["input"], r["output"] or "", r["labelmap"] or "", r["status"],
                         "" if r["seconds"] is None else r["seconds"]]
                        + [r["voxels"].get(c, "") for c in classes] + [r["error"] or "", r["worker"] or "",
                           "" if r.get("load_seconds") is None else r["load_seconds"]])
    csv_path = atomic_write(output_dir / f"{SUMMARY_NAME}.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    json_path = atomic_write(output_dir / f"{SUMMARY_NAME}.json",
                             lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=1)))
    return csv_path, json_path


def run_cohort(
    items: Sequence[CohortItem],
    model: str | Path,
    output_dir: str | Path,
    settings: Optional[SegmentSettings] = None,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    torch_threads: Optional[int] = None,
    memory_limit: str | int = "auto",
    retries: int = 2,
    progress: str = "auto",
    on_row: Optional[Callable[[dict], None]] = None,
) -> CohortReport:
    """Segment every item not already done; returns (and writes) the summary.

    ``scheduler``: the address of a running Dask scheduler (``tcp://host:8786``); otherwise a
    ``LocalCluster`` of ``workers`` processes (default :func:`default_workers`) is started and closed.
    ``retries``: how often Dask resubmits a volume whose worker died (a bad input is not retried
    within a run; a re-run retries it).
    """
    from .modelfile import read_metadata

    settings = settings or SegmentSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = str(Path(model).resolve())
    read_metadata(model)  # a bad model file is the user's error, named before any work
    start = time.perf_counter()
    report = CohortReport(model=model, model_sha256=file_sha256(model), scheduler=scheduler)
    items = list(items)
    with ThreadPoolExecutor(max_workers=4) as pool:
        earlier = list(pool.map(lambda it: completed_row(it, report.model_sha256, settings), items))
    rows: dict[int, dict] = {i: row for i, row in enumerate(earlier) if row is not None}
    pending = [i for i in range(len(items)) if i not in rows]
    bar = _Progress(progress, len(items), len(rows))
    bar.emit("cohort-start", total=len(items), skipped=len(rows), pending=len(pending))
    try:
        if pending:
            report.workers = _run_pending(items, pending, rows, report, settings, workers, scheduler, torch_threads,
                                          memory_limit, retries, bar, on_row)
    finally:
        bar.close()
        _remove_stale_parts(items)
    report.rows = [rows[i] for i in range(len(items)) if i in rows]
    report.seconds = time.perf_counter() - start
    csv_path, json_path = write_summary(report, output_dir)
    report.summary_csv, report.summary_json = str(csv_path), str(json_path)
    bar.emit("cohort-end", counts={s: report.count(s) for s in STATUSES}, seconds=round(report.seconds, 3),
             summary=str(json_path))
    return report


def _run_pending(items, pending, rows, report, settings, workers, scheduler, torch_threads, memory_limit, retries,
                 bar, on_row) -> int:
    import logging

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = workers or default_workers(len(pending), cores)
        if workers < 1:
            raise CohortError("--workers must be at least 1.")
        torch_threads = torch_threads or max(1, cores // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        client = Client(scheduler, timeout="30s")
    try:
        info = client.scheduler_info()
        host_threads: dict[str, int] = {}
        for address, w in info.get("workers", {}).items():
            host = address.rsplit(":", 1)[0]
            host_threads[host] = host_threads.get(host, 0) + int(w.get("nthreads", 1))
        count = len(info.get("workers", {}))
        futures = {}
        for i in pending:
            future = client.submit(process_item, asdict(items[i]), report.model, report.model_sha256, asdict(settings),
                                   torch_threads, host_threads, key=f"medsaga-segment-{i}-{_short(items[i].input)}",
                                   pure=False, retries=retries)
            futures[future] = i
        for future in as_completed(futures):
            i = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after every retry
                row = _row(items[i], "failed", None, None, f"{type(exc).__name__}: {exc}")
            rows[i] = row
            bar.row(row)
            if on_row is not None:
                on_row(row)
        return count
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _short(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


__all__ = [
    "CohortError", "CohortItem", "CohortReport", "SegmentSettings", "expand_inputs", "run_cohort", "process_item",
    "segment_image_file", "completed_row", "default_workers", "unique_names", "write_summary",
]


# --------------------------------------------------------------------------------------------
# command line: ``medsaga segment IMAGE [IMAGE ...] --model M --output-dir DIR``


def add_cohort_arguments(parser) -> None:
    """Options of ``medsaga segment`` for many inputs (the one-input options stay as they are)."""
    group = parser.add_argument_group(
        "many volumes (Dask)", "several images, folders or glob patterns, or --inputs-csv, segmented on a Dask cluster")
    group.add_argument("--output-dir", default=None, metavar="DIR",
                       help="segment every input into DIR/<name>.seg.nrrd, with DIR/summary.csv and summary.json")
    group.add_argument("--inputs-csv", default=None, metavar="CSV",
                       help="CSV with an 'image' column (optional 'output', 'labelmap'); paths relative to the CSV")
    group.add_argument("--labelmaps", action="store_true", help="also write DIR/<name>.labels.nii.gz per input")
    group.add_argument("--workers", type=int, default=None,
                       help="worker processes of the local Dask cluster (default: one per 4 cores and per 3 GiB)")
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="use a running Dask scheduler (tcp://host:8786) instead of a local cluster")
    group.add_argument("--threads-per-worker", type=int, default=None,
                       help="PyTorch threads per worker (default: the host's cores shared among its workers)")
    group.add_argument("--progress", choices=("auto", "tqdm", "json", "none"), default="auto",
                       help="a bar over volumes (auto on a terminal), JSON lines on stdout, or none")


def is_cohort_request(args) -> bool:
    return bool(getattr(args, "output_dir", None) or getattr(args, "inputs_csv", None))


def run_segment_cohort(args) -> int:
    """``medsaga segment`` with --output-dir / --inputs-csv: returns 0 when every volume is segmented, 1 otherwise."""
    from .modelfile import is_model_file

    if not args.output_dir:
        raise CohortError("Give --output-dir DIR for the outputs of many inputs.")
    painted = getattr(args, "painted", None)  # "none" (the model alone) is what every cohort input gets anyway
    for option, value in (("-o/--output", args.output), ("--labelmap", args.labelmap), ("--boxes-from", args.boxes_from),
                          ("--classes", args.classes), ("--painted", None if painted == "none" else painted)):
        if value:
            raise CohortError(f"{option} is for one input; with --output-dir the names come from the inputs "
                              "(--labelmaps adds label maps, a CSV 'output' column sets names).")
    if not is_model_file(args.model):
        raise CohortError(f"{args.model} is a base model: segment a cohort with an adapted model file (medsaga finetune).")
    if args.workers is not None and args.workers < 1:
        raise CohortError("--workers must be at least 1.")
    if args.workers is not None and args.scheduler:
        raise CohortError("--workers sizes the local cluster; a running --scheduler has its own workers.")
    items = expand_inputs(args.image, args.output_dir, args.inputs_csv, args.labelmaps)
    # auto would pick by each worker's CPU (bf16 units or not): a cohort keeps f32 unless asked, so its volumes
    # come out alike whichever worker ran them and finished rows keep matching their settings
    precision = "f32" if args.inference_precision == "auto" else args.inference_precision
    settings = SegmentSettings(axis=args.axis, slices=args.slices, window=args.window, batch_size=args.batch_size,
                               device=args.device, tta=args.tta, precision=precision)
    report = run_cohort(items, args.model, args.output_dir, settings, workers=args.workers, scheduler=args.scheduler,
                        torch_threads=args.threads_per_worker, progress=args.progress)
    if args.progress != "json":
        print(f"{report.count('done')} segmented, {report.count('skipped')} already done, {report.count('failed')} failed "
              f"({report.seconds:.0f} s); summary: {report.summary_csv}")
        for row in report.failed[:10]:
            print(f"  failed: {row['input']}: {row['error']}", file=sys.stderr)
        if len(report.failed) > 10:
            print(f"  ... and {len(report.failed) - 10} more in the summary", file=sys.stderr)
    return 1 if report.failed else 0
