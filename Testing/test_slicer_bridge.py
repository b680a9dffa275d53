"""MedSAGaBridge against real MRML (slicer-core): no mocks of the scene or the nodes."""
import math
import os
import sys
import textwrap

import numpy as np
import pytest

import slicer  # slicer-core is a test dependency: missing, these tests must fail, not skip
import vtk
from vtk.util import numpy_support  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "MedSAGaSlicer", "MedSAGa"))
from MedSAGaBridgeLib import BridgeError, ClassMismatchError, geometry, jobs, propagation, segments  # noqa: E402


# ------------------------------------------------------------------------------ helpers

def rotation(axis, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    m = np.eye(3)
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def make_scene():
    scene = slicer.vtkMRMLScene()
    segments.segmentations_logic(scene)  # module logic attached before segments are created
    return scene


def add_volume(scene, array_kji, directions=np.eye(3), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0),
               name="vol"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    k, j, i = array_kji.shape
    img = vtk.vtkImageData()
    img.SetDimensions(i, j, k)
    img.AllocateScalars(vtk.VTK_FLOAT, 1)
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = \
        np.ascontiguousarray(array_kji, np.float32).ravel()
    node.SetAndObserveImageData(img)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    dm = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            dm.SetElement(r, c, float(directions[r][c]))
    node.SetIJKToRASDirectionMatrix(dm)
    return node


def add_segmentation(scene, volume, names, geometry_volume=None):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(geometry_volume or volume)
    ids = [seg.GetSegmentation().AddEmptySegment("", n) for n in names]
    return seg, ids


def paint(seg, segment_id, volume, mask_kji):
    """Set a segment from a (k, j, i) mask on ``volume``'s grid (as the Paint effect would)."""
    img = geometry.oriented_image(mask_kji.astype(np.uint8), geometry.ijk_to_ras(volume))
    logic = segments.segmentations_logic(seg.GetScene())
    assert logic.SetBinaryLabelmapToSegment(img, seg, segment_id, logic.MODE_REPLACE, img.GetExtent())


def phantom(shape=(12, 24, 20)):
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [n / 2 for n in shape]
    r = np.sqrt(((k - c[0]) / shape[0]) ** 2 + ((j - c[1]) / shape[1]) ** 2 + ((i - c[2]) / shape[2]) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 0.42] = 1
    labels[r < 0.22] = 2
    image = labels * 100.0 + np.random.default_rng(0).normal(0, 5, shape)
    return image.astype(np.float32), labels


# ------------------------------------------------------------------------------ volumes and axes

def test_volume_array_and_axial_axis():
    scene = make_scene()
    image, _ = phantom()
    vol = add_volume(scene, image, directions=np.diag([-1, -1, 1]), spacing=(0.8, 0.8, 3.0))
    arr = geometry.volume_array(vol)
    assert arr.shape == image.shape and np.allclose(arr, image)
    axes = geometry.anatomical_axes(vol)
    assert axes == {"sagittal": 2, "coronal": 1, "axial": 0}
    assert geometry.acquisition_axis(vol) == 0
    assert geometry.resolve_axis(vol, "auto") == 0
    assert geometry.axis_name(vol, 0) == "axial"


def test_sagittal_volume_axes():
    scene = make_scene()
    image, _ = phantom()
    # I -> A, J -> S (inverted), K -> R: a sagittal acquisition
    directions = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)
    vol = add_volume(scene, image, directions=directions, spacing=(1, 1, 2.5))
    axes = geometry.anatomical_axes(vol)
    assert axes["sagittal"] == 0 and axes["axial"] == 1 and axes["coronal"] == 2
    assert geometry.resolve_axis(vol, "auto") == 0  # acquisition axis
    assert geometry.resolve_axis(vol, "axial") == 1


def test_oblique_volume_axes_are_distinct():
    scene = make_scene()
    image, _ = phantom()
    directions = rotation(0, 30) @ rotation(2, 20)
    vol = add_volume(scene, image, directions=directions)
    axes = geometry.anatomical_axes(vol)
    assert sorted(axes.values()) == [0, 1, 2]
    assert axes["axial"] == 0


def test_auto_axis_follows_the_annotations():
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image)
    seg, ids = add_segmentation(scene, vol, ["outer", "inner"])
    mask = np.zeros_like(truth)
    mask[:, :, [6, 13]] = truth[:, :, [6, 13]]  # painted on two sagittal (I) slices
    for c, sid in enumerate(ids, start=1):
        paint(seg, sid, vol, mask == c)
    ann = segments.class_labels(seg, vol)
    assert ann.axis == 2 and ann.slices == [6, 13]
    assert segments.class_labels(seg, vol, axis="axial").axis == 0


