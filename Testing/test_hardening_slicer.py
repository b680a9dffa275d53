"""The Slicer bridge applies the library's checks to what it passes on: segment names that become
class names (and NRRD header text), the model file chosen in the panel, the model file written."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import slicer  # noqa: F401  slicer-core is a test dependency: missing, these tests must fail, not skip

from test_slicer_bridge import add_segmentation, add_volume, make_scene, paint, phantom  # noqa: E402

from MedSAGaBridgeLib import BridgeError, jobs  # noqa: E402


def _painted(names):
    scene = make_scene()
    image, labels = phantom()
    vol = add_volume(scene, image)
    seg, ids = add_segmentation(scene, vol, names)
    for value, sid in enumerate(ids, start=1):
        mask = np.zeros_like(labels)
        mask[4] = labels[4] == value
        paint(seg, sid, vol, mask)
    return vol, seg


@pytest.mark.parametrize("name, message", [
    ("liver\ndata file: /etc/passwd", "control character U+000A"),
    ("a:=b", "':='"),
    (" padded", "white space"),
    ("Leber \u00fc", "ASCII text only"),
])
def test_segment_names_that_a_header_cannot_hold_are_refused(tmp_path, name, message):
    vol, seg = _painted(["outer", name])
    with pytest.raises(BridgeError, match=re.escape(message)):
        jobs.prepare_finetune(vol, seg, str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before any input was written


def test_model_output_is_checked_before_any_work(tmp_path):
    vol, seg = _painted(["outer", "inner"])
    (tmp_path / "folder.medsaga").mkdir()
    for bad, message in ((tmp_path / "folder.medsaga", "is a folder"), (tmp_path / "scan.nii.gz", "ends like an image"),
                         ("/proc/medsaga/m.medsaga", "cannot write in folder")):
        with pytest.raises(BridgeError, match=message):
            jobs.start_finetune(vol, seg, str(bad), workdir=str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
    scan = tmp_path / "scan.medsaga"
    scan.write_bytes(b"the user's input")
    with pytest.raises(BridgeError, match="is the input"):
        jobs.check_model_output(str(scan), [("image", str(scan))])


def test_model_chosen_in_the_panel_is_validated(tmp_path, tiny_model_file):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from MedSAGaLib.modelfile import ModelFileError

    with safe_open(str(tiny_model_file), framework="pt") as handle:
        meta = json.loads(handle.metadata()["medsaga"])
    state = load_file(str(tiny_model_file))
    odd = dict(meta, validation_dice=[0.3, "x"])
    save_file(state, str(tmp_path / "odd.medsaga"), metadata={"medsaga": json.dumps(odd)})
    names, dice, _ = jobs.model_summary(str(tmp_path / "odd.medsaga"))
    assert names == ["left", "right"] and dice == {}
    evil = dict(meta, class_names=["left\ndata file: x", "right"])
    save_file(state, str(tmp_path / "evil.medsaga"), metadata={"medsaga": json.dumps(evil)})
    with pytest.raises(ModelFileError, match="evil.medsaga.*control character"):
        jobs.model_summary(str(tmp_path / "evil.medsaga"))
    vol, seg = _painted(["left", "right"])
    with pytest.raises(BridgeError, match="control character"):
        jobs.start_segment(vol, seg, str(tmp_path / "evil.medsaga"), ["left\ndata file: x", "right"], None,
                           workdir=str(tmp_path / "w"))
