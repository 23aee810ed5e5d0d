"""Measured backend timings per device: what ``auto`` prefers to a backend's rule where they exist.

A backend plug-in's rule for which components it takes can only be as good as the CPUs its figures came from (the
OpenVINO rule: two CPUs, keyed by whether the CPU has VNNI). ``mmedge tune`` (``mmedge.runtimes.openvino.tune``)
measures instead, on this device, and stores the medians here: the artifact's ``engines/backend-timings.json`` (a
device-local cache beside the compiled engines, never shipped; the manifest stays the only host/device contract),
one record per device — CPU model and flags, cores, threads per graph, the compared engines' versions — with each
component's timings and graph sha256. ``measured_for`` returns this device's figures for the graphs the manifest
names now; ``selection.plan`` hands them to the plug-ins (``PlanRequest.measured``). Records for other devices,
threads, engine versions or graphs are kept and ignored. The code here names no backend.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from pathlib import Path
from typing import Any

from mmedge.artifact import Artifact, write_whole
from mmedge.errors import ArtifactError
from mmedge.locks import locked, remove_abandoned_temporaries

log = logging.getLogger("mmedge")

TIMINGS_FILE = "backend-timings.json"
FORMAT = 1


def device_key(probe, threads: int | None, engines) -> dict[str, Any]:
    """What a timing depends on besides the graph: the CPU, the threads per graph, the compared engines' versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in sorted(engines):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"cpu_model": probe.cpu_model, "machine": probe.machine, "cpu_flags": sorted(probe.cpu_flags),
            "cpu_cores": probe.cpu_cores, "threads": threads or probe.cpu_cores, "engines": versions}


def timings_path(artifact: Artifact) -> Path:
    return artifact.root / "engines" / TIMINGS_FILE


def _records(path: Path) -> list[dict]:
    """The stored records, each checked whole (``_well_formed``): a malformed one is dropped by itself, with one
    warning (``mmedge tune`` writes this device's again; the other devices' stay); an unreadable file counts as none
    (it is a cache: ``mmedge tune`` writes it again)."""
    if not path.is_file():
        return []
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or stored.get("format") != FORMAT or not isinstance(stored.get("records"),
                                                                                          list):
            raise ValueError(f"format {stored.get('format') if isinstance(stored, dict) else stored!r}"[:80])
    except (OSError, ValueError) as exc:
        _warn_once(path, f"ignoring {path} ({exc})")
        return []
    records = [r for r in stored["records"] if _well_formed(r)]
    if len(records) < len(stored["records"]):
        _warn_once(path, f"ignoring {len(stored['records']) - len(records)} malformed record(s) of {path}")
    return records


_warned: set[tuple[str, str]] = set()  # (file, message): each damage reported once per process, not per plan


def _warn_once(path: Path, message: str) -> None:
    if (str(path), message) not in _warned:
        _warned.add((str(path), message))
        log.warning("mmedge: %s; run `mmedge tune` to measure again", message)


_DISTRIBUTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _well_formed(record) -> bool:
    """A record as ``tune`` writes it: its device key (``device_key``'s fields, each of its type; the engines by
    distribution name), when and how often it was measured, and per component its graph sha256 and both timings
    (OpenVINO's may be null with the reason it failed)."""
    if not isinstance(record, dict) or not isinstance(record.get("components"), dict):
        return False
    device = record.get("device")
    if not (isinstance(device, dict) and set(device) == DEVICE_FIELDS
            and isinstance(device["cpu_model"], (str, type(None))) and isinstance(device["machine"], str)
            and isinstance(device["cpu_flags"], list) and all(isinstance(f, str) for f in device["cpu_flags"])
            and _count(device["cpu_cores"]) and _count(device["threads"])
            and isinstance(device["engines"], dict)
            and all(isinstance(name, str) and _DISTRIBUTION.fullmatch(name) and isinstance(v, (str, type(None)))
                    for name, v in device["engines"].items())):
        return False
    if not isinstance(record.get("measured_at"), (str, type(None))) or not _count(record.get("runs", 1)):
        return False
    return all(isinstance(name, str) and isinstance(timing, dict)
               and isinstance(timing.get("sha256"), (str, type(None)))
               and isinstance(timing.get("inputs", ""), str)
               and _figure(timing.get("onnxruntime_ms")) and _timed_or_refused(timing, "openvino")
               for name, timing in record["components"].items())


def _timed_or_refused(timing: dict, backend: str) -> bool:
    """``backend``'s median, or none (null) beside ``<backend>_failed``, why that engine could not run the graph here
    (``auto`` then leaves the graph to the other)."""
    if timing.get(f"{backend}_ms") is None:
        failed = timing.get(f"{backend}_failed")
        return isinstance(failed, str) and bool(failed)
    return _figure(timing[f"{backend}_ms"])