# ------------------------------------------------------------------------------ segmentation -> labels

def test_class_labels_slices_empty_and_overlap():
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image, directions=np.diag([-1, -1, 1]))
    seg, ids = add_segmentation(scene, vol, ["outer", "inner", "nothing"])
    painted = [3, 8]
    outer = np.zeros_like(truth)
    inner = np.zeros_like(truth)
    for s in painted:
        outer[s] = truth[s] >= 1  # outer includes inner: overlapping segments
        inner[s] = truth[s] == 2
    paint(seg, ids[0], vol, outer)
    paint(seg, ids[1], vol, inner)
    ann = segments.class_labels(seg, vol)
    assert ann.class_names == ["outer", "inner", "nothing"]
    assert ann.axis == 0 and ann.slices == painted
    assert ann.empty_segments == ["nothing"]
    assert ann.overlap_voxels == int(inner.sum())
    expected = np.zeros_like(truth)
    expected[outer.astype(bool)] = 1
    expected[inner.astype(bool)] = 2  # later segment wins
    assert np.array_equal(ann.labels, expected)


def test_class_labels_when_segmentation_geometry_differs():
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image, spacing=(1, 1, 2))
    # segmentation on a finer, shifted grid (half voxel size in-plane, same slices)
    fine = add_volume(scene, np.zeros((12, 48, 40), np.float32), spacing=(0.5, 0.5, 2),
                      origin=(-0.25, -0.25, 0), name="fine")
    seg, ids = add_segmentation(scene, vol, ["outer"], geometry_volume=fine)
    mask_fine = np.zeros((12, 48, 40), np.uint8)
    mask_fine[5, 10:30, 8:24] = 1  # 20x16 fine voxels = 10x8 coarse voxels
    paint(seg, ids[0], fine, mask_fine)
    ann = segments.class_labels(seg, vol)
    assert ann.slices == [5]
    assert ann.labels.shape == image.shape
    assert int(ann.labels.sum()) == 80
    assert np.array_equal(np.argwhere(ann.labels[5])[[0, -1]], [[5, 4], [14, 11]])


def test_no_segments_is_a_clear_error():
    scene = make_scene()
    vol = add_volume(scene, phantom()[0])
    seg, _ = add_segmentation(scene, vol, [])
    with pytest.raises(BridgeError, match="no segments"):
        segments.class_labels(seg, vol)


# ------------------------------------------------------------------------------ prediction -> segments

def _setup_painted(directions=np.eye(3), geometry_volume=None):
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image, directions=directions)
    seg, ids = add_segmentation(scene, vol, ["outer", "inner"], geometry_volume)
    drawn = np.zeros_like(truth)
    for s in (2, 9):
        drawn[s] = truth[s]
    drawn[2, 0, 0] = 1  # a stroke the model would never predict
    for c, sid in enumerate(ids, start=1):
        paint(seg, sid, vol, drawn == c)
    return scene, vol, seg, ids, truth, drawn


@pytest.mark.parametrize("orientation", ["axial", "oblique", "sagittal"])
def test_apply_prediction_keeps_annotated_slices_and_undoes(orientation):
    directions = {"axial": np.eye(3), "oblique": rotation(1, 25),
                  "sagittal": np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)}[orientation]
    scene, vol, seg, ids, truth, drawn = _setup_painted(directions)
    ann = segments.class_labels(seg, vol)
    assert ann.slices == [2, 9]
    before = [segments.segment_array(seg, sid, vol).copy() for sid in ids]
    session = segments.EditSession(seg, vol)
    prediction = truth.copy()
    prediction[2] = 2  # garbage on an annotated slice: must be ignored
    written = segments.apply_prediction(seg, vol, prediction, ["outer", "inner"], ann.axis,
                                        protected_slices=ann.slices, session=session)
    assert written["outer"] > 0 and written["inner"] > 0
    after = segments.class_labels(seg, vol, axis=0).labels
    for s in ann.slices:
        assert np.array_equal(after[s], drawn[s])
    others = [s for s in range(truth.shape[0]) if s not in ann.slices]
    assert np.array_equal(after[others], truth[others])
    session.undo()  # the whole multi-class apply is one undo step
    for sid, b in zip(ids, before):
        assert np.array_equal(segments.segment_array(seg, sid, vol), b)
    assert not session.can_undo()
    session.redo()
    assert np.array_equal(segments.class_labels(seg, vol, axis=0).labels[others], truth[others])


