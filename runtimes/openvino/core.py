"""The OpenVINO engine itself: the lazy import, one ``openvino.Core`` per process, and compile settings.

OpenVINO is optional (``pip install "mmedge[openvino]"``); nothing imports it before a runner, a decoder or
``mmedge doctor`` asks for it. ``OvOptions`` says how a graph is compiled: the device (``CPU``, ``GPU``, ``NPU``
as OpenVINO names them), threads, the precision hint and where compiled models are cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmedge.errors import BackendUnavailableError, InputError
from mmedge.setting_checks import is_whole

INSTALL = 'pip install "mmedge[openvino]" (OpenVINO and NNCF from PyPI)'
DEVICES = ("CPU", "GPU", "NPU")
# compressed LLM weights OpenVINO makes itself at first load (NNCF compress_weights): name -> (NNCF mode, group size)
WEIGHT_MODES = {"int8": ("int8_asym", None), "int4": ("int4_asym", 32)}


def import_openvino():
    """The ``openvino`` module, or BackendUnavailableError naming the install command."""
    return import_optional("openvino")


def import_optional(package: str):
    """``package`` (openvino, nncf) imported, or BackendUnavailableError naming the install command; an import error
    from inside an installed package is raised as it is."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == package:
            raise BackendUnavailableError(f"backend 'openvino' needs the Python package '{package}', which is not "
                                          "installed", f"'{package}' importable", INSTALL) from None
        raise


@functools.lru_cache(maxsize=1)
def core():
    """One ``openvino.Core`` per process (it holds the device plug-ins)."""
    return import_openvino().Core()


def version() -> str:
    """OpenVINO's version, e.g. ``2026.4.1-22982-e213a147257-releases/2026/4``."""
    return import_openvino().get_version()


DEFAULT_SHAPE_CACHE = 256  # input shapes whose prepared CPU kernels a compiled model keeps (OpenVINO's own: 5000)


@dataclass
class OvOptions:
    """How a component is compiled.

    ``device``: an OpenVINO device name (``CPU``, ``GPU``, ``NPU``; a GPU or NPU may take OpenVINO's ``.N`` index,
    ``GPU.1``, as ``mmedge doctor`` lists it: the CPU is one device, ``CPU``, with none). ``threads``: CPU inference
    threads (None: OpenVINO's default, all cores). ``precision_hint``: the inference precision OpenVINO may use
    (None: ``f32`` on a CPU, so an FP32 graph stays FP32 on CPUs with BF16/AMX; the device's default elsewhere; an
    ``f16`` / ``bf16`` hint on a CPU with neither is refused: it would compile at f32). ``engine_cache``:
    the folder compiled models are cached in (the artifact's ``engines/``; None: compile every time).
    ``weights``: for the decoder only, LLM weights OpenVINO compresses at first load (``int8``, ``int4``) from an FP32
    decoder graph, or None to run the graph's weights as they are. ``shape_cache``: on a CPU, how many input shapes a
    compiled model keeps its prepared kernels for (``CPU_RUNTIME_CACHE_CAPACITY``). OpenVINO's own default, 5000,
    let a long-lived CLIP text encoder grow by about 1.5 MB per new (batch, length) shape: 1.1 GB after 724 shapes.
    256 held it at 0.35 GB, and IDEFICS-mid decoded within the run-to-run spread of 5000 (0.97-1.10x its time);
    0 caches nothing (a decode step then prepares its kernels every time: 1.27x the time)
    (``benchmarks/openvino_shape_cache.py``, RESULTS.md). None (not given): 256 on a CPU; given for another device,
    where it changes nothing, it is refused.
    """

    device: str = "CPU"
    threads: int | None = None
    precision_hint: str | None = None
    engine_cache: Path | None = None
    weights: str | None = None
    shape_cache: int | None = None  # None: not given (DEFAULT_SHAPE_CACHE on a CPU)

    def __post_init__(self):
        base = self.device.split(".")[0] if isinstance(self.device, str) else None
        if base not in DEVICES or (base == "CPU" and self.device != "CPU"):
            raise InputError(f"OpenVINO device {self.device!r}", f"one of {', '.join(DEVICES)} (a GPU or NPU "
                             "optionally with its '.N' index, e.g. GPU.1; the CPU is one device, 'CPU')",
                             "pass device='CPU' or one `mmedge doctor` lists under OpenVINO")
        if self.threads is not None and not is_whole(self.threads, 1):
            raise InputError(f"threads is {self.threads!r}", "None or a positive integer", "pass e.g. threads=2")
        if self.precision_hint not in (None, "f32", "f16", "bf16"):
            raise InputError(f"precision_hint is {self.precision_hint!r}", "None, 'f32', 'f16' or 'bf16'",
                             "leave it unset for the device's FP32-faithful default")
        if self.shape_cache is not None and not is_whole(self.shape_cache, 0):
            raise InputError(f"shape_cache is {self.shape_cache!r}", "an integer of 0 or more (input shapes kept)",
                             f"pass e.g. shape_cache={DEFAULT_SHAPE_CACHE} (the default), or 0 to keep none")
        if self.shape_cache is not None and self.device != "CPU":
            raise InputError(f"shape_cache={self.shape_cache} would change nothing on OpenVINO device {self.device!r}",
                             "shape_cache only with the CPU device", "drop shape_cache")
        if self.weights not in (None, *WEIGHT_MODES):
            raise InputError(f"OpenVINO weights {self.weights!r}", f"None or one of {', '.join(WEIGHT_MODES)}",
                             "pass weights='int4' or 'int8' for the decoder, or leave it unset")

    def compile_config(self) -> dict[str, Any]:
        """Properties for ``compile_model`` / ``import_model``: latency hint, one stream, threads, precision."""
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if self.device == "CPU":
            config["NUM_STREAMS"] = 1
            config["INFERENCE_PRECISION_HINT"] = self.precision_hint or "f32"
            config["CPU_RUNTIME_CACHE_CAPACITY"] = DEFAULT_SHAPE_CACHE if self.shape_cache is None else self.shape_cache
            if self.threads is not None:
                config["INFERENCE_NUM_THREADS"] = self.threads
        elif self.precision_hint:
            config["INFERENCE_PRECISION_HINT"] = self.precision_hint
        return config


def device_name(device: str) -> str:
    """OpenVINO's full name of ``device`` (e.g. ``Intel(R) Core(TM) Ultra 7 155H``), or the name itself."""
    try:
        return str(core().get_property(device, "FULL_DEVICE_NAME"))
    except Exception:  # a device OpenVINO does not report
        return device
