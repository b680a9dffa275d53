"""Background ``medsaga`` jobs: files for the child process, command lines, process-tree cancel,
progress text, and results bound to the nodes a job was started with.

Command lines come from ``MedSAGaLib.commands`` (the CLI's own option definitions); progress
lines are ``MedSAGaLib.events`` records and their text is ``MedSAGaLib.events.describe``.
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from MedSAGaLib import safety
from MedSAGaLib.events import describe, kind_of, parse_json_line
from MedSAGaLib.slices import slice_view

from . import BridgeError
from .geometry import ijk_to_ras, volume_array, volume_shape
from .segments import Annotations, apply_prediction, class_labels, segments_for_classes

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds MedSAGaBridgeLib

# Windows: no console window for the child (closing it would kill the job), and a process
# group of its own, as slicer.util.launchConsoleProcess hides the console.
CREATE_NO_WINDOW = 0x08000000
CREATE_NEW_PROCESS_GROUP = 0x00000200


# ------------------------------------------------------------------------------- processes

def library_parent():
    """Folder that holds MedSAGaLib (installed beside the module in Slicer, the repository root in
    a checkout); None when it is only importable from site-packages."""
    for candidate in (PACKAGE_PARENT, os.path.dirname(PACKAGE_PARENT), os.path.dirname(os.path.dirname(PACKAGE_PARENT))):
        if os.path.isfile(os.path.join(candidate, "MedSAGaLib", "__init__.py")):
            return candidate
    return None


def python_executable(executable=None):
    """The Python to run jobs with: Slicer's PythonSlicer inside Slicer (``sys.executable`` is then
    the application, e.g. bin/SlicerApp-real), else this interpreter."""
    exe = executable or sys.executable
    folder, base = os.path.dirname(exe), os.path.basename(exe).lower()
    if base.startswith("slicer") or base.startswith("python-real"):
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            for where in (folder, os.path.dirname(folder), os.path.join(os.path.dirname(folder), "bin")):
                candidate = os.path.join(where, name)
                if os.path.isfile(candidate):
                    return candidate
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return exe


def popen_options(os_name=None):
    """Keyword arguments for ``subprocess.Popen`` that make the job's whole tree stoppable and,
    on Windows, keep its console hidden."""
    if (os_name or os.name) == "nt":
        options = {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
        if hasattr(subprocess, "STARTUPINFO"):
            info = subprocess.STARTUPINFO()
            info.dwFlags |= 1  # STARTF_USESHOWWINDOW
            info.wShowWindow = 0  # SW_HIDE
            options["startupinfo"] = info
        return options
    return {"start_new_session": True}  # its own process group: the launcher and its children


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_tree(process):
    """Kill ``process`` and every process it started (the launcher's real interpreter too)."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                       creationflags=CREATE_NO_WINDOW)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def job_command(module, args, stop_file, python=None):
    """``python -m MedSAGaBridgeLib.runner --stop-file F module args...``."""
    return [python or python_executable(), "-m", "MedSAGaBridgeLib.runner", "--stop-file", stop_file,
            module, *[str(a) for a in args]]


class Job:
    """One MedSAGa job in a separate process tree; never blocks the caller.

    ``poll()`` returns the progress events (JSON lines) that arrived since the last call; other
    lines go to ``log``. ``state``: 'running', 'done', 'failed' or 'cancelled'; a job runs until
    its whole process tree has ended. ``cancel()`` asks for a graceful stop (a fine-tune keeps
    its best model so far), and after ``grace`` seconds kills the tree. ``workdir``, when the job
    owns it, is deleted by ``cleanup()`` once its results are read."""

    def __init__(self, module, args, workdir, env=None, threads=None, grace=120.0, python=None):
        self.workdir = workdir
        self.stop_file = os.path.join(workdir, "stop")
        self.cmd = job_command(module, args, self.stop_file, python)
        self.grace = grace
        self.events = []
        self.log = []
        self.cancelled = False
        self._kill_at = None
        self._queue = queue.Queue()
        env = dict(os.environ if env is None else env)
        paths = [PACKAGE_PARENT] + ([library_parent()] if library_parent() else [])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env["PYTHONUNBUFFERED"] = "1"
        # progress text may hold non-ASCII (names); pin UTF-8 on both ends of the pipe
        env["PYTHONIOENCODING"] = "utf-8"
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.started = time.time()
        self.process = subprocess.Popen(self.cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                        encoding="utf-8", errors="replace", **popen_options())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def poll(self):
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                continue
            record = parse_json_line(line)
            if record is not None:
                self.events.append(record)
                new.append(record)
            else:
                self.log.append(line)
        if self._kill_at is not None and time.time() >= self._kill_at and self._tree_alive():
            kill_tree(self.process)
            self._kill_at = None
        return new

    def _tree_alive(self):
        if self.process.poll() is None:
            return True
        return os.name != "nt" and _group_alive(self.process.pid)

    @property
    def state(self):
        if self._tree_alive():
            return "running"
        if self.cancelled:
            return "cancelled"
        return "done" if self.process.returncode == 0 else "failed"

    @property
    def last(self):
        return self.events[-1] if self.events else None

    def cancel(self, grace=None):
        """Ask the job to stop; kill its tree if it has not ended ``grace`` seconds later."""
        if not self._tree_alive():
            return
        self.cancelled = True
        with open(self.stop_file, "w") as f:
            f.write("stop\n")
        self._kill_at = time.time() + (self.grace if grace is None else grace)

    def stop_and_wait(self, seconds):
        """Cancel, give the job ``seconds`` to stop by itself, then kill its tree (Slicer closing)."""
        self.cancel(grace=seconds)
        try:
            return self.wait(seconds + 10)
        except subprocess.TimeoutExpired:
            self.kill()
            return "cancelled"

    def kill(self):
        self.cancelled = True
        kill_tree(self.process)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.time() + timeout
        while self._tree_alive():
            self.poll()
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.cmd, timeout)
            time.sleep(0.05)
        self.process.wait()
        self._reader.join(5)
        self.poll()
        return self.state

    def progress_text(self):
        return describe(self.last) if self.last else ""

    def step_fraction(self):
        """(done, total) of the latest step or segment event, or None."""
        for ev in reversed(self.events):
            kind = kind_of(ev)
            if kind == "step" and "step" in ev and "steps" in ev:
                return int(ev["step"]), int(ev["steps"])
            if kind == "segment" and "done" in ev and "total" in ev:
                return int(ev["done"]), int(ev["total"])
        return None

    def error_text(self, lines=15):
        return "\n".join(self.log[-lines:])

    def cleanup(self):
        """Delete the job's work folder (its copy of the volume, labels and outputs)."""
        if self.workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)