def test_apply_prediction_with_different_segmentation_geometry():
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image, spacing=(1, 1, 2))
    fine = add_volume(scene, np.zeros((12, 48, 40), np.float32), spacing=(0.5, 0.5, 2),
                      origin=(-0.25, -0.25, 0), name="fine")
    seg, ids = add_segmentation(scene, vol, ["outer", "inner"], geometry_volume=fine)
    drawn_fine = np.zeros((12, 48, 40), np.uint8)
    drawn_fine[4, 11:31, 7:27] = 1
    drawn_fine[4, 3, 3] = 1  # a single fine voxel: would not survive a round trip via the coarse grid
    paint(seg, ids[0], fine, drawn_fine)
    before_fine = segments.segment_on(seg, ids[0], segments.segmentation_reference_image(seg))
    ann = segments.class_labels(seg, vol)
    assert ann.slices == [4]
    segments.apply_prediction(seg, vol, truth, ["outer", "inner"], ann.axis, protected_slices=ann.slices,
                              session=segments.EditSession(seg, vol))
    after_fine = segments.segment_on(seg, ids[0], segments.segmentation_reference_image(seg))
    assert np.array_equal(after_fine[4], before_fine[4])  # exactly as drawn, at full resolution
    after = segments.class_labels(seg, vol, axis=0).labels
    assert np.array_equal(after[7], truth[7])


def test_model_classes_not_matching_segments():
    scene, vol, seg, ids, truth, drawn = _setup_painted()
    with pytest.raises(ClassMismatchError, match="liver"):
        segments.apply_prediction(seg, vol, truth, ["outer", "liver"], 0, protected_slices=[2, 9])
    with pytest.raises(ClassMismatchError):
        segments.apply_prediction(seg, vol, truth * 2, ["outer", "inner"], 0)
    # nothing changed by the failed calls
    assert np.array_equal(segments.class_labels(seg, vol, axis=0).labels, drawn)
    # opt-in: missing classes become new segments
    segments.apply_prediction(seg, vol, truth, ["outer", "liver"], 0, protected_slices=[2, 9],
                            create_missing=True)
    assert [n for _, n in segments.segments(seg)] == ["outer", "inner", "liver"]


def test_write_segment_slices_for_one_segment():
    scene, vol, seg, ids, truth, drawn = _setup_painted()
    session = segments.EditSession(seg, vol)
    mask = np.zeros(truth.shape[1:], np.uint8)
    mask[5:10, 5:10] = 1
    segments.write_segment_slices(seg, vol, ids[1], {6: mask, 7: mask}, 0, session=session)
    inner = segments.segment_array(seg, ids[1], vol)
    assert np.array_equal(inner[6], mask) and np.array_equal(inner[7], mask)
    assert np.array_equal(inner[9], (drawn[9] == 2))
    session.undo()
    assert not segments.segment_array(seg, ids[1], vol)[6].any()


# ------------------------------------------------------------------------------ boxes

def test_propagation():
    from MedSAGaLib.slices import bounding_box
    _, truth = phantom()
    image = (truth > 0).astype(np.float32)
    boxes = []

    def predict(slice2d, box):  # inside the box, threshold: a stand-in for the network
        boxes.append(box)
        x0, y0, x1, y1 = (int(v) for v in box)
        out = np.zeros(slice2d.shape, bool)
        out[y0:y1, x0:x1] = slice2d[y0:y1, x0:x1] > 0.5
        return out

    start = 6
    res = propagation.propagate(predict, image, 0, start, bounding_box(truth[start] > 0), margin=2)
    nonempty = [s for s in range(truth.shape[0]) if (truth[s] > 0).sum() >= 4]
    assert sorted(res) == nonempty
    for s, m in res.items():
        assert np.array_equal(m, truth[s] > 0)


# ------------------------------------------------------------------------------ files and processes

