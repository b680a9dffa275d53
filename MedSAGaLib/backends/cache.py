"""On-disk cache of exported models: one folder per export, keyed, checked before use.

An entry is a folder of files plus ``manifest.json`` (written last, atomically) that holds the
entry's key and the SHA-256 of every file. An entry is used only when its manifest names the key
asked for and every file still has its checksum; anything else (a half-written folder, weights
changed since, another runtime version, a corrupted copy) is rebuilt.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ..fileio import atomic_write

MANIFEST = "manifest.json"
# Entries kept per cache folder in the user cache (least recently used go first).
USER_CACHE_ENTRIES = 16


def weights_checksum(module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): changes whenever a weight does."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(fields: dict) -> str:
    """A key for everything an export depends on (weights checksum, runtime version, precision, ...)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def user_cache_dir() -> Path:
    """``$MEDSAGA_CACHE_DIR``, else ``$XDG_CACHE_HOME/medsaga``, else ``~/.cache/medsaga``."""
    if os.environ.get("MEDSAGA_CACHE_DIR"):
        return Path(os.environ["MEDSAGA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medsaga"


def model_cache_dir(model_path: str | Path) -> Path:
    """The cache folder next to a model file: ``my.medsaga`` -> ``my.medsaga.openvino/``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".openvino")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def valid_entry(folder: Path, key: str) -> bool:
    """True when ``folder`` holds a complete entry for ``key`` whose files match their checksums."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("key") != key or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
            return False
        return all(_file_sha256(folder / name) == sha for name, sha in manifest["files"].items())
    except (OSError, ValueError, TypeError):
        return False


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def _prune(root: Path, keep: Path, entries: int) -> None:
    """Remove other entries in ``root`` beyond the ``entries - 1`` most recently used, and
    scratch folders of builds that died more than a day ago."""
    for scratch in root.glob(".*.part"):
        try:
            if scratch.is_dir() and time.time() - scratch.stat().st_mtime > 86400:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            pass
    others = [p for p in root.iterdir() if p.is_dir() and p != keep and (p / MANIFEST).exists()]
    others.sort(key=lambda p: (p / MANIFEST).stat().st_mtime, reverse=True)
    for stale in others[max(0, entries - 1):]:
        shutil.rmtree(stale, ignore_errors=True)


def cached_entry(
    root: Path,
    name: str,
    key: str,
    build: Callable[[Path], dict],
    keep_entries: int = USER_CACHE_ENTRIES,
) -> tuple[Path, bool]:
    """The folder of entry ``name`` under ``root`` for ``key``, built by ``build(folder)`` when missing or stale.

    ``build`` writes the entry's files into a scratch folder and returns extra manifest fields.
    Returns (folder, built_now). Where ``root`` cannot be written, the entry is built in a
    temporary folder that lives as long as the process.
    """
    folder = root / name
    if valid_entry(folder, key):
        os.utime(folder / MANIFEST)  # most recently used: pruned last
        return folder, False
    if not _writable(root):
        scratch = Path(tempfile.mkdtemp(prefix="medsaga-export-"))
        atexit.register(shutil.rmtree, scratch, True)
        _write_entry(scratch, key, build)
        return scratch, True
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=root))
    try:
        files, extra = _build_files(scratch, build)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # the old entry is invalid from here on
        for file in files:
            atomic_write(folder / file, lambda tmp, src=scratch / file: os.replace(src, tmp))
        _write_manifest(folder, key, files, extra)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _prune(root, folder, keep_entries)
    return folder, True


def _build_files(folder: Path, build: Callable[[Path], dict]) -> tuple[list[str], dict]:
    extra = build(folder) or {}
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not files:
        raise RuntimeError("The export wrote no files.")
    return files, extra


def _write_manifest(folder: Path, key: str, files: list[str], extra: dict) -> None:
    manifest = dict(extra, key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    files={name: _file_sha256(folder / name) for name in files})
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_entry(folder: Path, key: str, build: Callable[[Path], dict]) -> None:
    files, extra = _build_files(folder, build)
    _write_manifest(folder, key, files, extra)