def step_events(events):
    """The training-step events among a job's progress events."""
    return [e for e in events if kind_of(e) == "step" and "step" in e and "steps" in e]


# ----------------------------------------------------------------------------- files for jobs

def _storage_write(scene, node, path):
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetUseCompression(True)
    scene.AddNode(storage)
    try:
        storage.SetFileName(path)
        if not storage.WriteData(node):
            raise BridgeError(f"Could not write {path}")
    finally:
        scene.RemoveNode(storage)


def write_volume(volume_node, path):
    """Write the volume (its geometry, without parent transforms) to NRRD/NIfTI."""
    _storage_write(volume_node.GetScene(), volume_node, path)
    return path


def write_labels(labels, volume_node, path):
    """Write a (k, j, i) label array on the volume's grid to a file with the volume's geometry."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    img = vtk.vtkImageData()
    k, j, i = labels.shape
    img.SetDimensions(i, j, k)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = np.ascontiguousarray(labels, np.uint8).ravel()
    node.SetAndObserveImageData(img)
    _storage_write(scene, node, path)
    return path


def read_labels(path, volume_node):
    """Read a label volume (written on the volume's grid) back as a (k, j, i) array."""
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "result")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise BridgeError(f"Could not read {path}")
    arr = volume_array(node)
    if arr.shape != volume_shape(volume_node):
        raise BridgeError(f"{os.path.basename(path)} has shape {arr.shape}, the volume {volume_shape(volume_node)}.")
    if not np.allclose(ijk_to_ras(node), ijk_to_ras(volume_node), atol=1e-3):
        raise BridgeError(f"{os.path.basename(path)} is not on the volume's grid.")
    return arr.astype(np.uint8)


