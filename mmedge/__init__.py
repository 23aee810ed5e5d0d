"""mmedge: run multimodal models (CLIP, BLIP-2, Flamingo-style) on edge devices.

The device side: ``mmedge.load(artifact_folder)`` returns a pipeline. This package never imports
torch; the host-side exporter is ``mmedge.export`` (``pip install "mmedge[export]"``).
"""

from typing import TYPE_CHECKING

from mmedge.errors import MmedgeError, MmedgeWarning

__version__ = "0.2.0"

if TYPE_CHECKING:
    from mmedge.api import load


def __getattr__(name: str):
    """``mmedge.load`` and the submodules, imported on first use: ``import mmedge`` stays light (the ``mmedge``
    command imports the pipelines only once it has parsed its arguments and can answer Ctrl-C in one line)."""
    import importlib

    if name == "load":
        return importlib.import_module("mmedge.api").load
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"load"})


__all__ = ["__version__", "load", "MmedgeError", "MmedgeWarning"]
