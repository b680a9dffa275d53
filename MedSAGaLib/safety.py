"""Checks on what users and files hand to MedSAGa, made before any work: no torch, no Slicer.

The command line and the Slicer bridge call the same functions, so both refuse the same things:
- class names and colours that a ``.seg.nrrd`` header cannot hold (a newline in a name would
  start a header field of its own, e.g. ``data file:``, and point the reader at another file);
- an output that is one of the inputs (the same file, also through a symbolic or hard link), two
  outputs that are one file, an output with the wrong suffix, a folder, or in a folder that
  cannot be written.
Every message names the option or file and says what is wrong.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

MAX_CLASSES = 255  # label maps are written as uint8
MAX_NAME_LENGTH = 128
# Bidirectional overrides and isolates: they make a name display as something else.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".img", ".hdr")
LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
SEG_SUFFIXES = (".seg.nrrd",)


class InputError(ValueError):
    """A bad input (file, option, name): the message names it and says what is wrong."""


# ----------------------------------------------------------------------------- names and colours
def check_class_name(name, where: str = "class name") -> str:
    """A class name that survives a NRRD header and a Slicer segment: returned unchanged, or InputError.

    One line of printable ASCII (pynrrd, which slicerio writes with, encodes headers as ASCII),
    no surrounding white space, no ':=' (the NRRD key/value separator), at most 128 characters.
    """
    if not isinstance(name, str):
        raise InputError(f"{where}: {name!r} is not text.")
    if not name:
        raise InputError(f"{where}: a class name is empty.")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"{where}: class name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters.")
    if name != name.strip():
        raise InputError(f"{where}: class name {name!r} starts or ends with white space.")
    for char in name:
        category = unicodedata.category(char)
        if category in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp") or char in _BIDI_CONTROLS:
            raise InputError(
                f"{where}: class name {name!r} holds the control character U+{ord(char):04X}; "
                "names must be printable text on one line.")
    for char in name:
        if not " " <= char <= "~":
            raise InputError(
                f"{where}: class name {name!r} holds {char!r} (U+{ord(char):04X}); a .seg.nrrd header holds "
                "ASCII text only (letters a-z, digits, spaces, punctuation).")
    if ":=" in name:
        raise InputError(f"{where}: class name {name!r} holds ':=', which separates keys from values in a NRRD header.")
    return name


def check_class_names(names, where: str = "class names") -> list[str]:
    """1 to 255 distinct, valid class names."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise InputError(f"{where}: expected a list of class names, got {type(names).__name__}.")
    if not names:
        raise InputError(f"{where}: no class name given.")
    if len(names) > MAX_CLASSES:
        raise InputError(f"{where}: {len(names)} classes; at most {MAX_CLASSES} fit a label map.")
    checked = [check_class_name(n, where) for n in names]
    seen = set()
    for name in checked:
        if name in seen:
            raise InputError(f"{where}: class name {name!r} is given twice.")
        seen.add(name)
    return checked


def check_class_color(color, where: str = "class colour") -> tuple[float, float, float]:
    """An RGB colour of three finite numbers in [0, 1] (Slicer's convention)."""
    if isinstance(color, (str, bytes)) or not isinstance(color, Sequence) or len(color) != 3:
        raise InputError(f"{where}: colour {color!r} is not three numbers (red, green, blue in 0-1).")
    values = []
    for c in color:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(float(c)):
            raise InputError(f"{where}: colour {list(color)!r} holds {c!r}, not a finite number.")
        if not 0.0 <= float(c) <= 1.0:
            raise InputError(f"{where}: colour {list(color)!r} is outside 0-1.")
        values.append(float(c))
    return tuple(values)


def check_class_colors(colors, count: int, where: str = "class colours") -> Optional[list]:
    """None, or one colour (or None) per class."""
    if colors is None:
        return None
    if isinstance(colors, (str, bytes)) or not isinstance(colors, Sequence) or len(colors) != count:
        raise InputError(f"{where}: expected {count} colours, one per class.")
    return [None if c is None else check_class_color(c, where) for c in colors]


# ----------------------------------------------------------------------------- paths
def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths name one file: equal resolved paths, or one inode (hard or symbolic links)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
    except (OSError, RuntimeError):
        pass
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def has_suffix(path: str | Path, suffixes: Iterable[str]) -> bool:
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


def check_folder_writable(path: str | Path, what: str) -> None:
    """The folder that will hold ``path`` exists (or can be made) and accepts a new file."""
    folder = Path(path).parent
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(f"{what} {path}: {existing} is a file, not a folder.")
    if existing != folder:
        return _probe(existing, path, what)
    _probe(folder, path, what)


def _probe(folder: Path, path, what: str) -> None:
    # os.access is not enough: root passes it on read-only mounts. Create and remove a real file.
    try:
        fd, probe = tempfile.mkstemp(prefix=".medsaga-write-test.", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"{what} {path}: cannot write in folder {folder} ({reason}).") from None
    os.close(fd)
    os.unlink(probe)


