"""Which backends exist, where their code lives, what they need installed."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from mmedge.errors import BackendUnavailableError, InputError


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str | None  # None: named in the design, not shipped in this release
    package: str  # the import name of the engine it needs
    install: str  # how to get that engine
    also_needs: tuple[tuple[str, str], ...] = ()  # (distribution, import name) of other packages it needs


BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("onnxruntime", "mmedge.runtimes.onnxruntime", "onnxruntime",
                               "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)"),
    "tensorrt": BackendInfo("tensorrt", "mmedge.runtimes.tensorrt", "tensorrt",
                            'pip install "mmedge[tensorrt]" (TensorRT 10.x and cuda-python); on a Jetson TensorRT comes '
                            "with JetPack: sudo apt install python3-libnvinfer, then pip install cuda-python",
                            also_needs=(("cuda-python", "cuda"),)),
    "torch": BackendInfo("torch", "mmedge.runtimes.torch_backend", "torch",
                         'pip install "mmedge[torch]" (torch and transformers; add bitsandbytes for INT8/NF4 LLM weights)',
                         also_needs=(("transformers", "transformers"),)),
    "openvino": BackendInfo("openvino", "mmedge.runtimes.openvino", "openvino",
                            'pip install "mmedge[openvino]" (OpenVINO and NNCF)'),
}


def _info(name: str) -> BackendInfo:
    if name not in BACKENDS:  # no such backend at all: bad input, not an absent one
        raise InputError(
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


def require_installed(name: str, engines: dict) -> None:
    """BackendUnavailableError naming what is missing and the install command, judged from a device probe's
    ``engines`` (distribution name -> version or None): nothing is imported."""
    info = _info(name)
    needed = [(info.package, info.package), *info.also_needs]
    missing = [dist for dist, _ in needed if not engines.get(dist)]
    if missing:
        raise BackendUnavailableError(
            f"backend '{name}' needs the Python package{'s' if len(missing) > 1 else ''} "
            f"{' and '.join(repr(m) for m in missing)}, which {'are' if len(missing) > 1 else 'is'} not installed",
            " and ".join(f"'{dist}' importable as '{module}'" for dist, module in needed if dist in missing),
            info.install,
        )


def create_runner(name: str, path, component_name: str, component: dict, **options):
    """Create a runner for one component on the named backend."""
    return import_backend_module(name).create_runner(path, component_name, component, **options)
