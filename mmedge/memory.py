"""The memory this process may still take, and whether an artifact's load fits in it.

Linux's MemAvailable is the whole machine's; a container (Docker, Kubernetes, systemd) caps its processes lower with
a memory cgroup, and past that cap the kernel kills the process without an error a program could catch. So the memory
available is the lower of MemAvailable and, for the cgroup this process is in and each one above it that sets a limit,
that limit less what the cgroup uses (its inactive page cache counted free: the kernel reclaims it first, as
``docker stats`` does). Both cgroup versions are read: v2 (``memory.max``, ``memory.current``) and v1
(``memory.limit_in_bytes``, ``memory.usage_in_bytes``).

A load on ONNX Runtime's CPU provider (or OpenVINO's CPU) holds about 1.0-1.2 times its graphs' bytes once loaded
where their weights are in ``.onnx.data`` (as ``mmedge export`` now stores every graph over 32 MiB), 1.3-1.4 times
where they are inside the ``.onnx`` (benchmarks/RESULTS.md), and up to twice them while loading (``LOAD_HOLDS``).
``mmedge.load`` warns before it opens graphs that may not fit (``MemoryWarning``): an out-of-memory kill leaves no
other message. ``mmedge doctor ARTIFACT`` shows the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmedge.errors import ArtifactError, MmedgeWarning, warn

MIB = 2**20
LOAD_HOLDS = 2  # a load holds up to about this many times its graphs' bytes (ONNX Runtime's CPU provider, measured)
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as the largest page-aligned 64-bit value
GRAPH_BACKENDS = ("onnxruntime", "openvino")  # backends that load the ONNX graphs (torch loads PyTorch weights,
# TensorRT its engines)
SYSTEM = "the system's MemAvailable"
CGROUP = "this process's memory cgroup (a container's limit)"


class MemoryWarning(MmedgeWarning):
    """The graphs a load opens may not fit in the memory available: the load may fail, or the kernel may kill it."""


@dataclass(frozen=True)
class MemoryAvailable:
    mib: int
    limited_by: str  # SYSTEM or CGROUP

    def text(self) -> str:
        return f"{self.mib:,} MiB available now, per {self.limited_by}"


def meminfo_mib(meminfo: str, field: str) -> int | None:
    """A /proc/meminfo field (kB there) in MiB, or None where it is absent."""
    for line in meminfo.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) // 1024
    return None


def memory_available(meminfo: str | None = None, cgroup_root: str | Path = "/sys/fs/cgroup",
                     own_cgroups: str | None = None) -> MemoryAvailable | None:
    """The lower of the system's MemAvailable and this process's cgroup room (``cgroup_available``); None where
    neither is known (not Linux). The arguments are for tests: /proc/meminfo's text, the cgroup mount, and
    /proc/self/cgroup's text."""
    meminfo = _read("/proc/meminfo") if meminfo is None else meminfo
    system, total = meminfo_mib(meminfo, "MemAvailable"), meminfo_mib(meminfo, "MemTotal")
    room = cgroup_available(Path(cgroup_root), _read("/proc/self/cgroup") if own_cgroups is None else own_cgroups,
                            total * MIB if total else None)
    cgroup = None if room is None else room // MIB
    if cgroup is not None and (system is None or cgroup < system):
        return MemoryAvailable(cgroup, CGROUP)
    return None if system is None else MemoryAvailable(system, SYSTEM)


def cgroup_available(root: Path, own_cgroups: str, total: int | None = None) -> int | None:
    """Bytes this process's memory cgroups leave it: the least, over its cgroup and those above it that set a limit,
    of limit - usage + inactive page cache; None where none sets a limit (or none is mounted). A limit at or above
    the machine's memory (``total`` bytes) is none: a 32-bit kernel writes "no limit" as 2 GiB - 4 KiB."""
    rooms = []
    for line in own_cgroups.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
            base = root
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "memory"
        else:
            continue
        rooms += [room for folder in _own_and_above(base, path)
                  if (room := _room(folder, *files, no_limit=min(UNLIMITED, total or UNLIMITED))) is not None]
    return min(rooms) if rooms else None


