"""The Segment Editor effect's actions: one slice in process (an adapted model, or a box prompt),
and propagation as a background job (``propagation``), written masking-aware with one undo step.
Torch is imported only inside the functions that need it."""

import os

import numpy as np

from MedSAGaLib.slices import bounding_box, get_slice

from . import BridgeError
from .geometry import volume_array
from .jobs import BoundJob, Job, ensure_workdir, painted_labels, write_volume
from .segments import apply_prediction, class_labels, segment_array, segments_for_classes, write_segment_slices


def normalized_array(volume_node, preprocessing=None):
    """The volume in [0, 1] as the model was trained (its preprocessing settings)."""
    from MedSAGaLib.volume import normalize_with, preprocessing_settings
    settings = preprocessing or preprocessing_settings(None)
    return normalize_with(volume_array(volume_node).astype(np.float32), settings)


def segment_slice_with_model(segmentation_node, volume_node, segmenter, axis, index, session=None, device="cpu"):
    """An adapted model's classes on one slice, into the segments named like them.

    As the *Segment volume* job does (``--painted``), the drawn slices near this one are leaned on
    (:class:`MedSAGaLib.painted.PaintedSlices`). An annotated slice is never changed. Returns (slices
    written, {class: voxels})."""
    from MedSAGaLib.inference import segment_volume
    class_names = list(segmenter.class_names)
    mapping = segments_for_classes(segmentation_node, class_names)
    ann = class_labels(segmentation_node, volume_node, list(mapping.values()), axis=axis)
    if index in ann.slices:
        return [], {}
    meta = getattr(segmenter, "metadata", {}) or {}
    array01 = normalized_array(volume_node, meta.get("preprocessing"))
    prediction = segment_volume(segmenter, array01, ann.axis, [int(index)], None, device, False,
                                painted=painted_slices(ann, class_names, volume_node))
    written = apply_prediction(segmentation_node, volume_node, prediction, class_names, ann.axis,
                               protected_slices=ann.slices, slices=[int(index)], session=session)
    return [int(index)], written


def painted_slices(annotations, class_names, volume_node):
    """The drawn slices as :class:`MedSAGaLib.painted.PaintedSlices` for a model with ``class_names``; None when
    none of its classes is drawn."""
    from MedSAGaLib.painted import PaintedSlices
    labels = painted_labels(annotations, class_names)
    if labels is None:
        return None
    spacing = float(volume_node.GetSpacing()[::-1][annotations.axis])  # IJK spacing; the array is (k, j, i)
    return PaintedSlices(labels, annotations.axis, len(class_names), spacing)  # the slices holding a model class


def box_predictor(base, device="cpu"):
    """``predict(slice01_2d, box) -> bool mask`` with a BaseSam and box prompts."""
    from MedSAGaLib.inference import predict_box_slice

    def predict(slice01, box):
        return predict_box_slice(base, slice01, [float(v) for v in box], device)
    return predict


def prompt_box(segmentation_node, volume_node, segment_id, axis, index, box=None, margin=3):
    """The box to prompt with: ``box`` as given, else the segment's bounding box on the slice."""
    if box is not None:
        return [float(v) for v in box]
    current = get_slice(segment_array(segmentation_node, segment_id, volume_node), axis, index)
    found = bounding_box(current, margin)
    if found is None:
        raise BridgeError(f"The segment is empty on slice {index}: paint a stroke there or draw a box.")
    return found


def box_prompt(segmentation_node, volume_node, segment_id, predict, array01, axis, index, box=None, margin=3,
               session=None):
    """Box prompt for one segment on slice ``index`` (in process: one model call). Returns the
    slices written."""
    box = prompt_box(segmentation_node, volume_node, segment_id, axis, index, box, margin)
    mask = np.asarray(predict(get_slice(array01, axis, index), box)) != 0
    write_segment_slices(segmentation_node, volume_node, segment_id, {index: mask}, axis, session=session)
    return [index]


def start_propagation(segmentation_node, volume_node, segment_id, axis, index, box=None, margin=3, max_slices=30,
                      base="litemedsam", checkpoint=None, device="cpu", workdir=None, env=None, threads=None,
                      masking=None):
    """Propagate a box prompt slice by slice in a background job (``propagation.main``)."""
    box = prompt_box(segmentation_node, volume_node, segment_id, axis, index, box, margin)
    workdir = ensure_workdir(workdir)
    image = write_volume(volume_node, os.path.join(workdir, "image.nrrd"))
    result = os.path.join(workdir, "propagation.npz")
    args = [image, "--base", base, "--axis", axis, "--slice", index, "--box", ",".join(f"{v:g}" for v in box),
            "--max-slices", max_slices, "--margin", margin, "--device", device or "cpu", "-o", result]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    job = Job("MedSAGaBridgeLib.propagation", args, workdir, env=env, threads=threads, grace=2.0)
    return BoundJob(job, "propagate", volume_node, segmentation_node, masking=masking, segment_id=segment_id,
                    axis=axis, result=result)


def apply_propagation(segmentation_node, volume_node, segment_id, result_path, axis, session=None):
    """Write a propagation job's masks; slices that already hold the segment are kept as they are."""
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise BridgeError("The segment the propagation was started for no longer exists.")
    with np.load(result_path) as data:
        results = dict(zip((int(s) for s in data["slices"]), data["masks"].astype(bool)))
    current = segment_array(segmentation_node, segment_id, volume_node)
    masks = {s: m for s, m in results.items() if not get_slice(current, axis, s).any()}
    if not masks:
        return []
    write_segment_slices(segmentation_node, volume_node, segment_id, masks, axis, session=session)
    return sorted(masks)
