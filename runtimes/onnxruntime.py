"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind one runner.

Provider options come from the plan (``mmedge.runtimes.plugins.onnxruntime.ort_options``): the device id, FP16, the engine cache and
the builder workspace of the TensorRT provider. With IO binding (on by default for the GPU providers) a runner binds
its outputs on the provider's device and, with ``keep_on_device=True``, returns them as ``OrtDeviceArray``\\ s that
the next ONNX Runtime runner binds as inputs without a copy (``bind_ortvalue_input``), that torch / TensorRT read
through ``__cuda_array_interface__``, and that numpy copies to the host (``np.asarray``). A GPU array from another
backend (anything with ``__cuda_array_interface__``) is bound in place too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmedge.backends import refuse_unknown_options
from mmedge.errors import BackendError, BackendUnavailableError, FeedError, IntegrityError
from mmedge.runner import DeviceArray, Runner

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
    fp16: bool = False  # TensorRT provider: allow FP16 kernels
    engine_cache: Path | None = None  # TensorRT provider: where built engines are cached
    workspace_mb: int | None = None  # TensorRT provider: builder workspace (None: ONNX Runtime's default)
    io_binding: bool | None = None  # None: on for the CUDA / TensorRT providers, off on a CPU
    keep_on_device: bool = False  # with IO binding: return OrtDeviceArray outputs instead of numpy arrays
    config_entries: dict[str, str] = field(default_factory=dict)  # extra SessionOptions entries


