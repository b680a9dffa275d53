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
    """A class name that survives a NRRD header and a Slicer segment: returned unchanged, or InputError."""
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
