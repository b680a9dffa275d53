"""Qt-free bridge between MRML nodes and MedSAGaLib.

Everything here works on a plain ``vtkMRMLScene`` (3D Slicer or the ``slicer-core`` wheel):
no ``qt``, ``ctk``, ``slicer.app`` or ``slicer.util`` widgets, so the module, the Segment
Editor effect and the tests share one implementation.

Array convention: arrays are (k, j, i) like ``slicer.util.arrayFromVolume`` and like
``MedSAGaLib.volume.array_from_image`` on the NRRD files written here. A *slice axis* is a
numpy axis of that array (0 = K, 1 = J, 2 = I); anatomical names are resolved through the
volume's IJK-to-RAS directions, never from the array index alone.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import permutations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

AXIS_NAMES = ("sagittal", "coronal", "axial")  # RAS row 0 (R), 1 (A), 2 (S)


class BridgeError(ValueError):
    """A user-facing problem with the inputs (message is meant for the user)."""


class ClassMismatchError(BridgeError):
    """The model's classes do not match the segmentation's segments."""


# --------------------------------------------------------------------------------------------
# scene / logic helpers

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
    key = id(scene)
    logic = _LOGICS.get(key)
    if logic is None or logic.GetMRMLScene() is not scene:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        _LOGICS[key] = logic
    return logic


def _matrix_to_numpy(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _numpy_to_matrix(a):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(volume_node):
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def volume_array(volume_node):
    """Copy of the volume voxels as a (k, j, i) array (first component only)."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise BridgeError(f"Volume '{volume_node.GetName()}' has no image data.")
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    ncomp = image.GetNumberOfScalarComponents()
    arr = scalars.reshape(dims[2], dims[1], dims[0], ncomp)[..., 0] if ncomp > 1 else \
        scalars.reshape(dims[2], dims[1], dims[0])
    return np.array(arr, copy=True)


def _oriented_image(array_kji, ijk2ras, vtk_type=vtk.VTK_UNSIGNED_CHAR, origin_index=(0, 0, 0)):
    """vtkOrientedImageData holding ``array_kji`` with the given IJK-to-RAS geometry.

    ``origin_index`` is the (i, j, k) index of the array's first voxel (the image extent start)."""
    k, j, i = array_kji.shape
    img = slicer.vtkOrientedImageData()
    i0, j0, k0 = origin_index
    img.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    img.AllocateScalars(vtk_type, 1)
    img.SetImageToWorldMatrix(_numpy_to_matrix(ijk2ras))
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = np.ascontiguousarray(
        array_kji).ravel()
    return img


def _oriented_array(img):
    """(k, j, i) copy of a vtkOrientedImageData's scalars and its extent."""
    ext = img.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4] or img.GetPointData().GetScalars() is None:
        return None, ext
    shape = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return np.array(numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(shape)), ext


def volume_reference_image(volume_node):
    """Empty-geometry oriented image matching the volume's grid (extent from 0)."""
    dims = volume_node.GetImageData().GetDimensions()
    ref = slicer.vtkOrientedImageData()
    ref.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    ref.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras(volume_node)))
    return ref


