"""Segment Editor effect "MedSAGa".

- With an adapted model (.medsaga): segment the current slice (in process: one model call) or
  all slices (a background job, as the MedSAGa module's "Segment volume") into the segments
  named like the model's classes; annotated slices stay as drawn.
- With any model (LiteMedSAM or a SAM checkpoint): box prompt for the selected segment on the
  current slice (the segment's bounding box there, or a box dragged in the view), and propagate
  slice by slice in a background job, each result's box prompting the next slice.
Writes honour the editor's masking (editable area, intensity range, overwrite) and each apply is
one step on the Segment Editor's undo stack. Every decision is in MedSAGaBridgeLib.
"""

import os

import ctk
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

BASE_MODELS = ["litemedsam", "vit_b", "vit_l", "vit_h"]
DEVICES = ["auto", "cpu", "cuda", "mps"]


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):

    _models = {}  # cache shared by effect clones: key -> model

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MedSAGa"
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._dragStart = None
        self._dragStartXy = None
        self._lastSliceWidget = None
        self._boxPipeline = None
        self._job = None  # MedSAGaBridgeLib.jobs.BoundJob
        self._timer = None
        self._sessions = {}

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Segment with the Segment Anything Model.<p>
<b>Adapted model</b>: fills the current slice or all slices into the segments named like the
model's classes (fine-tune one in the MedSAGa module). Annotated slices are kept, and slices
within a few millimetres of them lean on them.<p>
<b>Box prompt</b>: segments the selected segment on the current slice from its bounding box
(or drag a box in a slice view with <i>Draw box</i> on); <i>Propagate</i> continues slice by slice.<p>
Masking settings apply; Undo reverts each apply. Long work runs in the background (Cancel stops it).
</html>"""

    # -- options

    def setupOptionsFrame(self):
        self.adaptedGroup = ctk.ctkCollapsibleGroupBox()
        self.adaptedGroup.title = "Adapted model"
        form = qt.QFormLayout(self.adaptedGroup)
        self.modelPathEdit = ctk.ctkPathLineEdit()
        self.modelPathEdit.filters = ctk.ctkPathLineEdit.Files
        self.modelPathEdit.nameFilters = ["MedSAGa model (*.medsaga)", "All files (*)"]
        self.modelPathEdit.toolTip = "Adapted model from the MedSAGa module."
        form.addRow("Model:", self.modelPathEdit)
        buttons = qt.QHBoxLayout()
        self.segmentSliceButton = qt.QPushButton("Segment current slice")
        self.segmentAllButton = qt.QPushButton("Segment all slices")
        buttons.addWidget(self.segmentSliceButton)
        buttons.addWidget(self.segmentAllButton)
        form.addRow(buttons)
        self.scriptedEffect.addOptionsWidget(self.adaptedGroup)

        self.boxGroup = ctk.ctkCollapsibleGroupBox()
        self.boxGroup.title = "Box prompt (selected segment)"
        form = qt.QFormLayout(self.boxGroup)
        self.baseModelCombo = qt.QComboBox()
        self.baseModelCombo.addItems(BASE_MODELS)
        form.addRow("Base model:", self.baseModelCombo)
        self.checkpointEdit = ctk.ctkPathLineEdit()
        self.checkpointEdit.filters = ctk.ctkPathLineEdit.Files
        self.checkpointEdit.toolTip = "Official SAM checkpoint for vit_b / vit_l / vit_h."
        form.addRow("Checkpoint:", self.checkpointEdit)
        self.marginSpin = qt.QSpinBox()
        self.marginSpin.setRange(0, 50)
        self.marginSpin.value = 3
        self.marginSpin.toolTip = "Pixels added around each box."
        form.addRow("Box margin:", self.marginSpin)
        self.maxSlicesSpin = qt.QSpinBox()
        self.maxSlicesSpin.setRange(1, 2000)
        self.maxSlicesSpin.value = 30
        self.maxSlicesSpin.toolTip = "Slices to propagate in each direction at most."
        form.addRow("Propagate at most:", self.maxSlicesSpin)
        self.drawBoxCheck = qt.QCheckBox("Draw box (drag in a slice view)")
        form.addRow(self.drawBoxCheck)
        buttons = qt.QHBoxLayout()
        self.boxButton = qt.QPushButton("Box from segment")
        self.boxButton.toolTip = "Prompt with the selected segment's bounding box on the current slice."
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "From the current slice, slice by slice in both directions (in the background)."
        buttons.addWidget(self.boxButton)
        buttons.addWidget(self.propagateButton)
        form.addRow(buttons)
        self.scriptedEffect.addOptionsWidget(self.boxGroup)

        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(DEVICES)
        self.deviceCombo.toolTip = "Where the model runs (auto: a GPU when there is one)."
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceCombo)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        self.scriptedEffect.addOptionsWidget(self.cancelButton)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onPollJob)

        self.segmentSliceButton.connect("clicked()", lambda: self.runGuarded(self.segmentCurrentSlice))
        self.segmentAllButton.connect("clicked()", lambda: self.runGuarded(self.segmentAllSlices))
        self.boxButton.connect("clicked()", lambda: self.runGuarded(self.boxFromSegment))
        self.propagateButton.connect("clicked()", lambda: self.runGuarded(self.propagate))
        self.cancelButton.connect("clicked()", self.onCancel)
        # the user's choices go to the effect's parameters (updateGUIFromMRML reads them back)
        self.modelPathEdit.connect("currentPathChanged(QString)", self.updateMRMLFromGUI)
        self.baseModelCombo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.checkpointEdit.connect("currentPathChanged(QString)", self.updateMRMLFromGUI)
        self.deviceCombo.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ModelPath", "")
        self.scriptedEffect.setParameterDefault("BaseModel", "litemedsam")
        self.scriptedEffect.setParameterDefault("Checkpoint", "")
        self.scriptedEffect.setParameterDefault("Device", "auto")

    def updateGUIFromMRML(self):
        def value(name):
            return self.scriptedEffect.parameter(name) if self.scriptedEffect.parameterDefined(name) else ""
        path = value("ModelPath") or self._moduleModelPath()
        for widget, text in ((self.modelPathEdit, path), (self.checkpointEdit, value("Checkpoint"))):
            if widget.currentPath != text:
                wasBlocked = widget.blockSignals(True)
                widget.currentPath = text
                widget.blockSignals(wasBlocked)
        for combo, text in ((self.baseModelCombo, value("BaseModel") or "litemedsam"),
                            (self.deviceCombo, value("Device") or "auto")):
            wasBlocked = combo.blockSignals(True)
            combo.currentText = text
            combo.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter("ModelPath", self.modelPathEdit.currentPath)
        self.scriptedEffect.setParameter("BaseModel", self.baseModelCombo.currentText)
        self.scriptedEffect.setParameter("Checkpoint", self.checkpointEdit.currentPath)
        self.scriptedEffect.setParameter("Device", self.deviceCombo.currentText)

    def _moduleModelPath(self):
        """The MedSAGa module's last model, read from its parameter node if one exists (never
        creating it)."""
        node = slicer.mrmlScene.GetSingletonNode("MedSAGa", "vtkMRMLScriptedModuleNode")
        return (node.GetParameter("modelPath") or "") if node else ""

    # -- helpers

    def runGuarded(self, function, *args):
        import MedSAGa
        reason = MedSAGa.unsupportedReason()
        if reason:
            slicer.util.errorDisplay(reason)
            return
        if not MedSAGa.installDependencies(askUser=True):  # asks with the normal cursor
            return
        with slicer.util.tryWithErrorDisplay("MedSAGa failed.", waitCursor=True):
            function(*args)

    def _nodes(self):
        from MedSAGaBridgeLib import BridgeError
        p = self.scriptedEffect.parameterSetNode()
        segmentation, volume = p.GetSegmentationNode(), p.GetSourceVolumeNode()
        if segmentation is None or volume is None:
            raise BridgeError("Select a segmentation and a source volume.")
        return p, segmentation, volume

    def _session(self, segmentation, volume, masking=None):
        """Writes with the editor's masking; the undo step goes on the Segment Editor's stack
        while it edits this segmentation."""
        from MedSAGaBridgeLib import segments
        editorNode = self.scriptedEffect.parameterSetNode()
        session = self._sessions.get(segmentation.GetID())
        if session is None or session.segmentation_node is not segmentation:
            session = self._sessions[segmentation.GetID()] = segments.EditSession(segmentation, volume)
        session.volume_node = volume
        session.masking = masking or segments.editor_masking(editorNode, segmentation)
        editing = editorNode is not None and editorNode.GetSegmentationNode() is segmentation
        session.external_save = self.scriptedEffect.saveStateForUndo if editing else None
        return session

    def _sliceWidget(self):
        if self._lastSliceWidget is not None:
            return self._lastSliceWidget
        return slicer.app.layoutManager().sliceWidget("Red")

    def _currentSlice(self, volume, sliceWidget=None):
        from MedSAGaBridgeLib import BridgeError, geometry
        m = (sliceWidget or self._sliceWidget()).sliceLogic().GetSliceNode().GetSliceToRAS()
        axis, index = geometry.view_slice(volume, [[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        if index is None:
            raise BridgeError("The slice view is outside the source volume.")
        return axis, index

    def _device(self):
        return self.deviceCombo.currentText

    def _inProcessDevice(self):
        import torch
        device = self._device()
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def _segmenter(self, path):
        from MedSAGaBridgeLib import BridgeError
        from MedSAGaLib.modelfile import load_model
        if not path or not os.path.isfile(path):
            raise BridgeError("Choose an adapted model file (fine-tune one in the MedSAGa module).")
        key = ("segmenter", path, os.path.getmtime(path), self._inProcessDevice())
        if key not in self._models:
            self._models.clear()
            self._models[key] = load_model(path).eval().to(self._inProcessDevice())
        return self._models[key]

    def _base(self):
        from MedSAGaBridgeLib import BridgeError
        from MedSAGaLib.models import build_base_model
        name = self.baseModelCombo.currentText
        checkpoint = self.checkpointEdit.currentPath or None
        if name != "litemedsam" and not checkpoint:
            raise BridgeError(f"{name} needs the official SAM checkpoint file.")
        key = ("base", name, checkpoint, self._inProcessDevice())
        if key not in self._models:
            self._models.clear()
            self._models[key] = build_base_model(name, checkpoint=checkpoint).eval().to(self._inProcessDevice())
        return self._models[key]

    # -- adapted model

    def segmentCurrentSlice(self):
        from MedSAGaBridgeLib import prompts
        _, segmentation, volume = self._nodes()
        segmenter = self._segmenter(self.modelPathEdit.currentPath)
        axis, index = self._currentSlice(volume)
        slices, written = prompts.segment_slice_with_model(segmentation, volume, segmenter, axis, index,
                                                           session=self._session(segmentation, volume),
                                                           device=self._inProcessDevice())
        if not slices:
            self.statusLabel.text = f"Slice {index} is annotated; it is kept as drawn."
            return
        self.statusLabel.text = "Segmented the slice: " + ", ".join(f"{k} {v} voxels" for k, v in written.items())

    def segmentAllSlices(self):
        from MedSAGaBridgeLib import BridgeError, jobs, segments
        if self._job is not None:
            raise BridgeError("A MedSAGa job is running; wait for it or cancel it.")
        _, segmentation, volume = self._nodes()
        path = self.modelPathEdit.currentPath
        if not path or not os.path.isfile(path):
            raise BridgeError("Choose an adapted model file (fine-tune one in the MedSAGa module).")
        classNames, _, _ = jobs.model_summary(path)
        mapping = segments.segments_for_classes(segmentation, classNames)
        ann = segments.class_labels(segmentation, volume, list(mapping.values()))
        import MedSAGa
        self._startJob(jobs.start_segment(volume, segmentation, path, classNames, ann,
                                          jobs.new_workdir(slicer.app.temporaryPath), device=self._device(),
                                          env=MedSAGa.jobEnvironment(),
                                          masking=segments.editor_masking(self.scriptedEffect.parameterSetNode(),
                                                                          segmentation)),
                       "Segmenting all slices...")

    # -- box prompts

    def boxFromSegment(self, box=None, sliceWidget=None):
        from MedSAGaBridgeLib import BridgeError, prompts
        p, segmentation, volume = self._nodes()
        segmentId = p.GetSelectedSegmentID()
        if not segmentId:
            raise BridgeError("Select a segment.")
        axis, index = self._currentSlice(volume, sliceWidget)
        predict = prompts.box_predictor(self._base(), self._inProcessDevice())
        written = prompts.box_prompt(segmentation, volume, segmentId, predict, prompts.normalized_array(volume),
                                     axis, index, box, margin=self.marginSpin.value,
                                     session=self._session(segmentation, volume))
        self.statusLabel.text = f"Box prompt: slice {', '.join(map(str, written))} written."

    def propagate(self):
        from MedSAGaBridgeLib import BridgeError, jobs, prompts, segments
        if self._job is not None:
            raise BridgeError("A MedSAGa job is running; wait for it or cancel it.")
        p, segmentation, volume = self._nodes()
        segmentId = p.GetSelectedSegmentID()
        if not segmentId:
            raise BridgeError("Select a segment.")
        name = self.baseModelCombo.currentText
        checkpoint = self.checkpointEdit.currentPath or None
        if name != "litemedsam" and not checkpoint:
            raise BridgeError(f"{name} needs the official SAM checkpoint file.")
        axis, index = self._currentSlice(volume)
        import MedSAGa
        self._startJob(prompts.start_propagation(
            segmentation, volume, segmentId, axis, index, margin=self.marginSpin.value,
            max_slices=self.maxSlicesSpin.value, base=name, checkpoint=checkpoint, device=self._device(),
            workdir=jobs.new_workdir(slicer.app.temporaryPath), env=MedSAGa.jobEnvironment(),
            masking=segments.editor_masking(p, segmentation)), "Propagating...")

    # -- background jobs

    def _startJob(self, job, text):
        self._job = job
        self.cancelButton.enabled = True
        self.statusLabel.text = text
        self._timer.start()

    def onCancel(self):
        if self._job is not None:
            self._job.job.cancel()
            self.statusLabel.text = "Cancelling..."

    def onPollJob(self):
        bound = self._job
        if bound is None:
            self._timer.stop()
            return
        if bound.job.poll():
            self.statusLabel.text = bound.job.progress_text()
        if bound.job.state == "running":
            return
        self._timer.stop()
        self._job = None
        self.cancelButton.enabled = False
        with slicer.util.tryWithErrorDisplay("MedSAGa could not apply the result.", waitCursor=True):
            outcome = bound.finish(self._session)  # the nodes the job was started for
            self.statusLabel.text = outcome.text
            if outcome.state == "failed":
                slicer.util.errorDisplay("MedSAGa job failed.", detailedText=bound.job.error_text(40))

    def cleanup(self):
        if self._timer:
            self._timer.stop()
        if self._job is not None:
            self._job.abandon(2)
            self._job = None

    # -- drawing a box

    def deactivate(self):
        self._hideBox()
        self._dragStart = None

    def _showBox(self, viewWidget, xy0, xy1):
        if self._boxPipeline is None or self._boxPipeline[4] is not viewWidget:
            self._hideBox()
            points = vtk.vtkPoints()
            points.SetNumberOfPoints(4)
            lines = vtk.vtkCellArray()
            lines.InsertNextCell(5)
            for i in (0, 1, 2, 3, 0):
                lines.InsertCellPoint(i)
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(1.0, 0.85, 0.1)
            actor.GetProperty().SetLineWidth(2)
            renderer = self.scriptedEffect.renderer(viewWidget)
            renderer.AddActor2D(actor)
            self._boxPipeline = (points, poly, actor, renderer, viewWidget)
        points, poly = self._boxPipeline[0], self._boxPipeline[1]
        (x0, y0), (x1, y1) = xy0, xy1
        for i, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
            points.SetPoint(i, x, y, 0)
        points.Modified()
        poly.Modified()
        self.scriptedEffect.forceRender(viewWidget)

    def _hideBox(self):
        if self._boxPipeline is not None:
            _, _, actor, renderer, viewWidget = self._boxPipeline
            renderer.RemoveActor2D(actor)
            self._boxPipeline = None
            self.scriptedEffect.forceRender(viewWidget)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        self._lastSliceWidget = viewWidget
        if not self.drawBoxCheck.checked:
            return False
        xy = callerInteractor.GetEventPosition()
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            self._dragStart = self.xyToRas(xy, viewWidget)  # the base class's helper: QPoint in, list out
            self._dragStartXy = xy
            self._showBox(viewWidget, xy, xy)
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._dragStart is not None:
            self._showBox(viewWidget, self._dragStartXy, xy)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._dragStart is not None:
            start, self._dragStart = self._dragStart, None
            self._hideBox()
            end = self.xyToRas(xy, viewWidget)
            from MedSAGaBridgeLib import BridgeError, geometry
            try:
                _, segmentation, volume = self._nodes()
                axis, _ = self._currentSlice(volume, viewWidget)
                box = geometry.box_from_ras(volume, axis, start, end)
            except BridgeError as exc:
                self.statusLabel.text = str(exc)
                return True
            if box is None or (box[2] - box[0] < 2 and box[3] - box[1] < 2):
                self.statusLabel.text = "Drag a larger box."
                return True
            self.runGuarded(self.boxFromSegment, box, viewWidget)
            return True
        return False
