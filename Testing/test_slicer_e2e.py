"""End to end through the bridge with real MRML (slicer-core) and the real ``medsaga`` CLI in a
separate process: volume node + painted slices -> fine-tune (few steps) -> segment volume ->
k segments, annotated slices unchanged, one undo step restores the previous state."""
import os
import sys

import numpy as np
import pytest

import slicer  # slicer-core is a test dependency: missing, these tests must fail, not skip
import torch  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from MedSAGaBridgeLib import BridgeError, ClassMismatchError, jobs, prompts, segments  # noqa: E402
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
    names, _, _ = jobs.model_summary(model_path)
    assert names == class_names
    bound = jobs.start_segment(vol, seg, model_path, names, ann, str(workdir), slices=todo, device="cpu", threads=1)
    # the drawn slices go along as --painted, in the model's class order: kept, and leaned on between them
    painted = bound.job.cmd[bound.job.cmd.index("--painted") + 1]
    assert np.array_equal(jobs.read_labels(painted, vol), drawn)
    assert bound.job.wait(600) == "done", bound.job.error_text(30)
    predicted = jobs.read_labels(bound.context["labelmap"], vol)  # read before finish() deletes it
    assert np.array_equal(predicted[ANNOTATED], drawn[ANNOTATED])
    session = segments.EditSession(seg, vol)
    outcome = bound.finish(lambda segmentation, volume, masking: session)
    assert outcome.state == "done" and not os.path.exists(str(workdir))
    assert [n for _, n in segments.segments(seg)] == class_names  # k segments, no extra ones
    after = segments.class_labels(seg, vol, axis=0).labels
    for s in ANNOTATED:
        assert np.array_equal(after[s], drawn[s]), f"annotated slice {s} changed"
    assert np.array_equal(after[todo], predicted[todo])
    session.undo()
    for sid, b in zip(ids, before):
        assert np.array_equal(segments.segment_array(seg, sid, vol), b)
    return after


def test_segment_volume_in_background_process(tmp_path, tiny_model_file):
    """The segment half, with the engine tests' untrained 2-class model file (tiny ViT, fast)."""
    names, _, _ = jobs.model_summary(str(tiny_model_file))
    scene, vol, seg, ids, truth, drawn = painted_scene(class_names=names)
    segment_and_check(vol, seg, ids, drawn, str(tiny_model_file), tmp_path / "job", class_names=names)
    # a model whose classes do not match the segments: a clear error before any job starts
    seg.GetSegmentation().GetSegment(ids[1]).SetName("liver")
    with pytest.raises(ClassMismatchError, match="no segment named"):
        jobs.start_segment(vol, seg, str(tiny_model_file), names, segments.class_labels(seg, vol), str(tmp_path))


def test_finetune_then_segment_through_the_bridge(tmp_path, tiny_vit_checkpoint):
    """GaLore (the default method) on the engine tests' tiny vit_b-format checkpoint: fast on a CPU.
    Progress: trainer -> CLI JSON lines -> the bridge's progress text (MedSAGaLib.events)."""
    from MedSAGaLib.events import describe
    scene, vol, seg, ids, truth, drawn = painted_scene()
    model_path = str(tmp_path / "adapted.medsaga")
    bound = jobs.start_finetune(vol, seg, model_path, str(tmp_path / "ft"), steps=2, base="vit_b",
                                checkpoint=str(tiny_vit_checkpoint), image_size=224, method="galore", rank=4,
                                device="cpu", threads=1)
    assert bound.context["inputs"].slices == ANNOTATED
    assert bound.job.wait(900) == "done", bound.job.error_text(40)
    steps = jobs.step_events(bound.job.events)
    assert steps, "no JSON step lines: " + bound.job.error_text(10)
    last = steps[-1]
    for key in ("step", "steps", "loss", "lr", "elapsed", "eta"):
        assert key in last, key
    assert last["steps"] == 2 and last["step"] == 2
    assert bound.job.events[-1].get("event") == "done"
    assert all(describe(e) for e in bound.job.events)
    assert bound.job.progress_text().startswith("done: 2 steps")
    outcome = bound.finish()
    assert outcome.model_path == model_path and os.path.isfile(model_path)
    assert not os.path.exists(str(tmp_path / "ft"))
    text = jobs.describe_model(model_path)
    assert "Classes: outer, inner" in text and "galore, 2 steps" in text and "vit_b" in text
    segment_and_check(vol, seg, ids, drawn, model_path, tmp_path / "seg")


