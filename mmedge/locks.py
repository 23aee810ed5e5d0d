"""Lock files for the device-local caches that several processes share (``engines/``, the demo's cache, an export's
staging folder), and the sweep of temporary files that killed writers left behind.

All of it is ``fcntl.flock``: the kernel drops a lock when its holder dies, however it dies, so a lock that is still
held always belongs to a live process — in any PID namespace (two containers sharing a volume), and never to a
process that has since been replaced by another of the same PID. Where the OS has no ``fcntl`` (Windows) nothing is
locked: each write is still whole (``mmedge.artifact.write_whole``), only the waiting is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

TEMPORARY_SUFFIX = ".tmp"  # write_whole's temporary files: ".<name>.<pid>-<8 hex>.tmp" beside the file they become
# temporary files of earlier mmedge versions (mkstemp's ".<name>.<8 of [a-z0-9_]>"), never locked by their writer
_LEGACY_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}")
# an earlier version's temporary file (its writer took no lock) this old was left by a killed writer
ABANDONED_SECONDS = 600.0


def hold(handle: int, *, wait: bool = True) -> bool:
    """Take an exclusive lock on the open file ``handle`` (released when it is closed, or its process dies). True when
    taken; False when ``wait`` is off and another holds it, and where locks are unavailable (no ``fcntl``, or a file
    system without them: NFS without its lock daemon) — then nothing is waited for."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``path`` while the block runs: a second process (or thread) waits
    for the first. The lock file stays: deleting it would let a third process lock another file. Where it cannot be
    made (read-only media) the block runs unlocked: what it writes then fails with its own error."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # made by another user: a lock needs no write access to its file
        try:
            handle = os.open(lock, os.O_RDONLY)
        except OSError:
            handle = None
    except OSError:
        handle = None
    try:
        if handle is not None:
            hold(handle)
        yield
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock


def hold_new(handle: int, path: Path) -> bool:
    """Lock the file just created as ``path`` (open as ``handle``). False when a sweep
    (``remove_abandoned_temporaries``) removed it in the instant before: make another."""
    if not hold(handle):
        return True  # no locks here: nothing sweeps it either
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except FileNotFoundError:
        return False


def remove_abandoned_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` that killed writers left (``write_whole``'s, and earlier mmedge
    versions'): each as large as the file it was to become. ``write_whole`` holds a lock on its temporary file from
    its creation (``hold_new``) to its rename, so one whose lock can be taken is abandoned; it is removed while
    locked. Earlier versions' names (never locked) go once they are ``ABANDONED_SECONDS`` old. Returns what was
    removed."""
    removed = []
    if fcntl is None:
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or name.endswith(".lock"):
            continue
        if name.endswith(TEMPORARY_SUFFIX):
            min_age = 0.0
        elif _LEGACY_TEMPORARY.fullmatch(name):
            min_age = ABANDONED_SECONDS
        else:
            continue
        path = Path(folder) / name
        try:
            handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone already, or not ours to read
            continue
        try:
            if (stat.S_ISREG(os.fstat(handle).st_mode) and time.time() - os.fstat(handle).st_mtime >= min_age
                    and hold(handle, wait=False)):
                path.unlink()  # while locked: a writer that made it meanwhile waits, then finds it gone
                removed.append(path)
        except OSError:
            pass
        finally:
            os.close(handle)
    return removed


__all__ = ["ABANDONED_SECONDS", "hold", "hold_new", "locked", "remove_abandoned_temporaries"]