@dataclass(frozen=True)
class Output:
    """One file a command will write: the option that names it, the path, the suffixes it may have."""

    option: str
    path: str | Path
    suffixes: tuple = ()
    refuse_suffixes: tuple = ()


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, Optional[str | Path]]] = ()) -> None:
    """Refuse, before any work, every output that would destroy an input or fail when written.

    ``inputs`` are (option, path) pairs; a None path is skipped. An input folder (a DICOM series)
    also protects every file inside it.
    """
    given = [o for o in outputs if o.path is not None and str(o.path) != ""]
    for out in outputs:
        if out.path is not None and str(out.path) == "":
            raise InputError(f"{out.option}: the output file name is empty.")
    for out in given:
        path = Path(out.path)
        if out.suffixes and not has_suffix(path, out.suffixes):
            raise InputError(f"{out.option} {path}: the file name must end in {' or '.join(out.suffixes)}.")
        if out.refuse_suffixes and has_suffix(path, out.refuse_suffixes):
            raise InputError(
                f"{out.option} {path}: the name ends like an image ({path.name}); give the output its own name "
                "(e.g. NAME.medsaga).")
        if path.is_dir():
            raise InputError(f"{out.option} {path} is a folder; give a file name.")
        if path.exists() and not path.is_file():
            raise InputError(f"{out.option} {path} exists and is not a regular file.")
        for option, source in inputs:
            if source is None or str(source) == "":
                continue
            source = Path(source)
            if same_file(path, source) or (source.is_dir() and _inside(path, source)):
                raise InputError(
                    f"{out.option} {path} is the input {option} {source}: writing it would destroy the input; "
                    "choose another output name.")
        check_folder_writable(path, out.option)
    for i, a in enumerate(given):
        for b in given[i + 1:]:
            if same_file(a.path, b.path):
                raise InputError(f"{a.option} and {b.option} name the same file {a.path}; give each its own.")


def rescue_folder() -> Path:
    """Where a result is kept when its own output cannot be written (the temporary folder)."""
    return Path(tempfile.gettempdir())


def rescue_path(path: str | Path) -> Path:
    """A free file name in the rescue folder for a result meant for ``path``."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return rescue_folder() / f"medsaga-rescued-{stamp}-{os.getpid()}-{path.name or 'output'}"


# ----------------------------------------------------------------------------- command requests
BASE_MODEL_NAMES = ("litemedsam", "vit_b", "vit_l", "vit_h")
AXIS_NAMES = ("axial", "coronal", "sagittal", "i", "j", "k", "0", "1", "2")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
MODEL_SUFFIX = ".medsaga"


def _number(values: dict, dest: str, flag: str, low=None, high=None, low_open=False, high_open=False) -> None:
    value = values.get(dest)
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{flag} {value}: give a finite number.")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{flag} {value}: must be {'above' if low_open else 'at least'} {low:g}.")
    if high is not None and (value >= high if high_open else value > high):
        raise InputError(f"{flag} {value}: must be {'below' if high_open else 'at most'} {high:g}.")


def _text(values: dict, dest: str, flag: str) -> Optional[str]:
    value = values.get(dest)
    if value is not None and str(value).strip() == "":
        raise InputError(f"{flag}: the value is empty; leave the option out for its default.")
    return value


def check_device_name(name: Optional[str], flag: str = "--device") -> None:
    if name is not None and not _DEVICE.match(str(name).lower()):
        raise InputError(f"{flag} {name!r}: use auto, cpu, cuda, cuda:N or mps.")


def check_axis_name(axis: Optional[str], flag: str = "--axis") -> None:
    if axis is not None and str(axis).lower() not in AXIS_NAMES:
        what = "is out of range" if str(axis).lstrip("-").isdigit() else "is not a slice axis"
        raise InputError(f"{flag} {axis!r} {what}: use axial, coronal, sagittal, i, j, k or 0-2.")


def is_base_model(name) -> bool:
    return str(name) in BASE_MODEL_NAMES


def check_model_input(path, flag: str = "--model") -> None:
    """A model file option names an existing regular file (the content is checked when it is read)."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such model file (base models: {', '.join(BASE_MODEL_NAMES)}).")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder, not a model file.")


