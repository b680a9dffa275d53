"""Data-parallel fine-tuning: 2 CPU processes on gloo against one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSAGaLib.training.config import FinetuneConfig, TrainingError
from MedSAGaLib.training.distributed import DistributedEnv, DistributedTraining, check_method

SPAWN_TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> Path:
    """4 real MNI152 axial slices (cropped to 96 x 96) with grey/white-matter labels, in [0, 1]."""
    from MedSAGaLib.samples.mni152 import mni152_tissue_labels
    from MedSAGaLib.volume import normalize_intensity

    t1, labels = mni152_tissue_labels()
    image = sitk.GetArrayFromImage(t1)[:, 60:156, 50:146]
    label = sitk.GetArrayFromImage(labels)[:, 60:156, 50:146]
    picks = [70, 80, 90, 100]
    images = normalize_intensity(image[picks])
    path = tmp_path_factory.mktemp("ddp") / "slices.npz"
    np.savez(path, images=images, labels=label[picks])
    return path


def _config(method: str, batch_size: int) -> FinetuneConfig:
    # no augmentation and no warm-up: the runs differ only in how the global batch is split
    return FinetuneConfig(method=method, steps=3, batch_size=batch_size, lr=1e-3, warmup=0, rank=8,
                          update_proj_gap=2, augment=False, device="cpu", precision="fp32", seed=3)


def _train(model_path: str, data_path: str, method: str, batch_size: int):
    from MedSAGaLib.modelfile import load_model
    from MedSAGaLib.training import finetune

    data = np.load(data_path)
    segmenter = load_model(model_path)
    result = finetune(segmenter, list(data["images"]), list(data["labels"]), _config(method, batch_size))
    return segmenter, result


def _rank_main(rank: int, world: int, port: int, model_path: str, data_path: str, method: str, out: str) -> None:
    """One process of a 2-process run, as torchrun would start it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from MedSAGaLib.training.distributed import shutdown

    segmenter, result = _train(model_path, data_path, method, batch_size=2 // world)
    torch.save({"state": segmenter.state_dict(), "config": result.config, "notes": result.notes},
               Path(out) / f"{method}_rank{rank}.pt")
    shutdown()


def _spawn(world: int, *args) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(_rank_main, args=(world, _free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed training did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ----------------------------------------------------------------------------------------------
def test_environment_detection_and_layerwise_refusal():
    assert DistributedEnv.from_environ({}) is None
    assert DistributedEnv.from_environ({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert DistributedEnv.from_environ(env) == DistributedEnv(rank=2, world_size=4, local_rank=0)
    with pytest.raises(TrainingError, match="torchrun"):
        DistributedEnv.from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(TrainingError, match="galore-layerwise cannot train under torchrun") as info:
        DistributedTraining.from_environment("galore-layerwise", "cpu", env)
    assert "--method galore" in str(info.value) and "full" in str(info.value)
    for method in ("galore", "full", "lora", "decoder"):
        check_method(method, 2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["galore", "full"])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_model_file, slices, method):
    _spawn(2, str(tiny_model_file), str(slices), method, str(tmp_path))
    ranks = [torch.load(tmp_path / f"{method}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    single, _ = _train(str(tiny_model_file), str(slices), method, batch_size=2)
    from MedSAGaLib.modelfile import load_model

    start = load_model(tiny_model_file).state_dict()
    moved = [k for k, v in single.state_dict().items() if not torch.equal(v, start[k])]
    assert moved, "training changed nothing: the comparison would be empty"
    assert any(k.startswith("image_encoder") for k in moved) and any(k.startswith("mask_decoder") for k in moved)
    lr = _config(method, 2).lr
    differing, total = 0, 0
    for name, reference in single.state_dict().items():
        # both ranks hold the same weights (same averaged gradient, same GaLore projection) ...
        torch.testing.assert_close(ranks[1]["state"][name], ranks[0]["state"][name], rtol=0, atol=0)
        # ... and they equal one process training on the whole global batch. AdamW's first steps move
        # every weight by about lr whatever its gradient's size, so where a gradient is almost zero,
        # float rounding (a sum of two halves against one sum) can move a weight by up to about lr:
        # a tenth of lr bounds every weight, and almost all must agree to 1e-6.
        diff = (ranks[0]["state"][name].double() - reference.double()).abs()
        assert float(diff.max()) < 0.1 * lr, f"{name}: differs by {float(diff.max()):.2e}"
        differing += int((diff > 1e-6).sum())
        total += diff.numel()
    assert differing <= 1e-4 * total, f"{differing} of {total} weights differ by more than 1e-6"
    assert ranks[0]["config"]["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 2}
    assert any("global batch 2 = 1 per process x 2" in n for n in ranks[0]["notes"])


@pytest.mark.slow
def test_torchrun_finetune_writes_a_model_that_loads_and_segments(tmp_path, tiny_vit_checkpoint):
    from MedSAGaLib.cli import main
    from MedSAGaLib.modelfile import load_model
    from MedSAGaLib.samples.mni152 import mni152_tissue_labels

    t1, labels = mni152_tissue_labels()
    image, label = tmp_path / "t1.nii.gz", tmp_path / "labels.nii.gz"
    sitk.WriteImage(t1[50:150, 60:170, 70:76], str(image))
    sitk.WriteImage(labels[50:150, 60:170, 70:76], str(label))
    bin_dir = Path(sys.executable).parent
    model = tmp_path / "ddp.medsaga"
    command = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", str(bin_dir / "medsaga"),
               "finetune", "--image", str(image), "--labels", str(label), "--base", "vit_b",
               "--checkpoint", str(tiny_vit_checkpoint), "--image-size", "224", "--method", "galore", "--rank", "8",
               "--steps", "2", "--batch-size", "1", "--shots", "4", "--no-augment", "--device", "cpu",
               "--threads", "1", "--progress", "none", "-o", str(model)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run(command, capture_output=True, text=True, timeout=SPAWN_TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote") == 1  # rank 0 alone writes and reports
    assert "global batch 2 = 1 per process x 2" in done.stderr
    segmenter = load_model(model)
    assert segmenter.metadata["training"]["config"]["distributed"]["world_size"] == 2
    out = tmp_path / "ddp.seg.nrrd"
    assert main(["segment", str(image), "--model", str(model), "-o", str(out), "--device", "cpu"]) == 0
    import slicerio

    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["label_1", "label_2"]
    assert seg["voxels"].shape[-3:] == tuple(t1[50:150, 60:170, 70:76].GetSize())
