"""Cohort segmentation on a real Dask LocalCluster (2 worker processes) with small real MNI152 volumes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSAGaLib import cohort
from MedSAGaLib.cohort import CohortError, CohortItem, SegmentSettings, completed_row, expand_inputs, run_cohort

import distributed  # dask.distributed is a dependency: missing, these tests must fail, not skip

RUN_TIMEOUT = 420  # seconds for one cohort run on a busy 2-core machine (workers import torch)


def _bounded(fn, seconds: float = RUN_TIMEOUT):
    """Run ``fn`` in a thread and fail the test when it takes longer than ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"cohort run did not finish within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[Path]:
    """Three small sub-volumes of the real MNI152 T1 (3 axial slices each, different brain levels)."""
    from MedSAGaLib.samples.mni152 import mni152_files

    folder = tmp_path_factory.mktemp("cohort_inputs")
    t1 = sitk.ReadImage(str(mni152_files()["t1"]), sitk.sitkFloat32)
    paths = []
    for n, z in enumerate((60, 85, 110)):
        path = folder / f"sub-{n:02d}_T1w.nii.gz"
        sitk.WriteImage(t1[45:145, 60:170, z : z + 3], str(path))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cohort_bad")
    corrupt = folder / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream")
    flat = folder / "flat2d.nrrd"
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkFloat32), str(flat))  # a 2-D image: wrong dimension
    return [corrupt, flat]


@pytest.fixture(scope="module")
def cluster():
    """A real LocalCluster: 2 worker processes, 1 thread each; always closed."""
    from distributed import Client, LocalCluster

    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         memory_limit="2GiB", silence_logs=40)
    client = Client(local)
    try:
        client.wait_for_workers(2, timeout=RUN_TIMEOUT)
        yield local, client
    finally:
        client.close()
        local.close()


def _read_seg(path) -> tuple[np.ndarray, list[str]]:
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    return seg["voxels"], [s["name"] for s in seg["segments"]]


# ----------------------------------------------------------------------------------------------
def test_expand_inputs_folder_glob_csv_and_names(tmp_path, volumes):
    out = tmp_path / "out"
    by_folder = expand_inputs([str(volumes[0].parent)], out, labelmaps=True)
    assert [Path(i.input).name for i in by_folder] == [p.name for p in volumes]
    assert [Path(i.output).name for i in by_folder] == [f"sub-{n:02d}_T1w.seg.nrrd" for n in range(3)]
    assert Path(by_folder[0].labelmap).name == "sub-00_T1w.labels.nii.gz"
    assert by_folder[0].sidecar.name == "sub-00_T1w.medsaga.json"
    by_glob = expand_inputs([str(volumes[0].parent / "sub-0[12]_*.nii.gz"), str(volumes[1])], out)
    assert [Path(i.input).name for i in by_glob] == [volumes[1].name, volumes[2].name]  # duplicates once

    # same file name in two folders: the folder goes in front, predictably
    for patient in ("p1", "p2"):
        (tmp_path / patient).mkdir()
        (tmp_path / patient / "image.nii.gz").write_bytes(volumes[0].read_bytes())
    clash = expand_inputs([str(tmp_path / "p1" / "image.nii.gz"), str(tmp_path / "p2" / "image.nii.gz")], out)
    assert [Path(i.output).name for i in clash] == ["p1_image.seg.nrrd", "p2_image.seg.nrrd"]

    table = tmp_path / "inputs.csv"
    table.write_text(f"image,output\n{volumes[0]},first.seg.nrrd\np1/image.nii.gz,\n")
    from_csv = expand_inputs([], out, inputs_csv=table)
    assert [Path(i.output).name for i in from_csv] == ["first.seg.nrrd", "image.seg.nrrd"]
    assert Path(from_csv[1].input) == (tmp_path / "p1" / "image.nii.gz").resolve()

    with pytest.raises(CohortError, match="matches no image"):
        expand_inputs([str(tmp_path / "nothing*.nii.gz")], out)
    with pytest.raises(CohortError, match="'image' column"):
        (tmp_path / "wrong.csv").write_text("path\nx.nii.gz\n")
        expand_inputs([], out, inputs_csv=tmp_path / "wrong.csv")
    with pytest.raises(CohortError, match="No such file"):
        expand_inputs([str(tmp_path / "missing.nii.gz")], out)


