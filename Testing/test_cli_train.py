"""``medsaga finetune`` / ``medsaga evaluate`` on a phantom with the tiny SAM ViT checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_volume
from MedSAGaLib.cli import main
from MedSAGaLib.events import SCHEMA, describe, parse_json_line
from MedSAGaLib.slices import MIN_SLICES_TO_HOLD_OUT, evenly_spread, plan_slices
from MedSAGaLib.modelfile import read_metadata
from MedSAGaLib.training import TrainingError

ROOT = Path(__file__).resolve().parents[1]


def phantom_task(tmp_path: Path, annotated=(1, 2, 3, 4), size=(24, 20, 6)):
    image = make_volume(tmp_path / "v.nrrd", size=size)
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.uint8)
    labels[array > 80] = 1
    labels[(array > 40) & (array <= 80)] = 2
    keep = np.zeros(array.shape[0], bool)
    keep[list(annotated)] = True
    labels[~keep] = 0
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(image)
    sitk.WriteImage(lab, str(tmp_path / "labels.nrrd"))
    return tmp_path / "v.nrrd", tmp_path / "labels.nrrd"


def tiny_args(ckpt):
    return ["--base", "vit_b", "--checkpoint", str(ckpt), "--image-size", "224", "--device", "cpu", "--rank", "8"]


def test_plan_slices():
    annotated = list(range(10, 30))
    assert plan_slices(annotated, [12, 20], None, 0.2) == ([12, 20], [s for s in annotated if s not in (12, 20)])
    train, val = plan_slices(annotated, None, 4, 0.2)
    assert len(train) == 4 and train == evenly_spread(annotated, 4) and not set(train) & set(val)
    train, val = plan_slices(annotated, None, None, 0.2)  # everything annotated: hold out a fifth
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    # a few painted slices all train: each is worth more as training data than as a judge
    assert plan_slices([3, 9, 15, 21, 27], None, None, 0.2) == ([3, 9, 15, 21, 27], [])
    assert plan_slices(list(range(MIN_SLICES_TO_HOLD_OUT - 1)), None, None, 0.2)[1] == []
    train, val = plan_slices(list(range(MIN_SLICES_TO_HOLD_OUT)), None, None, 0.2)
    assert len(val) == 2 and len(train) == MIN_SLICES_TO_HOLD_OUT - 2
    assert plan_slices(list(range(20)), None, None, 0.0)[1] == []  # --val-fraction 0: never
    with pytest.raises(TrainingError, match="no annotated slice"):
        plan_slices([], None, None, 0.2)
    with pytest.raises(TrainingError, match="hold no annotation"):
        plan_slices(annotated, [3], None, 0.2)


def test_finetune_json_progress_then_evaluate(tmp_path, tiny_vit_checkpoint, capsys):
    image, labels = phantom_task(tmp_path)
    out = tmp_path / "m.medsaga"
    code = main(["finetune", "--image", str(image), "--labels", str(labels), "--slices", "1,3", "--classes", "bright", "dim",
                 "--steps", "2", "--progress", "json", "-o", str(out), *tiny_args(tiny_vit_checkpoint)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    events = [parse_json_line(line) for line in captured.out.splitlines()]
    # the schema end to end: every stdout line is an event of MedSAGaLib.events with exactly its fields,
    # as the trainer and the workflow emitted them, and reads as the text the Slicer panel shows
    assert all(e is not None for e in events), captured.out
    for e in events:
        required, optional = SCHEMA[e["event"]]
        assert set(required) <= set(e) - {"event"} <= set(required) | set(optional), e
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "validate" in kinds
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2]
    assert describe(steps[-1]).startswith("step 2/2, loss ") and "val Dice" in describe(steps[-1])
    assert describe(events[-1]).startswith("done: 2 steps")
    # where the time went: set-up, preparing, steps, validation, in the done event and its text
    timings = events[-1]["timings"]
    assert {"setup", "prepare_training", "steps", "validation", "total"} <= set(timings)
    assert timings["validation_passes"] >= 2 and timings["total"] >= timings["steps"] > 0
    assert "\ntime: setting up " in describe(events[-1]) and " 2 steps " in describe(events[-1])
    assert describe(events[0]).startswith("starting: 2 training slice(s) (1,3), 2 validation slice(s) (2,4), "
                                          "classes bright, dim, method auto, 2 steps")
    meta = read_metadata(out)
    assert meta["class_names"] == ["bright", "dim"]
    # the default method is chosen per task; the file records the one that ran, and the run said why
    assert meta["training"]["method"] in ("galore", "decoder") and meta["training"]["train_slices"] == [1, 3]
    assert any(f"method {meta['training']['method']}" in d and "(auto)" in d for d in meta["training"]["decisions"])
    assert meta["training"]["val_slices"] == [2, 4]
    assert set(meta["validation_dice"]) == {"bright", "dim"}

    assert main(["evaluate", "--model", str(out), "--image", str(image), "--labels", str(labels), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in result["classes"]] == ["bright", "dim"]
    assert result["slices"] == [1, 2, 3, 4] and result["training_slices_included"] == [1, 3]
    assert all("dice" in r and "hd95_mm" in r for r in result["classes"])
    assert main(["evaluate", "--model", str(out), "--image", str(image), "--labels", str(labels), "--slices", "2,4"]) == 0
    table = capsys.readouterr().out
    assert "bright" in table and "HD95" in table and "mean" in table

    # --resume continues the adapted model (the correct-and-retrain loop)
    again = tmp_path / "m2.medsaga"
    assert main(["finetune", "--image", str(image), "--labels", str(labels), "--shots", "2", "--steps", "1",
                 "--progress", "none", "--resume", str(out), "-o", str(again), "--device", "cpu"]) == 0, capsys.readouterr().err
    meta2 = read_metadata(again)
    assert meta2["training"]["resumed_from"] == str(out) and meta2["class_names"] == ["bright", "dim"]


def _refused(args, capsys, expected, out):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert out.read_bytes() == b"the user's earlier model"
    assert not list(out.parent.glob("*.part"))


def test_finetune_bad_input_is_explained_and_keeps_existing_output(tmp_path, tiny_vit_checkpoint, tiny_model_file, capsys):
    image, labels = phantom_task(tmp_path)
    out = tmp_path / "keep.medsaga"
    out.write_bytes(b"the user's earlier model")
    base = ["finetune", "--image", str(image), "--labels", str(labels), "--steps", "1", "--progress", "none",
            "-o", str(out), *tiny_args(tiny_vit_checkpoint)]
    _refused(base + ["--slices", "0,2"], capsys, "hold no annotation", out)
    _refused(base + ["--slices", "2,40"], capsys, "outside the volume", out)
    _refused(base + ["--rank", "5000"], capsys, "rank 5000", out)
    _refused(base + ["--max-steps", "0"], capsys, "--max-steps must be at least 1", out)
    _refused(base + ["--classes", "a", "b", "c"], capsys, "--classes", out)
    # a class that no training slice holds
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    arr[1][arr[1] == 2] = 0
    one = sitk.GetImageFromArray(arr)
    one.CopyInformation(sitk.ReadImage(str(labels)))
    sitk.WriteImage(one, str(tmp_path / "one.nrrd"))
    _refused(["finetune", "--image", str(image), "--labels", str(tmp_path / "one.nrrd"), "--slices", "1", "--steps", "1",
              "--progress", "none", "-o", str(out), *tiny_args(tiny_vit_checkpoint)], capsys, "appear in no training slice", out)
    # empty labels
    empty = sitk.Image(sitk.ReadImage(str(labels)))
    sitk.WriteImage(empty * 0, str(tmp_path / "empty.nrrd"))
    _refused(["finetune", "--image", str(image), "--labels", str(tmp_path / "empty.nrrd"), "--steps", "1",
              "-o", str(out), *tiny_args(tiny_vit_checkpoint)], capsys, "no label", out)
    # resume from a model of other classes (the tiny model file segments left/right)
    _refused(base + ["--resume", str(tiny_model_file), "--classes", "bright", "dim"], capsys, "segments", out)
    resume_other_base = ["finetune", "--image", str(image), "--labels", str(labels), "--classes", "left", "right",
                         "--resume", str(tiny_model_file), "--base", "litemedsam", "-o", str(out)]
    _refused(resume_other_base, capsys, "adapted from vit_b", out)


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_writes_the_model(tmp_path, tiny_vit_checkpoint):
    image, labels = phantom_task(tmp_path)
    out = tmp_path / "m.medsaga"
    cmd = [sys.executable, "-m", "MedSAGaLib.cli", "finetune", "--image", str(image), "--labels", str(labels),
           "--steps", "400", "--progress", "json", "-o", str(out), "--threads", "1", *tiny_args(tiny_vit_checkpoint)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env=env, cwd=ROOT)
    try:
        for line in proc.stdout:
            if json.loads(line).get("event") == "step":
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    done = json.loads(rest.strip().splitlines()[-1])
    assert done["event"] == "done" and done["stopped"] and done["steps"] < 400
    meta = read_metadata(out)
    assert meta["training"]["stopped"] is True