def test_effect_segments_the_current_slice_in_process(tiny_model_file):
    """The effect's one-slice action, in process, masking-aware, one undo step."""
    import torch
    torch.set_num_threads(1)
    from MedSAGaLib.modelfile import load_model
    segmenter = load_model(str(tiny_model_file)).eval()
    names = list(segmenter.class_names)
    scene, vol, seg, ids, truth, drawn = painted_scene(class_names=names)
    session = segments.EditSession(seg, vol)
    assert prompts.segment_slice_with_model(seg, vol, segmenter, 0, ANNOTATED[0], session=session) == ([], {})
    slices, written = prompts.segment_slice_with_model(seg, vol, segmenter, 0, 2, session=session)
    assert slices == [2] and sorted(written) == sorted(names)
    after = segments.class_labels(seg, vol, axis=0).labels
    assert np.array_equal(np.delete(after, 2, axis=0), np.delete(drawn, 2, axis=0))  # only slice 2 changed
    # as the Segment volume job (--painted), the drawn slices 1 and 4 (3 mm apart) are leaned on: the slice is
    # what segment_volume gives with them, and not what the model alone gives
    from MedSAGaLib.inference import segment_volume
    from MedSAGaLib.painted import PaintedSlices
    array01 = prompts.normalized_array(vol, segmenter.metadata.get("preprocessing"))
    with_painted = segment_volume(segmenter, array01, 0, [2], None, "cpu", False,
                                  painted=PaintedSlices(drawn, 0, len(names), 3.0))
    alone = segment_volume(segmenter, array01, 0, [2], None, "cpu", False)
    assert np.array_equal(after[2], with_painted[2]) and not np.array_equal(after[2], alone[2])
    session.undo()
    assert np.array_equal(segments.class_labels(seg, vol, axis=0).labels, drawn)
    seg.GetSegmentation().GetSegment(ids[0]).SetName("liver")
    with pytest.raises(ClassMismatchError):
        prompts.segment_slice_with_model(seg, vol, segmenter, 0, 2, session=session)


def test_effect_box_prompt_and_propagation_job_with_litemedsam(tmp_path):
    """Box prompt from the segment's box on one slice (in process), then propagation as a background
    job, with real LiteMedSAM."""
    import torch
    torch.set_num_threads(1)
    from MedSAGaLib.models import build_base_model
    scene, vol, seg, ids, truth, drawn = painted_scene(shape=(4, 48, 48), annotated=[])
    inner = ids[1]
    stroke = np.zeros_like(truth)
    stroke[1] = truth[1] == 2
    paint(seg, inner, vol, stroke)  # only slice 1 painted for this segment
    predict = prompts.box_predictor(build_base_model("litemedsam").eval())
    session = segments.EditSession(seg, vol)
    written = prompts.box_prompt(seg, vol, inner, predict, prompts.normalized_array(vol), 0, 1, margin=2,
                                 session=session)
    assert written == [1]
    mask = segments.segment_array(seg, inner, vol)[1].astype(bool)
    target = truth[1] == 2
    dice = 2 * (mask & target).sum() / (mask.sum() + target.sum())
    assert dice > 0.6, dice
    bound = prompts.start_propagation(seg, vol, inner, 0, 1, margin=2, max_slices=1, workdir=str(tmp_path / "job"),
                                      threads=1)
    assert bound.job.wait(600) == "done", bound.job.error_text(30)
    assert bound.job.step_fraction()[0] == 3  # slices 1, 2 and 0 prompted
    outcome = bound.finish(lambda segmentation, volume, masking: session)
    assert outcome.written == {"slices": [0, 2]}  # slice 1 already holds the segment: kept
    result = segments.segment_array(seg, inner, vol).astype(bool)
    assert result[0].any() and result[2].any() and not result[3].any()
    assert np.array_equal(result[1], mask)
    session.undo()
    assert np.array_equal(segments.segment_array(seg, inner, vol).astype(bool), np.stack(
        [np.zeros_like(mask), mask, np.zeros_like(mask), np.zeros_like(mask)]))
    with pytest.raises(BridgeError, match="empty on slice 3"):
        prompts.start_propagation(seg, vol, inner, 0, 3, workdir=str(tmp_path))


@pytest.mark.skipif(os.name == "nt", reason="POSIX launcher script")
def test_cancel_behind_a_launcher_stops_training_and_keeps_the_best_model(tmp_path, tiny_vit_checkpoint):
    """The real CLI fine-tune started through a launcher like PythonSlicer (which forwards no
    signals): Cancel stops the training process itself, the launcher ends, the best model is kept."""
    import time
    from test_slicer_bridge import LAUNCHER, alive
    launcher = tmp_path / "launcher"
    launcher.write_text(LAUNCHER % sys.executable)
    launcher.chmod(0o755)
    scene, vol, seg, ids, truth, drawn = painted_scene()
    model_path = str(tmp_path / "cancelled.medsaga")
    bound = jobs.start_finetune(vol, seg, model_path, str(tmp_path / "ft"), steps=500, base="vit_b",
                                checkpoint=str(tiny_vit_checkpoint), image_size=224, method="galore", rank=4,
                                device="cpu", threads=1, python=str(launcher))
    job = bound.job
    deadline = time.time() + 300
    while time.time() < deadline and not jobs.step_events(job.events):
        job.poll()
        assert job.state == "running", job.error_text(30)
        time.sleep(0.2)
    assert jobs.step_events(job.events), "no step within 300 s"
    child = int(open(os.path.join(job.workdir, "child.pid")).read())
    job.cancel()
    assert job.wait(300) == "cancelled"
    assert not alive(job.process.pid) and not alive(child)
    done = job.events[-1]
    assert done.get("event") == "done" and done.get("stopped") and done["steps"] < 500
    outcome = bound.finish()
    assert outcome.state == "cancelled" and outcome.model_path == model_path
    names, _, meta = jobs.model_summary(model_path)
    assert names == CLASSES