DEVICE_FIELDS = {"cpu_model", "machine", "cpu_flags", "cpu_cores", "threads", "engines"}  # device_key's


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _figure(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            and value != float("inf"))


def measured_for(artifact: Artifact, probe, threads: int | None = None) -> dict[str, dict]:
    """{component: its stored timing, with the record's ``measured_at``} for this device, these threads and the graphs
    the manifest names now; empty where nothing was measured here (then ``auto`` follows the rule)."""
    for record in _records(timings_path(artifact)):
        stored = record.get("device") or {}
        if stored == device_key(probe, threads, stored.get("engines") or {}):
            return {name: {**timing, "measured_at": record.get("measured_at")}
                    for name, timing in record.get("components", {}).items()
                    if name in artifact.components
                    and timing.get("sha256") == artifact.component(name).get("sha256")}
    return {}


def record_lines(artifact: Artifact, probe) -> list[str]:
    """What ``mmedge doctor`` says of the stored timings: each record of this CPU, the threads per graph a load must
    ask for to use it, and why any part of it is ignored (other engine versions, graphs changed since); how many are
    other CPUs'. Nothing where there are none."""
    records = _records(timings_path(artifact))
    if not records:
        return []
    cpu = {k: v for k, v in device_key(probe, 1, ()).items() if k not in ("threads", "engines")}
    here = [r for r in records if {k: v for k, v in r["device"].items() if k not in ("threads", "engines")} == cpu]
    lines = [f"engines/{TIMINGS_FILE}: {len(records)} record(s) of mmedge tune, {len(here)} for this CPU"]
    for record in here:
        device = record["device"]
        ignored = []
        if device_key(probe, device["threads"], device["engines"])["engines"] != device["engines"]:
            ignored.append("measured with other engine versions (" + ", ".join(
                f"{name} {version}" for name, version in device["engines"].items()) + "): ignored, run `mmedge tune` "
                "again")
        changed = [name for name, timing in record["components"].items() if name not in artifact.components
                   or timing.get("sha256") != artifact.component(name).get("sha256")]
        if changed:
            ignored.append(f"graphs changed since, ignored for {', '.join(changed)}")
        threads = device["threads"]
        unset = " or none (all cores)" if threads == probe.cpu_cores else ""
        lines.append(f"  measured at {record.get('measured_at')} at {threads} thread(s) per graph: used by loads at "
                     f"--threads {threads}{unset}, others follow the rule"
                     + "".join(f"; {why}" for why in ignored))
    return lines


def store(path: Path, record: dict) -> None:
    """Replace this device's record, keep the other devices' (malformed ones dropped: ``_records``). The read and the
    write hold a lock file beside it (``mmedge.locks.locked``), so two tunes at once keep both records; written whole
    (a temporary file, then renamed), so a reader never sees half a file."""
    try:
        with locked(path):
            kept = [r for r in _records(path) if r.get("device") != record["device"]]
            text = json.dumps({"format": FORMAT, "records": [*kept, record]}, indent=2) + "\n"
            write_whole(path, text.encode())
    except OSError as exc:
        raise unwritable(path, exc) from None
    remove_abandoned_temporaries(path.parent)


def unwritable(path: Path, exc: OSError) -> ArtifactError:
    """The error for a timings file that cannot be written: a full disk is told apart (freeing space fixes it)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ArtifactError(f"cannot write '{path}' (no space left on its device)", f"room for {TIMINGS_FILE} on "
                             "the storage that holds the artifact", "free some space there (the engines/ folders "
                             "of artifacts no longer used are device-local caches, safe to delete), then run "
                             "`mmedge tune` again")
    return ArtifactError(f"cannot write '{path}' ({exc.strerror or exc})", f"{TIMINGS_FILE} as a writable file "
                         "in the artifact's engines/ folder", f"move or delete '{path}' if it is a folder, or "
                         "check the folder's permissions")


def check_storable(artifact: Artifact) -> Path:
    """The timings file ``store`` will write, checked before minutes of measuring: engines/ a folder (made if
    missing) and the file not a folder."""
    path = timings_path(artifact)
    artifact.engines_dir()
    if path.is_dir():
        raise ArtifactError(f"'{path}' is a folder, not the file of this artifact's measured timings",
                            f"{TIMINGS_FILE} as a file (or absent)", f"move or delete the folder '{path}'")
    return path


__all__ = ["TIMINGS_FILE", "check_storable", "device_key", "measured_for", "record_lines", "store",
           "timings_path", "unwritable"]
