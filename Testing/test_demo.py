"""The demo's pipeline end to end on the real MNI152 data and LiteMedSAM, at a toy step budget."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_writes_model_report_and_overlays(tmp_path):
    from MedSAGaLib.demo import main
    from MedSAGaLib.modelfile import read_metadata

    out = tmp_path / "demo"
    assert main(["--output", str(out), "--steps", "2", "--baseline-steps", "1", "--shots", "2", "--val-slices", "1",
                 "--augment-copies", "1", "--segment", "none", "--threads", "2", "--realistic-task", "none"]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    comparison = report["comparison_on_unseen_slices"]
    assert set(comparison) == {"untrained head", "galore", "decoder"}
    assert set(comparison["galore"]["val_dice"]) == {"grey_matter", "white_matter"}
    assert comparison["galore"]["galore_parameters"] > 0 and comparison["decoder"]["galore_parameters"] == 0
    assert len(report["train_slices"]) == 2 and not set(report["train_slices"]) & set(report["unseen_validation_slices"])
    assert report["files"]["overlays"] and all((out / f).exists() for f in report["files"]["overlays"])
    assert (out / "loss_curves.png").exists() and report["realistic_task"] is None
    meta = read_metadata(out / report["files"]["model"])
    assert meta["training"]["method"] == "galore" and meta["class_names"] == ["grey_matter", "white_matter"]


@pytest.mark.slow
def test_demo_realistic_task_trains_at_product_defaults_and_scores_unseen_slices(tmp_path):
    from MedSAGaLib.demo import realistic_task
    from MedSAGaLib.modelfile import read_metadata
    from MedSAGaLib.samples.mricron import MissingSampleData, template_path

    try:
        template_path("ch2.nii.gz")
    except MissingSampleData as exc:
        pytest.skip(str(exc))
    report = realistic_task("colin27_aal", tmp_path, "cpu", budget=240, steps=1)
    assert report["painted_slices"] == [51, 60, 70, 79, 88] and report["unseen_slices"] == 51
    assert set(report["dice"]) == {"caudate", "putamen", "pallidum", "thalamus", "hippocampus", "amygdala"}
    assert report["steps"] == 1 and any(d.startswith("cropping to rows") for d in report["decisions"])
    assert any(d.startswith("intensities: the crop's own") for d in report["decisions"])
    assert {"setup", "prepare_training", "steps"} <= set(report["timings"])
    assert (tmp_path / report["overlay"]).exists()
    assert report["segmented_with_painted_slices"] and isinstance(report["removed_voxels"], dict)
    meta = read_metadata(tmp_path / report["model"])
    assert meta["class_names"] == list(report["dice"]) and meta["training"]["roi"] is not None
