"""Bad inputs and hostile files, table-driven: every case ends with exit code 2 (or the documented
code), one line on stderr that names the option or file, no traceback, and nothing changed on disk
(inputs, existing outputs, no new file, no temporary). docs/HARDENING.md lists the cases by id."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_volume
from MedSAGaLib.cli import main

LABELLED = (1, 3, 4)  # axial slices holding labels


# ----------------------------------------------------------------------------- the world of files
def _write(array, reference, path, pixel=None):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    if pixel is not None:
        image = sitk.Cast(image, pixel)
    sitk.WriteImage(image, str(path))
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _retamper(src: Path, dst: Path, meta_edit=None, state_edit=None, rehash=False, raw_meta=None) -> Path:
    """A copy of a model file with its metadata and/or weights edited (as an adversary would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from MedSAGaLib.modelfile import _payload_digest

    with safe_open(str(src), framework="pt") as handle:
        meta = json.loads(handle.metadata()["medsaga"])
    state = load_file(str(src))
    if state_edit:
        state_edit(state)
    if meta_edit:
        meta_edit(meta)
    if rehash:
        meta["payload_sha256"] = _payload_digest(state)
    save_file(state, str(dst), metadata={"medsaga": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


class Payload:
    """A pickle that would create a file when unpickled: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit(**changes):
    def apply(meta):
        for key, value in changes.items():
            target = meta
            *path, last = key.split("__")
            for part in path:
                target = target[part]
            if value is _DELETE:
                target.pop(last, None)
            else:
                target[last] = value
    return apply


_DELETE = object()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_file, tiny_vit_checkpoint):
    d = tmp_path_factory.mktemp("world")
    image = make_volume(d / "img.nrrd")
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.uint8)
    for z in LABELLED:
        labels[z, 5:12, 3:9] = 1
        labels[z, 6:11, 14:20] = 2
    _write(labels, image, d / "lab.nii.gz")
    from MedSAGaLib.segio import write_seg_nrrd

    write_seg_nrrd(d / "lab.seg.nrrd", labels, image, ["left", "right"])
    extra = labels.copy()
    extra[LABELLED[0], 0:2, 0:2] = 3
    write_seg_nrrd(d / "extra.seg.nrrd", extra, image, ["left", "right", "vessel"])
    model = d / "model.medsaga"
    model.write_bytes(Path(tiny_model_file).read_bytes())
    ckpt = d / "ckpt.pth"
    ckpt.write_bytes(Path(tiny_vit_checkpoint).read_bytes())
    (d / "existing.seg.nrrd").write_bytes(b"the user's earlier segmentation")
    (d / "existing.medsaga").write_bytes(b"the user's earlier model")
    (d / "outdir.seg.nrrd").mkdir()
    (d / "outdir.medsaga").mkdir()
    (d / "afile").write_bytes(b"a file, not a folder")
    os.symlink(d / "img.nrrd", d / "img_alias.medsaga")
    os.symlink(d / "img.nrrd", d / "img_link.nrrd")
    os.link(d / "img.nrrd", d / "img_hard.nrrd")
    os.symlink(d / "lab.nii.gz", d / "lab_link.nii.gz")

    # --- bad images
    (d / "garbage.nii.gz").write_bytes(b"not an image at all" * 10)
    (d / "empty.nii").write_bytes(b"")
    (d / "nodicom").mkdir()
    (d / "nodicom" / "readme.txt").write_text("no DICOM here")
    float_img = array.astype(np.float32)
    for name in ("trunc.nii.gz", "trunc.nii", "trunc.nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(float_img + 1), str(d / name), True)
        _truncate(d / name)
    for name, value in (("nan.nii", np.nan), ("inf.nii.gz", np.inf), ("nan.mha", np.nan), ("nan.nrrd", -np.inf)):
        bad = float_img.copy()
        bad[2, 3, 4] = value
        _write(bad, image, d / name)
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(20, 20).astype(np.float32)), str(d / "flat2d.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(2, 3, 8, 8).astype(np.float32), isVector=False),
                    str(d / "four.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, 8, 8, 3).astype(np.float32), isVector=True),
                    str(d / "rgb.nrrd"))
    _write(np.full(array.shape, 7, np.float32), image, d / "const.nrrd")

    # --- bad labels (on the image's grid unless named otherwise)
    moved = sitk.GetImageFromArray(labels)
    moved.CopyInformation(image)
    moved.SetSpacing((0.8, 1.1, 2.0))
    sitk.WriteImage(moved, str(d / "lab_spacing.nii.gz"))
    tilted = sitk.GetImageFromArray(labels)
    tilted.CopyInformation(image)
    direction = list(image.GetDirection())
    direction[0] += 2e-3
    tilted.SetDirection(direction)
    sitk.WriteImage(tilted, str(d / "lab_direction.nrrd"))
    other = sitk.Image([8, 8, 4], sitk.sitkUInt8)
    sitk.WriteImage(other, str(d / "lab_size.nrrd"))
    _write(labels.astype(np.int16) - 1, image, d / "lab_negative.nrrd")
    _write(labels.astype(np.float32) * 0.5, image, d / "lab_fraction.nrrd")
    nan_labels = labels.astype(np.float32)
    nan_labels[0, 0, 0] = np.nan
    _write(nan_labels, image, d / "lab_nan.nrrd")
    huge = labels.astype(np.float64)
    huge[LABELLED[0], 0, 0] = 1e15
    _write(huge, image, d / "lab_huge.nrrd")
    many = (np.arange(labels.size).reshape(labels.shape) % 300).astype(np.uint16)
    _write(many, image, d / "lab_many.nrrd")
    _write(np.zeros_like(labels), image, d / "lab_empty.nii.gz")
    _write(labels, image, d / "lab_trunc.nii.gz")
    _truncate(d / "lab_trunc.nii.gz")

    # --- hostile model files
    marker = d / "PAYLOAD_RAN"
    with open(d / "pickle.medsaga", "wb") as handle:
        pickle.dump({"weights": Payload(marker)}, handle)
    with open(d / "pickle_ckpt.pth", "wb") as handle:
        pickle.dump({"image_encoder.pos_embed": Payload(marker)}, handle)
    (d / "junk.medsaga").write_bytes(b"\x00" * 64)
    (d / "empty.medsaga").write_bytes(b"")
    big_header = bytearray(model.read_bytes()[:64])
    big_header[:8] = (10**12).to_bytes(8, "little")
    (d / "bigheader.medsaga").write_bytes(bytes(big_header))
    (d / "model_trunc.medsaga").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (d / "model_folder.medsaga").mkdir()

    def scale_first(state):
        key = sorted(state)[0]
        state[key] = state[key] * 1.001

    tampered = {
        "no_checksum": dict(meta_edit=_edit(payload_sha256=_DELETE)),
        "bad_checksum": dict(state_edit=scale_first),
        "checksum_not_hex": dict(meta_edit=_edit(payload_sha256="z" * 64)),
        "depth48": dict(meta_edit=_edit(architecture__depth=48)),
        "depth24": dict(meta_edit=_edit(architecture__depth=24)),
        "depth_million": dict(meta_edit=_edit(architecture__depth=10**6)),
        "embed_1e9": dict(meta_edit=_edit(architecture__embed_dim=10**9)),
        "embed_float": dict(meta_edit=_edit(architecture__embed_dim=64.5)),
        "heads0": dict(meta_edit=_edit(architecture__num_heads=0)),
        "heads_split": dict(meta_edit=_edit(architecture__num_heads=3)),
        "no_architecture": dict(meta_edit=_edit(architecture=_DELETE)),
        "architecture_list": dict(meta_edit=_edit(architecture=[1, 2])),
        "arch_unknown_field": dict(meta_edit=_edit(architecture__evil="x")),
        "base_unknown": dict(meta_edit=_edit(base_model="vit_x", architecture__base="vit_x")),
        "base_mismatch": dict(meta_edit=_edit(base_model="vit_h")),
        "lite_claim": dict(meta_edit=_edit(base_model="litemedsam", architecture__base="litemedsam",
                                           architecture__image_size=256, image_size=256)),
        "image_size_huge": dict(meta_edit=_edit(architecture__image_size=65536, image_size=65536)),
        "image_size_odd": dict(meta_edit=_edit(architecture__image_size=230, image_size=230)),
        "image_size_differs": dict(meta_edit=_edit(image_size=512)),
        "global_out_of_range": dict(meta_edit=_edit(architecture__global_attn_indexes=[99])),
        "names_newline": dict(meta_edit=_edit(class_names=["left\ndata file: /etc/passwd", "right"])),
        "names_kv": dict(meta_edit=_edit(class_names=["left", "Segment0_Name:=x"])),
        "names_string": dict(meta_edit=_edit(class_names="leftright")),
        "names_duplicate": dict(meta_edit=_edit(class_names=["left", "left"])),
        "names_count": dict(meta_edit=_edit(class_names=["a", "b", "c"], class_colors=None)),
        "names_number": dict(meta_edit=_edit(class_names=[1, 2])),
        "names_empty": dict(meta_edit=_edit(class_names=[])),
        "colour_nan": dict(meta_edit=_edit(class_colors=[[0.1, 0.2, float("nan")], [0, 0, 0]])),
        "colour_255": dict(meta_edit=_edit(class_colors=[[255, 0, 0], [0, 0, 0]])),
        "colour_count": dict(meta_edit=_edit(class_colors=[[0, 0, 0]])),
        "window_negative": dict(meta_edit=_edit(preprocessing={"intensity": "window", "window": [40, -5]})),
        "intensity_unknown": dict(meta_edit=_edit(preprocessing={"intensity": "eval"})),
        "percentiles_bad": dict(meta_edit=_edit(preprocessing={"intensity": "percentile", "percentiles": [99, 1]})),
        "axis_bad": dict(meta_edit=_edit(axis="diagonal")),
        "version_newer": dict(meta_edit=_edit(format_version=99)),
        "version_text": dict(meta_edit=_edit(format_version="1")),
        "format_foreign": dict(meta_edit=_edit(format="other")),
        "meta_not_json": dict(raw_meta="{not json"),
        "meta_list": dict(raw_meta="[1, 2, 3]"),
        "sides_garbage": dict(meta_edit=_edit(sides={"merged": "x"})),
        "sides_midline_nan": dict(meta_edit=_edit(sides={"merged": [0, 1, 1], "first": [0, 1], "second": [0, 2],
                                                         "midline": float("nan"), "names": ["x"]})),
        # a well-formed split the weights do not have: one structure, but the decoder has two class slots
        "sides_tokens": dict(meta_edit=_edit(sides={"merged": [0, 1, 1], "first": [0, 1], "second": [0, 2],
                                                    "midline": 10.0, "names": ["x"]})),
        "tokens_resized": dict(state_edit=lambda s: s.__setitem__("mask_decoder.mask_tokens.weight",
                                                                   s["mask_decoder.mask_tokens.weight"][:2]), rehash=True),
        "weight_missing": dict(state_edit=lambda s: s.pop("mask_decoder.iou_token.weight"), rehash=True),
        "weight_reshaped": dict(state_edit=lambda s: s.__setitem__("mask_decoder.iou_token.weight",
                                                                    s["mask_decoder.iou_token.weight"].reshape(2, 128)),
                                rehash=True),
        "depth_with_weights": dict(state_edit=lambda s: [s.pop(k) for k in list(s) if ".blocks.3." in k],
                                   rehash=True),
    }
    for name, how in tampered.items():
        _retamper(model, d / f"t_{name}.medsaga", **how)
    _retamper(model, d / "odd_info.medsaga", meta_edit=_edit(validation_dice=[0.5, "x"], training="a string"))
    return d


def _snapshot(*folders: Path) -> dict:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                info = path.stat()
                # small files by content; the big model copies by size, time, inode and mode (hashing
                # hundreds of MB per case would dominate the run)
                content = hashlib.sha256(path.read_bytes()).hexdigest() if info.st_size < 2**20 else None
                out[str(path)] = (content, info.st_size, info.st_mtime_ns, info.st_ino, oct(info.st_mode))
            elif path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            else:
                out[str(path)] = ("dir",)
    return out


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def expect_refused(argv, expected: str, capsys, folders, code: int = 2) -> str:
    before = _snapshot(*folders)
    rc, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert lines, "no message"
    last = lines[-1]
    assert last.startswith("medsaga"), err
    assert expected.lower() in last.lower(), f"expected {expected!r} in {last!r}"
    assert "weights_only=False" not in err
    assert _snapshot(*folders) == before, "files changed, appeared or were left behind"
    return last


# ----------------------------------------------------------------------------- the table
SEG = ["segment", "{img}", "--model", "{model}", "-o", "{out}"]
BASE_SEG = ["segment", "{img}", "--model", "vit_b", "--checkpoint", "{ckpt}", "--image-size", "224", "-o", "{out}"]
FT = ["finetune", "--image", "{img}", "--labels", "{lab}", "-o", "{mout}", "--base", "vit_b", "--checkpoint", "{ckpt}",
      "--image-size", "224", "--steps", "1", "--progress", "none", "--device", "cpu"]
EV = ["evaluate", "--image", "{img}", "--labels", "{lab}", "--model", "{model}", "--device", "cpu"]


def _ft(**replace):
    """FT with options replaced ({"-o": "..."}) or dropped (value None)."""
    argv = list(FT)
    for flag, value in replace.items():
        flag = "-o" if flag == "o" else "--" + flag.replace("_", "-")
        i = argv.index(flag)
        if value is None:
            del argv[i : i + 2]
        else:
            argv[i + 1] = value
    return argv


CASES = [
    # --- images (segment)
    ("image-missing", ["segment", "{d}/missing.nii.gz", "--model", "{model}", "-o", "{out}"], "no such file"),
    ("image-garbage-gz", ["segment", "{d}/garbage.nii.gz", "--model", "{model}", "-o", "{out}"], "not a gzip"),
    ("image-empty-file", ["segment", "{d}/empty.nii", "--model", "{model}", "-o", "{out}"], "empty.nii"),
    ("image-folder-no-dicom", ["segment", "{d}/nodicom", "--model", "{model}", "-o", "{out}"], "No DICOM series"),
    ("image-truncated-nii-gz", ["segment", "{d}/trunc.nii.gz", "--model", "{model}", "-o", "{out}"], "truncated"),
    ("image-truncated-nii", ["segment", "{d}/trunc.nii", "--model", "{model}", "-o", "{out}"], "truncated"),
    ("image-truncated-nrrd", ["segment", "{d}/trunc.nrrd", "--model", "{model}", "-o", "{out}"], "trunc.nrrd"),
    ("image-nan-nii", ["segment", "{d}/nan.nii", "--model", "{model}", "-o", "{out}"], "NaN or infinite"),
    ("image-inf-nii-gz", ["segment", "{d}/inf.nii.gz", "--model", "{model}", "-o", "{out}"], "NaN or infinite"),
    ("image-nan-mha", ["segment", "{d}/nan.mha", "--model", "{model}", "-o", "{out}"], "NaN or infinite"),
    ("image-inf-nrrd", ["segment", "{d}/nan.nrrd", "--model", "{model}", "-o", "{out}"], "NaN or infinite"),
    ("image-2d", ["segment", "{d}/flat2d.nrrd", "--model", "{model}", "-o", "{out}"], "2-D image"),
    ("image-4d", ["segment", "{d}/four.nrrd", "--model", "{model}", "-o", "{out}"], "4-D image"),
    ("image-rgb", ["segment", "{d}/rgb.nrrd", "--model", "{model}", "-o", "{out}"], "components per voxel"),
    ("image-constant", ["segment", "{d}/const.nrrd", "--model", "{model}", "-o", "{out}"], "constant"),
    # --- images and labels (finetune, evaluate)
    ("ft-image-truncated", _ft(image="{d}/trunc.nii.gz"), "truncated"),
    ("ft-image-nan", _ft(image="{d}/nan.nii"), "NaN or infinite"),
    ("ft-image-missing", _ft(image="{d}/missing.nrrd"), "--image"),
    ("ft-labels-missing", _ft(labels="{d}/missing.nii.gz"), "--labels"),
    ("ft-labels-spacing", _ft(labels="{d}/lab_spacing.nii.gz"), "labels vs image: spacing (0.8, 1.1, 2) vs (0.8, 1.1, 3)"),
    ("ft-labels-direction", _ft(labels="{d}/lab_direction.nrrd"), "direction"),
    ("ft-labels-size", _ft(labels="{d}/lab_size.nrrd"), "size (8, 8, 4) vs (24, 20, 6)"),
    ("ft-labels-negative", _ft(labels="{d}/lab_negative.nrrd"), "negative values"),
    ("ft-labels-fraction", _ft(labels="{d}/lab_fraction.nrrd"), "non-integer"),
    ("ft-labels-nan", _ft(labels="{d}/lab_nan.nrrd"), "NaN"),
    ("ft-labels-huge-value", _ft(labels="{d}/lab_huge.nrrd"), "1e+15"),
    ("ft-labels-too-many", _ft(labels="{d}/lab_many.nrrd"), "more than 255 labels"),
    ("ft-labels-empty", _ft(labels="{d}/lab_empty.nii.gz"), "no label"),
    ("ft-labels-truncated", _ft(labels="{d}/lab_trunc.nii.gz"), "truncated"),
    ("ft-labels-folder", _ft(labels="{d}/nodicom"), "folder"),
    ("ev-labels-direction", EV[:4] + ["{d}/lab_direction.nrrd"] + EV[5:], "direction"),
    ("ev-image-truncated", ["evaluate", "--image", "{d}/trunc.nii", "--labels", "{lab}", "--model", "{model}"],
     "truncated"),
    ("boxes-labels-spacing", ["segment", "{img}", "--model", "vit_b", "--checkpoint", "{ckpt}", "--image-size", "224",
                              "--boxes-from", "{d}/lab_spacing.nii.gz", "-o", "{out}"], "does not lie on the image's grid"),
    # --- outputs that would destroy an input or fail late
    ("seg-labelmap-is-image", SEG + ["--labelmap", "{img}"], "is the input image"),
    ("seg-labelmap-symlink-to-image", SEG + ["--labelmap", "{d}/img_link.nrrd"], "is the input image"),
    ("seg-labelmap-hardlink-to-image", SEG + ["--labelmap", "{d}/img_hard.nrrd"], "is the input image"),
    ("seg-labelmap-is-boxes-labels", ["segment", "{img}", "--model", "litemedsam", "--boxes-from", "{lab}",
                                      "-o", "{out}", "--labelmap", "{lab}"], "is the input --boxes-from"),
    ("seg-labelmap-link-to-boxes-labels", ["segment", "{img}", "--model", "litemedsam", "--boxes-from", "{lab}",
                                           "-o", "{out}", "--labelmap", "{d}/lab_link.nii.gz"], "--boxes-from"),
    ("seg-output-is-boxes-seg", ["segment", "{img}", "--model", "litemedsam", "--boxes-from", "{d}/lab.seg.nrrd",
                                 "-o", "{d}/lab.seg.nrrd"], "is the input --boxes-from"),
    ("seg-labelmap-unknown-suffix", ["segment", "{img}", "--model", "{model}", "-o", "{d}/existing.seg.nrrd",
                                     "--labelmap", "{d}/x.txt"], "--labelmap"),
    ("seg-output-equals-labelmap", ["segment", "{img}", "--model", "{model}", "-o", "{d}/same.seg.nrrd",
                                    "--labelmap", "{d}/same.seg.nrrd"], "name the same file"),
    ("seg-output-suffix", ["segment", "{img}", "--model", "{model}", "-o", "{d}/out.nii.gz"], ".seg.nrrd"),
    ("seg-output-folder", ["segment", "{img}", "--model", "{model}", "-o", "{d}/outdir.seg.nrrd"], "is a folder"),
    ("seg-output-unwritable", ["segment", "{img}", "--model", "{model}", "-o", "/proc/medsaga-out.seg.nrrd"],
     "cannot write in folder"),
    ("seg-output-parent-is-file", ["segment", "{img}", "--model", "{model}", "-o", "{d}/afile/out.seg.nrrd"],
     "is a file, not a folder"),
    ("seg-output-empty-name", ["segment", "{img}", "--model", "{model}", "-o", ""], "empty"),
    ("ft-output-is-image-alias", _ft(o="{d}/img_alias.medsaga"), "is the input --image"),
    ("ft-output-image-suffix", _ft(o="{d}/model.nii.gz"), "ends like an image"),
    ("ft-output-is-labels", _ft(o="{lab}"), "-o/--output"),
    ("ft-output-is-resume", _ft(o="{model}", base=None) + ["--resume", "{model}"], "is the input --resume"),
    ("ft-output-is-checkpoint", _ft(o="{ckpt}"), "ends like an image"),
    ("ft-output-folder", _ft(o="{d}/outdir.medsaga"), "is a folder"),
    ("ft-output-unwritable", _ft(o="/proc/medsaga-test.medsaga"), "cannot write in folder"),
    ("ft-output-parent-is-file", _ft(o="{d}/afile/m.medsaga"), "is a file, not a folder"),
    # --- segment options
    ("seg-window-none", SEG + ["--window", "none"], "--window"),
    ("seg-window-empty", SEG + ["--window", ""], "--window"),
    ("seg-window-zero-width", SEG + ["--window", "40,0"], "width must be positive"),
    ("seg-window-negative-width", SEG + ["--window=40,-10"], "width must be positive"),
    ("seg-window-text", SEG + ["--window", "soft"], "preset"),
    ("seg-window-nan", SEG + ["--window", "nan,5"], "finite"),
    ("seg-window-blank-image", SEG + ["--window", "100000,10"], "every voxel would be black"),
    ("seg-window-white-image", SEG + ["--window", "-600,100"], "every voxel would be white"),
    ("seg-axis-number", SEG + ["--axis", "5"], "--axis"),
    ("seg-axis-name", SEG + ["--axis", "diagonal"], "--axis"),
    ("seg-axis-empty", SEG + ["--axis", ""], "--axis"),
    ("seg-slices-outside", SEG + ["--slices", "0,99"], "outside the volume"),
    ("seg-slices-text", SEG + ["--slices", "abc"], "Slices 'abc'"),
    ("seg-slices-empty-range", SEG + ["--slices", "5:2"], "select no slice"),
    ("seg-slices-empty", SEG + ["--slices", ""], "--slices"),
    ("seg-device-unknown", SEG + ["--device", "tpu"], "--device"),
    ("seg-device-absent-gpu", SEG + ["--device", "cuda:7"], "--device"),
    ("seg-batch-size-zero", SEG + ["--batch-size", "0"], "--batch-size"),
    ("seg-batch-size-text", SEG + ["--batch-size", "many"], "--batch-size"),
    ("seg-box-margin-negative", ["segment", "{img}", "--model", "litemedsam", "--boxes-from", "{lab}",
                                 "--box-margin", "-2", "-o", "{out}"], "--box-margin"),
    ("seg-threads-zero", SEG + ["--threads", "0"], "--threads"),
    ("seg-image-size-odd", ["segment", "{img}", "--model", "vit_b", "--checkpoint", "{ckpt}", "--image-size", "100",
                            "--classes", "a", "-o", "{out}"], "--image-size"),
    ("seg-classes-with-model-file", SEG + ["--classes", "a", "b"], "--classes applies to a base model"),
    ("seg-checkpoint-with-model-file", SEG + ["--checkpoint", "{ckpt}"], "--checkpoint applies to a base model"),
    ("seg-classes-newline", BASE_SEG + ["--classes", "a\ndata file: /etc/passwd", "b"], "control character"),
    ("seg-classes-key-injection", BASE_SEG + ["--classes", "a:=b"], "':='"),
    ("seg-classes-duplicate", BASE_SEG + ["--classes", "a", "a"], "given twice"),
    ("seg-classes-blank", BASE_SEG + ["--classes", " a"], "white space"),
    ("seg-classes-bidi", BASE_SEG + ["--classes", "liver\u202eevil"], "control character"),
    ("seg-classes-non-ascii", BASE_SEG + ["--classes", "Leber \u00fc"], "ASCII text only"),
    ("seg-base-no-classes", ["segment", "{img}", "--model", "litemedsam", "-o", "{out}"], "is a base model"),
    ("seg-checkpoint-missing", ["segment", "{img}", "--model", "vit_b", "--checkpoint", "{d}/none.pth",
                                "--classes", "a", "-o", "{out}"], "--checkpoint"),
    ("seg-checkpoint-pickle-payload", ["segment", "{img}", "--model", "vit_b", "--checkpoint", "{d}/pickle_ckpt.pth",
                                       "--classes", "a", "-o", "{out}"], "Python objects besides tensors"),
    ("seg-boxes-with-model-file", SEG + ["--boxes-from", "{lab}"], "--boxes-from prompts a base model"),
    ("seg-model-missing", ["segment", "{img}", "--model", "{d}/none.medsaga", "-o", "{out}"], "no such model file"),
    ("seg-model-folder", ["segment", "{img}", "--model", "{d}/model_folder.medsaga", "-o", "{out}"], "is a folder"),
    ("seg-unknown-option", SEG + ["--colour", "red"], "unrecognized arguments"),
    # --- finetune options
    ("ft-shots-zero", _ft() + ["--shots", "0"], "--shots"),
    ("ft-shots-above-annotated", _ft() + ["--shots", "9"], "--shots 9"),
    ("ft-shots-and-slices", _ft() + ["--shots", "1", "--slices", "1"], "--slices and --shots"),
    ("ft-slices-unannotated", _ft() + ["--slices", "0,2"], "hold no annotation"),
    ("ft-steps-zero", _ft(steps="0"), "--steps"),
    ("ft-steps-and-epochs", _ft() + ["--epochs", "2"], "not allowed with argument"),
    ("ft-epochs-zero", _ft(steps=None) + ["--epochs", "0"], "--epochs"),
    ("ft-epochs-nan", _ft(steps=None) + ["--epochs", "nan"], "--epochs"),
    ("ft-lr-zero", _ft() + ["--lr", "0"], "--lr"),
    ("ft-lr-nan", _ft() + ["--lr", "nan"], "--lr"),
    ("ft-lr-huge", _ft() + ["--lr", "5"], "--lr"),
    ("ft-encoder-lr-negative", _ft() + ["--encoder-lr=-1"], "--encoder-lr"),
    ("ft-warmup-negative", _ft() + ["--warmup=-1"], "--warmup"),
    ("ft-rank-zero", _ft() + ["--rank", "0"], "--rank"),
    ("ft-update-proj-gap-zero", _ft() + ["--update-proj-gap", "0"], "--update-proj-gap"),
    ("ft-scale-zero", _ft() + ["--scale", "0"], "--scale"),
    ("ft-scale-inf", _ft() + ["--scale", "inf"], "--scale"),
    ("ft-lora-rank-zero", _ft() + ["--lora-rank", "0"], "--lora-rank"),
    ("ft-train-stages-negative", _ft() + ["--train-stages=-1"], "--train-stages"),
    ("ft-val-fraction-one", _ft() + ["--val-fraction", "1"], "--val-fraction"),
    ("ft-val-fraction-negative", _ft() + ["--val-fraction=-0.1"], "--val-fraction"),
    ("ft-max-val-slices-negative", _ft() + ["--max-val-slices=-1"], "--max-val-slices"),
    ("ft-batch-size-zero", _ft() + ["--batch-size", "0"], "--batch-size"),
    ("ft-threads-zero", _ft() + ["--threads", "0"], "--threads"),
    ("ft-device-unknown", _ft(device="quantum"), "--device"),
    ("ft-proj-type-unknown", _ft() + ["--proj-type", "diagonal"], "projection"),
    ("ft-method-unknown", _ft() + ["--method", "magic"], "--method"),
    ("ft-precision-unknown", _ft() + ["--precision", "fp8"], "--precision"),
    ("ft-base-unknown", _ft(base="vit_x"), "--base"),
    ("ft-progress-unknown", _ft(progress="loud"), "--progress"),
    ("ft-image-size-odd", _ft(image_size="300"), "--image-size"),
    ("ft-checkpoint-pickle-payload", _ft(checkpoint="{d}/pickle_ckpt.pth"),
     "Python objects besides tensors"),
    ("ft-classes-count", _ft() + ["--classes", "a", "b", "c"], "--classes names 3 classes"),
    ("ft-classes-newline", _ft() + ["--classes", "a\nb", "c"], "control character"),
    ("ft-classes-key-injection", _ft() + ["--classes", "x:=y", "c"], "':='"),
    ("ft-resume-missing", _ft(base=None) + ["--resume", "{d}/none.medsaga"], "--resume"),
    ("ft-resume-base-mismatch", _ft(base="litemedsam", checkpoint=None, image_size=None) + ["--resume", "{model}"],
     "was adapted from vit_b"),
    ("ft-resume-tampered", _ft(base=None) + ["--resume", "{d}/t_depth48.medsaga"], "architecture.depth"),
    ("ft-resume-pickle", _ft(base=None) + ["--resume", "{d}/pickle.medsaga"], "not a MedSAGa model file"),
    # --- evaluate options
    ("ev-model-missing", EV[:-4] + ["--model", "{d}/none.medsaga"], "--model"),
    ("ev-model-pickle", EV[:-4] + ["--model", "{d}/pickle.medsaga", "--device", "cpu"], "not a MedSAGa model"),
    ("ev-slices-outside", EV + ["--slices", "40"], "outside the volume"),
    ("ev-batch-size-zero", EV + ["--batch-size", "0"], "--batch-size"),
    ("ev-window-none", EV + ["--window", "none"], "--window"),
    ("ev-device-unknown", EV[:-2] + ["--device", "gpu0"], "--device"),
    # --- info
    ("info-missing", ["info", "{d}/none.medsaga"], "no such model file"),
    ("info-folder", ["info", "{d}/model_folder.medsaga"], "is a folder"),
    ("info-junk", ["info", "{d}/junk.medsaga"], "not a MedSAGa model file"),
    ("info-empty", ["info", "{d}/empty.medsaga"], "empty.medsaga"),
    ("info-image-instead", ["info", "{img}"], "img.nrrd"),
    ("info-pickle", ["info", "{d}/pickle.medsaga"], "not a MedSAGa model file"),
    ("info-truncated", ["info", "{d}/model_trunc.medsaga"], "truncated"),
    ("info-huge-header", ["info", "{d}/bigheader.medsaga"], "bigheader.medsaga"),
    # --- command line as such
    ("no-command", [], "required"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
]

# Model files as hostile input: through segment (load) and info (metadata), with what each says.
HOSTILE = {
    "no_checksum": "no valid weight checksum",
    "bad_checksum": "do not match the checksum",
    "checksum_not_hex": "no valid weight checksum",
    "depth48": "architecture.depth is 48; expected a whole number from 1 to 40",
    "depth24": "architecture.depth is 24 but the weights have 4",
    "depth_million": "architecture.depth is 1000000",
    "embed_1e9": "architecture.embed_dim is 1000000000",
    "embed_float": "architecture.embed_dim is 64.5",
    "heads0": "architecture.num_heads is 0",
    "heads_split": "does not split into 3 heads",
    "no_architecture": "metadata has no architecture",
    "architecture_list": "metadata has no architecture",
    "arch_unknown_field": "unknown fields ['evil']",
    "base_unknown": "base_model is 'vit_x'",
    "base_mismatch": "differs from base_model",
    "lite_claim": "does not fit a litemedsam model",
    "image_size_huge": "image_size is 65536",
    "image_size_odd": "not a multiple of 16",
    "image_size_differs": "image_size 512 differs",
    "global_out_of_range": "global_attn_indexes",
    "names_newline": "control character U+000A",
    "names_kv": "':='",
    "names_string": "expected a list of class names",
    "names_duplicate": "given twice",
    "names_count": "metadata lists 3 classes but its decoder has 2",
    "names_number": "is not text",
    "names_empty": "no class name",
    "colour_nan": "not a finite number",
    "colour_255": "outside 0-1",
    "colour_count": "expected 2 colours",
    "window_negative": "preprocessing.window",
    "intensity_unknown": "preprocessing.intensity",
    "percentiles_bad": "preprocessing.percentiles",
    "axis_bad": "metadata axis is 'diagonal'",
    "version_newer": "newer MedSAGa",
    "version_text": "format_version is '1'",
    "format_foreign": "not a MedSAGa model file",
    "meta_not_json": "corrupt MedSAGa metadata",
    "meta_list": "not a mapping",
    "tokens_resized": "metadata lists 2 classes but its decoder has 1",
    "sides_garbage": "metadata sides (left and right learnt as one structure) is unreadable",
    "sides_midline_nan": "its midline is nan",
    "sides_tokens": "metadata lists 1 structures (left and right as one) but its decoder has 2 class slots",
    "weight_missing": "does not fit",
    "weight_reshaped": "does not fit",
    "depth_with_weights": "architecture.depth is 4 but the weights have 3",
}
# Shape problems are found when loading; info reads the metadata only.
SHAPE_ONLY = {"bad_checksum", "depth24", "lite_claim", "names_count", "tokens_resized", "sides_tokens", "weight_missing",
              "weight_reshaped", "depth_with_weights"}


def _paths(world: Path, tmp_path: Path) -> dict:
    return dict(d=world, img=world / "img.nrrd", lab=world / "lab.nii.gz", model=world / "model.medsaga",
                ckpt=world / "ckpt.pth", out=tmp_path / "out.seg.nrrd", mout=tmp_path / "new.medsaga")


def _fill(argv, paths) -> list[str]:
    return [a.format(**paths) if "{" in a else a for a in argv]


@pytest.mark.parametrize("case_id, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case_id, argv, expected, world, tmp_path, capsys):
    expect_refused(_fill(argv, _paths(world, tmp_path)), expected, capsys, [world, tmp_path])
    assert not (world / "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_model_segment(name, world, tmp_path, capsys):
    argv = ["segment", world / "img.nrrd", "--model", world / f"t_{name}.medsaga", "-o", tmp_path / "o.seg.nrrd"]
    last = expect_refused(argv, HOSTILE[name], capsys, [world, tmp_path])
    assert f"t_{name}.medsaga" in last  # the message names the model file


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - SHAPE_ONLY))
def test_hostile_model_info(name, world, tmp_path, capsys):
    last = expect_refused(["info", world / f"t_{name}.medsaga"], HOSTILE[name], capsys, [world, tmp_path])
    assert f"t_{name}.medsaga" in last


def test_pickle_payloads_never_run(world, tmp_path, capsys):
    for argv in (["info", world / "pickle.medsaga"],
                 ["segment", world / "img.nrrd", "--model", world / "pickle.medsaga", "-o", tmp_path / "o.seg.nrrd"],
                 ["segment", world / "img.nrrd", "--model", "vit_b", "--checkpoint", world / "pickle_ckpt.pth",
                  "--classes", "a", "-o", tmp_path / "o.seg.nrrd"]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and "weights_only=False" not in err
    assert not (world / "PAYLOAD_RAN").exists()


def test_tampered_depth_is_refused_before_building(world, tmp_path):
    """depth 48 cost 2.5 GB and 12 s before: now the shapes in the header refuse it at once."""
    import time
    import tracemalloc

    from MedSAGaLib.modelfile import ModelFileError, load_model

    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="architecture.depth is 48"):
        load_model(world / "t_depth48.medsaga")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 20 * 2**20, peak


def test_info_shows_odd_informational_metadata(world, capsys):
    rc, out, err = run_cli(["info", world / "odd_info.medsaga"], capsys)
    assert rc == 0, err
    assert "validation Dice: (unreadable: list)" in out
    assert "Traceback" not in err


def test_direction_mismatch_shows_the_differing_numbers(world, tmp_path, capsys):
    last = expect_refused(_fill(_ft(labels="{d}/lab_direction.nrrd"), _paths(world, tmp_path)), "direction", capsys,
                          [world, tmp_path])
    shown = last.split("direction ")[1]
    labels_dir, image_dir = shown.split(" vs ")
    assert labels_dir.strip(" .") != image_dir.strip(" .")


def test_debug_shows_the_traceback(world, tmp_path):
    from MedSAGaLib.volume import VolumeError

    with pytest.raises(VolumeError):
        main(["segment", str(world / "trunc.nii.gz"), "--model", str(world / "model.medsaga"),
              "-o", str(tmp_path / "o.seg.nrrd"), "--debug"])


# ----------------------------------------------------------------------------- what must still work
def test_negative_window_centre_as_users_type_it(world, tmp_path, capsys):
    """--window -600,1500 (a CT lung window) is taken as the option's value, not as an option."""
    from MedSAGaLib.cli import build_parser
    from MedSAGaLib.safety import join_negative_values

    args = build_parser().parse_args(join_negative_values(
        ["segment", "x.nrrd", "--model", "m.medsaga", "-o", "o.seg.nrrd", "--window", "-600,1500"]))
    assert args.window == "-600,1500"
    args = build_parser().parse_args(join_negative_values(
        ["finetune", "--image", "a", "--labels", "b", "-o", "c", "--window", "-.5,2"]))
    assert args.window == "-.5,2"
    # through main: the window is parsed and used (the image spans about -15..115, inside -1350..150)
    out = tmp_path / "o.seg.nrrd"
    rc, _, err = run_cli(["segment", world / "img.nrrd", "--model", world / "model.medsaga", "-o", out,
                          "--slices", "2", "--device", "cpu", "--window", "-600,1500"], capsys)
    assert rc == 0, err
    assert out.exists() and not list(tmp_path.glob("*.part"))


def test_evaluate_warns_about_an_extra_reference_class(world, capsys):
    rc, out, err = run_cli(["evaluate", "--image", world / "img.nrrd", "--labels", world / "extra.seg.nrrd",
                            "--model", world / "model.medsaga", "--slices", "1", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "warning: the reference labels hold class(es) ['vessel']" in err


def test_segment_replaces_an_existing_output_whole_keeping_its_mode(world, tmp_path, capsys):
    import slicerio

    out = tmp_path / "shared.seg.nrrd"
    out.write_bytes(b"old result")
    os.chmod(out, 0o644)
    labelmap = tmp_path / "shared.nii.gz"
    rc, _, err = run_cli(["segment", world / "img.nrrd", "--model", world / "model.medsaga", "-o", out,
                          "--labelmap", labelmap, "--slices", "3", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert slicerio.read_segmentation(str(out))["voxels"].shape[-3:] == (24, 20, 6)
    assert sitk.ReadImage(str(labelmap)).GetSize() == (24, 20, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.nii.gz", "shared.seg.nrrd"]


def test_window_words_mean_what_they_say():
    """'percentile' is percentiles even for a model trained with a window; 'auto' is the model's own."""
    from MedSAGaLib.workflow import preprocessing_for

    windowed = {"preprocessing": {"intensity": "window", "window": [40.0, 400.0]}}
    assert preprocessing_for("percentile", windowed)["intensity"] == "percentile"
    assert preprocessing_for("auto", windowed) == windowed["preprocessing"]
    assert preprocessing_for(None, windowed) == windowed["preprocessing"]
    assert preprocessing_for("ct-lung", windowed) == {"intensity": "window", "window": [-600.0, 1500.0]}
