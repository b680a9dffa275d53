"""The torch-free modules every front end shares: slices, progress events, command lines."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from MedSAGaLib import commands, events, slices

ROOT = Path(__file__).resolve().parents[1]


def test_shared_modules_import_without_torch():
    # torch (and SimpleITK) blocked: the Slicer panel imports these before PyTorch is installed
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        sys.modules["SimpleITK"] = None
        import numpy as np
        from MedSAGaLib import commands, events, slices
        from MedSAGaLib.training import config, methods
        argv = commands.finetune_argv("a.nii", "b.nii", "m.medsaga", steps=3, method="lora", slices=[4, 9])
        assert argv[:3] == ["finetune", "--image", "a.nii"], argv
        assert slices.annotated_slices(np.eye(3)[None], 1) == [0, 1, 2]
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok", len(methods.METHOD_REGISTRY))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


# --- slices ---------------------------------------------------------------------------------
def test_annotated_and_evenly_spread_slices():
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[[2, 5, 7], 1, 1] = 3
    assert slices.annotated_slices(labels, 0) == [2, 5, 7]
    assert slices.annotated_slices(labels, 1) == [1] and slices.annotated_slices(labels, 2) == [1]
    assert slices.evenly_spread(list(range(10)), 3) == [2, 4, 7]
    assert slices.evenly_spread([4, 8], 5) == [4, 8]
    assert slices.format_ranges([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"


def test_select_classes_and_labels_for_model():
    labels = np.array([0, 1, 2, 3])
    picked, names, colors = slices.select_classes(labels, ["a", "b", "c"], [1, 2, 3], ["c", "a"])
    assert picked.tolist() == [0, 2, 0, 1] and names == ["c", "a"] and colors == [3, 1]
    same, names, _ = slices.select_classes(labels, ["a", "b", "c"], [1, 2, 3], ["x", "y", "z"])
    assert same is labels and names == ["x", "y", "z"]
    with pytest.raises(ValueError, match="names 2 classes"):
        slices.select_classes(labels, ["a", "b", "c"], [1, 2, 3], ["x", "y"])
    assert slices.labels_for_model(["b", "a"], ["a", "b"], np.array([1, 2])).tolist() == [2, 1]
    with pytest.raises(ValueError, match="The model segments"):
        slices.labels_for_model(["a"], ["x", "y"], labels)


def test_axes_from_directions():
    # voxel axis i along A/P, j along S/I, k along R/L (a sagittal acquisition), with spacing in the matrix
    ijk_to_ras = np.array([[0, 0, -2.0], [1.5, 0, 0], [0, -0.8, 0]])
    assert slices.plane_axes(ijk_to_ras.ravel()) == {"sagittal": 2, "coronal": 0, "axial": 1}
    assert slices.axis_index(ijk_to_ras.ravel(), "sagittal") == 0  # k is numpy axis 0
    assert slices.axis_index(np.eye(3).ravel(), "axial") == 0 and slices.axis_index(np.eye(3).ravel(), "i") == 2
    with pytest.raises(slices.VolumeError, match="Unknown slice axis"):
        slices.axis_index(np.eye(3).ravel(), "oblique")
    array = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(slices.get_slice(array, 1, 2), array[:, 2, :])
    assert slices.slice_view(2, 3) == (slice(None), slice(None), 3)
    assert slices.bounding_box(np.pad(np.ones((2, 3)), 2), margin=1) == [1.0, 1.0, 6.0, 5.0]


# --- events ---------------------------------------------------------------------------------
def test_event_schema_is_enforced_and_documented():
    for kind, (required, optional) in events.SCHEMA.items():
        assert f"``{kind}``" in events.__doc__, kind  # every event is documented in the module docstring
        for name in required + optional:
            assert name in events.__doc__, (kind, name)
    with pytest.raises(ValueError, match="missing fields"):
        events.event("step", step=1)
    with pytest.raises(ValueError, match="Unknown progress event"):
        events.event("stepped")


def test_event_json_round_trip_and_text():
    ev = events.event("step", step=3, steps=10, loss=np.float32(0.25), lr=1e-3,
                      val_dice={"grey": 0.5, "white": float("nan")}, elapsed=4.0, eta=75.0)
    line = events.to_json_line(ev)
    back = events.parse_json_line(line + "\n")
    assert back == {"event": "step", "step": 3, "steps": 10, "loss": 0.25, "lr": 1e-3,
                    "val_dice": {"grey": 0.5, "white": None}, "elapsed": 4.0, "eta": 75.0}
    assert events.describe(back) == "step 3/10, loss 0.2500, lr 1.00e-03, val Dice 0.500 (grey 0.500, white n/a), ETA 1:15"
    assert events.describe(ev) == events.describe(back)  # the same text from the Python and the JSON form
    assert events.parse_json_line("Training on 2 slices") is None and events.parse_json_line("{broken") is None
    assert events.format_seconds(3725) == "1:02:05"


# --- command lines --------------------------------------------------------------------------
def _parser():
    from MedSAGaLib.cli import build_parser

    return build_parser()


FINETUNE_VALUES = dict(
    axis="coronal", slices="4,9", device="cpu", window="40,400", threads=2, shots=None, classes=["a", "b c"],
    method="lora", base="vit_b", checkpoint="sam.pth", image_size=512, steps=7, batch_size=3, lr=0.002,
    encoder_lr=0.0005, warmup=2, rank=8, update_proj_gap=5, scale=0.5, proj_type="left", lora_rank=16,
    train_stages=2, checkpointing=True, precision="fp32", no_augment=True, val_fraction=0.3, max_val_slices=4,
    seed=3, resume="old.medsaga", progress="json", time_budget=90.0, crop="on", class_weighting="balanced",
    feature_cache="/tmp/features", max_steps=250, mirror="off", sides="off", crop_margin=0.1,
)


def test_every_training_option_reaches_the_trainer_settings():
    from dataclasses import fields

    from MedSAGaLib.cli_train import _settings
    from MedSAGaLib.training import FinetuneConfig

    args = _parser().parse_args(commands.finetune_argv("i", "l", "o", **FINETUNE_VALUES))
    settings, names = _settings(args), {f.name for f in fields(FinetuneConfig)}
    assert set(settings) <= names
    # every option named as a trainer setting is handed on, with the value given
    for dest in names & set(FINETUNE_VALUES):
        assert settings[dest] == FINETUNE_VALUES[dest], dest
    assert settings["augment"] is False and settings["crop_margin"] == 0.1


def test_every_finetune_option_parses_back_to_its_value():
    assert {o.dest for o in commands.FINETUNE_OPTIONS} - {"image", "labels", "output", "epochs"} == set(FINETUNE_VALUES)
    argv = commands.finetune_argv("img.nii", "lab.nrrd", "out.medsaga", **FINETUNE_VALUES)
    args = _parser().parse_args(argv)
    assert args.command == "finetune" and (args.image, args.labels, args.output) == ("img.nii", "lab.nrrd", "out.medsaga")
    for dest, value in FINETUNE_VALUES.items():
        assert getattr(args, dest) == value, dest
    # list and array-axis forms
    args = _parser().parse_args(commands.finetune_argv("i", "l", "o", slices=[9, 4], axis=0, epochs=1.5))
    assert (args.slices, args.axis, args.epochs, args.steps) == ("9,4", "k", 1.5, None)
    with pytest.raises(TypeError, match="no option stpes"):
        commands.finetune_argv("i", "l", "o", stpes=3)


def test_segment_and_evaluate_options_parse_back():
    values = dict(axis="j", slices="0:5", device="cpu", window="ct-soft", threads=1, checkpoint="c.pth",
                  image_size=256, classes=["x"], boxes_from="lab.nrrd", box_margin=2, labelmap="o.nii.gz", batch_size=4,
                  tta="off")
    args = _parser().parse_args(commands.segment_argv("img.nii", "m.medsaga", "o.seg.nrrd", **values))
    # segment takes several images (a cohort with --output-dir), so its positional is a list
    assert (args.command, args.image, args.model, args.output) == ("segment", ["img.nii"], "m.medsaga", "o.seg.nrrd")
    for dest, value in values.items():
        assert getattr(args, dest) == value, dest
    args = _parser().parse_args(commands.evaluate_argv("img.nii", "lab.nrrd", "m.medsaga", json=True, slices=[1, 2],
                                                       tta="on"))
    assert (args.command, args.model, args.json, args.slices, args.tta) == ("evaluate", "m.medsaga", True, "1,2", "on")
    assert _parser().parse_args(commands.segment_argv("i", "m", "o")).tta == "auto"


def test_registries_and_their_torch_free_names_agree():
    from MedSAGaLib.models import BASE_MODEL_REGISTRY, build_base_model
    from MedSAGaLib.training.config import METHODS
    from MedSAGaLib.training.methods import METHOD_REGISTRY, get_method

    assert tuple(BASE_MODEL_REGISTRY) == commands.BASE_MODEL_NAMES
    from MedSAGaLib.backends import INFERENCE_PRECISIONS

    assert tuple(commands.INFERENCE_PRECISION.choices) == INFERENCE_PRECISIONS
    assert METHODS == tuple(METHOD_REGISTRY) and get_method("galore-layerwise").layerwise
    assert not get_method("decoder").trains_encoder
    with pytest.raises(ValueError, match="Unknown method 'adam'"):
        get_method("adam")
    with pytest.raises(ValueError, match="Unknown base model 'vit_x'"):
        build_base_model("vit_x")


def test_defaults_come_from_the_finetune_config():
    from MedSAGaLib.training.config import FinetuneConfig

    args = _parser().parse_args(commands.finetune_argv("i", "l", "o"))
    config = FinetuneConfig()
    for name in ("method", "batch_size", "lr", "warmup", "rank", "update_proj_gap", "scale", "proj_type",
                 "lora_rank", "max_val_slices", "seed"):
        assert getattr(args, name) == getattr(config, name), name