def segmentation_reference_image(segmentation_node, volume_node=None):
    """Oriented image (allocated, zero) on the segmentation's reference geometry.

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


def _resample(input_img, reference_img):
    out = slicer.vtkOrientedImageData()
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        input_img, reference_img, out, False, False, None, 0)
    if not ok:
        raise BridgeError("Could not resample a labelmap into the reference geometry.")
    arr, ext = _oriented_array(out)
    ref_ext = reference_img.GetExtent()
    shape = (ref_ext[5] - ref_ext[4] + 1, ref_ext[3] - ref_ext[2] + 1, ref_ext[1] - ref_ext[0] + 1)
    full = np.zeros(shape, dtype=np.uint8)
    if arr is None:
        return full
    # place (the output may be clipped to the overlapping extent)
    sl = tuple(slice(ext[2 * a] - ref_ext[2 * a], ext[2 * a + 1] - ref_ext[2 * a] + 1)
               for a in (2, 1, 0))
    full[sl] = arr
    return full


# --------------------------------------------------------------------------------------------
# axes

def anatomical_axes(volume_node):
    """Map anatomical plane name -> numpy axis of the (k, j, i) array.

    Uses the IJK-to-RAS directions; the assignment of I, J, K to R, A, S maximises the total
    alignment, so oblique volumes get three distinct axes."""
    m = ijk_to_ras(volume_node)[:3, :3]
    dirs = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    best, best_score = None, -1.0
    for perm in permutations(range(3)):  # perm[ras_row] = ijk column
        score = sum(abs(dirs[row, col]) for row, col in enumerate(perm))
        if score > best_score:
            best, best_score = perm, score
    return {AXIS_NAMES[row]: 2 - col for row, col in enumerate(best)}


def axis_name(volume_node, axis):
    for name, ax in anatomical_axes(volume_node).items():
        if ax == axis:
            return name
    raise ValueError(axis)


def acquisition_axis(volume_node):
    """The numpy axis with the largest voxel spacing (K on ties): how the volume was sliced."""
    spacing = np.linalg.norm(ijk_to_ras(volume_node)[:3, :3], axis=0)  # i, j, k
    ijk = max((2, 1, 0), key=lambda c: (spacing[c] > spacing.max() * 0.999, c))
    return 2 - ijk


def resolve_axis(volume_node, axis="auto", labels=None):
    """Numpy axis from 'auto' / 'axial' / 'coronal' / 'sagittal' / 0-2.

    'auto': the axis along which the annotations are sparsest (the user painted slices in that
    view); without annotations the acquisition axis."""
    if isinstance(axis, (int, np.integer)):
        if axis not in (0, 1, 2):
            raise BridgeError(f"Slice axis must be 0, 1 or 2, not {axis}.")
        return int(axis)
    axis = str(axis).lower()
    if axis in AXIS_NAMES:
        return anatomical_axes(volume_node)[axis]
    if axis != "auto":
        raise BridgeError(f"Unknown slice axis '{axis}'.")
    if labels is not None and np.any(labels):
        counts = []
        for ax in range(3):
            other = tuple(a for a in range(3) if a != ax)
            used = int(np.count_nonzero(np.any(labels, axis=other)))
            counts.append((used / labels.shape[ax], ax != acquisition_axis(volume_node), ax))
        return min(counts)[2]
    return acquisition_axis(volume_node)


def annotated_slices(labels, axis):
    """Indices along ``axis`` holding any non-zero label."""
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(np.any(labels != 0, axis=other))[0]]


def _take(array, axis, index):
    return np.take(array, index, axis=axis)


def _slicer_index(axis, index, ndim=3):
    sl = [slice(None)] * ndim
    sl[axis] = index
    return tuple(sl)


# --------------------------------------------------------------------------------------------
# segmentation -> labels

def segments(segmentation_node):
    """[(segment_id, name)] in the segmentation's order."""
    seg = segmentation_node.GetSegmentation()
    return [(seg.GetNthSegmentID(n), seg.GetNthSegment(n).GetName())
            for n in range(seg.GetNumberOfSegments())]


def segment_array(segmentation_node, segment_id, volume_node):
    """Binary (k, j, i) uint8 mask of one segment on the volume's grid (nearest neighbour)."""
    segmentation_node.CreateBinaryLabelmapRepresentation()
    img = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, img)
    ref = volume_reference_image(volume_node)
    arr, _ = _oriented_array(img)
    if arr is None or not arr.any():
        return _resample_empty(ref)
    label = (arr != 0).astype(np.uint8)
    ext = img.GetExtent()
    binary = _oriented_image(label, _matrix_to_numpy(_get_matrix(img)), origin_index=(ext[0], ext[2], ext[4]))
    return _resample(binary, ref)


def _get_matrix(img):
    m = vtk.vtkMatrix4x4()
    img.GetImageToWorldMatrix(m)
    return m


def _resample_empty(ref):
    e = ref.GetExtent()
    return np.zeros((e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1), np.uint8)


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
    import zlib
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


def _record_predicted(segmentation_node, volume_node, axis, slices):
    """Remember ``slices`` (along ``axis``) as model output, with their current content."""
    record = _read_predicted(segmentation_node, volume_node)
    if record is None or record.get("axis") != axis:
        record = {"volume": volume_node.GetID(), "axis": int(axis), "slices": {}}
    masks = {sid: segment_array(segmentation_node, sid, volume_node) for sid, _ in segments(segmentation_node)}
    for s in slices:
        record["slices"][str(int(s))] = {sid: _slice_checksum(_take(m, axis, s))
                                         for sid, m in masks.items() if _take(m, axis, s).any()}
    segmentation_node.SetAttribute(PREDICTED_ATTRIBUTE, json.dumps(record))