def new_workdir(parent=None):
    return tempfile.mkdtemp(prefix="medsaga-", dir=parent)


def ensure_workdir(workdir=None):
    """``workdir`` (created when missing), or a new folder in the temporary folder."""
    if not workdir:
        return new_workdir()
    os.makedirs(workdir, exist_ok=True)
    return workdir


# ------------------------------------------------------------------- jobs bound to their nodes

@dataclass
class Outcome:
    """What a finished job did, for the panel."""
    state: str                 # done, failed, cancelled, discarded
    text: str
    written: dict = None
    model_path: str = None


class BoundJob:
    """A job and the nodes it was started for. Its result goes to those nodes (looked up by ID
    and identity at the end), never to whatever is selected when it finishes; if a node was
    removed or the scene closed, the result is discarded with a message."""

    def __init__(self, job, kind, volume_node, segmentation_node=None, masking=None, **context):
        self.job, self.kind = job, kind
        self.scene = volume_node.GetScene()
        self.volume_id, self._volume = volume_node.GetID(), volume_node
        self.segmentation_id = segmentation_node.GetID() if segmentation_node is not None else None
        self._segmentation = segmentation_node
        self.masking = masking
        self.context = context

    def node_ids(self):
        return self.volume_id, self.segmentation_id

    def _current(self, node_id, node):
        if node_id is None or self.scene is None:
            return None
        found = self.scene.GetNodeByID(node_id)
        return found if found is node else None

    def nodes(self):
        """(volume, segmentation) as started, or None for one no longer in the scene."""
        return self._current(self.volume_id, self._volume), self._current(self.segmentation_id, self._segmentation)

    def abandon(self, seconds):
        """Slicer or the effect is closing: stop the whole process tree (a fine-tune saves its best
        model if it can within ``seconds``) and delete the work folder; no result is applied."""
        self.job.stop_and_wait(seconds)
        self.job.cleanup()

    def finish(self, make_session=None):
        """Apply the result (if any) to the job's own nodes and delete the work folder.

        ``make_session(segmentation, volume, masking)`` -> EditSession: how the write is undone
        (the Segment Editor's undo when it edits that segmentation); a plain session otherwise."""
        from .segments import EditSession
        state = self.job.state
        try:
            if self.kind == "finetune":
                model = self.context["model_path"]
                if state in ("done", "cancelled") and os.path.isfile(model):
                    text = ("Fine-tuning finished. " if state == "done" else
                            "Cancelled; the best model so far is kept. ") + self.job.progress_text()
                    return Outcome(state, text.strip(), model_path=model)
                if state == "cancelled":
                    return Outcome(state, "Cancelled before a model was saved.")
                return Outcome(state, "Fine-tuning failed.")
            if state != "done":
                return Outcome(state, "Cancelled." if state == "cancelled" else "Failed.")
            volume, segmentation = self.nodes()
            if volume is None or segmentation is None:
                return Outcome("discarded", "The result was discarded: the volume or segmentation it was computed "
                                            "for is no longer in the scene.")
            own = make_session is None  # a session made here is closed here (its hidden editor node goes)
            session = (make_session or (lambda seg, vol, masking: EditSession(seg, vol, masking)))(
                segmentation, volume, self.masking)
            try:
                return self._apply(volume, segmentation, session)
            finally:
                if own:
                    session.close()
        finally:
            self.job.cleanup()

    def _apply(self, volume, segmentation, session):
        """Write a segment or propagation result through ``session``."""
        if self.kind == "segment":
            prediction = read_labels(self.context["labelmap"], volume)
            written = apply_prediction(segmentation, volume, prediction, self.context["class_names"],
                                       self.context["axis"], protected_slices=self.context["annotated"],
                                       slices=self.context.get("slices"), session=session)
            return Outcome("done", "Segmented: " + ", ".join(f"{k} {v} voxels" for k, v in written.items())
                           + ". Annotated slices kept as drawn.", written=written)
        if self.kind == "propagate":
            from .prompts import apply_propagation
            written = apply_propagation(segmentation, volume, self.context["segment_id"],
                                        self.context["result"], self.context["axis"], session=session)
            return Outcome("done", f"Propagated to slice(s) {', '.join(map(str, written))}." if written
                           else "Nothing to add: every reached slice already holds the segment.",
                           written={"slices": written})
        raise BridgeError(f"Unknown job kind {self.kind!r}")


