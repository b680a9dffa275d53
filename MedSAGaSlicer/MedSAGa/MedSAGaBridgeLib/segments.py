"""Segments <-> class labels, predicted-slice bookkeeping, masking-aware writes and undo.

Every write goes through ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` (Slicer 5.10+),
the code the Segment Editor's own effects use (``qSlicerSegmentEditorAbstractEffect::
modifySegmentByLabelmap`` delegates to it), so the editable area, the editable intensity range
and the "modify other segments" setting hold for MedSAGa's writes as for a paint stroke.
"""

import json
import zlib
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer
from MedSAGaLib.slices import annotated_slices, get_slice, slice_view

from . import BridgeError, ClassMismatchError
from .geometry import (extent_shape, image_to_world, ijk_to_ras, oriented_array, oriented_image, resample, resolve_axis,
                       volume_reference_image, volume_shape)

_LOGICS = {}


def segmentations_logic(scene):
    """The segmentations module logic attached to ``scene``.

    Inside Slicer this is the application's logic; with slicer-core one is created and
    attached once per scene (segments can only be created once a logic is attached)."""
    try:  # inside the Slicer application
        logic = slicer.modules.segmentations.logic()
        if logic is not None and logic.GetMRMLScene() is scene:
            return logic
    except AttributeError:
        pass
    logic = _LOGICS.get(id(scene))
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        _LOGICS[id(scene)] = logic
    return logic


def segmentation_reference_image(segmentation_node, volume_node=None):
    """Oriented image (geometry only) of the segmentation's reference geometry.

    Falls back to the volume's geometry (and records it on the segmentation) when the
    segmentation has none yet."""
    seg = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = seg.GetConversionParameter(name)
    if not geometry and volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        geometry = seg.GetConversionParameter(name)
    ref = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(
            geometry, ref, True, vtk.VTK_UNSIGNED_CHAR, 1):
        raise BridgeError("The segmentation has no reference geometry; choose a volume.")
    return ref


# ----------------------------------------------------------------------- segmentation -> arrays

def segments(segmentation_node):
    """[(segment_id, name)] in the segmentation's order."""
    seg = segmentation_node.GetSegmentation()
    return [(seg.GetNthSegmentID(n), seg.GetNthSegment(n).GetName()) for n in range(seg.GetNumberOfSegments())]


def segment_on(segmentation_node, segment_id, reference):
    """Binary (k, j, i) uint8 mask of one segment on a reference geometry (nearest neighbour)."""
    segmentation_node.CreateBinaryLabelmapRepresentation()
    img = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, img)
    arr, ext = oriented_array(img)
    if arr is None or not arr.any():
        return np.zeros(extent_shape(reference.GetExtent()), np.uint8)
    binary = oriented_image((arr != 0).astype(np.uint8), image_to_world(img), origin_index=(ext[0], ext[2], ext[4]))
    return resample(binary, reference)


def segment_array(segmentation_node, segment_id, volume_node):
    """Binary (k, j, i) uint8 mask of one segment on the volume's grid."""
    return segment_on(segmentation_node, segment_id, volume_reference_image(volume_node))


@dataclass
class Annotations:
    labels: np.ndarray            # (k, j, i) int, 0 background, c = class c (1-based)
    class_names: list
    segment_ids: list
    axis: int
    slices: list                  # annotated slice indices along axis
    empty_segments: list = field(default_factory=list)
    overlap_voxels: int = 0       # voxels claimed by more than one segment (later segment wins)
    predicted_slices: list = field(default_factory=list)  # model output left as written


# Slices written by a model are recorded on the segmentation node (per slice and segment, a
# checksum of the segment's mask there), so they are not mistaken for annotations later; a
# slice the user edits afterwards no longer matches and counts as annotated again.
PREDICTED_ATTRIBUTE = "MedSAGa.PredictedSlices"


def _slice_checksum(mask2d):
    return zlib.crc32(np.packbits(np.ascontiguousarray(mask2d, dtype=bool)).tobytes()) & 0xFFFFFFFF


def _read_predicted(segmentation_node, volume_node):
    text = segmentation_node.GetAttribute(PREDICTED_ATTRIBUTE)
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if record.get("volume") != volume_node.GetID():
        return None
    return record