def _predicted_unchanged(record, masks, axis):
    """Recorded slices whose content (for the given segments) is still the model's."""
    out = []
    if not record or record.get("axis") != axis:
        return out
    for key, sums in record.get("slices", {}).items():
        s = int(key)
        if not 0 <= s < next(iter(masks.values())).shape[axis]:
            continue
        if sums and all(_slice_checksum(_take(m, axis, s)) == sums[sid] if sid in sums
                        else not _take(m, axis, s).any() for sid, m in masks.items()):
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
    dims = volume_node.GetImageData().GetDimensions()
    labels = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
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
    predicted = []
    drawn = labels
    if record is not None:
        rec_axis = record.get("axis")
        predicted = _predicted_unchanged(record, masks, rec_axis)
        if predicted:
            drawn = labels.copy()
            for s in predicted:
                drawn[_slicer_index(rec_axis, s)] = 0
    ax = resolve_axis(volume_node, axis, drawn)
    if record is None or record.get("axis") != ax:
        predicted = []
        drawn = labels
    return Annotations(labels=labels, class_names=[names[s] for s in segment_ids],
                       segment_ids=list(segment_ids), axis=ax,
                       slices=annotated_slices(drawn, ax), empty_segments=empty,
                       overlap_voxels=overlap, predicted_slices=predicted)


def match_classes(segmentation_node, class_names, create_missing=False):
    """{class name: segment id}; every class needs a segment with the same name."""
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


# --------------------------------------------------------------------------------------------
# undo

class UndoHistory:
    """One undo step per apply, through the segment editor logic's segmentation history.

    Inside Slicer pass the Segment Editor's own logic (so Ctrl+Z there undoes it too); with
    slicer-core (and as a fallback) a logic is created for the segmentation node."""

    def __init__(self, segmentation_node, volume_node=None, editor_logic=None):
        self.segmentation_node = segmentation_node
        scene = segmentation_node.GetScene()
        if editor_logic is None:
            editor_logic = slicer.vtkSlicerSegmentEditorLogic()
            editor_logic.SetMRMLScene(scene)
            node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "MedSAGaUndo")
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)
            editor_logic.SetSegmentEditorNode(node)
        self.logic = editor_logic
        self._bind(volume_node)

    def _bind(self, volume_node=None):
        if self.logic.GetSegmentationNode() is not self.segmentation_node:
            self.logic.SetSegmentationNode(self.segmentation_node)
        if volume_node is not None and self.logic.GetSourceVolumeNode() is not volume_node:
            self.logic.SetSourceVolumeNode(volume_node)

    def save(self):
        self._bind()
        self.logic.SaveStateForUndo()

    def undo(self):
        self._bind()
        self.logic.Undo()

    def redo(self):
        self._bind()
        self.logic.Redo()


# --------------------------------------------------------------------------------------------
# prediction -> segments

