"""Segment Editor effect "MedSAGa".

- With an adapted model (.medsaga): segment the current slice or all slices into the segments
  named like the model's classes; annotated slices stay as drawn.
- With any model (LiteMedSAM or a SAM checkpoint): box prompt for the selected segment on the
  current slice (the segment's bounding box there, or a box dragged in the view), and propagate
  slice by slice, each result's box prompting the next slice.
Every apply saves the editor's undo state first (one undo step). MRML work is in MedSAGaBridge.
"""

import os

import ctk
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

import MedSAGaBridge as bridge

BASE_MODELS = ["litemedsam", "vit_b", "vit_l", "vit_h"]


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
model's classes (fine-tune one in the MedSAGa module). Annotated slices are kept.<p>
<b>Box prompt</b>: segments the selected segment on the current slice from its bounding box
(or drag a box in a slice view with <i>Draw box</i> on); <i>Propagate</i> continues slice by slice.
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
        self.propagateButton.toolTip = "From the current slice, slice by slice in both directions."
        buttons.addWidget(self.boxButton)
        buttons.addWidget(self.propagateButton)
        form.addRow(buttons)
        self.scriptedEffect.addOptionsWidget(self.boxGroup)

        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.segmentSliceButton.connect("clicked()", lambda: self.runGuarded(self.segmentWithModel, True))
        self.segmentAllButton.connect("clicked()", lambda: self.runGuarded(self.segmentWithModel, False))
        self.boxButton.connect("clicked()", lambda: self.runGuarded(self.boxFromSegment, False))
        self.propagateButton.connect("clicked()", lambda: self.runGuarded(self.boxFromSegment, True))

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("ModelPath", "")
        self.scriptedEffect.setParameterDefault("BaseModel", "litemedsam")

    def updateGUIFromMRML(self):
        path = self.scriptedEffect.parameter("ModelPath") if self.scriptedEffect.parameterDefined("ModelPath") else ""
        if not path:
            try:  # the model last adapted or loaded in the MedSAGa module (its parameter node)
                import MedSAGa
                path = MedSAGa.MedSAGaLogic().getParameterNode().modelPath
            except Exception:
                path = ""
        if path and self.modelPathEdit.currentPath != path:
            self.modelPathEdit.currentPath = path

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("ModelPath", self.modelPathEdit.currentPath)
        self.scriptedEffect.setParameter("BaseModel", self.baseModelCombo.currentText)

    # -- helpers

    def runGuarded(self, function, *args):
        with slicer.util.tryWithErrorDisplay("MedSAGa failed.", waitCursor=True):
            import MedSAGa
            if not MedSAGa.installDependencies(askUser=True):
                return
            function(*args)

    def _nodes(self):
        p = self.scriptedEffect.parameterSetNode()
        segmentation = p.GetSegmentationNode()
        getter = getattr(p, "GetSourceVolumeNode", None) or getattr(p, "GetMasterVolumeNode")
        volume = getter()
        if segmentation is None or volume is None:
            raise bridge.BridgeError("Select a segmentation and a source volume.")
        return p, segmentation, volume

    def _sliceWidget(self):
        if self._lastSliceWidget is not None:
            return self._lastSliceWidget
        return slicer.app.layoutManager().sliceWidget("Red")

    def _currentSlice(self, volume, sliceWidget=None):
        sliceNode = (sliceWidget or self._sliceWidget()).sliceLogic().GetSliceNode()
        m = sliceNode.GetSliceToRAS()
        normal = [m.GetElement(r, 2) for r in range(3)]
        center = [m.GetElement(r, 3) for r in range(3)]
        axis = bridge.axis_from_normal(volume, normal)
        index = bridge.slice_index(volume, axis, center)
        if index is None:
            raise bridge.BridgeError("The slice view is outside the source volume.")
        return axis, index

    def _segmenter(self, path):
        from MedSAGaLib.modelfile import load_model
        if not path or not os.path.isfile(path):
            raise bridge.BridgeError("Choose an adapted model file (fine-tune one in the MedSAGa module).")
        key = ("segmenter", path, os.path.getmtime(path))
        if key not in self._models:
            self._models.clear()
            self._models[key] = load_model(path).eval()
        return self._models[key]

    def _base(self):
        from MedSAGaLib.models import build_base_model
        name = self.baseModelCombo.currentText
        checkpoint = self.checkpointEdit.currentPath or None
        if name != "litemedsam" and not checkpoint:
            raise bridge.BridgeError(f"{name} needs the official SAM checkpoint file.")
        key = ("base", name, checkpoint)
        if key not in self._models:
            self._models.clear()
            self._models[key] = build_base_model(name, checkpoint=checkpoint).eval()
        return self._models[key]

    # -- adapted model

    def segmentWithModel(self, currentSliceOnly):
        p, segmentation, volume = self._nodes()
        segmenter = self._segmenter(self.modelPathEdit.currentPath)
        axis = index = None
        if currentSliceOnly:
            axis, index = self._currentSlice(volume)
        slices, written = bridge.segment_with_model(segmentation, volume, segmenter, axis, index,
                                                    before_write=self.scriptedEffect.saveStateForUndo)
        if currentSliceOnly and not slices:
            self.statusLabel.text = f"Slice {index} is annotated; it is kept as drawn."
            return
        self.statusLabel.text = (f"Segmented {len(slices)} slice(s): "
                                 + ", ".join(f"{k} {v} voxels" for k, v in written.items()))

    # -- box prompts

    def boxFromSegment(self, propagate, box=None, sliceWidget=None):
        p, segmentation, volume = self._nodes()
        segmentId = p.GetSelectedSegmentID()
        if not segmentId:
            raise bridge.BridgeError("Select a segment.")
        axis, index = self._currentSlice(volume, sliceWidget)
        predict = bridge.box_predictor(volume, self._base())
        array01 = bridge.normalized_array(volume)
        written = bridge.box_prompt(segmentation, volume, segmentId, predict, array01, axis, index, box,
                                    propagate_slices=self.maxSlicesSpin.value if propagate else 0,
                                    margin=self.marginSpin.value,
                                    before_write=self.scriptedEffect.saveStateForUndo)
        self.statusLabel.text = (f"Box prompt: slice(s) {', '.join(map(str, written))} written."
                                 if written else "Nothing to add.")

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
            self._dragStart = self.scriptedEffect.xyToRas(xy, viewWidget)
            self._dragStartXy = xy
            self._showBox(viewWidget, xy, xy)
            return True
        if eventId == vtk.vtkCommand.MouseMoveEvent and self._dragStart is not None:
            self._showBox(viewWidget, self._dragStartXy, xy)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and self._dragStart is not None:
            start, self._dragStart = self._dragStart, None
            self._hideBox()
            end = self.scriptedEffect.xyToRas(xy, viewWidget)
            try:
                _, segmentation, volume = self._nodes()
                axis, _ = self._currentSlice(volume, viewWidget)
                box = bridge.box_from_ras(volume, axis, start, end)
            except bridge.BridgeError as exc:
                self.statusLabel.text = str(exc)
                return True
            if box is None or (box[2] - box[0] < 2 and box[3] - box[1] < 2):
                self.statusLabel.text = "Drag a larger box."
                return True
            self.runGuarded(self.boxFromSegment, False, box, viewWidget)
            return True
        return False
