"""File writing that never leaves half a file: no torch, so the Slicer bridge can use it before torch is installed.

A write goes to a temporary file beside the target, named ``.<name>.<host>-<pid>.<random>.part``,
then is renamed over the target. SIGINT and SIGTERM that arrive during the write wait until the
rename is done (a second one rolls the write back), so an interrupted run leaves either the old
file or the new one, never half of one. A SIGKILL cannot be caught: the next write to the same
folder removes the temporaries of processes on this host that no longer run, and names the
others.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import threading
import warnings
import zlib
from pathlib import Path

PART_SUFFIX = ".part"


class LeftoverWarning(UserWarning):
    """A temporary file left by an interrupted write that could not be removed safely."""


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


def _part_pattern(name: str) -> re.Pattern:
    return re.compile(r"^\." + re.escape(name) + r"\.(?:([0-9a-f]{8})-(\d+)\.)?[A-Za-z0-9_]+" + re.escape(PART_SUFFIX)
                      + r"(?:\.[A-Za-z0-9]+){0,2}$")  # writers that need an extension add it after .part


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def clean_leftovers(path: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove temporaries of ``path`` left by dead writers on this host; returns (removed, kept).

    A temporary of a live process (a concurrent writer) or of another host is kept and, as one
    without an owner in its name (older versions), reported with a LeftoverWarning.
    """
    path = Path(path)
    removed, kept = [], []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed, kept
    pattern = _part_pattern(path.name)
    host = _host_tag()
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        leftover = Path(entry.path)
        owner_host, pid = match.group(1), match.group(2)
        if owner_host == host and pid is not None and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed.append(leftover)
                continue
        if owner_host == host and pid is not None:
            continue  # a concurrent writer's file: not ours to judge
        kept.append(leftover)
    if removed:
        warnings.warn(
            f"removed {len(removed)} partial file(s) left by an interrupted write of {path}: "
            + ", ".join(p.name for p in removed), LeftoverWarning, stacklevel=3)
    if kept:
        warnings.warn(
            f"partial file(s) from an interrupted write of {path} remain (not removed, their writer is unknown): "
            + ", ".join(str(p) for p in kept), LeftoverWarning, stacklevel=3)
    return removed, kept


def _umask() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Not thread-safe, but only reached where /proc is missing.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def target_mode(path: Path) -> int:
    """The mode the written file gets: the replaced file's, else what the umask gives a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


class _DeferSignals:
    """Hold SIGINT/SIGTERM until a write is complete; a second signal aborts the write at once."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:
            raise KeyboardInterrupt  # asked twice: give up the write (the finally removes the temporary)
        self.pending.append(signum)

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if exc_type is not None or not self.pending:
            return
        # The write is done: now let the signal do what it would have done.
        signum = self.pending[0]
        handler = self.previous.get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file.

    The new file keeps the mode of the file it replaces (or the umask default for a new one).
    Leftover temporaries of ``path`` from killed writers are cleaned up first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    mode = target_mode(path)
    tmp = path.parent / f".{path.name}.{_host_tag()}-{os.getpid()}.{os.urandom(4).hex()}{PART_SUFFIX}"
    with _DeferSignals():
        try:
            # Created exclusively and with a private mode while half written.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            write(str(tmp))
            os.chmod(tmp, mode)
            with contextlib.suppress(OSError):
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    return path