def apply_prediction(segmentation_node, volume_node, prediction, class_names, axis,
                     protected_slices=(), slices=None, undo=None, create_missing=False, record=True):
    """Write a (k, j, i) class prediction (0 background, c -> class_names[c-1]) into segments.

    Only voxels of the volume's slices in ``slices`` (all when None) that are not in
    ``protected_slices`` change; every protected (annotated) slice and everything outside the
    volume stays exactly as it is, also when the segmentation's geometry differs from the
    volume's. Each class goes to the segment of the same name. ``undo`` (UndoHistory): its
    state is saved first, so the whole apply is one undo step. With ``record`` the written
    slices are remembered as model output (not annotations) until the user edits them.
    Returns {name: voxels set}."""
    prediction = np.asarray(prediction)
    dims = volume_node.GetImageData().GetDimensions()
    if prediction.shape != (dims[2], dims[1], dims[0]):
        raise BridgeError(f"Prediction shape {prediction.shape} does not match the volume "
                          f"{(dims[2], dims[1], dims[0])}.")
    if prediction.max(initial=0) > len(class_names):
        raise ClassMismatchError(f"Prediction has label {int(prediction.max())} but only "
                                 f"{len(class_names)} classes.")
    if undo is not None:  # mapping may create segments: save before any change
        undo.save()
    mapping = match_classes(segmentation_node, class_names, create_missing=create_missing)
    n = prediction.shape[axis]
    writable_slices = np.zeros(n, bool)
    writable_slices[list(range(n)) if slices is None else [s for s in slices if 0 <= s < n]] = True
    writable_slices[[s for s in protected_slices if 0 <= s < n]] = False
    # 2 = writable, 1 = protected, 0 = outside the volume (after resampling)
    marker = np.ones(prediction.shape, np.uint8)
    shape = [1, 1, 1]
    shape[axis] = n
    marker = np.where(writable_slices.reshape(shape), 2, 1).astype(np.uint8) * marker
    volume_geom = ijk_to_ras(volume_node)
    ref = segmentation_reference_image(segmentation_node, volume_node)
    ref_matrix = _matrix_to_numpy(_get_matrix(ref))
    ref_ext = ref.GetExtent()
    same_grid = (np.allclose(ref_matrix, volume_geom) and
                 tuple(ref_ext) == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1))
    if same_grid:
        writable = marker == 2
    else:
        writable = _resample(_oriented_image(marker, volume_geom), ref) == 2
    segmentation_node.CreateBinaryLabelmapRepresentation()
    written = {}
    was_modifying = segmentation_node.StartModify()
    try:
        logic = segmentations_logic(segmentation_node.GetScene())
        for c, name in enumerate(class_names, start=1):
            sid = mapping[name]
            cls = (prediction == c).astype(np.uint8)
            cls_ref = cls if same_grid else _resample(_oriented_image(cls, volume_geom), ref)
            cur = _segment_on_reference(segmentation_node, sid, ref)
            new = np.where(writable, cls_ref, cur).astype(np.uint8)
            written[name] = int(np.count_nonzero(new & writable))
            if np.array_equal(new, cur):
                continue
            img = _oriented_image(new, ref_matrix, origin_index=(ref_ext[0], ref_ext[2], ref_ext[4]))
            if not logic.SetBinaryLabelmapToSegment(img, segmentation_node, sid,
                                                    logic.MODE_REPLACE, img.GetExtent()):
                raise BridgeError(f"Could not write segment '{name}'.")
    finally:
        segmentation_node.EndModify(was_modifying)
    if record:
        _record_predicted(segmentation_node, volume_node, axis, np.nonzero(writable_slices)[0])
    return written


def _segment_on_reference(segmentation_node, segment_id, ref):
    img = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, img)
    arr, ext = _oriented_array(img)
    if arr is None or not arr.any():
        return _resample_empty(ref)
    binary = _oriented_image((arr != 0).astype(np.uint8), _matrix_to_numpy(_get_matrix(img)),
                             origin_index=(ext[0], ext[2], ext[4]))
    return _resample(binary, ref)


def write_segment_slices(segmentation_node, volume_node, segment_id, masks, axis, undo=None):
    """Replace one segment's content on the given volume slices ({index: 2-D mask})."""
    dims = volume_node.GetImageData().GetDimensions()
    pred = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    for index, mask in masks.items():
        pred[_slicer_index(axis, index)] = (np.asarray(mask) != 0)
    name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    # apply_prediction matches by name; make sure the requested segment is the one matched
    first = match_classes(segmentation_node, [name])[name]
    if first != segment_id:
        raise BridgeError(f"Two segments are named '{name}'; rename one of them.")
    return apply_prediction(segmentation_node, volume_node, pred, [name], axis,
                            slices=list(masks), undo=undo, record=False)


# --------------------------------------------------------------------------------------------
# boxes (effect: box prompt and propagation)

def bbox_2d(mask, margin=0):
    """(x0, y0, x1, y1) box of a 2-D mask in slice pixels (column, row; x1/y1 exclusive, as
    MedSAGaLib's boxes), grown by ``margin``; None when the mask is empty."""
    mask = np.asarray(mask) != 0
    if not mask.any():
        return None
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    h, w = mask.shape
    return (max(int(cols[0]) - margin, 0), max(int(rows[0]) - margin, 0),
            min(int(cols[-1]) + 1 + margin, w), min(int(rows[-1]) + 1 + margin, h))


def propagate(predict, array, axis, start, box, direction=(1, -1), max_slices=None,
              margin=2, min_pixels=4):
    """Box-prompt slice by slice from ``start``: each result's box prompts the next slice.

    ``predict(slice2d, box) -> mask2d``. Stops in each direction at the volume's end, after
    ``max_slices``, or when the result has fewer than ``min_pixels`` pixels. Returns
    {slice index: mask} (``start`` included)."""
    results = {}
    first = np.asarray(predict(_take(array, axis, start), box)) != 0
    results[start] = first
    n = array.shape[axis]
    for step in direction:
        prev, index, count = first, start + step, 0
        while 0 <= index < n and (max_slices is None or count < max_slices):
            b = bbox_2d(prev, margin)
            if b is None or np.count_nonzero(prev) < min_pixels:
                break
            prev = np.asarray(predict(_take(array, axis, index), b)) != 0
            if np.count_nonzero(prev) < min_pixels:
                break
            results[index] = prev
            index += step
            count += 1
    return results