def record_predicted(segmentation_node, volume_node, axis, slices):
    """Remember ``slices`` (along ``axis``) as model output, with their current content."""
    record = _read_predicted(segmentation_node, volume_node)
    if record is None or record.get("axis") != axis:
        record = {"volume": volume_node.GetID(), "axis": int(axis), "slices": {}}
    masks = {sid: segment_array(segmentation_node, sid, volume_node) for sid, _ in segments(segmentation_node)}
    for s in slices:
        record["slices"][str(int(s))] = {sid: _slice_checksum(get_slice(m, axis, s))
                                         for sid, m in masks.items() if get_slice(m, axis, s).any()}
    segmentation_node.SetAttribute(PREDICTED_ATTRIBUTE, json.dumps(record))


def _predicted_unchanged(record, masks, axis):
    """Recorded slices whose content (for the given segments) is still the model's."""
    out = []
    if not record or record.get("axis") != axis or not masks:
        return out
    count = next(iter(masks.values())).shape[axis]
    for key, sums in record.get("slices", {}).items():
        s = int(key)
        if not 0 <= s < count:
            continue
        if sums and all(_slice_checksum(get_slice(m, axis, s)) == sums[sid] if sid in sums
                        else not get_slice(m, axis, s).any() for sid, m in masks.items()):
            out.append(s)
    return sorted(out)


def class_labels(segmentation_node, volume_node, segment_ids=None, axis="auto"):
    """Class label volume on the volume's grid from the segments (class c = c-th segment).

    Overlaps: the later segment wins (as Slicer's labelmap export), counted in
    ``overlap_voxels``. Empty segments still define a class (listed in ``empty_segments``)."""
    all_segments = segments(segmentation_node)
    if segment_ids is None:
        segment_ids = [sid for sid, _ in all_segments]
    names = dict(all_segments)
    missing = [s for s in segment_ids if s not in names]
    if missing:
        raise BridgeError(f"Segments not found: {missing}")
    if not segment_ids:
        raise BridgeError("The segmentation has no segments: add one segment per class.")
    labels = np.zeros(volume_shape(volume_node), np.uint8)
    seen = np.zeros(labels.shape, bool)
    overlap, empty, masks = 0, [], {}
    for c, sid in enumerate(segment_ids, start=1):
        mask = segment_array(segmentation_node, sid, volume_node).astype(bool)
        masks[sid] = mask
        if not mask.any():
            empty.append(names[sid])
            continue
        overlap += int(np.count_nonzero(seen & mask))
        seen |= mask
        labels[mask] = c
    record = _read_predicted(segmentation_node, volume_node)
    predicted, drawn = [], labels
    if record is not None:
        rec_axis = record.get("axis")
        predicted = _predicted_unchanged(record, masks, rec_axis)
        if predicted:
            drawn = labels.copy()
            for s in predicted:
                drawn[slice_view(rec_axis, s)] = 0
    ax = resolve_axis(volume_node, axis, drawn)
    if record is None or record.get("axis") != ax:
        predicted, drawn = [], labels
    return Annotations(labels=labels, class_names=[names[s] for s in segment_ids], segment_ids=list(segment_ids),
                       axis=ax, slices=annotated_slices(drawn, ax), empty_segments=empty,
                       overlap_voxels=overlap, predicted_slices=predicted)


def segments_for_classes(segmentation_node, class_names, create_missing=False):
    """{class name: segment id}: the segment named like each class (case-insensitive)."""
    by_name = {}
    for sid, name in segments(segmentation_node):
        by_name.setdefault(name.strip().lower(), sid)
    mapping, missing = {}, []
    for name in class_names:
        sid = by_name.get(str(name).strip().lower())
        if sid is None:
            missing.append(name)
        mapping[name] = sid
    if missing:
        if not create_missing:
            have = [name for _, name in segments(segmentation_node)]
            raise ClassMismatchError(
                f"The model's classes {list(class_names)} do not match the segments {have}: "
                f"no segment named {missing}. Rename the segments or load the matching model.")
        for name in missing:
            mapping[name] = segmentation_node.GetSegmentation().AddEmptySegment("", str(name))
    return mapping


# ------------------------------------------------------------------------ masking and editing

