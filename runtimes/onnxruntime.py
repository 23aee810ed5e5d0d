"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind one runner."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mmedge.errors import BackendError, BackendUnavailableError, IntegrityError
from mmedge.runner import Runner

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

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner", "create a new one")
        try:
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

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                del self._session


def create_runner(path, component_name: str, component: dict, **options) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(path, component_name, component, OrtOptions(**options))
