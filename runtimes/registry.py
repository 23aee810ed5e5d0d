"""Which backends exist, in priority order, where their plug-ins live and what they need installed.

How a backend plugs in (the contract is ``mmedge.backends.Backend``):

1. Write ``runtimes/plugins/<name>.py`` (installed as ``mmedge.runtimes.plugins.<name>``) defining ``BACKEND``, an
   instance of a ``Backend`` subclass: ``unusable`` (why ``auto`` cannot use it here, from the device probe alone),
   ``plan_components`` (which components it takes and with which settings; named explicitly it takes all of them
   or raises BackendUnavailableError), ``open_runner`` (and ``open_decoder`` if it runs the KV-cached decoder), and
   ``settings``, the dataclass ``backend_options[<name>]`` is checked against. The plug-in module must import
   without its engine: import the engine (and the runner module) inside ``open_runner``.
2. Put the runner itself in ``runtimes/<name>.py``: a ``mmedge.runner.Runner`` subclass whose
   ``create_runner(path, component_name, component, **options)`` refuses unknown options
   (``mmedge.backends.refuse_unknown_options``).
3. Add its row to ``BACKENDS`` below with its ``priority`` (``auto`` asks the backends lowest first; ONNX Runtime,
   last, takes whatever is left), and its case to ``tests/test_conformance.py``'s ``CASES``.

Nothing in the core (``mmedge.selection``, ``mmedge.api``, ``mmedge.validate``, the pipelines) names a backend module;
``mmedge doctor`` prints what each plug-in says (``device_lines``, ``artifact_lines``). ``mmedge build`` is TensorRT's
own
command and imports it by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmedge.backends import Backend, BackendInfo
from mmedge.errors import InputError

# auto asks the backends in ``priority`` order (lowest first); ONNX Runtime, last, takes every component left
BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("onnxruntime", "mmedge.runtimes.plugins.onnxruntime", "onnxruntime",
                               "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)",
                               priority=100),
    "tensorrt": BackendInfo("tensorrt", "mmedge.runtimes.plugins.tensorrt", "tensorrt",
                            'pip install "mmedge[tensorrt]" (TensorRT 10.x and cuda-python); on a Jetson '
                            'TensorRT comes '
                            "with JetPack: sudo apt install python3-libnvinfer, then pip install cuda-python",
                            also_needs=(("cuda-python", "cuda"),), priority=10),
    "torch": BackendInfo("torch", "mmedge.runtimes.plugins.torch", "torch",
                         'pip install "mmedge[torch]" (torch and transformers; add bitsandbytes for INT8/NF4 '
                         'LLM weights)',
                         also_needs=(("transformers", "transformers"),), priority=20),
    "openvino": BackendInfo("openvino", "mmedge.runtimes.plugins.openvino", "openvino",
                            'pip install "mmedge[openvino]" (OpenVINO and NNCF)', priority=50),
}

def backend_names() -> list[str]:
    """What ``--backend`` takes: "auto" and every backend mmedge knows, installed or not."""
    return ["auto", *sorted(BACKENDS)]


def _info(name: str) -> BackendInfo:
    if name not in BACKENDS:  # no such backend at all: bad input, not an absent one
        raise InputError(
            f"unknown backend '{name}'",
            f"one of {', '.join(BACKENDS)} or 'auto'",
            "pass backend='auto' to let mmedge choose",
        )
    return BACKENDS[name]


def backend(name: str) -> Backend:
    """The named backend's plug-in (its module imports without the engine)."""
    return importlib.import_module(_info(name).plugin).BACKEND


def backends() -> list[Backend]:
    """Every backend's plug-in, in priority order."""
    return [backend(info.name) for info in sorted(BACKENDS.values(), key=lambda info: info.priority)]


def import_backend_module(name: str) -> ModuleType:
    """Import a backend's runner module, turning a missing engine into a BackendUnavailableError."""
    return backend(name).import_runner_module()


def require_installed(name: str, engines: dict) -> None:
    """BackendUnavailableError naming what is missing and the install command, judged from a device probe's
    ``engines`` (distribution name -> version or None): nothing is imported."""
    backend(name).require_installed(engines)


def create_runner(name: str, path, component_name: str, component: dict, **options):
    """Create a runner for one component on the named backend (its runner module's ``create_runner``)."""
    return import_backend_module(name).create_runner(path, component_name, component, **options)
