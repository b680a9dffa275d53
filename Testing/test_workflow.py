"""The workflow layer as a library: fine-tune / evaluate / segment without the command line."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MedSAGaLib.events import SCHEMA
from MedSAGaLib.modelfile import read_metadata
from MedSAGaLib.workflow import evaluate_volume, finetune_config, finetune_volume, load_task, segment_file
from test_cli_train import phantom_task


def test_finetune_config_clamps_warmup_and_converts_epochs():
    config = finetune_config(steps=3, warmup=10)
    assert (config.steps, config.warmup) == (3, 2)
    assert finetune_config(train_count=5, epochs=2, batch_size=2).steps == 5
    assert finetune_config(device="auto").device in ("cpu", "cuda", "mps")


def test_finetune_evaluate_segment_as_library_calls(tmp_path, tiny_vit_checkpoint):
    image, labels = phantom_task(tmp_path)
    base = dict(base="vit_b", checkpoint=str(tiny_vit_checkpoint), image_size=224, device="cpu", rank=8)
    events = []
    steps_seen = lambda: sum(e["event"] == "step" for e in events)  # noqa: E731
    out = tmp_path / "m.medsaga"
    run = finetune_volume(image, labels, output=out, slices=[1, 3], classes=["bright", "dim"], steps=50,
                          progress=events.append, should_stop=lambda: steps_seen() >= 2, **base)
    assert run.result.stopped and run.result.steps_done == 2 and run.model_path == out
    assert (run.train_slices, run.val_slices) == ([1, 3], [2, 4])
    assert events[0]["event"] == "start" and events[-1]["event"] == "done" and events[-1]["stopped"]
    for e in events:  # every event the library emits follows the documented schema
        required, optional = SCHEMA[e["event"]]
        assert set(required) <= set(e) - {"event"} <= set(required) | set(optional), e
    meta = read_metadata(out)
    assert meta["training"]["train_slices"] == [1, 3] and meta["training"]["steps"] == 2

    # stopped before the first step: nothing is written
    untouched = tmp_path / "none.medsaga"
    stopped = finetune_volume(image, labels, output=untouched, slices=[1], steps=5, should_stop=lambda: True, **base)
    assert stopped.result.steps_done == 0 and stopped.model_path is None and not untouched.exists()
    # by default every annotated slice trains and the run says why, whether or not a fraction was asked for
    for asked, why in (({}, "none is held out (--val-fraction 0.2"), ({"val_fraction": 0.2}, "with fewer than 10 annotated")):
        all_train = finetune_volume(image, labels, steps=5, should_stop=lambda: True, **asked, **base)
        assert (all_train.train_slices, all_train.val_slices) == ([1, 2, 3, 4], [])
        assert all_train.result.decisions[0].startswith(f"every painted slice trains (4): {why}")

    seen = []
    scores = evaluate_volume(out, image, labels, device="cpu", progress=seen.append)
    assert scores.slices == [1, 2, 3, 4] and scores.training_slices_included == [1, 3]
    assert [r["name"] for r in scores.classes] == ["bright", "dim"] and seen[-1] == {"event": "segment", "done": 4,
                                                                                  "total": 4}
    seg = segment_file(image, run.segmenter, tmp_path / "o.seg.nrrd", slices=[2], device="cpu",
                       labelmap=tmp_path / "o.nii.gz")
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(seg.labelmap)))
    assert np.array_equal(written, seg.labels) and not np.delete(written, 2, axis=0).any()
    assert seg.class_names == ["bright", "dim"] and sum(seg.voxel_counts().values()) == int((written > 0).sum())

    # images in memory load the same way as files
    task = load_task(sitk.ReadImage(str(image)), sitk.ReadImage(str(labels)), "k", classes=["bright", "dim"])
    from_files = load_task(image, labels, "k", classes=["bright", "dim"])
    assert task.axis == 0 and task.annotated == [1, 2, 3, 4] and task.class_names == ["bright", "dim"]
    assert np.array_equal(task.labels, from_files.labels) and np.array_equal(task.array, from_files.array)


def _small_structures_volume() -> tuple[sitk.Image, sitk.Image]:
    """A head-like phantom: a dark body inside a bright rim (scalp), two small structures a few grey levels
    apart in its middle, painted on three slices."""
    array = np.zeros((6, 64, 64), np.float32)
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 32, xx - 32)
    array[:, radius < 30] = 250.0  # scalp
    array[:, radius < 27] = 60.0  # brain
    array[:, 28:34, 24:30] = 70.0
    array[:, 28:34, 34:40] = 78.0
    array += np.random.default_rng(0).normal(0, 2, array.shape).astype(np.float32)
    labels = np.zeros(array.shape, np.uint8)
    labels[1:5, 28:34, 24:30], labels[1:5, 28:34, 34:40] = 1, 2
    image, label_image = sitk.GetImageFromArray(array), sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return image, label_image


def test_training_contrast_follows_the_crop(tmp_path, tiny_vit_checkpoint):
    from MedSAGaLib.volume import normalize_with, preprocessing_settings
    from MedSAGaLib.workflow import training_preprocessing

    image, labels = _small_structures_volume()
    task = load_task(image, labels, "k")
    settings, why = training_preprocessing(task, [1, 2, 4])
    low, high = settings["percentiles"]
    assert settings["intensity"] == "percentile" and 0.5 < low < high < 99.5 and "crop's own" in why
    # the two structures lie further apart in [0, 1] than with the volume's percentiles (the scalp sets the top)
    gap = lambda s: float(np.diff([normalize_with(task.array, s)[2][task.labels[2] == c].mean() for c in (1, 2)])[0])  # noqa: E731
    default = preprocessing_settings(None)
    assert gap(settings) > 2.5 * gap(default) > 0
    # what the user asks, a resumed model's setting and no crop keep the setting they name
    assert training_preprocessing(task, [1, 2, 4], window="percentile") == (default, None)
    assert training_preprocessing(task, [1, 2, 4], window="60,40")[0] == preprocessing_settings((60.0, 40.0))
    resumed = {"preprocessing": preprocessing_settings(None, (2.0, 98.0))}
    assert training_preprocessing(task, [1, 2, 4], model_metadata=resumed) == (resumed["preprocessing"], None)
    assert training_preprocessing(task, [1, 2, 4], crop="off") == (default, None)

    # fine-tuning keeps it in the model file (segment and evaluate read it from there) and says so
    run = finetune_volume(task, output=tmp_path / "m.medsaga", slices=[1, 2, 4], steps=1, base="vit_b",
                          checkpoint=str(tiny_vit_checkpoint), image_size=224, device="cpu", rank=8)
    assert read_metadata(tmp_path / "m.medsaga")["preprocessing"] == settings
    assert any(d.startswith("intensities: the crop's own") for d in run.result.decisions)
