"""mmedge: run multimodal models (CLIP, BLIP-2, Flamingo-style) on edge devices.

The device side: ``mmedge.load(artifact_folder)`` returns a pipeline. This package never imports
torch; the host-side exporter is ``mmedge.export`` (``pip install "mmedge[export]"``).
"""

__version__ = "0.2.0"

from mmedge.api import load  # noqa: E402
from mmedge.errors import MmedgeError, MmedgeWarning  # noqa: E402

__all__ = ["__version__", "load", "MmedgeError", "MmedgeWarning"]
