"""End to end through the bridge with real MRML (slicer-core) and the real ``medsaga`` CLI in a
separate process: volume node + painted slices -> fine-tune (few steps) -> segment volume ->
k segments, annotated slices unchanged, one undo step restores the previous state."""
import importlib.util
import os
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from MedSAGaBridgeLib import BridgeError, ClassMismatchError, geometry, jobs, prompts, propagation, segments  # noqa: E402
from test_slicer_bridge import add_segmentation, add_volume, make_scene, paint  # noqa: E402

pytestmark = pytest.mark.slow
CLASSES = ["outer", "inner"]
ANNOTATED = [1, 4]


def painted_scene(shape=(6, 48, 48), class_names=CLASSES, annotated=ANNOTATED):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt(((j - 24) / 48) ** 2 + ((i - 24) / 48) ** 2) + 0.01 * k
    truth = np.zeros(shape, np.uint8)
    truth[r < 0.38] = 1
    truth[r < 0.18] = 2
    image = truth * 400.0 + 50 + np.random.default_rng(0).normal(0, 10, shape)
    scene = make_scene()
    vol = add_volume(scene, image.astype(np.float32), directions=np.diag([-1, -1, 1]), spacing=(1, 1, 3))
    seg, ids = add_segmentation(scene, vol, class_names)
    drawn = np.zeros_like(truth)
    for s in annotated:
        drawn[s] = truth[s]
    for c, sid in enumerate(ids, start=1):
        paint(seg, sid, vol, drawn == c)
    return scene, vol, seg, ids, truth, drawn


def segment_and_check(vol, seg, ids, drawn, model_path, workdir, class_names=CLASSES):
    ann = segments.class_labels(seg, vol)
    assert ann.slices == ANNOTATED and ann.axis == 0
    before = [segments.segment_array(seg, sid, vol) for sid in ids]
    todo = [s for s in range(drawn.shape[0]) if s not in ann.slices]
    job, labelmap = jobs.start_segment(vol, model_path, str(workdir), axis=ann.axis, slices=todo,
                                         device="cpu", threads=1)
    assert job.wait(600) == "done", job.error_text(30)
    names, _, _ = jobs.model_summary(model_path)
    assert names == class_names
    undo = segments.EditSession(seg, vol)
    bridge.apply_segment_result(seg, vol, labelmap, names, ann.axis, ann.slices, undo=undo)
    assert [n for _, n in segments.segments(seg)] == class_names  # k segments, no extra ones
    after = segments.class_labels(seg, vol, axis=0).labels
    for s in ANNOTATED:
        assert np.array_equal(after[s], drawn[s]), f"annotated slice {s} changed"
    predicted = jobs.read_labels(labelmap, vol)
    assert np.array_equal(after[todo], predicted[todo])
    undo.undo()
    for sid, b in zip(ids, before):
        assert np.array_equal(segments.segment_array(seg, sid, vol), b)
    return after


def test_segment_volume_in_background_process(tmp_path, tiny_model_file):
    """The segment half, with the engine tests' untrained 2-class model file (tiny ViT, fast)."""
    names, _, _ = jobs.model_summary(str(tiny_model_file))
    scene, vol, seg, ids, truth, drawn = painted_scene(class_names=names)
    segment_and_check(vol, seg, ids, drawn, str(tiny_model_file), tmp_path, class_names=names)
    # a model whose classes do not match the segments: a clear error, nothing written
    seg.GetSegmentation().GetSegment(ids[1]).SetName("liver")
    with pytest.raises(ClassMismatchError, match="no segment named"):
        bridge.apply_segment_result(seg, vol, str(tmp_path / "result-labels.nrrd"), names, 0, ANNOTATED)


@pytest.mark.skipif(importlib.util.find_spec("MedSAGaLib.cli_train") is None,
                    reason="medsaga finetune (MedSAGaLib/cli_train.py, issue 3) has not landed yet")
def test_finetune_then_segment_through_the_bridge(tmp_path, tiny_vit_checkpoint):
    """GaLore (the default method) on the engine tests' tiny vit_b-format checkpoint: fast on a CPU."""
    scene, vol, seg, ids, truth, drawn = painted_scene()
    model_path = str(tmp_path / "adapted.medsaga")
    job, inputs = jobs.start_finetune(vol, seg, model_path, str(tmp_path / "ft"), steps=2,
                                        base="vit_b", checkpoint=str(tiny_vit_checkpoint), image_size=224,
                                        method="galore", rank=4, device="cpu", threads=1)
    assert inputs.slices == ANNOTATED
    state = job.wait(900)
    assert state == "done", job.error_text(40)
    steps = bridge.step_records(job.records)
    assert steps, "no JSON step lines: " + job.error_text(10)
    last = steps[-1]
    for key in ("step", "steps", "loss", "lr", "elapsed", "eta"):
        assert key in last, key
    assert last["steps"] == 2 and last["step"] == 2
    assert job.records[-1].get("event") == "done"
    assert all(bridge.progress_text(r) for r in job.records)
    assert os.path.isfile(model_path)
    text = jobs.describe_model(model_path)
    assert "Classes: outer, inner" in text and "galore, 2 steps" in text and "vit_b" in text
    segment_and_check(vol, seg, ids, drawn, model_path, tmp_path)


