"""MedSAGa: few-shot fine-tuning of SAM / LiteMedSAM with GaLore, and whole-volume segmentation.

The panel collects the inputs; every decision and all MRML work is in the Qt-free package
``MedSAGaBridgeLib`` and all long work (fine-tuning, segmenting a volume) runs in a separate
process tree (PythonSlicer running ``MedSAGaLib.cli``), polled by a timer, so the UI never blocks
and a crash in the engine cannot take the scene with it. Heavy packages (PyTorch through the
PyTorch extension, segment-anything, ...) are installed on first use, after the user agrees.

Supported: 3D Slicer 5.10 and later (``MedSAGaBridgeLib.support``). This file parses on the
Python of older Slicer releases, so that they show a clear message instead of a failure.
"""

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedSAGaBridgeLib import BridgeError, support

BASE_MODELS = ["litemedsam", "vit_b", "vit_l", "vit_h"]
METHODS = ["auto", "galore", "galore-layerwise", "lora", "full", "decoder"]  # auto: the library picks per task
DEVICES = ["auto", "cpu", "cuda", "mps"]
AXES = ["auto", "axial", "coronal", "sagittal"]
MODEL_SUFFIX = ".medsaga"


def unsupportedReason():
    """Why MedSAGa cannot run in this Slicer (None when it can)."""
    return support.unsupported_reason(slicer.app.applicationVersion, sys.version_info,
                                      hasattr(slicer, "vtkSlicerSegmentEditorLogic"))


#
# MedSAGa
#

class MedSAGa(ScriptedLoadableModule):

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAGa"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MedSAGa developers"]
        self.parent.helpText = f"""
Paint each class (one segment per class) on a few slices, <b>Fine-tune</b> the Segment Anything
Model to them (GaLore: low-rank gradient projection keeps optimizer memory small), then
<b>Segment volume</b> to fill the remaining slices. Annotated slices are kept exactly as drawn;
the Segment Editor's masking settings are honoured and the fill is one undo step. The Segment
Editor effect "MedSAGa" segments single slices and propagates box prompts.
<p>Requires {support.SUPPORTED_TEXT} and the PyTorch extension.</p>
"""
        self.parent.acknowledgementText = """
Builds on Segment Anything (Meta AI), LiteMedSAM / MedSAM (Bo Wang lab), GaLore (Zhao et al.)
and SAMed (Zhang et al.). The MedSAGa method is by its paper's authors; this extension is by the
MedSAGa developers.
"""


#
# Dependencies (installed on first use, after the user agrees)
#

def missingDependencies():
    """pip requirements whose packages cannot be imported (torch first)."""
    return support.missing_requirements(lambda name: importlib.util.find_spec(name) is not None)


