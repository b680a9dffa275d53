"""Shared fixtures: small SAM ViT checkpoints in the official format, model files, real MNI152 data."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY_VIT = dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=[1, 3])


@pytest.fixture(autouse=True)
def _feature_cache_per_test(tmp_path_factory, monkeypatch):
    """``medsaga finetune`` keeps frozen features in ~/.cache by default: each test gets its own folder
    (subprocesses inherit it), so no test reads another's features or writes into the home folder."""
    monkeypatch.setenv("MEDSAGA_FEATURE_CACHE", str(tmp_path_factory.mktemp("features")))


def make_sam_vit_state(native_size: int = 1024, seed: int = 0) -> dict:
    """A state dict shaped like segment_anything's sam_vit_b checkpoint, at a small width and depth."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = native_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=TINY_VIT["depth"], embed_dim=TINY_VIT["embed_dim"], img_size=native_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=TINY_VIT["num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=TINY_VIT["global_attn_indexes"], window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(native_size, native_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    )
    # segment_anything initialises rel-pos tables to zero; give them content so resizing is visible.
    for name, param in sam.named_parameters():
        if "rel_pos" in name or "pos_embed" in name:
            param.data.normal_(0, 0.02)
    return sam.state_dict()


@pytest.fixture(scope="session")
def tiny_vit_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_tiny.pth"
    torch.save(make_sam_vit_state(), path)  # the official files are plain state dicts saved this way
    return path


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory, tiny_vit_checkpoint) -> Path:
    """An untrained 2-class MedSAGa model file on the tiny ViT at 224 px (fast on a CPU)."""
    from MedSAGaLib.modelfile import load_model, save_model

    segmenter = load_model("vit_b", class_names=["left", "right"], checkpoint=tiny_vit_checkpoint, image_size=224)
    path = tmp_path_factory.mktemp("models") / "tiny.medsaga"
    save_model(path, segmenter, {"axis": "axial"})
    return path


@pytest.fixture(scope="session")
def mni152(tmp_path_factory) -> tuple[Path, Path]:
    """The real MNI152 T1 template and its grey/white-matter labels as NIfTI files."""
    from MedSAGaLib.samples.mni152 import write_mni152_task

    return write_mni152_task(tmp_path_factory.mktemp("mni152"))


def make_volume(
    path: Path,
    size=(24, 20, 6),
    spacing=(0.8, 1.1, 3.0),
    origin=(-12.0, 30.5, 7.25),
    direction=None,
    seed: int = 0,
) -> sitk.Image:
    """A phantom (two blobs on noise) with anisotropic spacing and an oblique direction, written to path."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0 : size[2], 0 : size[1], 0 : size[0]]
    array = rng.normal(0, 5, (size[2], size[1], size[0])).astype(np.float32)
    array += 100.0 * (((xx - size[0] * 0.3) ** 2 + (yy - size[1] * 0.5) ** 2) < (size[1] * 0.2) ** 2)
    array += 60.0 * (((xx - size[0] * 0.7) ** 2 + (yy - size[1] * 0.5) ** 2) < (size[1] * 0.15) ** 2)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is None:
        angle = np.deg2rad(20)
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
        direction = (rot @ tilt).ravel().tolist()
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image