# --------------------------------------------------------------------------- starting jobs

@dataclass
class FinetuneInputs:
    workdir: str
    image: str
    labels: str
    annotations: Annotations
    slices: list


def prepare_finetune(volume_node, segmentation_node, workdir, axis="auto", slices=None, segment_ids=None):
    """Write the volume and the selected annotated slices' class labels (geometry kept)."""
    from .geometry import axis_name
    ann = class_labels(segmentation_node, volume_node, segment_ids, axis)
    checked(safety.check_class_names, list(ann.class_names), "Segment names")  # they become header text
    chosen = ann.slices if slices is None else [s for s in slices if s in ann.slices]
    if not chosen:
        raise BridgeError("No annotated slice selected: paint the classes on a few slices "
                          f"(along the {axis_name(volume_node, ann.axis)} axis) first.")
    labels = np.zeros_like(ann.labels)
    for s in chosen:
        labels[slice_view(ann.axis, s)] = ann.labels[slice_view(ann.axis, s)]
    image = write_volume(volume_node, os.path.join(workdir, "image.nrrd"))
    label_path = write_labels(labels, volume_node, os.path.join(workdir, "labels.nrrd"))
    return FinetuneInputs(workdir, image, label_path, ann, chosen)


def start_finetune(volume_node, segmentation_node, model_path, workdir=None, axis="auto", slices=None,
                   segment_ids=None, threads=None, env=None, python=None, **options):
    """Write the inputs and start ``medsaga finetune`` in the background. Returns a BoundJob
    (``.context['inputs']``: the FinetuneInputs)."""
    check_model_output(model_path)
    workdir = ensure_workdir(workdir)
    inputs = prepare_finetune(volume_node, segmentation_node, workdir, axis, slices, segment_ids)
    job = Job("MedSAGaLib.cli", finetune_args(inputs, model_path, threads=threads, **options), workdir, env=env,
              threads=threads, python=python)
    return BoundJob(job, "finetune", volume_node, segmentation_node, model_path=model_path, inputs=inputs)


def checked(check, *args):
    """Run a MedSAGaLib.safety check; its InputError becomes the panel's BridgeError (same text)."""
    try:
        return check(*args)
    except safety.InputError as exc:
        raise BridgeError(str(exc)) from None


def check_model_output(model_path, inputs=()):
    """The model file the panel will write: not a folder, not an image, not one of ``inputs``, in a
    folder that can be written (checked before any work, as the CLI does)."""
    checked(safety.check_outputs,
            [safety.Output("Model file", model_path,
                           refuse_suffixes=safety.IMAGE_SUFFIXES + safety.SEG_SUFFIXES + (".pth", ".safetensors"))],
            list(inputs))


def finetune_args(inputs, model_path, **options):
    """``medsaga finetune`` arguments for prepared inputs (``MedSAGaLib.commands``: the CLI's own
    option definitions), with JSON progress for the panel."""
    from MedSAGaLib.commands import finetune_argv
    return finetune_argv(inputs.image, inputs.labels, model_path, slices=inputs.slices,
                         classes=inputs.annotations.class_names, axis=inputs.annotations.axis, progress="json",
                         **options)