def _own_and_above(base: Path, path: str) -> list[Path]:
    """The cgroup folders from this process's own up to the mount's root. Inside a container the mount is its own
    cgroup, and the host's path in /proc/self/cgroup is not under it: then the root alone."""
    parts = [part for part in path.strip().split("/") if part]
    folders = [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _room(folder: Path, limit_file: str, usage_file: str, inactive_field: str, no_limit: int) -> int | None:
    """The cgroup's limit - usage + inactive page cache, or None where it sets no limit. v1's ``memory.stat`` also
    says ``hierarchical_memory_limit``, the least limit above it, which a container without a cgroup namespace cannot
    read from its ancestors' folders (not mounted there)."""
    stat = {}
    for line in (_read(str(folder / "memory.stat")) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[key] = int(value)
    limits = [value for value in (_number(folder / limit_file), stat.get("hierarchical_memory_limit"))
              if value is not None and value < no_limit]
    usage = _number(folder / usage_file)
    if not limits or usage is None:
        return None
    return max(0, min(limits) - usage + stat.get(inactive_field, 0))


def _number(path: Path) -> int | None:
    text = (_read(str(path)) or "").strip()
    return int(text) if text.isdigit() else None  # v2 writes "max" for no limit


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class LoadEstimate:
    graphs_mib: float  # the planned ONNX Runtime / OpenVINO graphs' bytes on disk, external weights included
    available: MemoryAvailable | None
    estimated: bool = True  # False: the plan opens no graph on ONNX Runtime or OpenVINO (torch, TensorRT)

    @property
    def may_not_fit(self) -> bool:
        return self.estimated and self.available is not None and LOAD_HOLDS * self.graphs_mib > self.available.mib

    def text(self) -> str:
        available = self.available.text() if self.available else "the memory available is unknown"
        if not self.estimated:
            return ("the plan opens no graph on ONNX Runtime or OpenVINO (torch reads PyTorch weights, TensorRT its "
                    f"engines): not estimated; {available}")
        return (f"the planned graphs take {self.graphs_mib:,.1f} MiB on disk; a load holds about 1.0-1.4x that (up "
                f"to {LOAD_HOLDS}x while it loads) on ONNX Runtime's CPU provider; {available}")


def component_files(artifact, chosen, backend_options: dict | None = None, backends: tuple[str, ...] | None = None,
                    missing_ok: bool = False) -> set[Path]:
    """The files the plan ``chosen`` has its backends read for its components: each graph and its external data
    (OpenVINO's exported IR instead where its ``weights`` setting names one); none for torch, which reads PyTorch
    weights. ``backends``: only the components planned on these. ``missing_ok``: a file it cannot resolve (``doctor``
    reports a missing or unsafe one) is left out instead of raising."""
    weights = ((backend_options or {}).get("openvino") or {}).get("weights")
    paths: set[Path] = set()
    for name, planned in chosen.components.items():
        if planned.backend == "torch" or (backends is not None and planned.backend not in backends):
            continue
        component = artifact.component(name)
        ir = (component.get("openvino") or {}).get(weights) if planned.backend == "openvino" and weights else None
        for entry in ([ir, ir["weights_file"]] if ir else [component, component.get("external_data")]):
            if not entry:
                continue
            try:
                paths.add(artifact.resolve_file(entry["file"], f"components.{name}.file"))
            except ArtifactError:
                if not missing_ok:
                    raise
    return paths


def load_estimate(artifact, chosen, backend_options: dict | None = None, probe=None) -> LoadEstimate:
    """The bytes of the files the plan ``chosen`` opens on ONNX Runtime or OpenVINO (graphs and their external
    weights, OpenVINO's exported IR where ``backend_options`` name it) against the memory available now (as
    ``probe``, a ``DeviceProbe``, found it where given)."""
    files = component_files(artifact, chosen, backend_options, GRAPH_BACKENDS, missing_ok=True)
    graphs = sum(path.stat().st_size for path in files if path.is_file())
    if probe is None:
        available = memory_available()
    else:
        available = (None if probe.memory_available_mb is None
                     else MemoryAvailable(probe.memory_available_mb, probe.memory_limited_by or SYSTEM))
    return LoadEstimate(round(graphs / MIB, 1), available, bool(files))


FITTING = "free memory, or export a smaller precision (--precision int8, --llm-precision int4)"


def warn_if_it_may_not_fit(artifact, chosen, backend_options: dict | None = None) -> LoadEstimate:
    """``MemoryWarning`` before a load whose graphs may not fit in the memory available (``LoadEstimate``)."""
    estimate = load_estimate(artifact, chosen, backend_options)
    if estimate.may_not_fit:
        warn(f"loading '{artifact.root.name}' may not fit in memory: {estimate.text()}; {FITTING}", MemoryWarning)
    return estimate


__all__ = ["LOAD_HOLDS", "LoadEstimate", "MemoryAvailable", "MemoryWarning", "cgroup_available", "component_files",
           "load_estimate", "memory_available", "warn_if_it_may_not_fit"]