def test_effect_segments_current_slice_and_all_slices_in_process(tiny_model_file):
    """The effect's adapted-model actions, in process, with the Segment Editor logic's undo."""
    import torch
    torch.set_num_threads(1)
    from MedSAGaLib.modelfile import load_model
    segmenter = load_model(str(tiny_model_file)).eval()
    names = list(segmenter.class_names)
    scene, vol, seg, ids, truth, drawn = painted_scene(class_names=names)
    undo = segments.EditSession(seg, vol)
    assert bridge.segment_with_model(seg, vol, segmenter, 0, ANNOTATED[0], undo=undo) == ([], {})
    slices, written = bridge.segment_with_model(seg, vol, segmenter, 0, 2, undo=undo)
    assert slices == [2] and sorted(written) == sorted(names)
    slices, _ = bridge.segment_with_model(seg, vol, segmenter, undo=undo)
    assert slices == [0, 2, 3, 5]
    after = segments.class_labels(seg, vol, axis=0).labels
    for s in ANNOTATED:
        assert np.array_equal(after[s], drawn[s])
    undo.undo()
    undo.undo()
    assert np.array_equal(segments.class_labels(seg, vol, axis=0).labels, drawn)
    seg.GetSegmentation().GetSegment(ids[0]).SetName("liver")
    with pytest.raises(ClassMismatchError):
        bridge.segment_with_model(seg, vol, segmenter, undo=undo)


def test_effect_box_prompt_and_propagation_with_litemedsam():
    """Box prompt from the segment's box on one slice, then propagation, with real LiteMedSAM."""
    import torch
    torch.set_num_threads(1)
    from MedSAGaLib.models import build_base_model
    scene, vol, seg, ids, truth, drawn = painted_scene(shape=(4, 48, 48), annotated=[])
    inner = ids[1]
    stroke = np.zeros_like(truth)
    stroke[1] = truth[1] == 2
    paint(seg, inner, vol, stroke)  # only slice 1 painted for this segment
    base = build_base_model("litemedsam").eval()
    predict = prompts.box_predictor(vol, base)
    array01 = prompts.normalized_array(vol)
    undo = segments.EditSession(seg, vol)
    saved = []
    written = prompts.box_prompt(seg, vol, inner, predict, array01, 0, 1, margin=2, undo=undo,
                                before_write=lambda: saved.append(1))
    assert written == [1] and saved == [1]
    mask = segments.segment_array(seg, inner, vol)[1].astype(bool)
    target = truth[1] == 2
    dice = 2 * (mask & target).sum() / (mask.sum() + target.sum())
    assert dice > 0.6, dice
    written = prompts.box_prompt(seg, vol, inner, predict, array01, 0, 1, propagate_slices=1,
                                margin=2, undo=undo)
    assert written == [0, 2]  # slice 1 already holds the segment: kept
    result = segments.segment_array(seg, inner, vol).astype(bool)
    assert result[0].any() and result[2].any() and not result[3].any()
    undo.undo()
    assert np.array_equal(segments.segment_array(seg, inner, vol).astype(bool), np.stack(
        [np.zeros_like(mask), mask, np.zeros_like(mask), np.zeros_like(mask)]))
    with pytest.raises(BridgeError, match="empty on slice 3"):
        prompts.box_prompt(seg, vol, inner, predict, array01, 0, 3)


def test_cancel_keeps_the_last_good_model(tmp_path, tiny_vit_checkpoint):
    import time
    scene, vol, seg, ids, truth, drawn = painted_scene()
    model_path = str(tmp_path / "cancelled.medsaga")
    job, _ = jobs.start_finetune(vol, seg, model_path, str(tmp_path / "ft"), steps=500,
                                   base="vit_b", checkpoint=str(tiny_vit_checkpoint), image_size=224,
                                   method="galore", rank=4, device="cpu", threads=1)
    deadline = time.time() + 300
    while time.time() < deadline and not bridge.step_records(job.records):
        job.poll()
        assert job.state == "running", job.error_text(30)
        time.sleep(0.2)
    assert bridge.step_records(job.records), "no step within 300 s"
    job.cancel()
    assert job.wait(300) == "cancelled"
    done = job.records[-1]
    assert done.get("event") == "done" and done.get("stopped") and done["steps"] < 500
    names, _, meta = jobs.model_summary(model_path)
    assert names == CLASSES
