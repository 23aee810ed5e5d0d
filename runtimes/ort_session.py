"""Opening ONNX Runtime sessions (the loader, apart from the runners, as in Polygraphy): ``session_from_path`` is how
the runner, the KV-cached decoder and the exporter's checks open a graph, from one ``OrtOptions``; ``ORT_DTYPES`` is
the one table from ONNX Runtime's type names to numpy dtypes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmedge.device import FREE_MEMORY, out_of_memory, out_of_memory_error
from mmedge.errors import BackendError, BackendUnavailableError, InputError, IntegrityError, MmedgeError
from mmedge.setting_checks import check_switch, is_whole

# Our short names for ONNX Runtime's execution providers.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class OrtOptions:
    """How to build the session. ``providers`` in priority order, CPU always last as the fallback."""

    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None  # intra-op threads; None = ONNX Runtime's default (all cores)
    inter_op_threads: int | None = None
    graph_optimization: str = "all"
    device_id: int = 0
    # TensorRT provider: allow FP16 kernels in its weakly typed networks, any layer included: never for a graph whose
    # FP32 nodes must stay FP32 (the plan decides: mmedge.runtimes.tensorrt_planning.provider_fp16)
    fp16: bool = False
    engine_cache: Path | None = None  # TensorRT provider: where built engines are cached
    workspace_mb: int | None = None  # TensorRT provider: builder workspace (None: ONNX Runtime's default)
    io_binding: bool | None = None  # None: on for the CUDA / TensorRT providers, off on a CPU
    keep_on_device: bool = False  # with IO binding: return OrtDeviceArray outputs instead of numpy arrays
    config_entries: dict[str, str] = field(default_factory=dict)  # extra SessionOptions entries
    # off: no CPU arena nor memory patterns, each tensor's memory goes back when freed (the exporter's checks on
    # large graphs, whose shapes change at every decode step: the arena never shrinks)
    memory_arena: bool = True

    def __post_init__(self):
        """The values a user sets (``backend_options['onnxruntime']``, ``--backend-option onnxruntime.X=...``),
        judged before a session is built (a bad one reached ONNX Runtime as a KeyError on a "damaged graph")."""
        if self.graph_optimization not in _OPT_LEVELS:
            raise InputError(f"graph_optimization {self.graph_optimization!r}", f"one of {', '.join(_OPT_LEVELS)}",
                             "pass graph_optimization='all' (the default) or 'disable' to compare")
        for name, least in (("device_id", 0), ("workspace_mb", 1), ("inter_op_threads", 1)):
            value = getattr(self, name)
            if (value is not None or name == "device_id") and not is_whole(value, least):
                raise InputError(f"{name} is {value!r}", f"{'' if name == 'device_id' else 'None or '}an integer of "
                                 f"at least {least}", f"pass e.g. {name}={max(least, 1) if least else 0}")
        for name in ("fp16", "keep_on_device", "memory_arena"):
            check_switch(name, getattr(self, name))
        check_switch("io_binding", self.io_binding, none_means="on for a GPU")
        if not isinstance(self.config_entries, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.config_entries.items()):
            raise InputError(f"config_entries is {self.config_entries!r}"[:200],
                             "a dict of ONNX Runtime session config keys to string values",
                             "pass e.g. config_entries={'session.intra_op.allow_spinning': '0'}")


def available_providers() -> list[str]:
    """Our names for the execution providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def provider_list(options: OrtOptions) -> list[tuple[str, dict]]:
    offered = set(ort.get_available_providers())
    chosen: list[tuple[str, dict]] = []
    for short in options.providers:
        if short not in PROVIDERS:
            raise BackendUnavailableError(
                f"unknown ONNX Runtime provider '{short}'", f"one of {', '.join(PROVIDERS)}",
                "use 'cpu', 'cuda' or 'tensorrt'"
            )
        full = PROVIDERS[short]
        if full not in offered:
            raise BackendUnavailableError(
                f"ONNX Runtime provider '{short}' ({full}) is not in this onnxruntime build (it offers "
                f"{sorted(offered)})",
                f"an onnxruntime build with {full}",
                "pip uninstall onnxruntime && pip install onnxruntime-gpu (CUDA 12) on a machine with an NVIDIA GPU; "
                "on Jetson use the onnxruntime-gpu wheel for your JetPack",
            )
        chosen.append((full, provider_options(short, options)))
    if PROVIDERS["cpu"] not in [p for p, _ in chosen]:
        chosen.append((PROVIDERS["cpu"], {}))
    return chosen


def provider_options(short: str, options: OrtOptions) -> dict:
    if short == "cuda":
        return {"device_id": options.device_id}
    if short == "tensorrt":
        opts = {"device_id": options.device_id, "trt_fp16_enable": options.fp16, "trt_int8_enable": False}
        if options.engine_cache is not None:
            cache = str(options.engine_cache)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache,
                        trt_timing_cache_enable=True, trt_timing_cache_path=cache)
        if options.workspace_mb:
            opts["trt_max_workspace_size"] = int(options.workspace_mb) << 20
        return opts
    return {}


