"""Inference backends: OpenVINO agrees with PyTorch on real slices; its export cache is keyed and checked."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSAGaLib.backends import choose_backend, make_runner, openvino_available
from MedSAGaLib.backends.cache import model_cache_dir
from MedSAGaLib.cli import main
from MedSAGaLib.head import ClassSegmenter
from MedSAGaLib.inference import bounding_box
from MedSAGaLib.modelfile import load_model
from MedSAGaLib.models import build_base_model
from MedSAGaLib.preprocess import SliceTransform
from MedSAGaLib.volume import normalize_intensity

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def mni_arrays():
    from MedSAGaLib.samples.mni152 import mni152_tissue_labels

    t1, labels = mni152_tissue_labels()
    return normalize_intensity(sitk.GetArrayFromImage(t1).astype(np.float32)), sitk.GetArrayFromImage(labels)


def agreement(runner_a, runner_b, slices01) -> tuple[float, float]:
    """(share of pixels with the same argmax, max |logit difference|) over real slices."""
    transform = SliceTransform(runner_a.image_size)
    same = total = 0
    worst = 0.0
    for slice01 in slices01:
        image = transform.to_model(slice01)[None]
        a, b = runner_a(image), runner_b(image)
        worst = max(worst, float((a - b).abs().max()))
        same += int((a.argmax(1) == b.argmax(1)).sum())
        total += a.shape[0] * a.shape[2] * a.shape[3]
    return same / total, worst


def test_backend_choice():
    assert choose_backend("torch", "cpu") == "torch"
    assert choose_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="Unknown backend"):
        choose_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="runs on the CPU"):
        choose_backend("openvino", "cuda")
    if openvino_available():
        # Whole volumes repay the one-off export; a handful of slices of an unexported model does not.
        assert choose_backend("auto", "cpu", slices=190) == "openvino"
        assert choose_backend("openvino", "cpu", slices=1) == "openvino"


@needs_openvino
def test_openvino_matches_pytorch_on_mni152_with_the_tiny_vit(tiny_model_file, mni152, mni_arrays, tmp_path, capsys):
    array01, _ = mni_arrays
    model_path = tmp_path / "tiny.medsaga"
    shutil.copyfile(tiny_model_file, model_path)
    segmenter = load_model(model_path)
    reference = make_runner(segmenter, backend="torch", fast=False)
    runner = make_runner(segmenter, backend="openvino", cache_dir=model_cache_dir(model_path))
    assert runner.name == "openvino" and runner.built == ["encoder", "decoder"]
    same, worst = agreement(reference, runner, [array01[z] for z in (60, 90, 120)])
    print(f"tiny ViT 224 px, OpenVINO f32 vs PyTorch: argmax agreement {100 * same:.4f}%, max logit diff {worst:.2e}")
    assert same >= 0.995 and worst < 1e-2
    # The command line finds the export next to the model file and gives PyTorch's labels.
    image_path, _ = mni152
    manifests = {p: p.stat().st_mtime_ns for p in model_cache_dir(model_path).glob("*/manifest.json")}
    outputs = {}
    for backend, precision in (("openvino", "f32"), ("torch", "f32"), ("openvino", "auto")):
        name = f"{backend}-{precision}"
        out = tmp_path / f"{name}.seg.nrrd"
        assert main(["segment", str(image_path), "--model", str(model_path), "--slices", "70,100", "--backend",
                     backend, "--inference-precision", precision, "-o", str(out),
                     "--labelmap", str(tmp_path / f"{name}.nii.gz")]) == 0
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")))
    assert {p: p.stat().st_mtime_ns for p in model_cache_dir(model_path).glob("*/manifest.json")}.keys() == manifests.keys()
    assert outputs["openvino-f32"].any()
    assert (outputs["openvino-f32"] == outputs["torch-f32"]).mean() >= 0.995
    # the default (auto) says when it ran at bf16, which it does only where the CPU has bf16 units
    from MedSAGaLib.backends.openvino_backend import cpu_has_bf16

    assert ("ran in OpenVINO at bf16" in capsys.readouterr().err) == cpu_has_bf16()
    assert (outputs["openvino-auto"] == outputs["torch-f32"]).mean() >= 0.99


@pytest.mark.slow
@needs_openvino
def test_openvino_matches_pytorch_on_mni152_with_litemedsam(mni_arrays, tmp_path):
    """Real LiteMedSAM weights (k-class head and box prompts) on real MNI152 slices, f32."""
    array01, tissue = mni_arrays
    base = build_base_model("litemedsam")
    segmenter = ClassSegmenter.from_base(base, ["grey_matter", "white_matter"]).eval()
    cache = tmp_path / "cache"
    reference = make_runner(segmenter, backend="torch", fast=False)
    runner = make_runner(segmenter, backend="openvino", cache_dir=cache)
    slices = [array01[z] for z in (60, 90, 120)]
    same, worst = agreement(reference, runner, slices)
    print(f"LiteMedSAM k-class, OpenVINO f32 vs PyTorch: argmax agreement {100 * same:.4f}%, max logit diff {worst:.2e}")
    assert same >= 0.995 and worst < 1e-2
    # Box prompts reuse the encoder export of the same base weights: only the box decoder is new.
    box_reference = make_runner(base, "boxes", backend="torch", fast=False)
    box_runner = make_runner(base, "boxes", backend="openvino", cache_dir=cache)
    assert box_runner.built == ["box_decoder"]
    transform = SliceTransform(base.image_size)
    for z in (60, 90, 120):
        image = transform.to_model(array01[z])[None]
        boxes = torch.tensor([transform.box_to_model(bounding_box(tissue[z] == v), tissue[z].shape) for v in (1, 2)])
        a = box_reference.decode_boxes(box_reference.encode(image), boxes)
        b = box_runner.decode_boxes(box_runner.encode(image), boxes)
        print(f"LiteMedSAM boxes slice {z}: mask agreement {100 * float(((a > 0) == (b > 0)).float().mean()):.4f}%, "
              f"max logit diff {float((a - b).abs().max()):.2e}")
        assert float(((a > 0) == (b > 0)).float().mean()) >= 0.995


@needs_openvino
def test_export_cache_is_reused_only_for_the_same_weights(tiny_model_file, tmp_path):
    cache = tmp_path / "tiny.medsaga.openvino"
    segmenter = load_model(tiny_model_file)
    first = make_runner(segmenter, backend="openvino", cache_dir=cache)
    assert first.built == ["encoder", "decoder"]
    assert make_runner(segmenter, backend="openvino", cache_dir=cache).built == []
    assert choose_backend("auto", "cpu", segmenter, slices=1, cache_dir=cache) == "openvino"  # cached: worth it
    # A fine-tuned decoder (new weights) is exported again; the unchanged encoder is not.
    with torch.no_grad():
        segmenter.mask_decoder.mask_tokens.weight[1] += 0.5
    second = make_runner(segmenter, backend="openvino", cache_dir=cache)
    assert second.built == ["decoder"]
    image = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(second(image), make_runner(segmenter, backend="torch", fast=False)(image),
                               rtol=1e-3, atol=1e-3)
    # A damaged IR file or a manifest for other weights is never trusted: rebuilt.
    encoder_folder = second.folders[0]
    weights = encoder_folder / "encoder.bin"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    assert make_runner(segmenter, backend="openvino", cache_dir=cache).built == ["encoder"]
    manifest = json.loads((encoder_folder / "manifest.json").read_text())
    manifest["key"] = "0" * 64
    (encoder_folder / "manifest.json").write_text(json.dumps(manifest))
    assert make_runner(segmenter, backend="openvino", cache_dir=cache).built == ["encoder"]
    assert not list(cache.glob(".*.part"))  # no scratch folders left behind
    # Under auto, too few slices of an unexported model run PyTorch rather than pay for the export.
    with torch.no_grad():
        segmenter.mask_decoder.mask_tokens.weight[1] += 0.5
    assert make_runner(segmenter, backend="auto", cache_dir=cache, slices=2).name == "torch"


@needs_openvino
def test_openvino_refuses_an_untested_precision(tiny_model_file):
    with pytest.raises(ValueError, match="not offered"):
        from MedSAGaLib.backends.openvino_backend import OpenVinoRunner

        OpenVinoRunner(load_model(tiny_model_file), precision="int4")


needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf is not installed")


@needs_openvino
@needs_nncf
def test_int8_encoder_is_calibrated_on_the_volume_and_cached_by_its_slices(tiny_model_file, mni_arrays, tmp_path):
    from MedSAGaLib.backends.openvino_backend import OpenVinoRunner
    from MedSAGaLib.inference import calibration_images

    array01, _ = mni_arrays
    segmenter = load_model(tiny_model_file)
    cache = tmp_path / "tiny.medsaga.openvino"
    calibration = calibration_images(segmenter, array01, 0, range(50, 140), count=4)
    assert calibration.shape == (4, 3, 224, 224) and float(calibration.max()) > 0.5  # real slices, not padding
    runner = make_runner(segmenter, backend="auto", cache_dir=cache, precision="int8", calibration=calibration)
    assert runner.name == "openvino" and runner.built == ["encoder", "encoder-int8", "decoder"]
    assert "int8" in runner.description
    # Same weights and slices: nothing rebuilt; other slices: only the int8 encoder is quantised again.
    assert make_runner(segmenter, backend="openvino", cache_dir=cache, precision="int8", calibration=calibration).built == []
    again = make_runner(segmenter, backend="openvino", cache_dir=cache, precision="int8", calibration=calibration[:2])
    assert again.built == ["encoder-int8"]
    # The f32 export next to it is untouched and still gives PyTorch's logits.
    f32 = make_runner(segmenter, backend="openvino", cache_dir=cache)
    assert f32.built == []
    int8_logits, f32_logits = again(calibration[:1]), f32(calibration[:1])
    assert int8_logits.shape == f32_logits.shape and not torch.equal(int8_logits, f32_logits)  # quantised for real
    # What int8 cannot do is refused by name, never run in f32 instead.
    with pytest.raises(ValueError, match="OpenVINO backend"):
        make_runner(segmenter, backend="torch", precision="int8", calibration=calibration)
    with pytest.raises(ValueError, match="calibration"):
        OpenVinoRunner(segmenter, cache_dir=cache, precision="int8")
    with pytest.raises(ValueError, match="k-class"):
        OpenVinoRunner(segmenter, "boxes", cache_dir=cache, precision="int8", calibration=calibration)


@pytest.mark.slow
@needs_openvino
@needs_nncf
def test_int8_litemedsam_agrees_with_f32_on_unseen_mni152_slices(mni_arrays, tmp_path):
    """Real LiteMedSAM on real MNI152 slices: an int8 encoder calibrated on 16 slices of the volume gives
    about the f32 labels on slices it was not calibrated on (the measured agreement is in the notes)."""
    from MedSAGaLib.inference import calibration_images

    array01, _ = mni_arrays
    segmenter = ClassSegmenter.from_base(build_base_model("litemedsam"), ["grey_matter", "white_matter"]).eval()
    calibration = calibration_images(segmenter, array01, 0, range(40, 160))
    assert len(calibration) == 16
    int8 = make_runner(segmenter, backend="openvino", cache_dir=tmp_path, precision="int8", calibration=calibration)
    f32 = make_runner(segmenter, backend="openvino", cache_dir=tmp_path)
    images = torch.stack([SliceTransform(256).to_model(array01[z]) for z in (63, 97, 131)])  # not calibration slices
    a, b = f32(images), int8(images)
    same = float((a.argmax(1) == b.argmax(1)).float().mean())
    # The untrained head's argmax is mostly background, so the logits themselves are compared too:
    # quantisation moves them (it is not f32 in disguise), by a small part of their spread.
    relative = float((a - b).abs().mean() / a.std())
    print(f"LiteMedSAM k-class, OpenVINO int8 encoder vs f32: argmax agreement {100 * same:.3f}%, "
          f"mean |logit diff| {relative:.3f} of the logits' spread, max {float((a - b).abs().max()):.2e}")
    assert same >= 0.97
    assert 0 < relative < 0.1


@needs_openvino
def test_bf16_reuses_the_f32_export_and_is_refused_without_bf16_units(tiny_model_file, mni_arrays, tmp_path, monkeypatch):
    from MedSAGaLib.backends import openvino_backend

    array01, _ = mni_arrays
    segmenter = load_model(tiny_model_file)
    cache = tmp_path / "tiny.medsaga.openvino"
    f32 = make_runner(segmenter, backend="openvino", cache_dir=cache)
    with monkeypatch.context() as patch:  # a CPU without bf16 units: refused by name, never emulated
        patch.setattr(openvino_backend, "cpu_has_bf16", lambda: False)
        with pytest.raises(ValueError, match="bf16 units"):
            make_runner(segmenter, backend="auto", cache_dir=cache, precision="bf16")
    with pytest.raises(ValueError, match="OpenVINO backend"):
        make_runner(segmenter, backend="torch", precision="bf16")
    if not openvino_backend.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units")
    bf16 = make_runner(segmenter, backend="auto", cache_dir=cache, precision="bf16")
    assert bf16.name == "openvino" and bf16.built == [] and "bf16" in bf16.description  # the same f32 IR
    same, worst = agreement(f32, bf16, [array01[z] for z in (60, 90, 120)])
    print(f"tiny ViT, OpenVINO bf16 vs f32: argmax agreement {100 * same:.3f}%, max logit diff {worst:.2e}")
    assert same >= 0.97 and worst > 0  # bf16 for real, close to f32


@needs_openvino
def test_auto_precision_is_bf16_only_for_openvino_k_class_runs_on_a_cpu_with_bf16_units(tiny_model_file, tmp_path,
                                                                                       monkeypatch):
    """``--inference-precision auto`` (the default) resolves by the backend that runs and by the CPU: bf16 for an
    adapted model in OpenVINO where the CPU has bf16 units, f32 in PyTorch, for box prompts and elsewhere; the
    runner says what ran, and under auto a failed export may still fall back to PyTorch."""
    from MedSAGaLib.backends import openvino_backend, resolve_precision

    units = openvino_backend.cpu_has_bf16()
    assert resolve_precision("auto", "openvino") == ("bf16" if units else "f32")
    assert resolve_precision("auto", "torch") == "f32" and resolve_precision("auto", "openvino", "boxes") == "f32"
    assert resolve_precision("int8", "openvino") == "int8" and resolve_precision("f32", "openvino") == "f32"
    segmenter = load_model(tiny_model_file)
    cache = tmp_path / "tiny.medsaga.openvino"
    assert make_runner(segmenter, backend="torch", precision="auto").precision == "f32"
    assert make_runner(segmenter, backend="openvino", cache_dir=cache, precision="auto").precision == (
        "bf16" if units else "f32")
    monkeypatch.setattr(openvino_backend, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "openvino") == "f32"
    assert make_runner(segmenter, backend="openvino", cache_dir=cache, precision="auto").precision == "f32"

    def broken_export(*args, **kwargs):
        raise RuntimeError("converter lacks an op")

    monkeypatch.setattr(openvino_backend.OpenVinoRunner, "__init__", broken_export)
    with pytest.warns(UserWarning, match="OpenVINO export failed"):
        assert make_runner(segmenter, backend="auto", slices=100, cache_dir=tmp_path / "x", precision="auto").name == "torch"
    with pytest.raises(RuntimeError, match="converter"):
        make_runner(segmenter, backend="auto", slices=100, cache_dir=tmp_path / "x", precision="bf16")