def painted_labels(annotations, class_names):
    """The annotated (drawn, not predicted) slices' labels, numbered in the model's class order (0 elsewhere);
    None when no class of the model is drawn. The classes are matched by name (case-insensitive), as the
    result is written back."""
    wanted = [n.strip().lower() for n in class_names]
    lookup = np.zeros(len(annotations.class_names) + 1, np.uint8)  # segment value -> model class (0: not the model's)
    for value, name in enumerate(annotations.class_names, start=1):
        if name.strip().lower() in wanted:
            lookup[value] = wanted.index(name.strip().lower()) + 1
    labels = np.zeros_like(annotations.labels)
    for s in annotations.slices:
        view = slice_view(annotations.axis, s)
        labels[view] = lookup[annotations.labels[view]]
    return labels if labels.any() else None


def write_painted(annotations, class_names, volume_node, path):
    """:func:`painted_labels` as a label volume at ``path`` for ``medsaga segment --painted``; None when no
    class of the model is drawn."""
    labels = painted_labels(annotations, class_names)
    return None if labels is None else write_labels(labels, volume_node, path)


def start_segment(volume_node, segmentation_node, model_path, class_names, annotations, workdir=None, slices=None,
                  device=None, threads=None, env=None, masking=None, python=None):
    """Start ``medsaga segment`` for the volume; the result fills the segmentation's classes
    around ``annotations.slices`` when ``finish`` is called. Fails now (not after minutes) when
    the model's classes have no segments."""
    from MedSAGaLib.commands import segment_argv
    checked(safety.check_class_names, list(class_names), f"Model {model_path}: class names")
    segments_for_classes(segmentation_node, class_names)
    workdir = ensure_workdir(workdir)
    image = write_volume(volume_node, os.path.join(workdir, "image.nrrd"))
    labelmap = os.path.join(workdir, "result-labels.nrrd")
    painted = write_painted(annotations, class_names, volume_node, os.path.join(workdir, "painted.nrrd"))
    args = segment_argv(image, model_path, os.path.join(workdir, "result.seg.nrrd"), labelmap=labelmap,
                        axis=annotations.axis, slices=slices, device=device,  # threads: the job's environment
                        painted=painted or "none")  # none drawn: not the file the model was fine-tuned from
    job = Job("MedSAGaLib.cli", args, workdir, env=env, threads=threads, grace=2.0, python=python)
    return BoundJob(job, "segment", volume_node, segmentation_node, masking=masking, labelmap=labelmap,
                    class_names=list(class_names), axis=annotations.axis, annotated=list(annotations.slices),
                    slices=None if slices is None else list(slices))


# --------------------------------------------------------------------------- model files

def model_summary(model_path):
    """(class names, validation Dice dict or {}, metadata) of an adapted model file."""
    from MedSAGaLib.modelfile import read_metadata
    meta = read_metadata(model_path)  # bounded, validated metadata; ModelFileError names the file
    dice = meta.get("validation_dice")
    dice = {k: v for k, v in dice.items() if isinstance(v, (int, float))} if isinstance(dice, dict) else {}
    return list(meta.get("class_names") or []), dice, meta


def describe_model(model_path):
    """Text for the panel: classes, base model, method, steps and validation Dice."""
    from MedSAGaLib.events import format_dice
    names, dice, meta = model_summary(model_path)
    text = f"Classes: {', '.join(names)}"
    training = meta.get("training") or {}
    if training.get("method"):
        text += f"\nBase {meta.get('base_model', '?')}, {training['method']}"
        if training.get("steps"):
            text += f", {training['steps']} steps" + (" (stopped early)" if training.get("stopped") else "")
    if dice:
        text += "\nValidation Dice: " + format_dice(dice)
    return text
