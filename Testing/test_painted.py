"""The painted slices used between them at segmentation time (MedSAGaLib.painted) and --painted."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_volume
from MedSAGaLib.cli import main
from MedSAGaLib.inference import segment_volume
from MedSAGaLib.modelfile import load_model
from MedSAGaLib.painted import PaintedSlices, keep_connected_to_painted, painted_along
from MedSAGaLib.segio import read_class_labels, write_seg_nrrd


def painted_volume(shape=(30, 16, 16), painted=(10, 20)) -> np.ndarray:
    """Class 1 on a square in every painted slice, class 2 on the left half of slice 20 only."""
    labels = np.zeros(shape, np.uint8)
    for z in painted:
        labels[z, 4:12, 4:12] = 1
    labels[20, 4:12, 0:3] = 2
    return labels


def test_prior_interpolates_the_painted_neighbours_with_a_weight_that_falls_with_distance():
    hint = PaintedSlices(painted_volume(), axis=0, num_classes=2, slice_spacing_mm=1.5, weight=0.8, reach_mm=6.0)
    assert hint.indices == [10, 20]
    assert hint.prior(10) is None and hint.prior(20) is None  # the painted slices keep their labels
    fractions, weight = hint.prior(11)
    assert weight == pytest.approx(0.8 * (1 - 1.5 / 6))
    assert fractions.shape == (3, 16, 16) and np.allclose(fractions.sum(0), 1)
    assert fractions[2, 5, 1] == pytest.approx(0.1) and fractions[1, 5, 5] == pytest.approx(1.0)
    fractions, weight = hint.prior(17)  # nearer to 20: mostly its labels
    assert weight == pytest.approx(0.8 * (1 - 4.5 / 6)) and fractions[2, 5, 1] == pytest.approx(0.7)
    assert hint.prior(15) is None  # 7.5 mm from both: beyond the reach, the model alone
    # beyond the outermost painted slices: the nearest one, within the reach
    fractions, weight = hint.prior(22)
    assert weight == pytest.approx(0.8 * (1 - 3 / 6)) and fractions[2, 5, 1] == 1.0
    assert hint.prior(24) is None and hint.prior(0) is None
    with pytest.raises(ValueError, match="must be positive"):
        PaintedSlices(painted_volume(), axis=0, num_classes=2, slice_spacing_mm=0.0)
    with pytest.raises(ValueError, match="model has 1 classes"):
        PaintedSlices(painted_volume(), axis=0, num_classes=1, slice_spacing_mm=1.0)


def test_blend_moves_an_uncertain_pixel_towards_the_painted_label_and_weight_zero_changes_nothing():
    probabilities = np.zeros((3, 16, 16), np.float32)
    probabilities[0] = 0.6
    probabilities[1] = 0.4  # the model says background, not confidently
    hint = PaintedSlices(painted_volume(), axis=0, num_classes=2, slice_spacing_mm=1.0)
    blended = hint.blend(probabilities, 11)
    assert blended.argmax(0)[5, 5] == 1 and blended.argmax(0)[0, 0] == 0
    assert np.allclose(blended.sum(0), 1)
    unweighted = PaintedSlices(painted_volume(), axis=0, num_classes=2, slice_spacing_mm=1.0, weight=0.0)
    assert np.array_equal(unweighted.blend(probabilities, 11), probabilities)


def test_pieces_not_connected_to_a_class_painted_in_one_piece_are_removed():
    labels = painted_volume()
    hint = PaintedSlices(labels.copy(), axis=0, num_classes=2, slice_spacing_mm=1.0)
    result = np.zeros_like(labels)
    result[8:23, 4:12, 4:12] = 1  # the structure, joining both painted slices
    result[2:4, 0:2, 0:2] = 1  # a stray piece far from them
    result[26, 14:16, 14:16] = 2  # a stray piece of the class painted on one slice
    hint.restore(result)
    assert result[20, 5, 1] == 2  # the painted slice as painted
    removed = keep_connected_to_painted(result, hint)
    assert removed == {1: 8, 2: 4}
    assert result[2:4, 0:2, 0:2].sum() == 0 and result[26].sum() == 0
    assert (result[8:23, 4:12, 4:12] == 1).all()


def test_a_structure_on_each_side_painted_on_the_same_slices_keeps_both_sides_only():
    labels = np.zeros((30, 16, 16), np.uint8)
    for z in (10, 20):  # left and right caudate as one class: two pieces on each painted slice
        labels[z, 2:6, 1:4] = 1
        labels[z, 2:6, 12:15] = 1
    hint = PaintedSlices(labels.copy(), axis=0, num_classes=1, slice_spacing_mm=1.0)
    assert hint.most_pieces(1) == 2
    result = np.zeros_like(labels)
    result[8:23, 2:6, 1:4] = 1
    result[8:23, 2:6, 12:15] = 1
    result[27:29, 10:12, 6:9] = 1  # a third piece, connected to neither side
    hint.restore(result)
    assert keep_connected_to_painted(result, hint) == {1: 12}
    assert result[8:23, 2:6, 1:4].all() and result[8:23, 2:6, 12:15].all() and not result[27:29].any()


def test_a_class_painted_in_separate_pieces_and_lone_slices_are_left_alone():
    labels = np.zeros((30, 16, 16), np.uint8)
    labels[10, 1:4, 1:4] = 1  # two lesions, each painted on its own slice
    labels[20, 10:14, 10:14] = 1
    hint = PaintedSlices(labels.copy(), axis=0, num_classes=1, slice_spacing_mm=1.0)
    result = np.zeros_like(labels)
    result[9:12, 1:4, 1:4] = 1
    result[19:22, 10:14, 10:14] = 1
    result[15, 6:8, 6:8] = 1  # a third lesion nobody painted
    hint.restore(result)
    assert keep_connected_to_painted(result, hint) == {}
    assert result[15, 6:8, 6:8].all()
    # one painted piece; a slice segmented on its own (the editor's current slice) is never emptied
    single = PaintedSlices(painted_volume(painted=(10,)), axis=0, num_classes=2, slice_spacing_mm=1.0)
    result = np.zeros_like(labels)
    result[27, 0:3, 0:3] = 1
    single.restore(result)
    assert keep_connected_to_painted(result, single, segmented=[27]) == {}
    assert result[27, 0:3, 0:3].all()
    # the same slice as part of a run of segmented slices that reaches the painted one is judged
    assert keep_connected_to_painted(result, single, segmented=range(10, 30)) == {1: 9}


def test_painted_along_matches_classes_and_refuses_another_axis():
    labels = painted_volume()
    hint = painted_along(labels, 0, ["disc", "edge"], ["disc", "edge"], 1.0)
    assert hint.indices == [10, 20] and hint.num_classes == 2
    # by name, in the model's order
    swapped = painted_along(np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8), 0,
                            ["disc", "edge"], ["edge", "disc"], 1.0)
    assert np.array_equal(swapped.labels, labels)
    # a plain label volume holding only class 2: its value 2 is the model's class 2 (read_class_labels numbers it 1)
    only_edge = (labels == 2).astype(np.uint8)
    hint = painted_along(only_edge, 0, ["disc", "edge"], ["label_2"], 1.0)
    assert hint.labels.max() == 2 and hint.indices == [20]
    with pytest.raises(ValueError, match="label value 3 is not a class"):
        painted_along(only_edge, 0, ["disc", "edge"], ["label_3"], 1.0)
    with pytest.raises(ValueError, match="fewer along another"):
        painted_along(labels, 1, ["disc", "edge"], ["disc", "edge"], 1.0)
    with pytest.raises(ValueError, match="no painted slice|no class of the model"):
        painted_along(np.zeros_like(labels), 0, ["disc", "edge"], ["disc", "edge"], 1.0)


def test_segment_volume_keeps_the_painted_slices_and_cli_segment_and_evaluate_take_painted(
        tmp_path, tiny_model_file, capsys):
    image = make_volume(tmp_path / "image.nrrd", size=(24, 20, 10))
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.uint8)
    labels[3, 4:12, 4:16] = 1
    labels[6, 4:12, 4:16] = 1
    labels[6, 14:18, 2:6] = 2
    segmenter = load_model(str(tiny_model_file))
    array01 = (array - array.min()) / (array.max() - array.min())
    hint = PaintedSlices(labels.copy(), axis=0, num_classes=2, slice_spacing_mm=1.0)
    ran: dict = {}
    result = segment_volume(segmenter, array01.astype(np.float32), 0, slices=[2, 4, 5, 8], progress=False,
                            backend="torch", painted=hint, ran=ran)
    assert np.array_equal(result[3], labels[3]) and np.array_equal(result[6], labels[6])
    assert "removed" in ran
    with pytest.raises(ValueError, match="do not match"):
        segment_volume(segmenter, array01[:, :10].astype(np.float32), 0, progress=False, backend="torch", painted=hint)

    painted = tmp_path / "painted.seg.nrrd"
    write_seg_nrrd(painted, labels, image, ["left", "right"], [None, None])
    out = tmp_path / "out.seg.nrrd"
    code = main(["segment", str(tmp_path / "image.nrrd"), "--model", str(tiny_model_file), "-o", str(out),
                 "--device", "cpu", "--backend", "torch", "--painted", str(painted)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 painted slices were kept as painted" in captured.err
    written, names, _ = read_class_labels(out, image)
    assert np.array_equal(written[3], labels[3]) and np.array_equal(written[6], labels[6])
    code = main(["evaluate", "--model", str(tiny_model_file), "--image", str(tmp_path / "image.nrrd"), "--labels",
                 str(painted), "--device", "cpu", "--backend", "torch", "--painted", str(painted), "--slices", "0:10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the 2 painted slices (3,6) were kept" in captured.out
    assert "2 of these slices were used for training or copied from --painted" in captured.out
    # an output may not replace the painted labels; box prompts and many inputs do not take them
    code = main(["segment", str(tmp_path / "image.nrrd"), "--model", str(tiny_model_file), "-o", str(painted),
                 "--painted", str(painted)])
    assert code != 0 and painted.exists()
    assert read_class_labels(painted, image)[0].sum() == labels.sum()
    code = main(["segment", str(tmp_path / "image.nrrd"), "--model", "litemedsam", "--boxes-from", str(painted),
                 "-o", str(tmp_path / "boxes.seg.nrrd"), "--painted", str(painted)])
    assert code != 0 and "--painted applies to an adapted model" in capsys.readouterr().err
    code = main(["segment", str(tmp_path / "image.nrrd"), "--model", str(tiny_model_file), "--output-dir",
                 str(tmp_path / "many"), "--painted", str(painted)])
    assert code != 0 and "--painted" in capsys.readouterr().err


def test_segment_on_the_scan_the_model_was_fine_tuned_on_uses_its_painted_labels_by_itself(
        tmp_path, tiny_vit_checkpoint, capsys):
    """finetune records hashes of the scan and of its training slices' labels; `segment` on that same scan (no
    --painted) then keeps and leans on the painted slices, and says so; on another scan, with --painted none, or
    once the labels file changed or is gone, the model runs alone."""
    image_path = tmp_path / "image.nrrd"
    image = make_volume(image_path, size=(24, 20, 10))
    labels = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    labels[3, 4:12, 4:16] = 1
    labels[6, 4:12, 4:16] = 1
    labels[6, 14:18, 2:6] = 2
    painted = tmp_path / "painted.seg.nrrd"
    write_seg_nrrd(painted, labels, image, ["disc", "edge"], [None, None])
    model = tmp_path / "adapted.medsaga"
    code = main(["finetune", "--image", str(image_path), "--labels", str(painted), "--base", "vit_b", "--checkpoint",
                 str(tiny_vit_checkpoint), "--image-size", "224", "--steps", "1", "--method", "decoder",
                 "--device", "cpu", "--feature-cache", "none", "--progress", "none", "-o", str(model)])
    assert code == 0, capsys.readouterr().err
    source = load_model(str(model)).metadata["training"]["painted_from"]
    assert set(source) == {"labels", "image_sha256", "train_labels_sha256"}  # hashes and a path, no labels
    capsys.readouterr()

    def segment(out, *extra, on=image_path):
        code = main(["segment", str(on), "--model", str(model), "-o", str(tmp_path / out), "--device", "cpu",
                     "--backend", "torch", *extra])
        err = capsys.readouterr().err
        return code, err, (read_class_labels(tmp_path / out, image)[0] if code == 0 else None)

    code, err, auto = segment("auto.seg.nrrd")
    assert code == 0 and "fine-tuned on this scan: the slices painted in" in err and "2 painted slices were kept" in err
    assert np.array_equal(auto[3], labels[3]) and np.array_equal(auto[6], labels[6])
    code, err, explicit = segment("explicit.seg.nrrd", "--painted", str(painted))
    assert code == 0 and np.array_equal(auto, explicit)
    code, err, alone = segment("alone.seg.nrrd", "--painted", "none")
    assert code == 0 and "painted" not in err and not np.array_equal(alone, auto)
    other = tmp_path / "other.nrrd"
    make_volume(other, size=(24, 20, 10), seed=1)  # the same grid, other voxels: another scan
    code, err, _ = segment("other.seg.nrrd", on=other)
    assert code == 0 and "painted" not in err
    # an output may not replace the labels it would use
    code, err, _ = segment("painted.seg.nrrd")
    assert code != 0 and "labels this model was fine-tuned from" in err
    assert np.array_equal(read_class_labels(painted, image)[0], labels)
    # the training slices' labels changed since: not used, and said
    changed = labels.copy()
    changed[3, 4:6, 4:16] = 0
    write_seg_nrrd(painted, changed, image, ["disc", "edge"], [None, None])
    code, err, result = segment("changed.seg.nrrd")
    assert code == 0 and "changed on its training slices" in err and np.array_equal(result, alone)
    painted.unlink()
    code, err, result = segment("gone.seg.nrrd")
    assert code == 0 and "is gone" in err and np.array_equal(result, alone)
