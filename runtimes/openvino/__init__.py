"""OpenVINO backend: every component of an artifact on an OpenVINO device (CPU first; GPU / NPU where OpenVINO
reports them), read straight from the artifact's ONNX graphs.

- ``create_runner(path, component_name, component, **options)``: an ``OpenVinoRunner`` (options: ``OvOptions``).
- ``create_decoder(artifact, embeddings, **options)``: the KV-cached decoder (``OpenVinoDecoder``), the same
  ``Decoder`` protocol the generation loop drives on ONNX Runtime; ``weights='int4'`` / ``'int8'`` compresses an FP32
  decoder's weights with NNCF at first load.
- Compiled models are cached in the artifact's ``engines/`` (``cache``), keyed by graph sha256, precision, device
  and OpenVINO version; on read-only or full storage they run uncached (one warning: each load compiles again).
  ``list_devices()`` answers ``mmedge doctor``.

OpenVINO is imported when a runner or decoder is made, never on import of this package; without it those raise
BackendUnavailableError naming ``pip install "mmedge[openvino]"``. Nothing here imports torch.
"""

from __future__ import annotations

from mmedge.runtimes.openvino.core import INSTALL, OvOptions, import_openvino
from mmedge.runtimes.openvino.devices import OvDevice, list_devices


def create_runner(path, component_name: str, component: dict, **options):
    """A runner of one component (``options``: ``OvOptions`` fields; anything else is refused)."""
    from mmedge.runtimes.openvino.runner import create_runner as runner

    return runner(path, component_name, component, **options)


def create_decoder(artifact, embeddings, **options):
    """The artifact's KV-cached decoder on OpenVINO (``options``: ``OvOptions`` fields; the compiled model is cached
    in the artifact's engines/ unless ``engine_cache`` says otherwise; uncached where engines/ cannot be written)."""
    from mmedge.backends import settings_from_options

    settings = settings_from_options("openvino", OvOptions, {"engine_cache": artifact.engines_path, **options})
    import_openvino()
    from mmedge.runtimes.openvino.decoder import OpenVinoDecoder

    return OpenVinoDecoder.for_artifact(artifact, embeddings, settings)


__all__ = ["INSTALL", "OvDevice", "OvOptions", "create_decoder", "create_runner", "import_openvino", "list_devices"]
