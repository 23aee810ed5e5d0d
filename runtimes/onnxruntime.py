"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind one runner.

Provider options come from the plan (``mmedge.runtimes.plugins.onnxruntime.ort_options``): the device id, FP16, the
engine cache and
the builder workspace of the TensorRT provider. With IO binding (on by default for the GPU providers) a runner binds
its outputs on the provider's device and, with ``keep_on_device=True``, returns them as ``OrtDeviceArray``\\ s that
the next ONNX Runtime runner binds as inputs without a copy (``bind_ortvalue_input``), that torch / TensorRT read
through ``__cuda_array_interface__``, and that numpy copies to the host (``np.asarray``). A GPU array from another
backend (anything with ``__cuda_array_interface__``) is bound in place too.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort

from mmedge.backends import settings_from_options
from mmedge.device import SMALLER_CALLS, out_of_memory, out_of_memory_error
from mmedge.errors import BackendError, IntegrityError
from mmedge.runner import DeviceArray, Runner
from mmedge.runtimes.ort_session import (
    ORT_DTYPES,
    PROVIDERS,
    OrtOptions,
    available_providers,
    provider_options,
    session_from_path,
)

_provider_options = provider_options  # the name tests and earlier callers use


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
        self.dtype = np.dtype(ORT_DTYPES.get(ortvalue.data_type(), np.float32))

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


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, component_name: str, component: dict,
                 options: OrtOptions | None = None):
        super().__init__(component_name, component)
        self.options = options or OrtOptions()
        self._session = session_from_path(path, self.options, f"component '{component_name}'")
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
        self._refuse_closed()
        return self._session.get_providers()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner", "create a new one")

    def _check_declared_io(self) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        graph_inputs, graph_outputs = {i.name for i in inputs}, {o.name for o in outputs}
        if graph_inputs != set(self._inputs) or not set(self._outputs) <= graph_outputs:
            raise IntegrityError(
                f"component '{self.component_name}' graph has inputs {sorted(graph_inputs)} and outputs "
                f"{sorted(graph_outputs)}, which do not match its manifest entry",
                f"inputs {sorted(self._inputs)} and outputs {sorted(self._outputs)}",
                "re-export the artifact; graph and manifest come from different exports",
            )
        self._check_graph_tensors({arg.name: (ORT_DTYPES.get(arg.type), arg.shape, f"{arg.type} of shape {arg.shape}")
                                   for arg in [*inputs, *outputs]})

    def _device_feed(self, meta, value):
        """With IO binding a device array is bound where it is; a session without it takes host arrays."""
        return value if self.io_binding else np.asarray(value)

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._refuse_closed()
        try:
            if self.io_binding:
                return self._run_bound(feeds)
            # InferenceSession.run is thread-safe; no lock needed on the hot path.
            values = self._session.run(self._output_names, feeds)
        except Exception as exc:
            if out_of_memory(exc):
                raise out_of_memory_error(f"ONNX Runtime ran out of memory running component '{self.component_name}'",
                                          exc, SMALLER_CALLS) from None
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
                binding.bind_input(name, "cuda", self._device_id, np.dtype(interface["typestr"]).type,
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
    return OnnxRuntimeRunner(path, component_name, component, settings_from_options("onnxruntime", OrtOptions, options))


__all__ = ["ORT_DTYPES", "PROVIDERS", "OnnxRuntimeRunner", "OrtDeviceArray", "OrtOptions", "available_providers",
           "create_runner", "provider_options", "session_from_path"]