@pytest.mark.slow
def test_cohort_matches_one_process_segment_reports_bad_inputs_and_skips_on_rerun(
        tmp_path, volumes, bad_inputs, cluster, tiny_model_file):
    from MedSAGaLib.cli import main

    local, client = cluster
    out = tmp_path / "cohort"
    items = expand_inputs([str(p) for p in volumes + bad_inputs], out, labelmaps=True)
    report = _bounded(lambda: run_cohort(items, tiny_model_file, out, SegmentSettings(device="cpu"),
                                         scheduler=local.scheduler_address, progress="none"))
    by_input = {Path(r["input"]).name: r for r in report.rows}
    assert [by_input[p.name]["status"] for p in volumes] == ["done"] * 3
    assert {r["worker"] for r in report.rows if r["status"] == "done"} <= {"0", "1"}
    corrupt, flat = (by_input[p.name] for p in bad_inputs)
    assert corrupt["status"] == "failed" and "corrupt.nii.gz" in corrupt["error"]
    assert flat["status"] == "failed" and "3-D" in flat["error"]
    assert not (out / "corrupt.seg.nrrd").exists()

    # identical to the one-process command, voxel for voxel (both the segmentation and the label map)
    for path in volumes:
        ref = tmp_path / "single" / f"{path.name}.seg.nrrd"
        ref_map = tmp_path / "single" / f"{path.name}.nii.gz"
        assert main(["segment", str(path), "--model", str(tiny_model_file), "-o", str(ref),
                     "--labelmap", str(ref_map), "--device", "cpu"]) == 0
        row = by_input[path.name]
        voxels, names = _read_seg(row["output"])
        ref_voxels, ref_names = _read_seg(ref)
        assert names == ref_names == ["left", "right"]
        np.testing.assert_array_equal(voxels, ref_voxels)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(row["labelmap"])),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(ref_map))))
        counts = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(ref_map))).ravel(), minlength=3)
        assert row["voxels"] == {"left": int(counts[1]), "right": int(counts[2])}

    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("input,output,labelmap,status,seconds,voxels_left,voxels_right,error")
    assert len(summary) == 1 + len(items)

    # a re-run of the good inputs does no work: nothing submitted, no file rewritten
    good = items[:3]
    stamps = {p: os.stat(p).st_mtime_ns for it in good for p in (it.output, it.labelmap, it.sidecar)}
    tasks_before = len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    again = _bounded(lambda: run_cohort(good, tiny_model_file, out, scheduler=local.scheduler_address, progress="none"))
    assert [r["status"] for r in again.rows] == ["skipped"] * 3 and again.workers == 0
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    assert len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))) == tasks_before

    # the full re-run retries only the failed inputs; other settings or a broken output redo a volume
    Path(items[1].output).write_bytes(Path(items[1].output).read_bytes()[:100])  # a truncated output
    assert completed_row(items[1], report.model_sha256, SegmentSettings()) is None
    assert completed_row(items[0], report.model_sha256, SegmentSettings(slices="0:2")) is None
    assert completed_row(items[0], report.model_sha256, SegmentSettings(precision="int8")) is None  # int8 labels differ
    rerun = _bounded(lambda: run_cohort(items, tiny_model_file, out, scheduler=local.scheduler_address, progress="none"))
    assert [r["status"] for r in rerun.rows] == ["skipped", "done", "skipped", "failed", "failed"]
    np.testing.assert_array_equal(_read_seg(items[1].output)[0],
                                  _read_seg(tmp_path / "single" / f"{volumes[1].name}.seg.nrrd")[0])


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_leaves_every_output_valid(tmp_path, volumes, cluster, tiny_model_file):
    local, client = cluster
    # more volumes than workers, so work is in flight when a worker dies
    inputs = []
    for n in range(3):
        for path in volumes:
            copy = tmp_path / "in" / f"r{n}_{path.name}"
            copy.parent.mkdir(exist_ok=True)
            copy.write_bytes(path.read_bytes())
            inputs.append(str(copy))
    out = tmp_path / "cohort"
    items = expand_inputs(inputs, out)
    pids = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and not killed:
            busy = [address for address, keys in client.processing().items() if keys]
            done = list(out.glob("*.medsaga.json"))
            if busy and done:  # the worker has loaded the model and is on its next volume
                time.sleep(0.3)
                address = busy[0]
                os.kill(pids[address], signal.SIGKILL)
                killed[address] = pids[address]
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    report = _bounded(lambda: run_cohort(items, tiny_model_file, out, scheduler=local.scheduler_address,
                                         progress="none", retries=3))
    killer.join(5)
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert [r["status"] for r in report.rows] == ["done"] * len(items), [r["error"] for r in report.rows]
    for it in items:  # every output complete and on its input's grid
        assert completed_row(it, report.model_sha256, SegmentSettings()) is not None
    assert not list(out.glob(".*.part"))
    # the nanny brought the killed worker back: the cluster still has 2 workers
    client.wait_for_workers(2, timeout=RUN_TIMEOUT)  # a fresh worker imports torch: minutes on a loaded CPU
    assert killed[next(iter(killed))] not in client.run(os.getpid).values()


@pytest.mark.slow
def test_segment_command_with_many_inputs(tmp_path, volumes, bad_inputs, cluster, tiny_model_file, capsys):
    import json

    from MedSAGaLib.cli import main

    local, _ = cluster
    out = tmp_path / "cli"
    args = ["segment", str(volumes[0].parent), str(bad_inputs[0]), "--model", str(tiny_model_file),
            "--output-dir", str(out), "--scheduler", local.scheduler_address, "--device", "cpu", "--labelmaps"]
    assert _bounded(lambda: main(args + ["--progress", "json"])) == 1  # one input failed: the exit code says so
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["cohort-start"] + ["volume"] * 4 + ["cohort-end"]
    assert events[-1]["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    assert sorted(p.name for p in out.glob("*.seg.nrrd")) == [f"sub-{n:02d}_T1w.seg.nrrd" for n in range(3)]
    assert len(list(out.glob("*.labels.nii.gz"))) == 3

    # one-input options do not mix with many inputs; several inputs need --output-dir
    assert main(args + ["-o", str(tmp_path / "x.seg.nrrd")]) == 2
    assert "for one input" in capsys.readouterr().err
    assert main(["segment", str(volumes[0]), str(volumes[1]), "--model", str(tiny_model_file),
                 "-o", str(tmp_path / "x.seg.nrrd")]) == 2
    assert "--output-dir" in capsys.readouterr().err
