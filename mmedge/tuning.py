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

import json
import logging
import os
from pathlib import Path
from typing import Any

from mmedge.artifact import Artifact
from mmedge.errors import ArtifactError

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
    """The stored records; an unreadable file counts as none (it is a cache: ``mmedge tune`` writes it again)."""
    if not path.is_file():
        return []
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") != FORMAT or not isinstance(stored.get("records"), list):
            raise ValueError(f"format {stored.get('format')!r}")
        records = [r for r in stored["records"] if _well_formed(r)]
        if len(records) < len(stored["records"]):
            raise ValueError(f"{len(stored['records']) - len(records)} malformed record(s)")
        return records
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("mmedge: ignoring %s (%s); run `mmedge tune` to measure again", path, exc)
        return []


def _well_formed(record) -> bool:
    """A record as ``tune`` writes it: a device key and timings per component, all objects."""
    return (isinstance(record, dict) and isinstance(record.get("device"), dict)
            and isinstance(record.get("components"), dict)
            and all(isinstance(timing, dict) and all(_figure(timing.get(f"{backend}_ms"))
                                                     for backend in ("onnxruntime", "openvino"))
                    for timing in record["components"].values()))


def _figure(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


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


def store(path: Path, record: dict) -> None:
    """Replace this device's record, keep the others; written whole (a temporary file, then renamed)."""
    kept = [r for r in _records(path) if r.get("device") != record["device"]]
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps({"format": FORMAT, "records": [*kept, record]}, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write '{path}' ({exc.strerror or exc})", f"{TIMINGS_FILE} as a writable file "
                            "in the artifact's engines/ folder", f"move or delete '{path}' if it is a folder, or "
                            "check the folder's permissions") from None


def check_storable(artifact: Artifact) -> Path:
    """The timings file ``store`` will write, checked before minutes of measuring: engines/ a folder (made if
    missing) and the file not a folder."""
    path = timings_path(artifact)
    artifact.engines_dir()
    if path.is_dir():
        raise ArtifactError(f"'{path}' is a folder, not the file of this artifact's measured timings",
                            f"{TIMINGS_FILE} as a file (or absent)", f"move or delete the folder '{path}'")
    return path


__all__ = ["TIMINGS_FILE", "check_storable", "device_key", "measured_for", "store", "timings_path"]