@dataclass
class Masking:
    """The Segment Editor's masking settings (its parameter node), as plain values.

    Defaults when the Segment Editor is not editing this segmentation: edit everywhere and leave
    other segments alone (a fill never erases a segment the user did not name as a class)."""
    mask_mode: int = slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
    mask_segment_id: str = ""
    intensity_mask: bool = False
    intensity_range: tuple = (0.0, 0.0)
    overwrite_mode: int = slicer.vtkMRMLSegmentEditorNode.OverwriteNone

    @classmethod
    def from_editor_node(cls, node):
        """The settings of a vtkMRMLSegmentEditorNode (the Segment Editor's parameter node)."""
        return cls(mask_mode=node.GetMaskMode(), mask_segment_id=node.GetMaskSegmentID() or "",
                   intensity_mask=bool(node.GetSourceVolumeIntensityMask()),
                   intensity_range=tuple(node.GetSourceVolumeIntensityMaskRange()),
                   overwrite_mode=node.GetOverwriteMode())

    def apply_to(self, node):
        node.SetMaskMode(self.mask_mode)
        node.SetMaskSegmentID(self.mask_segment_id or None)
        node.SetSourceVolumeIntensityMask(bool(self.intensity_mask))
        node.SetSourceVolumeIntensityMaskRange(*[float(v) for v in self.intensity_range])
        node.SetOverwriteMode(self.overwrite_mode)


def editor_masking(editor_node, segmentation_node):
    """The masking a MedSAGa write into ``segmentation_node`` honours: the Segment Editor's
    settings when it is editing that segmentation, else the defaults (edit everywhere, other
    segments untouched)."""
    if editor_node is not None and editor_node.GetSegmentationNode() is segmentation_node:
        return Masking.from_editor_node(editor_node)
    return Masking()


class EditSession:
    """Writes into one segmentation as the Segment Editor does, with one undo step per apply.

    A private, hidden segment editor node carries the ``masking`` settings to a
    vtkSlicerSegmentEditorLogic, whose ``ModifySegmentByLabelmap`` applies them. ``save_state``:
    called once before an apply changes anything; pass the Segment Editor's own
    ``saveStateForUndo`` when it edits this segmentation (its Undo button then covers MedSAGa's
    change), else the session keeps the undo history itself (``undo``/``redo``)."""

    def __init__(self, segmentation_node, volume_node=None, masking=None, save_state=None):
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        scene = segmentation_node.GetScene()
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAGaEdit")
        self.editor_node.SetHideFromEditors(True)
        self.editor_node.SetSaveWithScene(False)
        self.logic.SetSegmentEditorNode(self.editor_node)
        self.masking = masking or Masking()
        self.external_save = save_state
        self.external_undo = None  # the Segment Editor's undo, when its stack holds the steps
        self._bind()

    def _bind(self):
        if self.logic.GetSegmentationNode() is not self.segmentation_node:
            self.logic.SetSegmentationNode(self.segmentation_node)
        if self.volume_node is not None and self.logic.GetSourceVolumeNode() is not self.volume_node:
            self.logic.SetSourceVolumeNode(self.volume_node)
        self.masking.apply_to(self.editor_node)

    def save(self):
        """Save the undo state (once per apply, before the first change)."""
        self._bind()
        if self.external_save is not None:
            self.external_save()
        else:
            self.logic.SaveStateForUndo()

    def can_undo(self):
        return self.external_save is None and bool(self.logic.CanUndo())

    def undo(self):
        self._bind()
        self.logic.Undo()

    def redo(self):
        self._bind()
        self.logic.Redo()

    def close(self):
        """Remove the session's hidden editor node from the scene."""
        scene = self.editor_node.GetScene()
        if scene is not None:
            scene.RemoveNode(self.editor_node)

    def set_segment(self, segment_id, target, writable, reference):
        """Make ``segment_id`` equal ``target`` where ``writable`` (both (k, j, i) on ``reference``),
        within the editor's masking. Returns the voxels the segment holds there afterwards."""
        self._bind()
        self.editor_node.SetSelectedSegmentID(segment_id)
        current = segment_on(self.segmentation_node, segment_id, reference)
        matrix, ext = image_to_world(reference), reference.GetExtent()
        origin = (ext[0], ext[2], ext[4])
        remove = writable & (current != 0) & (target == 0)
        add = writable & (target != 0) & (current == 0)
        L = slicer.vtkSlicerSegmentEditorLogic
        for mode, mask in ((L.ModificationModeRemove, remove), (L.ModificationModeAdd, add)):
            if mask.any():
                image = oriented_image(mask.astype(np.uint8), matrix, origin_index=origin)
                self.logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, image, mode, False, False)
        after = segment_on(self.segmentation_node, segment_id, reference)
        return int(np.count_nonzero((after != 0) & writable))


