"""Masking-aware writes, one-step undo and job results bound to their nodes, against real MRML
(slicer-core: vtkSlicerSegmentEditorLogic is the code the Segment Editor's effects write through)."""
import os
import sys

import numpy as np
import pytest

import slicer  # slicer-core is a test dependency: missing, these tests must fail, not skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from MedSAGaBridgeLib import jobs, segments  # noqa: E402
from test_slicer_bridge import add_segmentation, add_volume, make_scene, paint  # noqa: E402

SHAPE = (4, 12, 12)


def scene_with(names=("a", "b", "other")):
    scene = make_scene()
    image = np.zeros(SHAPE, np.float32)
    image[:, :, 6:] = 100.0  # right half bright
    vol = add_volume(scene, image)
    seg, ids = add_segmentation(scene, vol, list(names))
    return scene, vol, seg, ids


def fill_prediction(value=1):
    prediction = np.zeros(SHAPE, np.uint8)
    prediction[1:3] = value
    return prediction


def test_editable_intensity_range_is_honoured():
    scene, vol, seg, ids = scene_with()
    masking = segments.Masking(intensity_mask=True, intensity_range=(50.0, 200.0))
    written = segments.apply_prediction(seg, vol, fill_prediction(), ["a"], 0,
                                        session=segments.EditSession(seg, vol, masking))
    a = segments.segment_array(seg, ids[0], vol)
    assert a[1:3, :, 6:].all() and not a[:, :, :6].any()  # only the editable intensities
    assert written["a"] == int(fill_prediction().sum())  # what the model said, for the panel


def test_editable_area_and_overwrite_settings_are_honoured():
    scene, vol, seg, ids = scene_with()
    other = np.zeros(SHAPE, np.uint8)
    other[1:3, 0:4, :] = 1
    paint(seg, ids[2], vol, other)
    # the default: other segments untouched (overlap allowed)
    segments.apply_prediction(seg, vol, fill_prediction(), ["a"], 0)
    assert np.array_equal(segments.segment_array(seg, ids[2], vol), other)
    assert segments.segment_array(seg, ids[0], vol)[1:3].all()
    # overwrite all segments: the fill takes the voxels of "other"
    masking = segments.Masking(overwrite_mode=slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    segments.apply_prediction(seg, vol, fill_prediction(), ["b"], 0, session=segments.EditSession(seg, vol, masking))
    assert not segments.segment_array(seg, ids[2], vol).any()
    # editable area "outside all segments": nothing where a or b already are
    scene, vol, seg, ids = scene_with()
    paint(seg, ids[2], vol, other)
    masking = segments.Masking(mask_mode=slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    segments.apply_prediction(seg, vol, fill_prediction(), ["a"], 0, session=segments.EditSession(seg, vol, masking))
    a = segments.segment_array(seg, ids[0], vol)
    assert not (a & other).any() and a[1:3, 4:].all()


def test_masking_follows_the_segment_editor_only_for_its_segmentation():
    scene, vol, seg, ids = scene_with()
    editor = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(50, 200)
    assert segments.editor_masking(editor, seg) == segments.Masking()  # the editor edits another segmentation
    editor.SetAndObserveSegmentationNode(seg)
    assert segments.editor_masking(editor, seg).intensity_mask
    assert segments.editor_masking(None, seg) == segments.Masking()


def test_one_undo_step_through_an_outside_undo_stack():
    """With the Segment Editor's own stack (save_state), the whole multi-class fill is one step on it."""
    scene, vol, seg, ids = scene_with()
    editor_history = segments.EditSession(seg, vol)  # stands for the editor widget's logic
    saves = []

    def save_state():
        saves.append(1)
        editor_history.save()

    session = segments.EditSession(seg, vol, save_state=save_state)
    prediction = fill_prediction()
    prediction[2] = 2
    segments.apply_prediction(seg, vol, prediction, ["a", "b"], 0, session=session)
    assert saves == [1] and not session.can_undo()
    assert segments.segment_array(seg, ids[1], vol)[2].all()
    editor_history.undo()
    assert not segments.segment_array(seg, ids[0], vol).any() and not segments.segment_array(seg, ids[1], vol).any()


def test_failed_apply_saves_no_undo_state():
    scene, vol, seg, ids = scene_with()
    session = segments.EditSession(seg, vol)
    with pytest.raises(segments.ClassMismatchError):
        segments.apply_prediction(seg, vol, fill_prediction(), ["liver"], 0, session=session)
    assert not session.can_undo()


# ------------------------------------------------------------------- results bound to their nodes

def finished_segment_job(tmp_path, vol, seg, prediction):
    """A real (trivial) process standing in for `medsaga segment`, its labelmap written beforehand."""
    workdir = tmp_path / "job"
    workdir.mkdir()
    labelmap = jobs.write_labels(prediction, vol, str(workdir / "result-labels.nrrd"))
    (tmp_path / "donejob.py").write_text("def main(argv):\n    return 0\n")
    job = jobs.Job("donejob", [], str(workdir), env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert job.wait(60) == "done", job.error_text()
    ann = segments.class_labels(seg, vol, axis=0)
    return jobs.BoundJob(job, "segment", vol, seg, labelmap=labelmap, class_names=["a", "b"], axis=0,
                         annotated=ann.slices, slices=None), workdir


def test_job_result_goes_to_the_nodes_it_was_started_with(tmp_path):
    scene, vol, seg, ids = scene_with(("a", "b"))
    other_vol = add_volume(scene, np.zeros(SHAPE, np.float32), name="selected later")
    other_seg, other_ids = add_segmentation(scene, other_vol, ["a", "b"])
    bound, workdir = finished_segment_job(tmp_path, vol, seg, fill_prediction())
    # the user selects other nodes while the job runs; the result still goes to the job's own
    outcome = bound.finish()
    assert outcome.state == "done" and outcome.written["a"] > 0
    assert segments.segment_array(seg, ids[0], vol)[1:3].all()
    assert not segments.segment_array(other_seg, other_ids[0], other_vol).any()
    assert not workdir.exists()  # the work folder (a copy of the volume) is gone
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 0  # no hidden node left behind


def test_job_result_is_discarded_when_its_nodes_are_gone(tmp_path):
    scene, vol, seg, ids = scene_with(("a", "b"))
    bound, workdir = finished_segment_job(tmp_path, vol, seg, fill_prediction())
    scene.Clear(0)  # scene closed while the job ran
    vol2 = add_volume(scene, np.zeros(SHAPE, np.float32))  # may reuse the same node IDs
    seg2, ids2 = add_segmentation(scene, vol2, ["a", "b"])
    outcome = bound.finish()
    assert outcome.state == "discarded" and "no longer in the scene" in outcome.text
    assert not segments.segment_array(seg2, ids2[0], vol2).any()
    assert not workdir.exists()