def test_files_keep_geometry(tmp_path):
    scene = make_scene()
    image, truth = phantom()
    vol = add_volume(scene, image, directions=rotation(2, 15), spacing=(0.7, 0.9, 2.0), origin=(3, -4, 5))
    path = jobs.write_labels(truth, vol, str(tmp_path / "labels.nrrd"))
    assert np.array_equal(jobs.read_labels(path, vol), truth)
    jobs.write_volume(vol, str(tmp_path / "image.nrrd"))
    import SimpleITK as sitk
    img = sitk.ReadImage(str(tmp_path / "image.nrrd"))
    assert np.allclose(sitk.GetArrayFromImage(img), image)
    # MRML RAS -> ITK LPS
    ras = geometry.ijk_to_ras(vol)
    lps = np.diag([-1, -1, 1]) @ ras[:3, 3]
    assert np.allclose(img.GetOrigin(), lps, atol=1e-4)
    other = add_volume(scene, image, name="other")
    with pytest.raises(BridgeError, match="grid"):
        jobs.read_labels(path, other)


def test_prepare_finetune_writes_selected_slices(tmp_path):
    scene, vol, seg, ids, truth, drawn = _setup_painted()
    inputs = jobs.prepare_finetune(vol, seg, str(tmp_path), slices=[9])
    labels = jobs.read_labels(inputs.labels, vol)
    assert inputs.slices == [9]
    assert np.array_equal(labels[9], drawn[9]) and not labels[2].any()
    args = jobs.finetune_args(inputs, "m.medsaga", steps=3, rank=4)
    # the CLI's own parser accepts the job's command line and reads back what the panel meant
    from MedSAGaLib.cli import build_parser
    parsed = build_parser().parse_args(args)
    assert parsed.command == "finetune" and parsed.output == "m.medsaga"
    assert parsed.axis == "k"  # numpy axis 0 of (k, j, i) = voxel axis k
    assert parsed.slices == "9" and parsed.steps == 3 and parsed.rank == 4
    assert parsed.classes == ["outer", "inner"] and parsed.progress == "json"
    with pytest.raises(BridgeError, match="No annotated slice"):
        jobs.prepare_finetune(vol, seg, str(tmp_path), slices=[5])
    with pytest.raises(TypeError, match="stepz"):  # a misspelt option fails here, not in the child
        jobs.finetune_args(inputs, "m.medsaga", stepz=3)


FAKE_JOB = textwrap.dedent("""
    import json, signal, sys, time

    def main(argv):
        mode = argv[0]
        stop = []
        if mode in ("graceful", "stubborn"):
            signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print("starting", flush=True)
        for step in range(1, 1000):
            print(json.dumps({"event": "step", "step": step, "steps": 999, "loss": 1.0 / step, "lr": 1e-3,
                              "val_dice": {"a": 0.5}, "elapsed": step * 0.01, "eta": 9.0}), flush=True)
            if step == 3 and mode == "short":
                return 0
            if stop and mode == "graceful":
                open("kept-model", "w").write(str(step))
                return 0
            time.sleep(0.02)
        return 0
""")

# A launcher like PythonSlicer / CTK's AppLauncher: runs the real interpreter as its child,
# records the child's pid, and forwards no signals.
LAUNCHER = textwrap.dedent("""\
    #!%s
    import subprocess, sys
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    open("child.pid", "w").write(str(child.pid))
    sys.exit(child.wait())
""")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def fake_job(tmp_path, mode, name, **kwargs):
    (tmp_path / "fakejob.py").write_text(FAKE_JOB)
    workdir = tmp_path / name
    workdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return jobs.Job("fakejob", [mode], str(workdir), env=env, **kwargs), workdir


def wait_for_events(job, timeout=60):
    import time
    deadline = time.time() + timeout
    while not job.events and time.time() < deadline:
        job.poll()
        time.sleep(0.02)
    assert job.events, job.error_text()


def test_job_progress_failure_and_work_folder(tmp_path):
    job, workdir = fake_job(tmp_path, "short", "short")
    assert job.wait(60) == "done"
    assert [e["step"] for e in job.events] == [1, 2, 3] and job.log == ["starting"]
    assert job.progress_text() == "step 3/999, loss 0.3333, lr 1.00e-03, val Dice 0.500, ETA 0:09"
    assert job.step_fraction() == (3, 999)
    assert jobs.step_events(job.events + [{"event": "done", "steps": 3}]) == job.events
    job.cleanup()
    assert not workdir.exists()
    failing = jobs.Job("sys", [], str(tmp_path), python=sys.executable)  # sys has no main(): fails
    assert failing.wait(30) == "failed" and "main" in failing.error_text()