# --------------------------------------------------------------------------------------------
# files for the background process

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
    numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())[:] = \
        np.ascontiguousarray(labels, dtype=np.uint8).ravel()
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
    dims = volume_node.GetImageData().GetDimensions()
    if arr.shape != (dims[2], dims[1], dims[0]):
        raise BridgeError(f"{os.path.basename(path)} has shape {arr.shape}, the volume "
                          f"{(dims[2], dims[1], dims[0])}.")
    if not np.allclose(ijk_to_ras(node), ijk_to_ras(volume_node), atol=1e-3):
        raise BridgeError(f"{os.path.basename(path)} is not on the volume's grid.")
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# background process

def library_parent():
    """Folder that holds MedSAGaLib (installed beside the module in Slicer, repo root in a
    checkout); None when it is only importable from site-packages."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isfile(os.path.join(cand, "MedSAGaLib", "__init__.py")):
            return cand
    return None


def python_executable():
    """The Python to run the library with: Slicer's own (PythonSlicer) inside Slicer."""
    if hasattr(slicer, "app"):  # inside the application: the launcher-wrapped interpreter
        import shutil
        found = shutil.which("PythonSlicer")
        if found:
            return found
    exe = sys.executable
    base = os.path.basename(exe).lower()
    if base.startswith("slicer"):  # the application binary itself: use its PythonSlicer
        cand = os.path.join(os.path.dirname(exe), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if os.path.exists(cand):
            return cand
    return exe


def cli_axis(axis):
    """The CLI's --axis for a numpy axis of the (k, j, i) array (0 -> 'k', 1 -> 'j', 2 -> 'i')."""
    if isinstance(axis, (int, np.integer)):
        return "kji"[int(axis)]
    return axis


def finetune_command(image, labels, output, slices=None, classes=None, axis=None, base=None,
                     checkpoint=None, method=None, steps=None, rank=None, update_proj_gap=None,
                     scale=None, lr=None, warmup=None, device=None, resume=None, threads=None,
                     image_size=None, python=None):
    cmd = [python or python_executable(), "-m", "MedSAGaLib.cli", "finetune",
           "--image", image, "--labels", labels]
    if slices:
        cmd += ["--slices", ",".join(str(int(s)) for s in slices)]
    if classes:
        cmd += ["--classes", *[str(c) for c in classes]]
    opts = [("--axis", None if axis is None else cli_axis(axis)), ("--base", base),
            ("--checkpoint", checkpoint), ("--image-size", image_size), ("--method", method),
            ("--steps", steps), ("--rank", rank), ("--update-proj-gap", update_proj_gap),
            ("--scale", scale), ("--lr", lr), ("--warmup", warmup), ("--device", device),
            ("--resume", resume), ("--threads", threads)]
    for flag, value in opts:
        if value is not None and value != "":
            cmd += [flag, str(value)]
    return cmd + ["--progress", "json", "-o", output]


def segment_command(image, model, output, labelmap, axis=None, slices=None, device=None,
                    python=None):
    cmd = [python or python_executable(), "-m", "MedSAGaLib.cli", "segment", image,
           "--model", model, "-o", output, "--labelmap", labelmap]
    if axis is not None:
        cmd += ["--axis", cli_axis(axis)]
    if slices:
        cmd += ["--slices", ",".join(str(int(s)) for s in slices)]
    if device:
        cmd += ["--device", str(device)]
    return cmd


class Job:
    """A MedSAGaLib CLI run in a separate process; never blocks the caller.

    ``poll()`` returns the progress records (one JSON object per stdout line) that arrived
    since the last call; ``state`` is 'running', 'done', 'failed' or 'cancelled'. ``cancel()``
    sends SIGTERM (the CLI keeps the last good model)."""

    def __init__(self, cmd, cwd=None, env=None, threads=None):
        self.cmd = list(cmd)
        self.records = []
        self.log = []
        self.cancelled = False
        self._queue = queue.Queue()
        env = dict(os.environ if env is None else env)
        parent = library_parent()
        if parent:
            env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in
                                                env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The child's messages may hold non-ASCII text (progress bars, names); under a C/POSIX
        # locale both sides would default to ASCII, so pin UTF-8 on both ends of the pipe.
        env["PYTHONIOENCODING"] = "utf-8"
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            env["MKL_NUM_THREADS"] = str(threads)
        self.started = time.time()
        self.process = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1,
                                        encoding="utf-8", errors="replace")
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
            record = None
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
            if isinstance(record, dict):
                self.records.append(record)
                new.append(record)
            else:
                self.log.append(line)
        return new

    @property
    def returncode(self):
        return self.process.poll()

    @property
    def state(self):
        rc = self.process.poll()
        if rc is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return "done" if rc == 0 else "failed"

    @property
    def last(self):
        return self.records[-1] if self.records else None

    def cancel(self):
        if self.process.poll() is None:
            self.cancelled = True
            if os.name == "nt":
                self.process.terminate()
            else:
                self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout=None):
        self.process.wait(timeout)
        self._reader.join(5)
        self.poll()
        return self.state

    def error_text(self, lines=15):
        return "\n".join(self.log[-lines:])