def session_options(options: OrtOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if options.threads is not None:
        so.intra_op_num_threads = options.threads
    if options.inter_op_threads is not None:
        so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise to users
    if not options.memory_arena:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    for key, value in options.config_entries.items():
        so.add_session_config_entry(key, str(value))
    return so


# ONNX Runtime's type names (NodeArg.type, OrtValue.data_type()) -> numpy dtypes
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_}


def session_from_path(path: str | os.PathLike, options: OrtOptions | None = None,
                      what: str = "a graph") -> ort.InferenceSession:
    """An ``InferenceSession`` over the graph at ``path`` with ``options`` (default: CPU, all cores); a graph ONNX
    Runtime cannot load is an IntegrityError naming ``what`` and the file."""
    options = options or OrtOptions()
    providers = provider_list(options)
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(options),
                                    providers=[p for p, _ in providers], provider_options=[o for _, o in providers])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/… types
        if out_of_memory(exc):  # the file is intact (its sha256 was checked): this device lacks the memory
            weights = Path(f"{path}.data")  # the external data an export writes beside a large graph
            size = Path(path).stat().st_size + (weights.stat().st_size if weights.is_file() else 0)
            raise out_of_memory_error(f"ONNX Runtime ran out of memory loading {what} from '{Path(path).name}' "
                                      f"({size / 2**20:,.0f} MiB on disk)", exc, FREE_MEMORY) from None
        raise GraphLoadError(f"{what} from '{Path(path).name}'",
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}",
                             str(exc)) from None


class GraphLoadError(IntegrityError):
    """ONNX Runtime could not load a graph (``subject``: which, and from which file; ``detail``: its words): a
    damaged file, unless this release is older than the graph needs (``too_old_for``, where the artifact is known)."""

    def __init__(self, subject: str, detail: str, words: str = ""):
        self.subject, self.detail, self.words = subject, detail, words or detail  # words: ONNX Runtime's, whole
        super().__init__(f"ONNX Runtime could not load {subject} ({detail})",
                         "a valid ONNX graph as written by `mmedge export`",
                         "re-export the artifact or copy the file again")


# ONNX Runtime's words where a graph needs what this release lacks: an operator, an opset, an IR version, an attribute
# value a kernel does not take (the INT4 LLM's 8-bit MatMulNBits: "Only 4b quantization is supported")
NEWER_RELEASE_SIGNS = ("NOT_IMPLEMENTED", "Could not find an implementation", "No Op registered", "not a registered",
                       "IR version", "opset", "Opset", "not supported", "is supported", "Unsupported", "unsupported")


def too_old_for(error: GraphLoadError, manifest: dict) -> MmedgeError:
    """``error`` as a BackendError where this ONNX Runtime is older than the one the export validated the graph on
    (``export.validated_with.onnxruntime``; a patch release apart counts as the same) or than mmedge needs, and says
    what a newer release has (``NEWER_RELEASE_SIGNS``; the file is intact: its sha256 was checked; e.g. an INT4
    LLM's 8-bit LM head needs 1.22); else ``error`` itself."""
    from mmedge.versions import MIN_ONNXRUNTIME, older_than_needed, release

    recorded = ((manifest.get("export") or {}).get("validated_with") or {}).get("onnxruntime")
    older = older_than_needed(ort.__version__, MIN_ONNXRUNTIME, recorded if isinstance(recorded, str) else None,
                              "the export validated it on")
    if older is None or not any(sign in error.words for sign in NEWER_RELEASE_SIGNS):
        return error  # out of memory, a provider that failed to start, a damaged graph: no upgrade helps
    why, wanted = older
    head = (", or re-export with --int4-head int4 (an INT4 LLM's 8-bit LM head needs onnxruntime 1.22)"
            if "MatMulNBits" in error.words and release(ort.__version__) < release(MIN_ONNXRUNTIME) else "")
    return BackendError(f"ONNX Runtime {ort.__version__} could not load {error.subject} ({error.detail})",
                        f"an onnxruntime release that runs this graph ({why})",
                        f'upgrade onnxruntime (pip install -U "onnxruntime>={wanted}", or your device\'s '
                        f"onnxruntime-gpu build){head}")


@contextlib.contextmanager
def release_named_when_too_old(manifest: dict):
    """Opening an artifact's graph: a GraphLoadError raised in the block becomes ``too_old_for``'s error."""
    try:
        yield
    except GraphLoadError as exc:
        raise too_old_for(exc, manifest) from None


__all__ = ["ORT_DTYPES", "PROVIDERS", "GraphLoadError", "OrtOptions", "available_providers", "provider_list",
           "provider_options", "release_named_when_too_old", "session_from_path", "session_options",
           "too_old_for"]
