"""Which backends exist, where their code lives, what they need installed."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from mmedge.errors import BackendUnavailableError


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str | None  # None: named in the design, not shipped in this release
    package: str  # the import name of the engine it needs
    install: str  # how to get that engine


BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("onnxruntime", "mmedge.runtimes.onnxruntime", "onnxruntime",
                               "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)"),
    "tensorrt": BackendInfo("tensorrt", None, "tensorrt", "pip install 'mmedge[tensorrt]' (TensorRT 10.x; on Jetson it comes with JetPack)"),
    "torch": BackendInfo("torch", None, "torch", "pip install 'mmedge[torch]'"),
}


def _info(name: str) -> BackendInfo:
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend '{name}'",
            f"one of {', '.join(BACKENDS)} or 'auto'",
            "pass backend='auto' to let mmedge choose",
        )
    return BACKENDS[name]


def import_backend_module(name: str) -> ModuleType:
    """Import a backend's module, turning a missing engine into a BackendUnavailableError."""
    from mmedge import __version__

    info = _info(name)
    if info.module is None:
        raise BackendUnavailableError(
            f"backend '{name}' is not part of mmedge {__version__} yet",
            "a backend this release ships: onnxruntime",
            "use backend='onnxruntime' (its CUDA and TensorRT execution providers cover GPUs)",
        )
    try:
        return importlib.import_module(info.module)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == info.package:
            raise BackendUnavailableError(
                f"backend '{name}' needs the Python package '{info.package}', which is not installed",
                f"'{info.package}' importable",
                info.install,
            ) from None
        raise


def create_runner(name: str, path, component_name: str, component: dict, **options):
    """Create a runner for one component on the named backend."""
    return import_backend_module(name).create_runner(path, component_name, component, **options)
