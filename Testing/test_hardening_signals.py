"""Signals at every stage and half-written files: SIGINT/SIGTERM before and during training and
during a write, SIGKILL leftovers, the mode of replaced files, and a save that fails at the end.

Writes are exercised in small torch-free subprocesses (MedSAGaLib.fileio imports no torch), the
training stages in a few real ``medsaga finetune`` runs on the tiny ViT, bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_volume

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _python(code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


WRITER = """
    import os, signal, sys, time
    from MedSAGaLib.fileio import atomic_write
    target, mode = sys.argv[1], sys.argv[2]
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background jobs
    # (`make test &`) with SIGINT ignored, and an ignored signal has nothing to do after the write
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"new-" * 1000)
            handle.flush()
            if mode in ("term", "int", "term-twice"):
                os.kill(os.getpid(), signal.SIGINT if mode == "int" else signal.SIGTERM)
            if mode == "term-twice":
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGTERM)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)
            handle.write(b"end")

    atomic_write(target, write)
    print("after the write")
"""


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


@pytest.mark.parametrize("mode, returncode", [("term", -signal.SIGTERM), ("int", -signal.SIGINT)])
def test_signal_during_a_write_finishes_it_then_acts(tmp_path, mode, returncode):
    """The write completes (whole new file, no temporary), then the signal does what it would have done."""
    target = tmp_path / "model.medsaga"
    target.write_bytes(b"old")
    result = _python(WRITER, target, mode)
    assert result.returncode == returncode, result.stderr
    assert target.read_bytes() == b"new-" * 1000 + b"end"
    assert "after the write" not in result.stdout
    assert _parts(tmp_path) == []


def test_second_sigterm_during_a_write_rolls_it_back(tmp_path):
    target = tmp_path / "out.seg.nrrd"
    target.write_bytes(b"old")
    result = _python(WRITER, target, "term-twice")
    assert result.returncode != 0
    assert target.read_bytes() == b"old"
    assert _parts(tmp_path) == []


def test_sigkill_leftover_is_cleaned_by_the_next_write(tmp_path):
    from MedSAGaLib.fileio import LeftoverWarning, atomic_write

    target = tmp_path / "out.seg.nrrd"
    target.write_bytes(b"old")
    result = _python(WRITER, target, "kill")
    assert result.returncode == -signal.SIGKILL
    assert len(_parts(tmp_path)) == 1 and target.read_bytes() == b"old"
    # a live writer's temporary (a concurrent run) and an unknown one are kept, the dead one removed
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        from MedSAGaLib.fileio import _host_tag

        live = tmp_path / f".out.seg.nrrd.{_host_tag()}-{sleeper.pid}.abcd.part"
        live.write_bytes(b"busy")
        unknown = tmp_path / ".out.seg.nrrd.x1y2z3.part"
        unknown.write_bytes(b"?")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
        messages = [str(w.message) for w in caught if issubclass(w.category, LeftoverWarning)]
        assert any("removed 1 partial file" in m for m in messages), messages
        assert any(str(unknown) in m for m in messages), messages
        assert _parts(tmp_path) == sorted([live.name, unknown.name])
        assert target.read_bytes() == b"new"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_replaced_file_keeps_its_mode_and_new_files_follow_the_umask(tmp_path):
    from MedSAGaLib.fileio import atomic_write

    shared = tmp_path / "shared.seg.nrrd"
    shared.write_bytes(b"old")
    os.chmod(shared, 0o644)
    atomic_write(shared, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert shared.stat().st_mode & 0o777 == 0o644
    os.chmod(shared, 0o640)
    atomic_write(shared, lambda tmp: Path(tmp).write_bytes(b"newer"))
    assert shared.stat().st_mode & 0o777 == 0o640
    old = os.umask(0o027)
    try:
        fresh = atomic_write(tmp_path / "fresh.nii.gz", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o640


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from MedSAGaLib.fileio import atomic_write

    target = tmp_path / "m.medsaga"
    target.write_bytes(b"old")

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and _parts(tmp_path) == []


def test_model_that_cannot_be_saved_is_kept_and_the_place_named(tiny_model_file, tmp_path, monkeypatch):
    """An output folder that stops being writable after the checks: the trained model is not lost."""
    from MedSAGaLib.modelfile import ModelFileError, load_model, save_model

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    segmenter = load_model(tiny_model_file)
    with pytest.raises(ModelFileError) as caught:
        save_model("/proc/medsaga-no-such-folder/m.medsaga", segmenter)
    message = str(caught.value)
    assert "the model was kept at" in message
    kept = Path(message.split("the model was kept at ")[1].split(": move")[0])
    assert kept.parent == tmp_path and kept.exists()
    assert load_model(kept).class_names == segmenter.class_names


# ----------------------------------------------------------------------------- real runs, signalled
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals")
    image = make_volume(d / "img.nrrd")
    labels = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    for z in (1, 3, 4):
        labels[z, 5:12, 3:9] = 1
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(d / "lab.nii.gz"))
    return d


def _finetune(task: Path, checkpoint: Path, out: Path, steps: int = 400) -> subprocess.Popen:
    argv = [sys.executable, "-m", "MedSAGaLib.cli", "finetune", "--image", task / "img.nrrd", "--labels",
            task / "lab.nii.gz", "--base", "vit_b", "--checkpoint", checkpoint, "--image-size", "224",
            "--steps", str(steps), "--progress", "json", "--device", "cpu", "--threads", "1", "--method", "decoder",
            "-o", out]
    return subprocess.Popen([str(a) for a in argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_event(proc: subprocess.Popen, kind: str, timeout: float = 120) -> list[dict]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            seen.append(json.loads(line))
        except json.JSONDecodeError:
            continue
        if seen[-1].get("event") == kind:
            return seen
    proc.kill()
    raise AssertionError(f"no {kind} event; saw {seen[-3:]}; stderr {proc.stderr.read()[-2000:]}")


# SIGTERM/SIGINT during training: test_cli_train.py::test_sigterm_stops_cleanly_and_writes_the_model
# (the StopFlag handler stops after the step and writes the best model whole).


def test_sigterm_before_training_leaves_nothing(task, tiny_vit_checkpoint, tmp_path):
    out = tmp_path / "m.medsaga"
    out.write_bytes(b"the user's earlier model")
    proc = _finetune(task, tiny_vit_checkpoint, out)
    try:
        _wait_for_event(proc, "start")  # data read, model built, before the first step
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # stopped before the first step: nothing written, the earlier file untouched
    assert proc.returncode in (130, 143), stderr
    assert "Traceback" not in stderr
    assert out.read_bytes() == b"the user's earlier model"
    assert _parts(tmp_path) == []


def _catches(pid: int, sig: int) -> bool:
    """Whether a process has a handler installed for ``sig`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_sigterm_while_loading_exits_143(task, tiny_vit_checkpoint, tmp_path):
    out = tmp_path / "o.seg.nrrd"
    out.write_bytes(b"the user's earlier segmentation")
    proc = subprocess.Popen([sys.executable, "-m", "MedSAGaLib.cli", "segment", str(task / "img.nrrd"),
                             "--model", "vit_b", "--checkpoint", str(tiny_vit_checkpoint), "--classes", "a",
                             "--image-size", "224", "-o", str(out), "--device", "cpu"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert out.read_bytes() == b"the user's earlier segmentation"
    assert _parts(tmp_path) == []