@dataclass
class FinetuneInputs:
    workdir: str
    image: str
    labels: str
    annotations: Annotations
    slices: list


def prepare_finetune(volume_node, segmentation_node, workdir=None, axis="auto", slices=None,
                     segment_ids=None):
    """Write the volume and the selected annotated slices' class labels (geometry kept)."""
    ann = class_labels(segmentation_node, volume_node, segment_ids, axis)
    chosen = ann.slices if slices is None else [s for s in slices if s in ann.slices]
    if not chosen:
        raise BridgeError("No annotated slice selected: paint the classes on a few slices "
                          f"(along the {axis_name(volume_node, ann.axis)} axis) first.")
    workdir = workdir or tempfile.mkdtemp(prefix="medsaga-")
    labels = np.zeros_like(ann.labels)
    for s in chosen:
        idx = _slicer_index(ann.axis, s)
        labels[idx] = ann.labels[idx]
    image = write_volume(volume_node, os.path.join(workdir, "image.nrrd"))
    label_path = write_labels(labels, volume_node, os.path.join(workdir, "labels.nrrd"))
    return FinetuneInputs(workdir, image, label_path, ann, chosen)


def start_finetune(volume_node, segmentation_node, model_path, workdir=None, axis="auto",
                   slices=None, segment_ids=None, threads=None, **options):
    """Prepare files and start ``medsaga finetune`` in the background. Returns (Job, inputs)."""
    inputs = prepare_finetune(volume_node, segmentation_node, workdir, axis, slices, segment_ids)
    cmd = finetune_command(inputs.image, inputs.labels, model_path, slices=inputs.slices,
                           classes=inputs.annotations.class_names, axis=inputs.annotations.axis,
                           threads=threads, **options)
    return Job(cmd, cwd=inputs.workdir, threads=threads), inputs


def start_segment(volume_node, model_path, workdir=None, axis=None, slices=None, device=None,
                  threads=None):
    """Start ``medsaga segment`` for the volume in the background. Returns (Job, labelmap path)."""
    workdir = workdir or tempfile.mkdtemp(prefix="medsaga-")
    image = os.path.join(workdir, "image.nrrd")
    if not os.path.exists(image):
        write_volume(volume_node, image)
    out = os.path.join(workdir, "result.seg.nrrd")
    labelmap = os.path.join(workdir, "result-labels.nrrd")
    cmd = segment_command(image, model_path, out, labelmap, axis=axis, slices=slices, device=device)
    return Job(cmd, cwd=workdir, threads=threads), labelmap


def apply_segment_result(segmentation_node, volume_node, labelmap_path, class_names, axis,
                         annotated, undo=None, create_missing=False):
    """Read the background segmentation's labelmap and write it around the annotated slices."""
    prediction = read_labels(labelmap_path, volume_node)
    return apply_prediction(segmentation_node, volume_node, prediction, class_names, axis,
                            protected_slices=annotated, undo=undo, create_missing=create_missing)


def format_eta(seconds):
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _mean_dice(value):
    if isinstance(value, dict):
        vals = [v for v in value.values() if isinstance(v, (int, float))]
        return sum(vals) / len(vals) if vals else None
    return value if isinstance(value, (int, float)) else None


