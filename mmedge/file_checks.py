"""This device's record of artifact files whose sha256 was checked: a file is hashed once per version, not per load.

``Artifact.verified_path`` compares a file's sha256 with the manifest before a session is created. Hashing reads
the whole file (about a second per GB), and it did so in every process that loaded the artifact: each ``mmedge
run`` of a 5 GB model read 5 GB first. The record, ``engines/sha256-checks.record`` (device-local, never
shipped, like the engine caches beside it), keeps for each checked file the sha256 it matched and the file's
identity then: device, inode, size, modification and change times in ns. A later load whose file has the same
identity, and whose manifest names the same sha256, trusts the earlier check.

What changes the identity: any write, truncation, replacement, rename over it or copy (a new inode, or a new change
time, which the kernel sets on every write and no user tool can set back). What the record cannot see: bytes that
change with no write through the file system (a failing disk); ``mmedge validate`` and
``Artifact.open(path, recheck=True)`` hash every file whatever the record says. The record guards against
accidents, as the manifest's sha256 does: whoever can write the folder can rewrite both.

A file changed within ``RACY_SECONDS`` of its check is not recorded (git's "racily clean" rule): on a file system
with a coarse clock, a second write in the same tick would leave its times as recorded. A record that cannot be
written (read-only media) is skipped; the file is then hashed on each load, as before. Triton's Python-backend models
open their version folders with ``Artifact(..., record=False)``: nothing is written into a model repository.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from mmedge.locks import remove_abandoned_temporaries

RECORD_FILE = "sha256-checks.record"
RACY_SECONDS = 2.0


def identity(path: Path) -> list[int]:
    """What any change to the file's bytes changes: [device, inode, size, mtime ns, ctime ns]."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class CheckRecord:
    """The record in one ``engines/`` folder (created when first written). Thread-safe; several processes may
    share it (the last writer wins; a lost entry only means one more hash)."""

    def __init__(self, folder: Path):
        self.path = folder / RECORD_FILE
        self._entries: dict[str, dict] | None = None
        self._lock = threading.Lock()

    def matches(self, key: str, sha256: str, now: list[int]) -> bool:
        """Whether ``key`` was checked against ``sha256`` while the file had the identity ``now``."""
        with self._lock:
            entry = self._read().get(key)
        return entry == {"sha256": sha256, "identity": now}

    def remember(self, key: str, sha256: str, checked: list[int]) -> None:
        """Record that the file with identity ``checked`` matched ``sha256`` (unless it changed too recently)."""
        if time.time_ns() - max(checked[3], checked[4]) < RACY_SECONDS * 1e9:
            return
        from mmedge.artifact import write_whole  # (mmedge.artifact imports this module)

        with self._lock:
            entries = {**self._read(fresh=True), key: {"sha256": sha256, "identity": checked}}
            try:
                self.path.parent.mkdir(exist_ok=True)
                # whole, readable by the other users of a shared cache as a plain write makes it
                write_whole(self.path, json.dumps(entries).encode())
            except OSError:  # read-only media or a full disk: no record (the file is hashed on each load)
                return
            self._entries = entries
        remove_abandoned_temporaries(self.path.parent)  # what writers killed mid-write left in engines/

    def _read(self, fresh: bool = False) -> dict[str, dict]:
        if self._entries is None or fresh:
            try:
                loaded = json.loads(self.path.read_text())
            except (OSError, ValueError):  # none yet, or unreadable: nothing is trusted
                loaded = {}
            self._entries = loaded if isinstance(loaded, dict) else {}
        return self._entries


__all__ = ["CheckRecord", "RACY_SECONDS", "RECORD_FILE", "identity"]
