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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mmedge.bench import time_samples  # noqa: F401  (one timer for `mmedge bench` and the benchmarks)

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


def summary(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (in the caller's unit: ms or tokens/s)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def time_call(fn: Callable[[], Any], *, warmup: int, runs: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; return the summary."""
    samples = time_samples(fn, warmup=warmup, runs=runs)
    return Timing(statistics.median(samples), min(samples), max(samples), runs)


# --- peak memory of a child process ----------------------------------------------------------------
# Linux carries a process's peak RSS across exec: a child forked from a large parent reports at
# least the parent's RSS as its ru_maxrss (vfork and posix_spawn too). So the command is started
# by this small interpreter, whose fork is a few MiB, and it writes the command's own rusage.
_LAUNCHER = """\
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


@dataclass(frozen=True)
class ChildResult:
    """What a finished child process left: exit status, its own peak RSS, and its output."""

    returncode: int
    peak_rss_bytes: int | None
    wall_s: float
    stdout: str
    stderr: str


def run_child(argv: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None) -> ChildResult:
    """Run ``argv`` to completion and return its exit status, peak RSS (``ru_maxrss``) and output.

    The peak is the command's own, read with ``os.wait4`` by a minimal launcher (see ``_LAUNCHER``);
    it includes the launcher's few MiB as a floor. After ``timeout_s`` seconds the whole process
    group is killed and ``peak_rss_bytes`` is None.
    """
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        result_file = Path(tmp) / "rusage"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(result_file), *argv],
                                stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall_s = time.perf_counter() - start
        returncode, peak = proc.returncode, None
        if result_file.exists():
            code, maxrss_kib = result_file.read_text().split()
            returncode, peak = int(code), int(maxrss_kib) * 1024  # Linux reports KiB
        out.seek(0)
        err.seek(0)
        return ChildResult(returncode, peak, wall_s, out.read(), err.read())


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


def cpu_ticks() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of CPU time the hypervisor gave to others between two ``cpu_ticks`` snapshots."""
    deltas = [b - a for a, b in zip(before, after)]
    return deltas[7] / max(sum(deltas[:8]), 1)  # steal / (user .. steal); guest time is inside user


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, memory, OS, Python, copy bandwidth, load and the time of the run."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": round(pages / (1 << 30), 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "copy_bandwidth_gbps": round(memory_bandwidth_gbps(), 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
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


def backends_used(pipeline) -> str:
    """Which backend ran each component (``auto`` follows ``mmedge tune``'s timings where the artifact has them)."""
    return ", ".join(f"{name} {chosen.backend}" for name, chosen in pipeline.plan.components.items())


def error_text(exc: BaseException) -> str:
    """The full traceback of ``exc``, for the JSON file and the report."""
    import traceback

    return "".join(traceback.format_exception(exc)).rstrip()


def first_line(error: str) -> str:
    """The exception line of a traceback (its last line)."""
    return error.splitlines()[-1][:300]


def recipe_revision(folder: Path) -> str | None:
    """The exporter recipe revision an artifact's manifest records (``export.recipe_revision``), None if none."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return (manifest.get("export") or {}).get("recipe_revision")


def export_once(name: str, folder: Path, cached: bool, export: Callable[[], Any]) -> dict:
    """Run ``export()`` unless ``cached`` and made with the exporter's current default recipes
    (``mmedge.manifest.RECIPE_REVISION``); returns status, seconds and the traceback of any failure."""
    from mmedge.manifest import RECIPE_REVISION

    if cached and recipe_revision(folder) == RECIPE_REVISION:
        return {"path": str(folder), "cached": True, "seconds": 0.0, "error": None}
    if cached:
        print(f"{name}: the cached export predates the exporter's recipe revision {RECIPE_REVISION}",
              file=sys.stderr)
    print(f"exporting {name} -> {folder}", file=sys.stderr)
    start = time.perf_counter()
    try:
        export()
        error = None
    except Exception as exc:  # a failed export is recorded and reported; the other variants go on
        error = error_text(exc)
        print(f"export of {name} FAILED:\n{error}", file=sys.stderr)
    return {"path": str(folder), "cached": False, "seconds": round(time.perf_counter() - start, 1), "error": error}


def child_summary(child: ChildResult, *, rss_on_failure: bool = True) -> dict:
    """Peak RSS and wall time of a child, its printed result, or its stderr when it failed."""
    summary = {"peak_rss_bytes": child.peak_rss_bytes, "wall_s": round(child.wall_s, 1), "returncode": child.returncode}
    if child.returncode == 0 and child.peak_rss_bytes is not None:
        summary.update(json.loads(child.stdout.strip().splitlines()[-1]))
    else:
        summary["error"] = child.stderr.strip()[-4000:]
        if not rss_on_failure:
            summary["peak_rss_bytes"] = None
    return summary


def fmt_cos(value: float | None) -> str | None:
    return None if value is None else f"{value:.5f}"


def fmt_share(value: float | None) -> str | None:
    return None if value is None else f"{value:.0%}"


class TokenClock:
    """A ``mmedge.generation.Decoder`` around another one that notes when each decode step is asked for.

    The loop calls ``step`` (or ``step_greedy``) right after it has chosen a token, so the calls mark tokens
    1 .. n-1; the caller marks token n when ``generate`` returns. ``reserve`` and ``step_greedy`` are passed on
    when the wrapped decoder has them (the torch backend's preallocated cache and on-device greedy choice).
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.vocab_size = decoder.vocab_size
        self.max_positions = getattr(decoder, "max_positions", None)
        self.times: list[float] = []
        self.step_seconds: list[float] = []  # inside decoder.step: embedding lookup + the graph
        if callable(getattr(decoder, "reserve", None)):
            self.reserve = decoder.reserve
        if callable(getattr(decoder, "step_greedy", None)):
            self.step_greedy = self._step_greedy

    def start(self, inputs_embeds, attention_mask):
        self.times, self.step_seconds = [], []
        return self.decoder.start(inputs_embeds, attention_mask)

    def _timed(self, call, *args):
        now = time.perf_counter()
        self.times.append(now)
        out = call(*args)
        self.step_seconds.append(time.perf_counter() - now)
        return out

    def step(self, token_ids, attention_mask):
        return self._timed(self.decoder.step, token_ids, attention_mask)

    def _step_greedy(self, token_ids, attention_mask, banned=()):
        return self._timed(self.decoder.step_greedy, token_ids, attention_mask, banned)

    def reorder(self, rows):
        self.decoder.reorder(rows)


class StreamerClock:
    """A transformers ``generate`` streamer that only notes when it is handed something: ``times[0]`` is the
    prompt, then one entry per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def prompt_inputs(captioner, image) -> tuple:
    """(embeds, mask, ids): the decoder's prefill inputs for one image and no prompt, as ``Captioner.caption`` builds
    them (the family's input builder; BLIP-2: prefix rows, then the prompt's tokens)."""
    built = captioner.inputs.for_images(image, None)
    return built["embeds"], built["mask"], built["ids"]
