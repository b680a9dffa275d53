"""Property-based checks (hypothesis) on what users type: class names, colours, windows, paths,
and the NRRD header injection through a class name, reproduced and refused."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MedSAGaLib.safety import (InputError, Output, check_class_color, check_class_name, check_outputs,
                               join_negative_values, same_file)
from MedSAGaLib.volume import VolumeError, parse_window

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _reference() -> sitk.Image:
    image = sitk.Image([6, 5, 3], sitk.sitkFloat32)
    image.SetSpacing((0.7, 1.3, 2.5))
    return image


def test_data_file_injection_through_a_class_name_is_reproduced_and_refused(tmp_path):
    """A newline in a segment name starts a header field: ``data file:`` makes readers take the
    voxels from another file. Reproduced with slicerio directly, refused by MedSAGa's writer."""
    import slicerio

    from MedSAGaLib.segio import ijk_to_lps, write_seg_nrrd

    reference = _reference()
    victim = tmp_path / "other.seg.nrrd"
    other = slicerio.create_segmentation(reference.GetSize(), ijk_to_lps(reference))
    slicerio.add_segment(other, np.ones(reference.GetSize(), bool), {"id": "Segment_1", "name": "x"})
    slicerio.write_segmentation(str(victim), other)
    # what the old writer did: names straight into the header
    evil = f"liver\ndata file: {victim.name}"
    forged = slicerio.create_segmentation(reference.GetSize(), ijk_to_lps(reference))
    slicerio.add_segment(forged, np.zeros(reference.GetSize(), bool), {"id": "Segment_1", "name": evil})
    injected = tmp_path / "forged.seg.nrrd"
    try:
        slicerio.write_segmentation(str(injected), forged)
        header = injected.read_bytes().split(b"\n\n")[0].decode("latin-1")
        assert "\ndata file: other.seg.nrrd" in header  # the attack: a header line of the attacker's choice
    except Exception:
        pass  # a slicerio that refuses it itself is fine too
    labels = np.zeros(tuple(reversed(reference.GetSize())), np.uint8)
    with pytest.raises(InputError, match="control character U\\+000A"):
        write_seg_nrrd(tmp_path / "ours.seg.nrrd", labels, reference, [evil])
    assert not (tmp_path / "ours.seg.nrrd").exists()


@FAST
@given(st.text(min_size=1, max_size=24))
def test_a_class_name_is_refused_or_round_trips_exactly(tmp_path, name):
    """Whatever the text: refused with InputError, or written and read back unchanged."""
    from MedSAGaLib.segio import read_class_labels, write_seg_nrrd

    try:
        check_class_name(name)
    except InputError as exc:
        assert "class name" in str(exc)
        return
    reference = _reference()
    labels = np.zeros(tuple(reversed(reference.GetSize())), np.uint8)
    labels[1, 2, 3] = 1
    path = tmp_path / "n.seg.nrrd"
    write_seg_nrrd(path, labels, reference, [name])
    _, names, _ = read_class_labels(path, reference)
    assert names == [name]


@FAST
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 300), st.text(max_size=3)),
                min_size=0, max_size=4))
def test_a_colour_is_three_finite_numbers_in_0_1(color):
    try:
        checked = check_class_color(color)
    except InputError:
        return
    assert len(checked) == 3 and all(0 <= c <= 1 and math.isfinite(c) for c in checked)


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True))
def test_a_window_is_finite_with_a_positive_width_or_refused(centre, width):
    text = f"{centre},{width}"
    try:
        window = parse_window(text)
    except VolumeError as exc:
        assert "--window" in str(exc) or "Window" in str(exc)
        return
    assert math.isfinite(window[0]) and math.isfinite(window[1]) and window[1] > 0


@FAST
@given(st.floats(-5000, 5000, allow_nan=False), st.floats(0.1, 5000, allow_nan=False))
def test_a_window_typed_with_a_negative_centre_reaches_the_option(centre, width):
    from MedSAGaLib.cli import build_parser

    text = f"{centre:g},{width:g}"
    args = build_parser().parse_args(join_negative_values(
        ["segment", "x.nrrd", "-o", "o.seg.nrrd", "--window", text, "--device", "cpu"]))
    assert args.window == text
    assert parse_window(args.window) == pytest.approx((float(f"{centre:g}"), float(f"{width:g}")))


@FAST
@given(st.sampled_from(["plain", "symlink", "hardlink", "dotdot", "other"]))
def test_an_output_naming_an_input_is_refused_however_spelt(tmp_path, how):
    source = tmp_path / "scan.nii.gz"
    source.write_bytes(b"scan")
    alias = {"plain": source, "symlink": tmp_path / f"l{os.urandom(3).hex()}.nii.gz",
             "hardlink": tmp_path / f"h{os.urandom(3).hex()}.nii.gz",
             "dotdot": tmp_path / "sub" / ".." / "scan.nii.gz", "other": tmp_path / "result.nii.gz"}[how]
    if how == "symlink":
        os.symlink(source, alias)
    elif how == "hardlink":
        os.link(source, alias)
    elif how == "dotdot":
        (tmp_path / "sub").mkdir(exist_ok=True)
    outputs = [Output("--labelmap", alias, (".nii.gz",))]
    if how == "other":
        check_outputs(outputs, [("image", source)])
        assert not same_file(alias, source)
    else:
        with pytest.raises(InputError, match="is the input image"):
            check_outputs(outputs, [("image", source)])
    assert source.read_bytes() == b"scan"
