"""Frozen-prefix encoder features kept on disk between fine-tuning runs.

A fine-tune spends a large part of its time before the first step: every (augmented) training
slice goes once through the frozen front of the encoder. ``--resume`` and Slicer's correct-and-
retrain loop hand the same slices to the same frozen front again, so those features are stored,
one file per slice, keyed by a hash of the slice's pixels and of everything that shapes the
features (the frozen modules' weights, their depth, the pixel normalisation, the precision, the
torch version). A changed input or model simply misses. Files are safetensors (no code runs on
load), written atomically, checked for shape on read (a bad file is deleted and recomputed), and
the oldest are removed when the folder grows past ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

DEFAULT_MAX_BYTES = 2 * 1024**3
SUFFIX = ".features"


def default_folder() -> Path:
    """``$MEDSAGA_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/medsaga/features`` (``~/.cache/...``)."""
    explicit = os.environ.get("MEDSAGA_FEATURE_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "medsaga" / "features"


def tensors_digest(tensors: Iterable[torch.Tensor], *extra: object) -> str:
    """sha256 over tensors' shapes, dtypes and bytes, plus ``extra`` values (as text)."""
    digest = hashlib.sha256()
    for value in extra:
        digest.update(repr(value).encode())
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class FeatureStore:
    """A folder of per-slice features; ``hits`` and ``misses`` count this process's lookups."""

    def __init__(self, folder: Union[str, Path], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0

    def key(self, image: torch.Tensor, prefix_identity: str) -> str:
        return tensors_digest([image], prefix_identity)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str, shape: Optional[tuple] = None) -> Optional[torch.Tensor]:
        """The stored features, or None (missing, unreadable or of another shape: then removed)."""
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            from safetensors.torch import load_file

            tensor = load_file(str(path))["features"]
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            os.utime(path)  # recently used: trimmed last
        except Exception:
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store atomically; a full or read-only disk only costs the cache, never the run."""
        from safetensors.torch import save_file

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=".part-", dir=self.folder)
            os.close(handle)
            try:
                save_file({"features": tensor.detach().to("cpu").contiguous()}, tmp)
                os.replace(tmp, self._path(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.trim()
        except OSError:
            pass

    def trim(self) -> None:
        """Remove the least recently used files until the folder holds at most ``max_bytes``."""
        files = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


__all__ = ["FeatureStore", "default_folder", "tensors_digest", "DEFAULT_MAX_BYTES"]