def progress_text(record):
    """One-line summary of a progress record of ``medsaga finetune --progress json``
    (events: start, prepare, prepare-validation, validate, step, done)."""
    if not record:
        return ""
    event = record.get("event", "step")
    if event in ("prepare", "prepare-validation") and "total" in record:
        what = "validation slices" if event == "prepare-validation" else "training slices"
        return f"preparing {what} {record.get('done', 0)}/{record['total']}"
    if event == "start":
        return (f"starting: {len(record.get('train_slices') or [])} training, "
                f"{len(record.get('val_slices') or [])} validation slices, {record.get('steps', '?')} steps")
    if event == "validate":
        dice = _mean_dice(record.get("val_dice"))
        return "validation Dice before training" + (f" {dice:.3f}" if dice is not None else "")
    parts = []
    if event == "done":
        parts.append(f"done: {record.get('steps', '?')} steps" + (" (stopped early)" if record.get("stopped") else ""))
    elif "step" in record and "steps" in record:
        parts.append(f"step {record['step']}/{record['steps']}")
    if record.get("loss") is not None:
        parts.append(f"loss {float(record['loss']):.4f}")
    dice = _mean_dice(record.get("val_dice"))
    if dice is not None:
        parts.append(f"val Dice {float(dice):.3f}")
    if event != "done" and record.get("eta") is not None:
        parts.append(f"ETA {format_eta(record['eta'])}")
    return ", ".join(parts)


def step_records(records):
    """The training-step records among a job's progress records."""
    return [r for r in records if r.get("event", "step") == "step" and "step" in r and "steps" in r]


# --------------------------------------------------------------------------------------------
# in-process model work (the effect: current slice, box prompts); imports torch lazily

def normalized_array(volume_node, preprocessing=None):
    """The volume in [0, 1] as the model was trained (its preprocessing settings)."""
    from MedSAGaLib.volume import normalize_with, preprocessing_settings
    settings = preprocessing or preprocessing_settings(None)
    return normalize_with(volume_array(volume_node).astype(np.float32), settings)


def model_summary(model_path):
    """(class names, validation Dice dict or {}, metadata) of an adapted model file."""
    from MedSAGaLib.modelfile import read_metadata
    meta = read_metadata(model_path)
    return list(meta.get("class_names") or []), dict(meta.get("validation_dice") or {}), meta


def describe_model(model_path):
    """Text for the panel: classes, base model, method, steps and validation Dice."""
    names, dice, meta = model_summary(model_path)
    text = f"Classes: {', '.join(names)}"
    training = meta.get("training") or {}
    if training.get("method"):
        text += f"\nBase {meta.get('base_model', '?')}, {training['method']}"
        if training.get("steps"):
            text += f", {training['steps']} steps" + (" (stopped early)" if training.get("stopped") else "")
    values = {k: v for k, v in dice.items() if isinstance(v, (int, float))}
    if values:
        text += "\nValidation Dice: " + ", ".join(f"{k} {float(v):.3f}" for k, v in values.items())
    return text


def segment_in_process(volume_node, segmenter, axis, slices=None, device="cpu", progress=False):
    """Class labels (k, j, i) for ``slices`` (all when None) with a loaded ClassSegmenter."""
    from MedSAGaLib.inference import segment_volume
    meta = getattr(segmenter, "metadata", {}) or {}
    array01 = normalized_array(volume_node, meta.get("preprocessing"))
    return segment_volume(segmenter, array01, axis, slices, None, device, progress)


def box_predictor(volume_node, base, device="cpu"):
    """``predict(slice01_2d, box) -> bool mask`` with a BaseSam and box prompts."""
    from MedSAGaLib.inference import predict_box_slice

    def predict(slice01, box):
        return predict_box_slice(base, slice01, [float(v) for v in box], device)
    return predict


# --------------------------------------------------------------------------------------------
# slice views (the effect): RAS positions -> slice axis, slice index, 2-D pixel boxes

def ras_to_ijk(volume_node, ras):
    """Continuous (i, j, k) of a RAS point in the volume."""
    m = np.linalg.inv(ijk_to_ras(volume_node))
    return (m @ np.array([ras[0], ras[1], ras[2], 1.0]))[:3]