def check_request(command: str, values: dict) -> list[str]:
    """Check a ``medsaga`` command's option values (argparse ``dest`` names) before any work.

    Raises InputError naming the option; returns warnings (text) about values that will be
    ignored. Used by the CLI before it runs a command, and by front ends before they start one.
    """
    notes: list[str] = []
    if command not in ("segment", "finetune", "evaluate", "info"):
        return notes  # bench checks its own options
    if command == "segment" and isinstance(values.get("image"), (list, tuple)):
        images = list(values["image"])
        if values.get("output_dir") or values.get("inputs_csv") or len(images) != 1:
            # many inputs (folders, globs, a CSV): MedSAGaLib.cohort expands them and reports each one
            values = dict(values, image=None)
        else:
            values = dict(values, image=images[0])
    for dest, flag in (("axis", "--axis"), ("slices", "--slices"), ("window", "--window"), ("device", "--device"),
                       ("checkpoint", "--checkpoint"), ("labelmap", "--labelmap"), ("resume", "--resume"),
                       ("boxes_from", "--boxes-from"), ("base", "--base"), ("proj_type", "--proj-type"),
                       ("painted", "--painted")):
        _text(values, dest, flag)
    check_axis_name(values.get("axis"))
    check_device_name(values.get("device"))
    if values.get("window") is not None:
        from .volume import VolumeError, parse_window

        try:
            parse_window(values["window"])
        except VolumeError as exc:
            raise InputError(str(exc)) from None
    if values.get("classes") is not None:
        check_class_names(list(values["classes"]), "--classes")
    _number(values, "threads", "--threads", 1)
    _number(values, "batch_size", "--batch-size", 1)
    image_size = values.get("image_size")
    if image_size is not None and (image_size < 224 or image_size > 2048 or image_size % 16):
        raise InputError(f"--image-size {image_size}: use a multiple of 16 from 224 to 2048.")
    checkpoint = values.get("checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise InputError(f"--checkpoint {checkpoint}: no such file.")

    if command == "segment" and values.get("painted") == "none":  # the model alone (segment's default is auto)
        values = dict(values, painted=None)
    if command == "segment":
        model = values.get("model") or "litemedsam"
        model_file = not is_base_model(model)
        if model_file:
            check_model_input(model)
            for dest, flag in (("classes", "--classes"), ("checkpoint", "--checkpoint"), ("image_size", "--image-size")):
                if values.get(dest) is not None:
                    raise InputError(f"{flag} applies to a base model; the model file {model} brings its own.")
        _number(values, "box_margin", "--box-margin", 0)
        if values.get("box_margin") and not values.get("boxes_from"):
            notes.append("--box-margin is ignored without --boxes-from.")
        if values.get("painted") is not None and (values.get("boxes_from") or not model_file):
            raise InputError("--painted applies to an adapted model file (what was painted before fine-tuning).")
        if values.get("painted") is not None and values.get("image") is None:
            raise InputError("--painted belongs to one volume; it cannot apply to many inputs (--output-dir).")
        check_outputs(
            [Output("-o/--output", values.get("output"), SEG_SUFFIXES),
             Output("--labelmap", values.get("labelmap"), LABELMAP_SUFFIXES)],
            [("image", values.get("image")), ("--model", model if model_file else None),
             ("--boxes-from", values.get("boxes_from")), ("--checkpoint", checkpoint),
             ("--painted", values.get("painted"))])
    elif command == "finetune":
        if values.get("slices") is not None and values.get("shots") is not None:
            raise InputError("--slices and --shots both choose the training slices; give one of them.")
        _number(values, "shots", "--shots", 1)
        _number(values, "steps", "--steps", 1)
        _number(values, "epochs", "--epochs", 0, low_open=True)
        _number(values, "lr", "--lr", 0, 1, low_open=True)
        _number(values, "encoder_lr", "--encoder-lr", 0, 1, low_open=True)
        _number(values, "warmup", "--warmup", 0)
        _number(values, "rank", "--rank", 1, 4096)
        _number(values, "update_proj_gap", "--update-proj-gap", 1)
        _number(values, "scale", "--scale", 0, low_open=True)
        _number(values, "lora_rank", "--lora-rank", 1, 1024)
        _number(values, "train_stages", "--train-stages", 0, 64)
        _number(values, "val_fraction", "--val-fraction", 0, 1, high_open=True)
        _number(values, "max_val_slices", "--max-val-slices", 0)
        if values.get("resume") is not None:
            check_model_input(values["resume"], "--resume")
        check_outputs(
            [Output("-o/--output", values.get("output"),
                    refuse_suffixes=IMAGE_SUFFIXES + SEG_SUFFIXES + (".seg.nrrd", ".pth", ".pt", ".safetensors"))],
            [("--image", values.get("image")), ("--labels", values.get("labels")),
             ("--resume", values.get("resume")), ("--checkpoint", checkpoint)])
    elif command == "evaluate":
        check_model_input(values.get("model"), "--model")
    elif command == "info":
        check_model_input(values.get("model"), "model")
    for dest, flag in (("image", "--image" if command != "segment" else "image"), ("labels", "--labels"),
                       ("boxes_from", "--boxes-from"), ("painted", "--painted")):
        if values.get(dest) is not None and not Path(values[dest]).exists():
            raise InputError(f"{flag} {values[dest]}: No such file or folder.")
    return notes


def join_negative_values(argv: Sequence[str], options: Sequence[str] = ("--window",)) -> list[str]:
    """``--window -600,1500`` -> ``--window=-600,1500``: argparse takes a value starting with '-' for an option."""
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word in options and i + 1 < len(words) and words[i + 1].startswith("-") and len(words[i + 1]) > 1 \
                and (words[i + 1][1].isdigit() or words[i + 1][1] == "."):
            out.append(f"{word}={words[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out
