"""Helpers shared by the benchmark scripts: timing, peak RSS of a subprocess, memory bandwidth,
machine facts, and JSON / markdown output.

Only the standard library and numpy are imported here, so a benchmark's device-side child process
(which must not import torch) can import this module too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

MIB = 1 << 20


# --- timing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Wall-clock latencies of repeated calls, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    runs: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def time_call(fn: Callable[[], Any], *, warmup: int, runs: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; return the summary."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples), runs)


# --- peak memory of a child process ----------------------------------------------------------------
@dataclass(frozen=True)
class ChildResult:
    """What a finished child process left: exit status, its own peak RSS, and its output."""

    returncode: int
    peak_rss_bytes: int
    wall_s: float
    stdout: str
    stderr: str


def run_child(argv: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``argv`` to completion and read its peak RSS (``ru_maxrss``) from ``os.wait4``.

    ``wait4`` returns the rusage of that one child, unlike ``getrusage(RUSAGE_CHILDREN)``, which
    is the maximum over every child this process has waited for. The child is killed after
    ``timeout_s`` seconds (its returncode is then negative).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env)
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
        wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildResult(proc.returncode, usage.ru_maxrss * 1024, wall_s, out.read(), err.read())  # Linux: KiB


# --- machine facts ---------------------------------------------------------------------------------
def memory_bandwidth_gbps(size_mib: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` copy bandwidth of one core, in GB/s (bytes read + bytes written)."""
    src = np.ones(size_mib * MIB, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def cpu_model() -> str:
    """The CPU model name as lscpu prints it (falls back to /proc/cpuinfo, then platform)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        source, key = text, "Model name:"
    except (OSError, subprocess.CalledProcessError):
        source, key = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "", "model name"
    for line in source.splitlines():
        if line.strip().startswith(key):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, memory, OS, Python, copy bandwidth and the time of the run."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(pages / (1 << 30), 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "copy_bandwidth_gbps": round(memory_bandwidth_gbps(), 1),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed versions of ``names`` (missing ones are reported as 'absent')."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# --- output ------------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed, ``None`` shown as an en dash."""
    def cell(value: Any) -> str:
        return "–" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms: float | None) -> str | None:
    return None if ms is None else (f"{ms:.1f}" if ms < 100 else f"{ms:.0f}")


def fmt_ratio(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"


def fmt_mib(nbytes: int | None) -> str | None:
    return None if nbytes is None else f"{nbytes / MIB:.1f}"


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing."""
    return None if value is None or not reference else value / reference