def available_providers() -> list[str]:
    """Our names for the execution providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def _provider_list(options: OrtOptions) -> list[tuple[str, dict]]:
    offered = set(ort.get_available_providers())
    chosen: list[tuple[str, dict]] = []
    for short in options.providers:
        if short not in PROVIDERS:
            raise BackendUnavailableError(
                f"unknown ONNX Runtime provider '{short}'", f"one of {', '.join(PROVIDERS)}", "use 'cpu', 'cuda' or 'tensorrt'"
            )
        full = PROVIDERS[short]
        if full not in offered:
            raise BackendUnavailableError(
                f"ONNX Runtime provider '{short}' ({full}) is not in this onnxruntime build (it offers {sorted(offered)})",
                f"an onnxruntime build with {full}",
                "pip uninstall onnxruntime && pip install onnxruntime-gpu (CUDA 12) on a machine with an NVIDIA GPU; "
                "on Jetson use the onnxruntime-gpu wheel for your JetPack",
            )
        chosen.append((full, _provider_options(short, options)))
    if PROVIDERS["cpu"] not in [p for p, _ in chosen]:
        chosen.append((PROVIDERS["cpu"], {}))
    return chosen


def _provider_options(short: str, options: OrtOptions) -> dict:
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
    for key, value in options.config_entries.items():
        so.add_session_config_entry(key, str(value))
    return so


_ORT_ELEMENT_TYPES = {np.dtype(np.float32): np.float32, np.dtype(np.float16): np.float16, np.dtype(np.int64): np.int64,
                      np.dtype(np.int32): np.int32, np.dtype(np.int8): np.int8, np.dtype(np.uint8): np.uint8,
                      np.dtype(np.bool_): np.bool_}


class OrtDeviceArray(DeviceArray):
    """An output left where ONNX Runtime put it (the GPU with the CUDA / TensorRT providers) by an IO-bound runner.

    Another ONNX Runtime runner binds it as an input without a copy; on the GPU, torch / TensorRT / CuPy read it
    through ``__cuda_array_interface__``; ``np.asarray`` (or ``numpy()``) copies it to the host. ``ortvalue`` is the
    ``onnxruntime.OrtValue`` itself.
    """

    def __init__(self, ortvalue: ort.OrtValue):
        self.ortvalue = ortvalue
        self.shape = tuple(ortvalue.shape())
        self.ndim = len(self.shape)
        self.device = ortvalue.device_name()
        self.dtype = np.dtype(_ORT_NUMPY.get(ortvalue.data_type(), np.float32))

    @property
    def __cuda_array_interface__(self) -> dict:
        if self.device != "cuda":
            raise AttributeError("__cuda_array_interface__: this array is in host memory")
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ortvalue.data_ptr(), False), "version": 3,
                "strides": None, "stream": None}  # the run that wrote it has finished

    def numpy(self) -> np.ndarray:
        return self.ortvalue.numpy()

    def device_name(self) -> str:
        return self.device


_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, component_name: str, component: dict, options: OrtOptions | None = None):
        super().__init__(component_name, component)
        self.options = options or OrtOptions()
        providers = _provider_list(self.options)
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options(self.options),
                providers=[p for p, _ in providers], provider_options=[o for _, o in providers],
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/… types
            raise IntegrityError(
                f"ONNX Runtime could not load component '{component_name}' from '{Path(path).name}' "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
                "a valid ONNX graph as written by `mmedge export`",
                "re-export the artifact or copy the file again",
            ) from None
        self._check_declared_io()
        self._output_names = list(self._outputs)
        self._lock = threading.Lock()
        self._closed = False
        first = self._session.get_providers()[0]
        self._device = "cuda" if first in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._device_id = self.options.device_id
        self.io_binding = self._device == "cuda" if self.options.io_binding is None else bool(self.options.io_binding)
        self.keep_on_device = self.io_binding and self.options.keep_on_device

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _check_declared_io(self) -> None:
        graph_inputs = {i.name for i in self._session.get_inputs()}
        graph_outputs = {o.name for o in self._session.get_outputs()}
        if graph_inputs != set(self._inputs) or not set(self._outputs) <= graph_outputs:
            raise IntegrityError(
                f"component '{self.component_name}' graph has inputs {sorted(graph_inputs)} and outputs "
                f"{sorted(graph_outputs)}, which do not match its manifest entry",
                f"inputs {sorted(self._inputs)} and outputs {sorted(self._outputs)}",
                "re-export the artifact; graph and manifest come from different exports",
            )

    def _check_one(self, meta, value):
        if isinstance(value, OrtDeviceArray) or (not isinstance(value, np.ndarray) and hasattr(value, "__cuda_array_interface__")):
            shape = tuple(value.shape)
            dtype = np.dtype(value.dtype) if isinstance(value, OrtDeviceArray) else np.dtype(value.__cuda_array_interface__["typestr"])
            if dtype != np.dtype(meta.dtype) or len(shape) != len(meta.shape) or any(
                    w is not None and w != g for w, g in zip(meta.shape, shape)):
                raise FeedError(f"component '{self.component_name}' input '{meta.name}' is a device array {list(shape)} {dtype}",
                                f"{meta.dtype} shaped {self._describe(meta)}", "convert or reshape it before feeding it")
            if not self.io_binding:
                return np.asarray(value)  # a session without IO binding takes host arrays
            return value
        return super()._check_one(meta, value)

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner", "create a new one")
        try:
            if self.io_binding:
                return self._run_bound(feeds)
            # InferenceSession.run is thread-safe; no lock needed on the hot path.
            values = self._session.run(self._output_names, feeds)
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime failed running component '{self.component_name}' "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
                "feeds matching the component's declared inputs",
                "check input shapes against runner.input_metadata()",
            ) from None
        return dict(zip(self._output_names, values))

    def _run_bound(self, feeds: dict) -> dict:
        """One call through a fresh IOBinding (thread-safe): inputs bound where they are, outputs on the device."""
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, OrtDeviceArray):
                binding.bind_ortvalue_input(name, value.ortvalue)
            elif isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:  # another backend's GPU array: bound in place
                interface = value.__cuda_array_interface__
                binding.bind_input(name, "cuda", self._device_id, _ORT_ELEMENT_TYPES[np.dtype(interface["typestr"])],
                                   list(interface["shape"]), int(interface["data"][0]))
        for name in self._output_names:
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if self.keep_on_device:
            return {name: OrtDeviceArray(value) for name, value in zip(self._output_names, values)}
        return {name: value.numpy() for name, value in zip(self._output_names, values)}

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                del self._session


def create_runner(path, component_name: str, component: dict, **options) -> OnnxRuntimeRunner:
    """A runner for one component's graph; ``options``: ``OrtOptions`` fields (anything else is refused)."""
    allowed = [f.name for f in fields(OrtOptions)]
    refuse_unknown_options("onnxruntime", {k: v for k, v in options.items() if k not in allowed}, allowed)
    return OnnxRuntimeRunner(path, component_name, component, OrtOptions(**options))