@pytest.mark.skipif(os.name == "nt", reason="POSIX launcher script")
@pytest.mark.parametrize("mode", ["graceful", "stubborn", "plain"])
def test_cancel_stops_the_whole_tree_behind_a_launcher(tmp_path, mode):
    """cancel() stops the real interpreter behind a launcher that forwards no signals: a job that
    handles SIGTERM stops gracefully (and keeps its result), any other is stopped or killed."""
    launcher = tmp_path / "launcher"
    launcher.write_text(LAUNCHER % sys.executable)
    launcher.chmod(0o755)
    job, workdir = fake_job(tmp_path, mode, mode, python=str(launcher), grace=1.0)
    wait_for_events(job)
    child = int((workdir / "child.pid").read_text())
    assert job.process.pid != child and alive(child)
    job.cancel()
    assert job.wait(30) == "cancelled"
    assert not alive(job.process.pid) and not alive(child)
    assert job.events[-1]["step"] < 999
    if mode == "graceful":  # stopped by the runner's stop file, result written before exiting
        assert int((workdir / "kept-model").read_text()) >= 1


@pytest.mark.skipif(os.name == "nt", reason="POSIX launcher script")
def test_abandoning_a_bound_job_stops_its_tree_and_deletes_its_work_folder(tmp_path):
    """What the module's and the effect's cleanup() call when Slicer closes mid-job."""
    launcher = tmp_path / "launcher"
    launcher.write_text(LAUNCHER % sys.executable)
    launcher.chmod(0o755)
    job, workdir = fake_job(tmp_path, "stubborn", "stubborn", python=str(launcher), grace=1.0)
    wait_for_events(job)
    child = int((workdir / "child.pid").read_text())
    scene = slicer.vtkMRMLScene()
    bound = jobs.BoundJob(job, "finetune", scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    bound.abandon(1)
    assert not alive(job.process.pid) and not alive(child)
    assert not workdir.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_signalling_the_launcher_alone_would_orphan_the_child(tmp_path):
    """Why the tree matters: SIGTERM to the launcher (the old cancel) leaves the child running."""
    import signal
    launcher = tmp_path / "launcher"
    launcher.write_text(LAUNCHER % sys.executable)
    launcher.chmod(0o755)
    job, workdir = fake_job(tmp_path, "plain", "orphan", python=str(launcher))
    wait_for_events(job)
    child = int((workdir / "child.pid").read_text())
    job.process.send_signal(signal.SIGTERM)
    job.process.wait(10)
    try:
        assert alive(child) and job.state == "running"  # the tree is still there, and Job knows it
    finally:
        job.kill()
        job.wait(30)
    assert not alive(child)


def test_jobs_run_with_pythonslicer_inside_slicer(tmp_path):
    for app, launcher in (("bin/SlicerApp-real", "bin/PythonSlicer"),  # Linux, Windows (.exe alike)
                          ("Contents/MacOS/Slicer", "Contents/bin/PythonSlicer")):  # macOS bundle
        root = tmp_path / app.split("/")[0]
        for name in (app, launcher):
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        assert jobs.python_executable(str(tmp_path / app)) == str(tmp_path / launcher), root
    assert jobs.python_executable() == sys.executable  # outside Slicer: this interpreter


def test_popen_options_hide_the_console_on_windows():
    nt = jobs.popen_options("nt")
    assert nt["creationflags"] & jobs.CREATE_NO_WINDOW and nt["creationflags"] & jobs.CREATE_NEW_PROCESS_GROUP
    assert jobs.popen_options("posix") == {"start_new_session": True}


@pytest.mark.parametrize("directions", [np.diag([-1, -1, 1]),
                                        np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float),
                                        rotation(0, 30) @ rotation(2, 20)])
def test_axes_agree_with_the_library_on_written_files(tmp_path, directions):
    from MedSAGaLib.volume import read_volume, slice_axis
    scene = make_scene()
    vol = add_volume(scene, phantom()[0], directions=directions)
    image = read_volume(jobs.write_volume(vol, str(tmp_path / "v.nrrd")))
    for name in ("axial", "coronal", "sagittal"):
        assert slice_axis(image, name) == geometry.resolve_axis(vol, name)
    from MedSAGaLib.commands import format_value
    for axis in (0, 1, 2):
        assert slice_axis(image, format_value("axis", axis)) == axis


@pytest.mark.parametrize("directions", [np.diag([-1, -1, 1]), rotation(1, 25),
                                        np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)])
