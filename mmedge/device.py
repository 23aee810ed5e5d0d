"""What this machine is and which engines it has, probed once per process without importing them.

Nothing here imports torch or tensorrt: engines are found with ``importlib.util.find_spec`` and
their versions read from package metadata; GPUs come from ONNX Runtime's providers and nvidia-smi.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "asimd", "asimddp", "i8mm", "sve")
# distribution name -> import name(s); cuda-python gives the TensorRT backend its device buffers and streams
# (cuda.bindings since 12.6, cuda.cudart before; "cuda" alone is a namespace other NVIDIA packages share),
# and the torch backend needs transformers beside torch
ENGINES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",), "tensorrt": ("tensorrt",), "torch": ("torch",),
           "transformers": ("transformers",),
           "bitsandbytes": ("bitsandbytes",), "cuda-python": ("cuda.bindings", "cuda.cudart")}
# the distributions that install the one ``onnxruntime`` module (a CPU build, or a build with other providers)
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-migraphx")
# where a version may be read, in order
DISTRIBUTIONS = {"cuda-python": ("cuda-python", "cuda-bindings"), "onnxruntime": ORT_DISTRIBUTIONS}


@dataclass
class GpuInfo:
    name: str
    compute_capability: str | None = None
    memory_total_mb: int | None = None
    memory_free_mb: int | None = None


@dataclass
class DeviceProbe:
    machine: str
    system: str
    cpu_cores: int
    cpu_flags: list[str]
    memory_total_mb: int | None
    gpus: list[GpuInfo] = field(default_factory=list)
    jetson: dict | None = None
    engines: dict[str, str | None] = field(default_factory=dict)  # package -> version, None if absent
    ort_providers: list[str] = field(default_factory=list)
    # the lower of MemAvailable and this process's cgroup room (mmedge.memory): on a Jetson the GPU shares it
    memory_available_mb: int | None = None
    memory_limited_by: str | None = None  # which of the two it is
    cpu_model: str | None = None  # /proc/cpuinfo's "model name" (x86) or "Model" (Arm boards)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_flags(cpuinfo: str) -> list[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in ISA_FLAGS if f in flags]


def _cpu_model(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return None


# how an engine says it could not allocate: C++'s std::bad_alloc, ONNX Runtime's arena, Python's MemoryError
OUT_OF_MEMORY_SIGNS = ("bad_alloc", "Failed to allocate memory", "out of memory", "OutOfMemory")
FREE_MEMORY = ("close other processes or pipelines (mmedge serve: fewer --workers or artifacts), or export a smaller "
               "precision (--precision int8, --llm-precision int4); mmedge doctor ARTIFACT shows this device")
SMALLER_CALLS = ("pass fewer images or texts per call, fewer beams or a shorter max_new_tokens, or fewer threads; or "
                 + FREE_MEMORY)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (not a damaged graph or a bad feed)."""
    return isinstance(exc, MemoryError) or any(sign in str(exc) for sign in OUT_OF_MEMORY_SIGNS)


def out_of_memory_error(what: str, exc: BaseException, fix: str):
    """The InsufficientMemoryError for ``what`` (e.g. "ONNX Runtime ran out of memory loading the decoder"), with the
    engine's words and the memory this device has available now."""
    from mmedge.errors import InsufficientMemoryError
    from mmedge.memory import memory_available

    available = memory_available()
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return InsufficientMemoryError(f"{what} ({detail})", "more free memory than there is now"
                                   + (f" ({available.text()})" if available is not None else ""), fix)


def parse_jetson(nv_tegra_release: str | None, device_tree_model: str | None) -> dict | None:
    """Jetson module and L4T release from /etc/nv_tegra_release and /proc/device-tree/model."""
    if not nv_tegra_release and not (device_tree_model and "jetson" in device_tree_model.lower()):
        return None
    info: dict = {"model": (device_tree_model or "").strip("\x00 \n") or None, "l4t": None, "unified_memory": True}
    if nv_tegra_release:
        # e.g. "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
        head = nv_tegra_release.split(",")
        major = head[0].replace("#", "").split("(")[0].strip().lstrip("R")
        revision = next((h.split(":")[1].strip() for h in head if "REVISION" in h), "")
        info["l4t"] = f"{major}.{revision}" if revision else major
    return info


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _engine_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name, modules in ENGINES.items():
        if not any(importable(module) for module in modules):
            versions[name] = None
            continue
        found = installed_distributions(DISTRIBUTIONS.get(name, (name,)))
        versions[name] = next(iter(found.values()), "unknown")  # the first of them installed
    return versions


def installed_distributions(names: tuple[str, ...]) -> dict[str, str]:
    """Which of the distributions ``names`` are installed, with their versions (read from their metadata)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def importable(module: str) -> bool:
    """Whether ``module`` (dotted names too) is installed as a module or a regular package, importing at most its
    parent packages.
    A bare namespace package does not count: type stubs such as tensorrt-stubs install a ``tensorrt/`` folder of
    .pyi files, which imports as an empty namespace, not as TensorRT."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        return False
    namespace = spec is not None and spec.submodule_search_locations is not None and spec.origin in (None, "namespace")
    return spec is not None and not namespace


def _nvidia_smi_gpus() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=name,compute_cap,memory.total,memory.free"
    try:
        out = subprocess.run([exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            total = int(parts[2]) if parts[2].isdigit() else None
            free = int(parts[3]) if parts[3].isdigit() else None
            gpus.append(GpuInfo(parts[0], parts[1] or None, total, free))
    return gpus


@functools.lru_cache(maxsize=1)
def probe() -> DeviceProbe:
    """The device, probed once per process."""
    from mmedge.memory import meminfo_mib, memory_available

    engines = _engine_versions()
    meminfo = _read("/proc/meminfo") or ""
    available = memory_available(meminfo)
    cpuinfo = _read("/proc/cpuinfo") or ""
    providers: list[str] = []
    if engines.get("onnxruntime"):
        from mmedge.runtimes.ort_session import available_providers

        providers = available_providers()
    return DeviceProbe(
        machine=platform.machine(),
        system=platform.system(),
        cpu_cores=os.cpu_count() or 1,
        cpu_flags=_cpu_flags(cpuinfo),
        cpu_model=_cpu_model(cpuinfo),
        memory_total_mb=meminfo_mib(meminfo, "MemTotal"),
        memory_available_mb=available.mib if available else None,
        memory_limited_by=available.limited_by if available else None,
        gpus=_nvidia_smi_gpus(),
        jetson=parse_jetson(_read("/etc/nv_tegra_release"), _read("/proc/device-tree/model")),
        engines=engines,
        ort_providers=providers,
    )
