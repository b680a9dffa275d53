"""Frozen encoder features kept on disk between fine-tuning runs (``--feature-cache``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedSAGaLib.modelfile import load_model
from MedSAGaLib.training import FinetuneConfig, finetune
from MedSAGaLib.training.feature_store import FeatureStore


def _slices(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        img = rng.random((48, 48)).astype(np.float32) * 0.2
        lab = np.zeros((48, 48), np.uint8)
        lab[8 + i : 24 + i, 10:30] = 1
        lab[30:40, 5 + i : 20 + i] = 2
        img[lab == 1] += 0.6
        img[lab == 2] += 0.3
        images.append(img)
        labels.append(lab)
    return images, labels


def _run(checkpoint, images, labels, store, steps=3):
    segmenter = load_model("vit_b", class_names=["a", "b"], checkpoint=checkpoint, image_size=224)
    # mirroring fixed on: with "auto" this phantom's class 2 sits at the rule's threshold, so the fourth slice
    # below would change the decision and with it every augmented copy (the store would rightly miss them)
    config = FinetuneConfig(method="galore", steps=steps, augment_copies=2, crop="off", warmup=0, seed=0,
                            mirror="on")
    result = finetune(segmenter, images, labels, config, feature_store=store)
    assert result.mirrored and result.metadata()["mirrored"] is True  # what inference.mirror_averaging reads
    return [h["loss"] for h in result.history if "loss" in h], result


def test_store_round_trip_bad_files_and_trim(tmp_path):
    store = FeatureStore(tmp_path / "f", max_bytes=3 * 4096 + 2000)
    tensors = [torch.full((32, 32), float(i)) for i in range(4)]  # 4 KiB each
    keys = [store.key(t, "prefix") for t in tensors]
    assert len(set(keys)) == 4 and store.key(tensors[0], "other prefix") != keys[0]
    assert store.get(keys[0]) is None and store.misses == 1
    for k, t in zip(keys, tensors):
        store.put(k, t)
    files = sorted((tmp_path / "f").glob("*.features"))
    assert len(files) == 3  # the least recently used one was trimmed to stay under max_bytes
    assert store.get(keys[0]) is None and torch.equal(store.get(keys[3]), tensors[3])
    assert store.get(keys[3], shape=(16, 64)) is None  # another shape: not used, and removed
    assert not (tmp_path / "f" / f"{keys[3]}.features").exists()
    (tmp_path / "f" / f"{keys[2]}.features").write_bytes(b"not safetensors")
    assert store.get(keys[2]) is None and not (tmp_path / "f" / f"{keys[2]}.features").exists()
    assert not list((tmp_path / "f").glob(".part-*"))
    # an unusable folder (a file stands where it should be) costs the cache, never the run
    blocked = FeatureStore(tmp_path / "a-file")
    (tmp_path / "a-file").write_text("x")
    blocked.put(keys[0], tensors[0])
    assert blocked.get(keys[0]) is None


@pytest.mark.slow
def test_second_run_reuses_features_and_trains_identically(tmp_path, tiny_vit_checkpoint):
    images, labels = _slices(3)
    store = FeatureStore(tmp_path / "features")
    first, result = _run(tiny_vit_checkpoint, images, labels, store)
    assert store.hits == 0 and store.misses == 6  # 3 slices x 2 versions, computed and stored
    assert not any("reused" in d for d in result.decisions)
    again = FeatureStore(tmp_path / "features")
    second, result = _run(tiny_vit_checkpoint, images, labels, again)
    assert again.hits == 6 and again.misses == 0
    assert second == first  # the stored features are the ones the first run trained on
    assert any(d.startswith("reused the frozen encoder features of 6 of 6 training slice(s)") for d in result.decisions)
    # one slice more (Slicer's correct-and-retrain loop): the old slices' versions come from the store
    more_images, more_labels = _slices(4)
    more = FeatureStore(tmp_path / "features")
    _run(tiny_vit_checkpoint, more_images, more_labels, more, steps=1)
    assert more.hits == 6 and more.misses == 2
    # other frozen weights: nothing matches
    segmenter = load_model("vit_b", class_names=["a", "b"], checkpoint=tiny_vit_checkpoint, image_size=224)
    with torch.no_grad():
        segmenter.image_encoder.blocks[0].mlp.lin1.weight.mul_(1.01)
    other = FeatureStore(tmp_path / "features")
    finetune(segmenter, images, labels, FinetuneConfig(steps=1, augment_copies=2, crop="off"), feature_store=other)
    assert other.hits == 0 and other.misses == 6


@pytest.mark.slow
def test_finetune_resume_reuses_the_features_of_the_first_run(tmp_path, tiny_vit_checkpoint, capsys, monkeypatch):
    from MedSAGaLib.cli import main
    from test_cli_train import phantom_task, tiny_args

    image, labels = phantom_task(tmp_path)
    common = ["finetune", "--image", str(image), "--labels", str(labels), "--slices", "1,3", "--steps", "1",
              *tiny_args(tiny_vit_checkpoint)]
    monkeypatch.setenv("MEDSAGA_FEATURE_CACHE", str(tmp_path / "default-cache"))
    assert main(common + ["-o", str(tmp_path / "a.medsaga")]) == 0
    first = capsys.readouterr().err
    assert "reused the frozen encoder features" not in first and "Time: setting up " in first
    assert list((tmp_path / "default-cache").glob("*.features"))  # the default folder comes from the environment
    assert main(common + ["--resume", str(tmp_path / "a.medsaga"), "-o", str(tmp_path / "b.medsaga")]) == 0
    second = capsys.readouterr().err
    assert "Decided: reused the frozen encoder features of 8 of 8 training slice(s)" in second, second
    # --feature-cache none: nothing read or written
    assert main(common + ["--feature-cache", "none", "-o", str(tmp_path / "c.medsaga")]) == 0
    assert "reused" not in capsys.readouterr().err