def _pipEnsure():
    """Slicer's pip_ensure (slicer.packaging / slicer.pydeps, Slicer >= 5.11) or None."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        function = getattr(module, "pip_ensure", None)
        if function is not None:
            return function
    return None


def _pytorchUtils():
    try:
        import PyTorchUtils  # the PyTorch extension
    except ImportError:
        return None
    return PyTorchUtils


def _installStep(how, requirements):
    if how == "pytorch-extension":
        logic = _pytorchUtils().PyTorchUtilsLogic()
        logic.installTorch(**support.supported_keywords(logic.installTorch, {
            "askConfirmation": False, "torchVersionRequirement": support.TORCH_REQUIREMENT[len("torch"):],
            "torchvisionVersionRequirement": support.TORCHVISION_REQUIREMENT[len("torchvision"):]}))
    elif how == "pip-torchvision":  # pinned to the torch that is there, so pip cannot replace it
        slicer.util.pip_install(list(requirements) + ["-c", _constraintsFile()])
    elif how == "pip-torch":
        slicer.util.pip_install(list(requirements))
    else:
        pipEnsure = _pipEnsure()
        if pipEnsure is not None:
            from packaging.requirements import Requirement
            pipEnsure([Requirement(r) for r in requirements], **support.supported_keywords(
                pipEnsure, {"skip_packages": support.SLICER_OWNED_PACKAGES, "requester": "MedSAGa"}))
        else:  # a list keeps a constraints path with spaces intact
            slicer.util.pip_install(list(requirements) + ["-c", _constraintsFile()])


def installDependencies(askUser=True):
    """Install the missing packages. Returns True when everything is importable.

    The question is asked with the normal cursor; only the installation shows the busy cursor.
    In testing mode nothing is installed (a test then skips)."""
    missing = missingDependencies()
    if not missing:
        return True
    if slicer.app.testingEnabled():
        return False
    if askUser and not slicer.util.confirmOkCancelDisplay(
            "MedSAGa needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads several hundred MB and may take a few minutes. "
              "Slicer's own numpy and SimpleITK are not changed.",
            windowTitle="MedSAGa: install dependencies"):
        return False
    with slicer.util.WaitCursor():
        for how, requirements in support.install_plan(missing, _pytorchUtils() is not None):
            _installStep(how, requirements)
    importlib.invalidate_caches()
    still = missingDependencies()
    if still:
        raise RuntimeError("Could not install: " + ", ".join(still))
    return True


def _constraintsFile():
    """A pip constraints file pinning the packages Slicer ships (numpy, SimpleITK, torch)."""
    from importlib import metadata
    lines = []
    for name in support.SLICER_OWNED_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    path = os.path.join(tempfile.mkdtemp(prefix="medsaga-pip-"), "constraints.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def segmentEditorWidget():
    """The Segment Editor module's qMRMLSegmentEditorWidget, or None (module not loaded yet)."""
    try:
        return slicer.modules.segmenteditor.widgetRepresentation().self().editor
    except Exception:
        return None


def jobEnvironment():
    """The environment Slicer was started with (as slicer.util.launchConsoleProcess uses)."""
    getter = getattr(slicer.util, "startupEnvironment", None)
    return getter() if getter else None


#
# Parameter node
#

@parameterNodeWrapper
class MedSAGaParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    sliceAxis: Annotated[str, Choice(AXES)] = "auto"
    excludedSlices: str = ""  # comma-separated annotated slices the user unticked
    baseModel: Annotated[str, Choice(BASE_MODELS)] = "litemedsam"
    checkpoint: str = ""
    method: Annotated[str, Choice(METHODS)] = "auto"  # as `medsaga finetune` (a test pins it)
    rank: Annotated[int, WithinRange(1, 1024)] = 32
    updateProjGap: Annotated[int, WithinRange(1, 100000)] = 50
    scale: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    learningRate: Annotated[float, WithinRange(1e-7, 1.0)] = 1e-3  # the trainer's default (a test pins it)
    # 0 = chosen by the data within timeBudget (early stopping on held-out slices from 10 painted slices on)
    steps: Annotated[int, WithinRange(0, 100000)] = 0
    timeBudget: Annotated[float, WithinRange(10.0, 86400.0)] = 240.0  # seconds (the trainer's default; a test pins it)
    device: Annotated[str, Choice(DEVICES)] = "auto"
    modelPath: str = ""


#
# Widget
#

class MedSAGaWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._annotations = None
        self._annotationsKey = None
        self._job = None  # MedSAGaBridgeLib.jobs.BoundJob
        self._timer = None
        self._updatingSlices = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        reason = unsupportedReason()
        if reason:
            label = qt.QLabel(reason)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAGa.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAGaLogic()

        self.ui.checkpointPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.checkpointPathLineEdit.nameFilters = ["SAM checkpoint (*.pth *.pt)", "All files (*)"]
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = [f"MedSAGa model (*{MODEL_SUFFIX})", "All files (*)"]

        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.refreshSlicesButton.connect("clicked(bool)", lambda _=None: self.refreshSlices(force=True))
        self.ui.slicesListWidget.connect("itemChanged(QListWidgetItem*)", self.onSliceItemChanged)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)

        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        if self._job is not None:
            self._job.abandon(10)
            self._job = None

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                self._parameterNode.inputVolume = node
        if not self._parameterNode.segmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                self._parameterNode.segmentation = node

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.ui.checkpointPathLineEdit.currentPath = self._parameterNode.checkpoint
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self._checkCanApply()

    # -- state

    def _checkCanApply(self, caller=None, event=None):
        p = self._parameterNode
        running = self._job is not None
        haveInputs = bool(p and p.inputVolume and p.segmentation)
        haveModel = bool(p and p.modelPath and os.path.isfile(p.modelPath))
        # a running job is bound to its nodes: the selection cannot change under it
        self.ui.inputVolumeSelector.enabled = not running
        self.ui.segmentationSelector.enabled = not running
        self.ui.fineTuneButton.enabled = haveInputs and not running
        self.ui.cancelButton.enabled = running
        self.ui.segmentButton.enabled = haveInputs and haveModel and not running
        self.ui.saveModelButton.enabled = haveModel and not running
        self.ui.checkpointPathLineEdit.enabled = bool(p and p.baseModel != "litemedsam")
        self.ui.undoButton.enabled = bool(p and p.segmentation and self.logic.canUndo(p.segmentation))
        key = (p.inputVolume.GetID() if p and p.inputVolume else None,
               p.segmentation.GetID() if p and p.segmentation else None,
               p.sliceAxis if p else None)
        if key != self._annotationsKey:
            self.refreshSlices()

    def onCheckpointChanged(self, path):
        if self._parameterNode:
            self._parameterNode.checkpoint = path

    def onModelPathChanged(self, path):
        if self._parameterNode:
            self._parameterNode.modelPath = path
        self.showModelInfo()

    # -- annotated slices

    def refreshSlices(self, force=False):
        from MedSAGaBridgeLib import geometry, segments
        p = self._parameterNode
        self._annotations = None
        self._annotationsKey = (p.inputVolume.GetID() if p and p.inputVolume else None,
                                p.segmentation.GetID() if p and p.segmentation else None,
                                p.sliceAxis if p else None)
        self._updatingSlices = True
        try:
            self.ui.slicesListWidget.clear()
            if not (p and p.inputVolume and p.segmentation):
                self.ui.slicesSummaryLabel.text = "Choose a volume and a segmentation."
                return
            try:
                ann = segments.class_labels(p.segmentation, p.inputVolume, axis=p.sliceAxis)
            except BridgeError as exc:
                self.ui.slicesSummaryLabel.text = str(exc)
                return
            self._annotations = ann
            excluded = self._excluded()
            axisName = geometry.axis_name(p.inputVolume, ann.axis)
            for index in ann.slices:
                item = qt.QListWidgetItem(f"{axisName} slice {index}")
                item.setData(qt.Qt.UserRole, index)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Unchecked if index in excluded else qt.Qt.Checked)
                self.ui.slicesListWidget.addItem(item)
            text = (f"{len(ann.class_names)} classes ({', '.join(ann.class_names)}); "
                    f"{len(ann.slices)} annotated {axisName} slices.")
            if ann.empty_segments:
                text += f" Empty: {', '.join(ann.empty_segments)}."
            if ann.predicted_slices:
                text += (f" {len(ann.predicted_slices)} slices hold unedited model output "
                         "(edit one to use it as an annotation).")
            if ann.overlap_voxels:
                text += f" {ann.overlap_voxels} voxels in several segments (the later segment wins)."
            self.ui.slicesSummaryLabel.text = text
        finally:
            self._updatingSlices = False

    def _excluded(self):
        text = self._parameterNode.excludedSlices if self._parameterNode else ""
        return {int(v) for v in text.split(",") if v.strip().isdigit()}

    def onSliceItemChanged(self, item):
        if self._updatingSlices or not self._parameterNode:
            return
        excluded = []
        for row in range(self.ui.slicesListWidget.count):
            it = self.ui.slicesListWidget.item(row)
            if it.checkState() != qt.Qt.Checked:
                excluded.append(str(it.data(qt.Qt.UserRole)))
        self._parameterNode.excludedSlices = ",".join(excluded)

    def selectedSlices(self):
        if self._annotations is None:
            return []
        excluded = self._excluded()
        return [s for s in self._annotations.slices if s not in excluded]

    # -- fine-tune

    def onFineTune(self):
        p = self._parameterNode
        if not installDependencies(askUser=True):  # asks with the normal cursor
            return
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            self.refreshSlices(force=True)
            if self._annotations is None:
                raise BridgeError(self.ui.slicesSummaryLabel.text)
            if p.baseModel != "litemedsam" and not p.checkpoint:
                raise BridgeError(f"{p.baseModel} needs the official SAM checkpoint file.")
            modelPath = p.modelPath
            if not modelPath or os.path.isdir(modelPath) or os.path.exists(modelPath):
                # never overwrite an adapted model: a new file beside it (or in Slicer's temp folder)
                folder = (modelPath if os.path.isdir(modelPath) else os.path.dirname(modelPath)) if modelPath \
                    else os.path.join(slicer.app.temporaryPath, "MedSAGa")
                os.makedirs(folder, exist_ok=True)
                modelPath = os.path.join(folder, f"{p.inputVolume.GetName()}-{time.strftime('%Y%m%d-%H%M%S')}{MODEL_SUFFIX}")
            slices = self.selectedSlices()
            if not slices:
                raise BridgeError("Tick at least one annotated slice to fine-tune on.")
            job = self.logic.startFinetune(p, modelPath, slices)
            self._startJob(job)
            self.ui.progressLabel.text = f"Fine-tuning on {len(job.context['inputs'].slices)} slices..."

    def _startJob(self, job):
        self._job = job
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
        self._timer.start()
        self._checkCanApply()

    def onCancel(self):
        if self._job is not None:
            self._job.job.cancel()
            self.ui.progressLabel.text = "Cancelling (a fine-tune stops after the current step)..."

    def onPollJob(self):
        bound = self._job
        if bound is None:
            self._timer.stop()
            return
        job = bound.job
        if job.poll():
            fraction = job.step_fraction()
            if fraction:
                self.ui.progressBar.setRange(0, fraction[1])
                self.ui.progressBar.setValue(fraction[0])
            prefix = "Fine-tuning: " if bound.kind == "finetune" else "Segmenting: "
            self.ui.progressLabel.text = prefix + job.progress_text()
        if job.state == "running":
            return
        self._timer.stop()
        self._job = None
        with slicer.util.tryWithErrorDisplay("Could not apply the result.", waitCursor=True):
            outcome = bound.finish(self.logic.editSession)  # applies to the job's own nodes
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(100 if outcome.state == "done" else 0)
            label = self.ui.progressLabel if bound.kind == "finetune" else self.ui.segmentStatusLabel
            label.text = outcome.text
            if outcome.model_path and self._parameterNode:
                self._parameterNode.modelPath = outcome.model_path
                self.ui.modelPathLineEdit.currentPath = outcome.model_path
            if outcome.state == "failed":
                slicer.util.errorDisplay(outcome.text, detailedText=job.error_text(40))
        self.showModelInfo()
        self._checkCanApply()

    # -- models

    def showModelInfo(self):
        p = self._parameterNode
        path = p.modelPath if p else ""
        if not path or not os.path.isfile(path):
            self.ui.modelInfoLabel.text = "No adapted model."
            return
        try:
            from MedSAGaBridgeLib import jobs
            self.ui.modelInfoLabel.text = jobs.describe_model(path)
        except Exception as exc:  # missing dependencies or not a model file
            self.ui.modelInfoLabel.text = f"Cannot read {os.path.basename(path)}: {exc}"

    def onLoadModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "Load adapted model", "",
                                              f"MedSAGa model (*{MODEL_SUFFIX});;All files (*)")
        if path:
            self._parameterNode.modelPath = path
            self.ui.modelPathLineEdit.currentPath = path
            self.showModelInfo()

    def onSaveModel(self):
        source = self._parameterNode.modelPath
        path = qt.QFileDialog.getSaveFileName(self.parent, "Save adapted model", os.path.basename(source),
                                              f"MedSAGa model (*{MODEL_SUFFIX})")
        if not path:
            return
        if not path.endswith(MODEL_SUFFIX):
            path += MODEL_SUFFIX
        with slicer.util.tryWithErrorDisplay("Could not save the model."):
            if os.path.abspath(path) != os.path.abspath(source):
                shutil.copyfile(source, path)
            self._parameterNode.modelPath = path
            self.ui.modelPathLineEdit.currentPath = path

    # -- segment

    def onSegment(self):
        if not installDependencies(askUser=True):  # asks with the normal cursor
            return
        with slicer.util.tryWithErrorDisplay("Could not segment the volume.", waitCursor=True):
            self._startJob(self.logic.startSegment(self._parameterNode))
            self.ui.segmentStatusLabel.text = "Segmenting the volume..."

    def onUndo(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not undo."):
            self.logic.undo(p.segmentation)
            self.ui.segmentStatusLabel.text = "Undone."
        self._checkCanApply()


#
# Logic
#

class MedSAGaLogic(ScriptedLoadableModuleLogic):
    """Panel actions over the bridge; usable from the Python console and tests."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._sessions = {}  # segmentation node ID -> EditSession (its undo history)

    def getParameterNode(self):
        return MedSAGaParameterNode(super().getParameterNode())

    def workdir(self):
        from MedSAGaBridgeLib import jobs
        return jobs.new_workdir(slicer.app.temporaryPath)

    def trainingOptions(self, p):
        return dict(base=p.baseModel, checkpoint=p.checkpoint or None, method=p.method,
                    steps=p.steps or None, time_budget=None if p.steps else p.timeBudget,
                    rank=p.rank, update_proj_gap=p.updateProjGap, scale=p.scale,
                    lr=p.learningRate, device=p.device)

    def startFinetune(self, p, modelPath, slices=None, **overrides):
        from MedSAGaBridgeLib import jobs
        options = self.trainingOptions(p)
        options.update(overrides)
        return jobs.start_finetune(p.inputVolume, p.segmentation, modelPath, self.workdir(), axis=p.sliceAxis,
                                   slices=slices or None, env=jobEnvironment(), **options)

    def startSegment(self, p):
        from MedSAGaBridgeLib import jobs, segments
        classNames, _, _ = jobs.model_summary(p.modelPath)
        ann = segments.class_labels(p.segmentation, p.inputVolume, axis=p.sliceAxis)
        editor = segmentEditorWidget()
        masking = segments.editor_masking(editor.mrmlSegmentEditorNode() if editor else None, p.segmentation)
        return jobs.start_segment(p.inputVolume, p.segmentation, p.modelPath, classNames, ann, self.workdir(),
                                  device=p.device, env=jobEnvironment(), masking=masking)

    def editSession(self, segmentationNode, volumeNode, masking=None):
        """The session a write into ``segmentationNode`` goes through: one per segmentation. When the
        Segment Editor edits that segmentation, its own undo stack takes the step (its Undo button
        and Ctrl+Z undo MedSAGa's change); otherwise the session's history does (the panel's Undo)."""
        from MedSAGaBridgeLib import segments
        session = self._sessions.get(segmentationNode.GetID())
        if session is None or session.segmentation_node is not segmentationNode:
            session = segments.EditSession(segmentationNode, volumeNode)
            self._sessions[segmentationNode.GetID()] = session
        session.volume_node = volumeNode
        session.masking = masking or segments.Masking()
        editor = segmentEditorWidget()
        editing = editor is not None and editor.segmentationNode() is segmentationNode
        session.external_save = editor.saveStateForUndo if editing else None
        session.external_undo = editor.undo if editing else None
        return session

    def canUndo(self, segmentationNode):
        session = self._sessions.get(segmentationNode.GetID())
        return bool(session is not None and (session.external_undo is not None or session.can_undo()))

    def undo(self, segmentationNode):
        session = self._sessions.get(segmentationNode.GetID())
        if session is None:
            return
        if session.external_undo is not None:
            session.external_undo()
        else:
            session.undo()


#
# Test (runs inside Slicer: the extension's ctest)
#

class MedSAGaTest(ScriptedLoadableModuleTest):

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = unsupportedReason()
        if reason:
            self.skipTest(reason)
        self.setUp()
        self.test_bridge_roundtrip_and_undo()
        self.setUp()
        self.test_finetune_segment_undo()

    def _phantom(self):
        import numpy as np
        shape = (12, 40, 40)
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        r = np.sqrt(((k - 6) / 12) ** 2 + ((j - 20) / 40) ** 2 + ((i - 20) / 40) ** 2)
        truth = np.zeros(shape, np.uint8)
        truth[r < 0.42] = 1
        truth[r < 0.22] = 2
        image = truth * 100.0 + np.random.default_rng(0).normal(0, 5, shape)
        volume = slicer.util.addVolumeFromArray(image.astype(np.float32), name="MedSAGaPhantom")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAGaTestSeg")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in ("outer", "inner")]
        painted = np.zeros_like(truth)
        for s in (3, 8):
            painted[s] = truth[s]
        for c, sid in enumerate(ids, start=1):
            slicer.util.updateSegmentBinaryLabelmapFromArray((painted == c).astype(np.uint8),
                                                             segmentation, sid, volume)
        return volume, segmentation, truth, painted

    def test_bridge_roundtrip_and_undo(self):
        import numpy as np
        from MedSAGaBridgeLib import segments
        self.delayDisplay("Bridge: labels, protected apply, undo")
        volume, segmentation, truth, painted = self._phantom()
        ann = segments.class_labels(segmentation, volume)
        self.assertEqual(ann.slices, [3, 8])
        self.assertEqual(ann.class_names, ["outer", "inner"])
        self.assertTrue(np.array_equal(ann.labels, painted))
        logic = MedSAGaLogic()
        session = logic.editSession(segmentation, volume)
        segments.apply_prediction(segmentation, volume, truth, ann.class_names, ann.axis,
                                  protected_slices=ann.slices, session=session)
        self.assertTrue(np.array_equal(segments.class_labels(segmentation, volume, axis=0).labels, truth))
        logic.undo(segmentation)
        self.assertTrue(np.array_equal(segments.class_labels(segmentation, volume, axis=0).labels, painted))
        self.delayDisplay("Bridge test passed")

    def test_finetune_segment_undo(self):
        import numpy as np
        from MedSAGaBridgeLib import jobs, segments
        self.delayDisplay("Fine-tune (few steps), segment volume, undo")
        missing = missingDependencies()
        if missing:  # never installed by a test: Slicer's testing mode forbids it
            self.skipTest("MedSAGa's Python packages are not installed (" + ", ".join(missing)
                          + "): install them from the MedSAGa module, then rerun the test.")
        volume, segmentation, truth, painted = self._phantom()
        logic = MedSAGaLogic()
        p = logic.getParameterNode()
        p.inputVolume, p.segmentation, p.steps, p.device = volume, segmentation, 2, "cpu"
        modelPath = os.path.join(logic.workdir(), "test" + MODEL_SUFFIX)
        overrides = {}
        checkpoint = os.environ.get("MEDSAGA_TEST_VIT_B_CHECKPOINT")  # a small vit_b-format file: fast
        if checkpoint:
            overrides = dict(base="vit_b", checkpoint=checkpoint, image_size=224, rank=4)
        bound = logic.startFinetune(p, modelPath, threads=2, **overrides)
        self.assertEqual(bound.job.wait(1800), "done", bound.job.error_text(40))
        self.assertTrue(os.path.isfile(modelPath))
        steps = jobs.step_events(bound.job.events)
        self.assertTrue(steps and steps[-1]["step"] == 2, bound.job.error_text(20))
        self.assertEqual(bound.finish().model_path, modelPath)
        self.assertFalse(os.path.exists(bound.job.workdir))  # the work folder is deleted
        p.modelPath = modelPath
        bound = logic.startSegment(p)
        self.assertEqual(bound.job.wait(1800), "done", bound.job.error_text(40))
        outcome = bound.finish(logic.editSession)
        self.assertEqual(sorted(outcome.written), ["inner", "outer"])
        after = segments.class_labels(segmentation, volume, axis=0).labels
        for s in (3, 8):
            self.assertTrue(np.array_equal(after[s], painted[s]))
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        logic.undo(segmentation)
        self.assertTrue(np.array_equal(segments.class_labels(segmentation, volume, axis=0).labels, painted))
        self.delayDisplay("End-to-end test passed")