def test_view_geometry_for_the_effect(directions):
    scene = make_scene()
    vol = add_volume(scene, phantom()[0], directions=directions, spacing=(0.9, 1.1, 2.0), origin=(5, 6, 7))
    m = geometry.ijk_to_ras(vol)

    def ras(i, j, k):
        return (m @ [i, j, k, 1])[:3]

    for axis in range(3):
        normal = m[:3, 2 - axis]  # a view looking along the voxel axis
        assert geometry.axis_from_normal(vol, -normal) == axis
    assert geometry.slice_index(vol, 0, ras(3, 4, 7.2)) == 7
    assert geometry.slice_index(vol, 2, ras(13, 4, 7)) == 13
    assert geometry.slice_index(vol, 0, ras(3, 4, 40)) is None
    # slice along k: rows j, columns i; along j: rows k, columns i; along i: rows k, columns j
    assert geometry.box_from_ras(vol, 0, ras(9, 2, 5), ras(3, 8, 5)) == (3, 2, 10, 9)
    assert geometry.box_from_ras(vol, 1, ras(3, 4, 2), ras(6, 4, 5)) == (3, 2, 7, 6)
    assert geometry.box_from_ras(vol, 2, ras(1, 4, 2), ras(1, 7, 5)) == (4, 2, 8, 6)
    assert geometry.box_from_ras(vol, 0, ras(-30, -30, 5), ras(100, 100, 5)) == (0, 0, 20, 24)
    # a slice view's SliceToRAS (columns: view x, view y, normal, centre) -> the slice it shows
    for axis, index in ((0, 7), (1, 3), (2, 13)):
        view = np.eye(4)
        others = [a for a in range(3) if a != axis]
        view[:3, 0], view[:3, 1] = m[:3, 2 - others[1]], m[:3, 2 - others[0]]
        view[:3, 2] = -m[:3, 2 - axis]
        centre = [5, 4, 3]
        centre[2 - axis] = index
        view[:3, 3] = ras(*centre)
        assert geometry.view_slice(vol, view) == (axis, index)
    view[:3, 3] = ras(500, 4, 3)
    assert geometry.view_slice(vol, view) == (2, None)


def test_model_output_is_not_mistaken_for_annotations():
    scene, vol, seg, ids, truth, drawn = _setup_painted()
    segments.apply_prediction(seg, vol, truth, ["outer", "inner"], 0, protected_slices=[2, 9])
    ann = segments.class_labels(seg, vol)  # auto axis still found from the drawn slices
    assert ann.axis == 0 and ann.slices == [2, 9]
    assert ann.predicted_slices == [s for s in range(truth.shape[0]) if truth[s].any() and s not in (2, 9)]
    assert np.array_equal(ann.labels, segments.class_labels(seg, vol, axis=0).labels)
    # the user corrects a predicted slice: it becomes an annotation
    corrected = (truth[5] == 2).copy()
    corrected[0, 0] = True
    full = segments.segment_array(seg, ids[1], vol)
    full[5] = corrected
    paint(seg, ids[1], vol, full)
    ann = segments.class_labels(seg, vol)
    assert ann.slices == [2, 5, 9] and 5 not in ann.predicted_slices
    # box-prompt writes (write_segment_slices) count as the user's
    mask = np.zeros(truth.shape[1:], np.uint8)
    mask[1:3, 1:3] = 1
    segments.write_segment_slices(seg, vol, ids[0], {0: mask}, 0)
    assert segments.class_labels(seg, vol).slices == [0, 2, 5, 9]


def test_painted_labels_for_segment_follow_the_model_class_order(tmp_path):
    """What `medsaga segment --painted` receives: the drawn slices only, numbered in the model's class order
    (matched by name, case-insensitive), classes the model lacks left out; nothing drawn -> no file."""
    scene, vol, seg, ids, truth, drawn = _setup_painted()
    ann = segments.class_labels(seg, vol, axis=0)
    path = jobs.write_painted(ann, ["Inner", "outer"], vol, str(tmp_path / "painted.nrrd"))
    written = jobs.read_labels(path, vol)
    swapped = np.where(drawn == 1, 2, np.where(drawn == 2, 1, 0))
    assert np.array_equal(written, swapped)
    assert set(np.unique(drawn)) == {0, 1}  # this phantom's painted slices hold only "outer"
    only = jobs.read_labels(jobs.write_painted(ann, ["spleen", "OUTER"], vol, str(tmp_path / "p2.nrrd")), vol)
    assert np.array_equal(only, np.where(drawn == 1, 2, 0))
    assert jobs.write_painted(ann, ["spleen", "inner"], vol, str(tmp_path / "p3.nrrd")) is None