def axis_from_normal(volume_node, normal_ras):
    """Numpy axis of the (k, j, i) array whose voxel axis is closest to a view's normal."""
    dirs = ijk_to_ras(volume_node)[:3, :3]
    dirs = dirs / np.maximum(np.linalg.norm(dirs, axis=0, keepdims=True), 1e-12)
    n = np.asarray(normal_ras, float)
    n = n / max(np.linalg.norm(n), 1e-12)
    return 2 - int(np.argmax(np.abs(dirs.T @ n)))


def slice_index(volume_node, axis, ras):
    """Index along ``axis`` of the slice through a RAS point (None when outside the volume)."""
    ijk = ras_to_ijk(volume_node, ras)
    index = int(round(ijk[2 - axis]))
    dims = volume_node.GetImageData().GetDimensions()
    return index if 0 <= index < dims[2 - axis] else None


def slice_pixel(volume_node, axis, ras):
    """(column, row) of a RAS point in the 2-D slice ``np.take(array, index, axis)``."""
    ijk = ras_to_ijk(volume_node, ras)
    remaining = [a for a in range(3) if a != axis]  # numpy axes (row, column)
    row, col = (ijk[2 - a] for a in remaining)
    return col, row


def box_from_ras(volume_node, axis, ras_a, ras_b):
    """Pixel box (x0, y0, x1, y1; end exclusive) of two RAS corners on a slice, clipped."""
    (c0, r0), (c1, r1) = slice_pixel(volume_node, axis, ras_a), slice_pixel(volume_node, axis, ras_b)
    dims = volume_node.GetImageData().GetDimensions()
    shape = [dims[2 - a] for a in range(3) if a != axis]  # (rows, columns)
    x0, x1 = sorted((c0, c1))
    y0, y1 = sorted((r0, r1))
    x0, y0 = max(int(np.floor(x0 + 0.5)), 0), max(int(np.floor(y0 + 0.5)), 0)
    x1, y1 = min(int(np.floor(x1 + 0.5)) + 1, shape[1]), min(int(np.floor(y1 + 0.5)) + 1, shape[0])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


# --------------------------------------------------------------------------------------------
# the effect's actions (Qt-free; the effect saves its undo state through ``before_write``)

def segment_with_model(segmentation_node, volume_node, segmenter, axis=None, index=None,
                       undo=None, before_write=None, device="cpu"):
    """Adapted model into the segments named like its classes.

    ``index`` given: that slice only (along ``axis``); else every slice that is not annotated
    (the annotations' axis unless ``axis`` is given). Annotated slices are never changed.
    Returns (slices segmented, {class: voxels})."""
    class_names = list(segmenter.class_names)
    mapping = match_classes(segmentation_node, class_names)
    ann = class_labels(segmentation_node, volume_node, list(mapping.values()),
                       axis="auto" if axis is None else axis)
    axis = ann.axis
    if index is not None:
        if index in ann.slices:
            return [], {}
        slices = [int(index)]
    else:
        slices = [s for s in range(ann.labels.shape[axis]) if s not in ann.slices]
    if not slices:
        return [], {}
    prediction = segment_in_process(volume_node, segmenter, axis, slices, device=device)
    if before_write is not None:
        before_write()
    written = apply_prediction(segmentation_node, volume_node, prediction, class_names, axis,
                               protected_slices=ann.slices, slices=slices, undo=undo)
    return slices, written


def box_prompt(segmentation_node, volume_node, segment_id, predict, array01, axis, index, box=None,
               propagate_slices=0, margin=3, undo=None, before_write=None):
    """Box prompt for one segment on slice ``index``; optionally propagate.

    ``box`` None: the segment's bounding box on that slice (grown by ``margin``). With
    ``propagate_slices`` > 0 the result's box prompts the neighbouring slices, up to that many
    in each direction; slices that already hold the segment are kept. Returns the slices
    written."""
    current = segment_array(segmentation_node, segment_id, volume_node)
    if box is None:
        box = bbox_2d(_take(current, axis, index), margin)
        if box is None:
            raise BridgeError(f"The segment is empty on slice {index}: paint a stroke there or draw a box.")
    if propagate_slices:
        results = propagate(predict, array01, axis, index, box, max_slices=propagate_slices,
                            margin=margin)
        masks = {s: m for s, m in results.items() if not _take(current, axis, s).any()}
    else:
        masks = {index: np.asarray(predict(_take(array01, axis, index), box)) != 0}
    if not masks:
        return []
    if before_write is not None:
        before_write()
    write_segment_slices(segmentation_node, volume_node, segment_id, masks, axis, undo=undo)
    return sorted(masks)