# ---------------------------------------------------------------------- prediction -> segments

def apply_prediction(segmentation_node, volume_node, prediction, class_names, axis, protected_slices=(),
                     slices=None, session=None, create_missing=False, record=True):
    """Write a (k, j, i) class prediction (0 background, c -> class_names[c-1]) into segments.

    Only voxels of the volume's slices in ``slices`` (all when None) that are not in
    ``protected_slices`` may change, and of those only what the editor's masking allows
    (``session``: an EditSession; a default one when None). Every protected (annotated) slice
    and everything outside the volume stays exactly as it is, also when the segmentation's
    geometry differs from the volume's. Each class goes to the segment of the same name. The
    session's undo state is saved once first: the whole apply is one undo step. With ``record``
    the written slices are remembered as model output (not annotations) until the user edits
    them. Returns {name: voxels of the class on the writable slices}."""
    prediction = np.asarray(prediction)
    shape = volume_shape(volume_node)
    if prediction.shape != shape:
        raise BridgeError(f"Prediction shape {prediction.shape} does not match the volume {shape}.")
    if prediction.max(initial=0) > len(class_names):
        raise ClassMismatchError(f"Prediction has label {int(prediction.max())} but only {len(class_names)} classes.")
    if not create_missing:  # fail before saving an undo state or changing anything
        segments_for_classes(segmentation_node, class_names)
    session = session or EditSession(segmentation_node, volume_node)
    session.save()  # creating segments below is part of the same undo step
    mapping = segments_for_classes(segmentation_node, class_names, create_missing=create_missing)
    count = shape[axis]
    writable_slices = np.zeros(count, bool)
    writable_slices[list(range(count)) if slices is None else [s for s in slices if 0 <= s < count]] = True
    writable_slices[[s for s in protected_slices if 0 <= s < count]] = False
    # 2 = writable, 1 = protected, 0 = outside the volume (after resampling)
    selector = [1, 1, 1]
    selector[axis] = count
    marker = np.broadcast_to(np.where(writable_slices.reshape(selector), 2, 1).astype(np.uint8), shape)
    volume_geometry = ijk_to_ras(volume_node)
    ref = segmentation_reference_image(segmentation_node, volume_node)
    ref_ext = ref.GetExtent()
    same_grid = (np.allclose(image_to_world(ref), volume_geometry) and
                 tuple(ref_ext) == (0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1))

    def on_reference(array):
        return array if same_grid else resample(oriented_image(np.ascontiguousarray(array), volume_geometry), ref)

    writable = on_reference(marker) == 2
    segmentation_node.CreateBinaryLabelmapRepresentation()
    written = {}
    for c, name in enumerate(class_names, start=1):
        target = on_reference((prediction == c).astype(np.uint8))
        session.set_segment(mapping[name], target, writable, ref)
        written[name] = int(np.count_nonzero((target != 0) & writable))
    if record:
        record_predicted(segmentation_node, volume_node, axis, np.nonzero(writable_slices)[0])
    return written


def write_segment_slices(segmentation_node, volume_node, segment_id, masks, axis, session=None):
    """Replace one segment's content on the given volume slices ({index: 2-D mask})."""
    prediction = np.zeros(volume_shape(volume_node), np.uint8)
    for index, mask in masks.items():
        prediction[slice_view(axis, index)] = np.asarray(mask) != 0
    name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    # apply_prediction matches by name; make sure the requested segment is the one matched
    if segments_for_classes(segmentation_node, [name])[name] != segment_id:
        raise BridgeError(f"Two segments are named '{name}'; rename one of them.")
    return apply_prediction(segmentation_node, volume_node, prediction, [name], axis, slices=list(masks),
                            session=session, record=False)
