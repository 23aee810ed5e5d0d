"""Put an artifact's files into a model repository: hard-linked (or copied, across file systems), each checked
against the manifest's sha256; and keep this device's record of those checks (``mmedge.file_checks``) valid.

A hard link changes the linked file's change time (its link count changed; ``atomic_folder``'s permission pass
leaves hard-linked files alone): the record of the check, keyed by the file's identity, would go stale and the
artifact's next ``mmedge.load`` would hash every graph again. The file's bytes did not change (same device, inode,
size and modification time), so ``record_again`` records the check under the file's new identity, once the
repository is in place, through the record's own rule (``CheckRecord.remember``: not within ``RACY_SECONDS`` of a
change)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from mmedge import file_checks
from mmedge.artifact import Artifact, sha256_file
from mmedge.errors import IntegrityError

HASH_BYTES_PER_SECOND = 1e9  # about a second per GB: waiting out RACY_SECONDS pays where re-hashing costs more


class Placer:
    """Places one artifact's files; remembers which checked files it hard-linked (``record_again``)."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.linked: dict[str, tuple[str, Path, list[int]]] = {}  # name -> (sha256, path, identity when checked)

    def place(self, name: str, sha256: str | None, field: str, folder: Path) -> None:
        """Hard-link (or copy) one file of the artifact into ``folder``. Its sha256 is checked on the artifact's file,
        once per file however many models hold it (``Artifact.verified_path``), and again on a copy; a hard link is
        the same bytes, so hashing it again would read gigabytes for nothing."""
        source = (self.artifact.verified_path(name, sha256, field) if sha256
                  else self.artifact.resolve_file(name, field))
        checked = file_checks.identity(source) if sha256 and name not in self.linked else None
        target = folder / name
        if link_or_copy(source, target):
            if checked is not None:
                self.linked[name] = (sha256, source, checked)
        elif sha256 and sha256_file(target) != sha256:
            raise IntegrityError(f"the copy of '{name}' in the repository does not match the manifest's sha256",
                                 "an exact copy of the artifact's file", "check the disk, then run `mmedge triton` "
                                 "again")

    def stale_checks(self) -> list[tuple[str, str, list[int]]]:
        """(name, sha256, identity now) of each linked file whose check this device recorded and whose identity
        changed since in its change time alone."""
        record = file_checks.CheckRecord(self.artifact.engines_path)
        stale = []
        for name, (sha256, path, checked) in self.linked.items():
            try:
                now = file_checks.identity(path)
            except OSError:
                continue
            if now != checked and now[:4] == checked[:4] and record.matches(name, sha256, checked):
                stale.append((name, sha256, now))
        return stale


def record_again(placers: list[Placer]) -> None:
    """Record each hard-linked file's check under its new change time (see the module docstring). Where the last
    change is within ``RACY_SECONDS``, waits it out only if hashing those files at the next load would take longer
    than the wait; otherwise they are hashed once more there."""
    stale = [(placer, found) for placer in placers for found in placer.stale_checks()]
    if not stale:
        return
    latest = max(max(now[3], now[4]) for _, (_, _, now) in stale)
    wait = file_checks.RACY_SECONDS - (time.time_ns() - latest) / 1e9
    if wait > 0:
        if sum(now[2] for _, (_, _, now) in stale) < wait * HASH_BYTES_PER_SECOND:
            return
        time.sleep(wait)
    records = {id(placer): file_checks.CheckRecord(placer.artifact.engines_path) for placer, _ in stale}
    for placer, (name, sha256, now) in stale:
        records[id(placer)].remember(name, sha256, now)


def link_or_copy(source: Path, target: Path) -> bool:
    """True where ``target`` is a hard link to ``source``, False where it is a copy."""
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(source, target)
        return False
