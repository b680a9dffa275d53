"""Realistic sample tasks (Debian mricron-data), the crop to painted structures, the data-chosen step
budget and the warning for classes that were not learned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSAGaLib.roi import CROP_BELOW_AREA, RegionOfInterest, choose_roi
from MedSAGaLib.samples.mricron import TEMPLATES
from MedSAGaLib.training.budget import StepBudget
from MedSAGaLib.training.diagnosis import MIN_PAINTED_PIXELS, stuck_classes, thinly_painted_classes

needs_mricron = pytest.mark.skipif(
    not (TEMPLATES / "aal.nii.gz").exists() or not (TEMPLATES / "ch2.nii.gz").exists(),
    reason=f"Debian package mricron-data not installed ({TEMPLATES} missing): `apt-get install -y mricron-data` "
           "(make install does it)")


# ------------------------------------------------------------------------------ the tasks
@needs_mricron
@pytest.mark.parametrize("name, count, axis", [("colin27_aal", 6, "axial"), ("colin27_aal_lr", 12, "coronal")])
def test_colin27_tasks_load_expert_labels_on_the_t1_grid(name, count, axis):
    from MedSAGaLib.samples.tasks import load_sample_task

    task = load_sample_task(name)
    assert task.axis == axis and len(task.class_names) == count == len(task.class_colors)
    assert task.image.GetSize() == task.labels.GetSize() == (181, 217, 181)
    assert np.allclose(task.image.GetSpacing(), task.labels.GetSpacing())
    assert np.allclose(task.image.GetOrigin(), task.labels.GetOrigin())
    labels = sitk.GetArrayFromImage(task.labels)
    counts = np.bincount(labels.ravel(), minlength=count + 1)
    assert len(counts) == count + 1  # nothing above k
    # every structure is small (well under 1% of the volume) but present with thousands of voxels
    assert all(1500 < c < 0.01 * labels.size for c in counts[1:]), counts
    assert "BSD-3-clause" in task.licence and "Tzourio-Mazoyer" in task.source
    if count == 12:  # left and right of each structure are distinct classes of similar size
        assert task.class_names[:2] == ["caudate_left", "caudate_right"]
        assert 0.7 < counts[1] / counts[2] < 1.4


@needs_mricron
def test_aal_values_come_from_the_package_table():
    from MedSAGaLib.samples.mricron import aal_names

    values = aal_names()
    assert values["Caudate_L"] == 71 and values["Amygdala_R"] == 42 and len(values) == 116


def test_unknown_task_is_named():
    from MedSAGaLib.samples.tasks import load_sample_task

    with pytest.raises(ValueError, match="colin27_aal"):
        load_sample_task("nope")


def test_missing_package_names_the_package(monkeypatch, tmp_path):
    from MedSAGaLib.samples import mricron

    monkeypatch.setattr(mricron, "TEMPLATES", tmp_path)
    with pytest.raises(mricron.MissingSampleData, match="apt-get install -y mricron-data"):
        mricron.colin27_aal_volume(False)


# ------------------------------------------------------------------------------ crop
def test_roi_grows_the_painted_box_and_round_trips():
    lab = np.zeros((100, 80), np.uint8)
    lab[40:50, 30:40] = 1
    other = np.zeros_like(lab)
    other[60:70, 20:30] = 2
    roi = RegionOfInterest.around([lab, other], margin=0.5)
    assert (roi.y0, roi.y1, roi.x0, roi.x1) == (25, 85, 10, 50)  # box 40-69 x 20-39, grown by 15 and 10
    crop = roi.crop(lab)
    assert crop.shape == (60, 40) and crop.sum() == lab.sum()
    assert np.array_equal(roi.paste(crop), lab)
    assert RegionOfInterest.from_dict(roi.to_dict()) == roi
    with pytest.raises(ValueError, match="shape"):
        roi.crop(np.zeros((80, 100)))


def test_auto_crop_only_for_small_structures():
    small = np.zeros((200, 200), np.uint8)
    small[90:110, 80:120] = 1
    roi, why = choose_roi([small], "auto")
    assert roi is not None and roi.area_fraction < CROP_BELOW_AREA and "cropping" in why
    large = np.zeros((200, 200), np.uint8)
    large[10:190, 20:180] = 1
    roi, why = choose_roi([large], "auto")
    assert roi is None and "no crop" in why
    assert choose_roi([large], "on")[0] is not None
    assert choose_roi([small], "off")[0] is None


# ------------------------------------------------------------------------------ step budget
def test_budget_plans_steps_from_the_measured_time_and_caps_them():
    b = StepBudget(time_budget=100, max_steps=400, val_every=20)
    assert b.plan(elapsed=40, seconds_per_step=0.5, steps_done=3) == 123  # 60 s left / 0.5 s
    assert "time budget" in b.decisions[-1]
    b = StepBudget(time_budget=1000, max_steps=400, val_every=20)
    assert b.plan(elapsed=10, seconds_per_step=0.1, steps_done=3) == 400 and "step cap" in b.decisions[-1]
    # validation time counts: 2 s every 20 steps adds 0.1 s per step
    b = StepBudget(time_budget=100, max_steps=400, val_every=20)
    assert b.plan(elapsed=40, seconds_per_step=0.5, steps_done=3, validation_seconds=2.0) == 103


def test_budget_replans_from_the_longer_measurement():
    b = StepBudget(time_budget=100, max_steps=400, val_every=20)
    assert b.plan(elapsed=40, seconds_per_step=0.6, steps_done=3) == 103  # the probe: 60 s left / 0.6 s
    assert b.plan(elapsed=50, seconds_per_step=0.5, steps_done=20) == 120  # steps were cheaper: 50 s / 0.5 s more
    assert b.decisions[0].startswith("planned 103") and b.decisions[1].startswith("re-planned 120")
    assert "after 20 steps" in b.decisions[1]


def test_step_plan_counts_the_measured_validation_passes():
    from types import SimpleNamespace

    from MedSAGaLib.training import FinetuneConfig
    from MedSAGaLib.training.trainer import FinetuneResult, StepBudgetHook

    hook = StepBudgetHook(FinetuneConfig(time_budget=100, max_steps=400, val_every=20), has_validation=True)
    # the pass before training took 4 s: one every 20 steps adds 0.2 s to each (the steps themselves cost ~0)
    trainer = SimpleNamespace(result=FinetuneResult(timings={"validation": 4.0, "validation_passes": 1}),
                              total_steps=400, elapsed=lambda: 40.0)
    for step in range(1, 4):
        hook.on_step_end(trainer, {"step": step})
    assert hook.validation_seconds == 4.0
    assert 290 <= trainer.total_steps <= 303  # 60 s left / 0.2 s; without it, the cap of 400


def test_step_plan_is_made_again_from_the_steady_steps(monkeypatch):
    """Slow first steps (one-off costs) must not cut the run short: the last plan, at LATE_REPLAN_STEPS, uses
    only the steps after REPLAN_STEPS."""
    from types import SimpleNamespace

    from MedSAGaLib.training import FinetuneConfig, trainer as trainer_module
    from MedSAGaLib.training.budget import LATE_REPLAN_STEPS, REPLAN_STEPS
    from MedSAGaLib.training.trainer import FinetuneResult, StepBudgetHook

    clock = {"now": 0.0}
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock["now"])
    hook = StepBudgetHook(FinetuneConfig(time_budget=240, max_steps=400, val_every=20), has_validation=False)
    trainer = SimpleNamespace(result=FinetuneResult(), total_steps=400, elapsed=lambda: 20.0 + clock["now"])
    for step in range(1, LATE_REPLAN_STEPS + 1):
        clock["now"] += 1.2 if step <= REPLAN_STEPS else 0.96  # 20 s preparing, then 1.2 s steps, then 0.96 s
        hook.on_step_end(trainer, {"step": step})
    decisions = hook.budget.decisions
    assert len(decisions) == 3 and "after 60 steps" in decisions[2] and "0.96 s per step" in decisions[2]
    left = 240 - (20 + 20 * 1.2 + 40 * 0.96)
    assert trainer.total_steps == LATE_REPLAN_STEPS + int(left / 0.96)  # more than the plan from step 20
    assert trainer.total_steps > int(decisions[1].split()[1])


def test_budget_stops_on_patience_after_min_steps_only():
    b = StepBudget(time_budget=100, max_steps=400, patience=2, min_steps=60, val_every=20)
    b.planned_steps = 400
    for step, score in [(20, 0.3), (40, 0.5), (60, 0.502), (80, 0.49)]:
        b.observe(step, score)
        assert not b.finished(step) or step == 80
    assert b.finished(80) and "stopped improving" in b.stop_reason and "40" in b.stop_reason
    b = StepBudget(time_budget=100, max_steps=400, patience=1, min_steps=60, val_every=20)
    b.planned_steps = 400
    b.observe(20, 0.5)
    b.observe(40, 0.4)  # no gain, but before min_steps: keeps going
    assert not b.finished(40)


def test_budget_stops_when_time_runs_out_or_plan_is_done():
    b = StepBudget(time_budget=100, max_steps=400)
    assert not b.out_of_time(elapsed=90, seconds_per_step=5)
    assert b.out_of_time(elapsed=97, seconds_per_step=5) and "time budget" in b.stop_reason
    b = StepBudget(time_budget=100, max_steps=400)
    b.planned_steps = 50
    assert not b.finished(49) and b.finished(50) and "planned 50" in b.stop_reason


# ------------------------------------------------------------------------------ stuck classes
def test_stuck_class_is_named_with_advice():
    lab = np.zeros((50, 50), np.uint8)
    lab[:20, :20] = 1
    lab[30:32, 30:32] = 2
    msgs = stuck_classes({"big": 0.9, "tiny": 0.0}, [lab, lab], ["big", "tiny"], val_labels=[lab])
    assert len(msgs) == 1 and "'tiny' was not learned" in msgs[0] and "paint it on more slices" in msgs[0]
    assert stuck_classes({"big": 0.9, "tiny": 0.6}, [lab], ["big", "tiny"], val_labels=[lab]) == []
    # a class absent from every held-out slice cannot be checked: said so, not silently passed
    only_big = (lab == 1).astype(np.uint8)
    msgs = stuck_classes({"big": 0.9, "tiny": float("nan")}, [lab], ["big", "tiny"], val_labels=[only_big])
    assert len(msgs) == 1 and "could not be checked" in msgs[0]


def test_class_balance_weights_favour_rare_classes():
    from MedSAGaLib.training.trainer import class_balance_weights

    lab = np.zeros((100, 100), np.uint8)
    lab[:30] = 1
    lab[50:52, :5] = 2
    w = class_balance_weights([lab], 2)
    assert math.isclose(np.mean(w), 1.0) and w[2] > w[1] > w[0]
    assert max(w) <= 10 * min(w) + 1e-9


# ------------------------------------------------------------------------------ the trainer, tiny model
def _blobs(n=4, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint8)
        y, x = rng.integers(20, 30, size=2)
        lab[y : y + 8, x : x + 8] = 1
        lab[y + 10 : y + 14, x : x + 6] = 2
        images.append(np.clip(0.2 + 0.5 * (lab == 1) + 0.3 * (lab == 2) + 0.05 * rng.standard_normal(lab.shape), 0, 1)
                      .astype(np.float32))
        labels.append(lab)
    return images, labels


def test_adaptive_run_decides_crops_stops_and_reports(tiny_model_file, tmp_path):
    from MedSAGaLib.inference import predict_slices
    from MedSAGaLib.modelfile import load_model, save_model
    from MedSAGaLib.training import FinetuneConfig, finetune

    torch.manual_seed(0)
    seg = load_model(tiny_model_file, class_names=["left", "right"])
    images, labels = _blobs()
    config = FinetuneConfig(method="decoder", batch_size=2, augment_copies=1, time_budget=3600, max_steps=8, val_every=2,
                            patience=1, device="cpu")
    result = finetune(seg, images[:3], labels[:3], config, images[3:], labels[3:])
    text = " | ".join(result.decisions)
    assert "cropping to rows" in text and "planned 8 steps" in text and "step cap" in text
    assert result.steps_done == 8 and result.stop_reason == "reached the planned 8 steps" and result.roi is not None
    # every class got a verdict: either learned or named with advice
    named = {w.split("'")[1] for w in result.warnings}
    assert all(result.val_dice[c] > 0.05 or c in named for c in ["left", "right"])
    # the crop travels with the model file and is applied when segmenting; outside it is background
    path = tmp_path / "m.medsaga"
    save_model(path, seg, {"training": result.metadata()})
    again = load_model(path)
    assert again.roi == seg.roi
    pred = predict_slices(again, [images[3]])[0]
    roi = again.roi
    outside = np.ones(pred.shape, bool)
    outside[roi.y0 : roi.y1, roi.x0 : roi.x1] = False
    assert pred.shape == images[3].shape and not pred[outside].any()


def test_nearest_slice_baseline_copies_the_closest_painted_labels():
    from MedSAGaLib.baselines import copy_nearest_slices, nearest_painted

    painted = {10: np.full((3, 4), 1, np.uint8), 20: np.full((3, 4), 2, np.uint8)}
    out = copy_nearest_slices(painted, [0, 14, 15, 16, 30])
    assert out.shape == (5, 3, 4) and [int(s[0, 0]) for s in out] == [1, 1, 1, 2, 2]  # a tie takes the lower slice
    assert nearest_painted([20, 10], 15) == 10
    with pytest.raises(ValueError, match="differ in shape"):
        copy_nearest_slices({1: np.zeros((2, 2)), 2: np.zeros((3, 3))}, [1])
    with pytest.raises(ValueError, match="No painted slice"):
        copy_nearest_slices({}, [1])


def test_with_nothing_held_out_a_class_is_judged_on_its_own_painted_slices():
    lab = np.zeros((8, 8), np.uint8)
    lab[:6, :6] = 1
    lab[7, 7] = 2
    msgs = stuck_classes({"big": 0.9, "tiny": 0.3}, [lab], ["big", "tiny"], on_training_slices=True)
    assert len(msgs) == 1 and "'tiny' was not learned (Dice 0.30 on the very slices it was painted on" in msgs[0]
    assert stuck_classes({"big": 0.9, "tiny": 0.6}, [lab], ["big", "tiny"], on_training_slices=True) == []
    # the held-out check keeps its own, lower bar
    assert stuck_classes({"big": 0.9, "tiny": 0.3}, [lab], ["big", "tiny"], val_labels=[lab]) == []


def test_a_thinly_painted_class_is_named_even_when_it_fits():
    # colin27_aal_lr's amygdalae: 50 and 130 painted pixels, fit their painted slices, missed elsewhere
    lab = np.zeros((40, 40), np.uint8)
    lab[:20, :20] = 1  # 400 pixels per slice
    lab[30:35, 30:35] = 2  # 25 pixels per slice
    msgs = thinly_painted_classes([lab, lab], ["big", "small"])
    assert len(msgs) == 1 and "'small' is painted on only 50 pixels (2 slice(s))" in msgs[0] and "largest" in msgs[0]
    assert thinly_painted_classes([lab] * 6, ["big", "small"]) == []  # 150 pixels: enough
    assert MIN_PAINTED_PIXELS == 150
    # a class already named (not learned) is not named twice; an unpainted class is check_training_data's to refuse
    assert thinly_painted_classes([lab, lab], ["big", "small"], named=["'small' was not learned ..."]) == []
    assert thinly_painted_classes([(lab == 1).astype(np.uint8)], ["big", "small"]) == []


def test_run_with_nothing_held_out_checks_each_class_on_the_painted_slices(tiny_model_file):
    from MedSAGaLib.modelfile import load_model
    from MedSAGaLib.training import FinetuneConfig, finetune

    torch.manual_seed(0)
    seg = load_model(tiny_model_file, class_names=["left", "right"])
    images, labels = _blobs(3)
    config = FinetuneConfig(method="decoder", batch_size=2, augment_copies=2, time_budget=3600, max_steps=4, device="cpu")
    result = finetune(seg, images, labels, config)
    assert "no held-out painted slice" in " | ".join(result.decisions)
    assert set(result.train_dice) == {"left", "right"} and result.metadata()["train_dice"] == result.train_dice
    named = {w.split("'")[1] for w in result.warnings}
    assert all(result.train_dice[c] >= 0.5 or c in named for c in ["left", "right"])
    assert all("on the very slices it was painted on" in w or "is painted on only" in w for w in result.warnings)
    # "right" is painted on 72 pixels in all: named, once, whether or not it fit its painted slices
    assert sum("'right'" in w for w in result.warnings) == 1
