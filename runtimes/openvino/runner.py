"""A runner of one component on OpenVINO (``mmedge.runner.Runner``): the graph compiled for one device, one
infer request per concurrent caller (a request is not thread-safe; idle ones are reused)."""

from __future__ import annotations

import os
import threading

import numpy as np

from mmedge.errors import BackendError, IntegrityError
from mmedge.runner import Runner
from mmedge.runtimes.openvino.compile import compiled_model, engine_detail
from mmedge.runtimes.openvino.core import OvOptions


def port_names(ports, wanted=()) -> list[str]:
    """Each input / output port's name: one of ``wanted`` (the manifest's) when the port carries it, else any of its
    names (OpenVINO keeps the ONNX tensor names; a port may carry several, e.g. an input and the Cast after it)."""
    names = []
    for port in ports:
        carried = port.get_names()
        names.append(next((name for name in wanted if name in carried), port.get_any_name()))
    return names


NO_NUMPY_TYPE = ("bf16", "u1", "u2", "u3", "u4", "u6", "i4", "nf4", "f4e2m1", "f8e4m3", "f8e5m2", "f8e8m0")


def port_tensor(port) -> tuple:
    """(numpy dtype or None, dims (an int where static, None where dynamic; None for a dynamic rank), how OpenVINO
    writes them) of a compiled model's port, for ``Runner._check_graph_tensors``."""
    element, shape = port.get_element_type(), port.get_partial_shape()
    try:  # bf16 has no numpy dtype (OpenVINO hands out float16 for it), nor have the sub-byte and fp8 types
        dtype = None if element.get_type_name() in NO_NUMPY_TYPE else np.dtype(element.to_dtype())
    except Exception:
        dtype = None  # matches no declared dtype
    dims = None if shape.rank.is_dynamic else [dim.get_length() if dim.is_static else None for dim in shape]
    return dtype, dims, f"{element.get_type_name()} of shape {shape}"


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, path: str | os.PathLike, component_name: str, component: dict, options: OvOptions | None = None):
        super().__init__(component_name, component)
        self.options = options or OvOptions()
        self._compiled, self.source = compiled_model(path, component_name, component, self.options)
        inputs = port_names(self._compiled.inputs, self._inputs)
        outputs = port_names(self._compiled.outputs, self._outputs)
        self._port_of = dict(zip(outputs, self._compiled.outputs))
        if set(inputs) != set(self._inputs) or not set(self._outputs) <= set(outputs):
            raise IntegrityError(f"component '{component_name}' graph has inputs {sorted(inputs)} and outputs "
                                 f"{sorted(outputs)}, which do not match its manifest entry",
                                 f"inputs {sorted(self._inputs)} and outputs {sorted(self._outputs)}",
                                 "re-export the artifact; graph and manifest come from different exports")
        self._check_graph_tensors({**dict(zip(inputs, map(port_tensor, self._compiled.inputs))),
                                   **dict(zip(outputs, map(port_tensor, self._compiled.outputs)))})
        self._output_names = list(self._outputs)
        self._idle: list = []  # infer requests not in use
        self._lock = threading.Lock()
        self._closed = False

    @property
    def device(self) -> str:
        return self.options.device

    def _request(self):
        with self._lock:
            if self._closed:
                raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner",
                                   "create a new one")
            return self._idle.pop() if self._idle else self._compiled.create_infer_request()

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request()
        try:
            # share_inputs: the request reads the caller's arrays in place (no copy); safe, as infer() is synchronous
            results = request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()},
                                    share_inputs=True)
            # the request reuses its output buffers on its next call: copy out what the caller keeps
            return {name: np.array(results[self._port_of[name]], copy=True) for name in self._output_names}
        except Exception as exc:
            raise BackendError(f"OpenVINO failed running component '{self.component_name}' "
                               f"({type(exc).__name__}: {engine_detail(exc)})",
                               "feeds matching the component's declared inputs",
                               "check input shapes against runner.input_metadata()") from None
        finally:
            with self._lock:
                if not self._closed:
                    self._idle.append(request)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.clear()
            self._compiled = None


def create_runner(path, component_name: str, component: dict, **options) -> OpenVinoRunner:
    """A runner of one component (``options``: ``OvOptions`` fields; anything else is refused)."""
    from mmedge.backends import settings_from_options
    from mmedge.runtimes.openvino.core import import_openvino

    settings = settings_from_options("openvino", OvOptions, options)
    import_openvino()
    return OpenVinoRunner(path, component_name, component, settings)
