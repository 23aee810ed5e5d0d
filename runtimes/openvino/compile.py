"""One component's graph compiled by OpenVINO, through the ``engines/`` cache.

OpenVINO reads the artifact's ONNX graph directly (its ONNX front end; the com.microsoft ops mmedge writes,
MatMulNBits, QDQ and dynamic INT8, included). With ``OvOptions.weights`` the decoder's FP32 weights are compressed by
NNCF (``compress_weights``) before compiling; the compiled model is cached, so NNCF runs once per device. An artifact
exported with ``--openvino-weights`` carries the compressed model already (``components.decoder.openvino``, an
OpenVINO IR with its measured parity): that one is read instead, and NNCF does not run on the device.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

from mmedge.errors import BackendUnavailableError, InputError, IntegrityError
from mmedge.runtimes.openvino.cache import BlobCache, OvKey
from mmedge.runtimes.openvino.core import (
    WEIGHT_MODES,
    OvOptions,
    core,
    device_name,
    import_openvino,
    import_optional,
)

log = logging.getLogger("mmedge")


def precision_label(component: dict, weights: str | None, exported: bool = False) -> str:
    """The precision a compiled model runs at: the graph's, and any weights NNCF compressed (at export or here)."""
    graph = str(component.get("precision") or "fp32")
    return f"{graph}+nncf-{weights}{'-exported' if exported else ''}" if weights else graph


def exported_weights(artifact, component_name: str, weights: str | None) -> Path | None:
    """The OpenVINO IR (``.xml``; its ``.bin`` beside it) with ``weights`` that the export wrote for the component,
    both files checked against their sha256, or None when the artifact has none."""
    entry = (artifact.component(component_name).get("openvino") or {}).get(weights) if weights else None
    if entry is None:
        return None
    where = f"components.{component_name}.openvino.{weights}"
    artifact.verified_path(entry["weights_file"]["file"], entry["weights_file"]["sha256"], where + ".weights_file")
    return artifact.verified_path(entry["file"], entry["sha256"], where + ".file")


def cache_key(component: dict, options: OvOptions, exported: bool = False) -> OvKey:
    from mmedge import __version__

    return OvKey(onnx_sha256=str(component.get("sha256") or ""),
                 external_data_sha256=str((component.get("external_data") or {}).get("sha256") or ""),
                 precision=precision_label(component, options.weights, exported), device=options.device,
                 device_full_name=device_name(options.device), openvino_version=import_openvino().get_version(),
                 mmedge_version=__version__, inference_precision=str(options.compile_config().get(
                     "INFERENCE_PRECISION_HINT", "default")))


def _require_available(device: str) -> None:
    """A device OpenVINO does not find here is refused as unavailable (compiling for it failed with a bare
    "Exception from src/inference/src/cpp/core.cpp" and read as a damaged graph)."""
    available = list(core().available_devices)  # CPU, GPU.0, NPU, ...
    if device in available or device in {name.split(".")[0] for name in available}:
        return
    raise BackendUnavailableError(f"OpenVINO finds no '{device}' device here", f"one of {', '.join(available)}",
                                  "pass device='CPU', or install that device's driver (`mmedge doctor` lists the "
                                  "devices OpenVINO finds)")


def compiled_model(path: str | os.PathLike, component_name: str, component: dict, options: OvOptions,
                   exported: bool = False):
    """(``openvino.CompiledModel``, where it came from: "cache", "compiled" or "compiled, cached as NAME").
    ``exported``: ``path`` is the IR the export compressed with ``options.weights`` (no NNCF here)."""
    _require_available(options.device)
    config = options.compile_config()
    cache = BlobCache(options.engine_cache) if options.engine_cache is not None else None
    key = cache_key(component, options, exported) if cache is not None else None
    if cache is not None:
        blob, reasons = cache.load(component_name, key)
        if blob is not None:
            try:
                return core().import_model(blob, options.device, config), "cache"
            except Exception as exc:  # a blob this OpenVINO cannot read back: compile again
                log.info("mmedge: OpenVINO could not import the cached %s (%s): compiling again", component_name, exc)
        elif reasons:
            log.info("mmedge: OpenVINO recompiles %s: %s", component_name, "; ".join(reasons))
    model = read_model(path, component_name)
    if options.weights and not exported:
        model = compress_weights(model, component_name, component, options.weights)
    start = time.perf_counter()
    try:
        compiled = core().compile_model(model, options.device, config)
    except Exception as exc:
        raise IntegrityError(f"OpenVINO could not compile component '{component_name}' for {options.device} "
                             f"({type(exc).__name__}: {_first_line(exc)})",
                             "a graph OpenVINO supports on this device", "use --backend onnxruntime for this artifact, "
                             "or another OpenVINO device") from None
    source = f"compiled in {time.perf_counter() - start:.1f} s"
    if cache is not None and _can_export(options.device):
        stream = io.BytesIO()
        compiled.export_model(stream)
        stored = cache.store(component_name, key, stream.getvalue(),
                             {"weights": weights_record(options.weights)} if options.weights else None)
        source += f", cached as {Path(stored).name}"
    return compiled, source


def read_model(path: str | os.PathLike, component_name: str):
    try:
        return core().read_model(str(path))
    except Exception as exc:
        raise IntegrityError(f"OpenVINO could not read component '{component_name}' from '{Path(path).name}' "
                             f"({type(exc).__name__}: {_first_line(exc)})", "a valid ONNX graph as written by "
                             "`mmedge export`", "re-export the artifact or copy the file again") from None


def compress_weights(model, component_name: str, component: dict, weights: str):
    """The model with its MatMul weights compressed by NNCF (``WEIGHT_MODES[weights]``); the graph must be FP32."""
    if component.get("precision") != "fp32":
        raise InputError(f"OpenVINO weight compression '{weights}' was asked for component '{component_name}', whose "
                         f"graph is already {component.get('precision')}", "an FP32 decoder graph (NNCF compresses its "
                         "weights itself)", "load the FP32 export with weights='int4', or leave weights unset to run "
                         "this graph as it is")
    nncf = import_optional("nncf")  # OpenVINO's weight compression
    nncf.set_log_level(logging.WARNING)  # its tables and progress bars: mmedge logs its own line below
    mode, group = WEIGHT_MODES[weights]
    start = time.perf_counter()
    log.info("mmedge: NNCF compresses %s's weights to %s (once per device; the compiled model is cached)",
             component_name, weights)
    arguments = {"mode": nncf.CompressWeightsMode(mode)}
    if group:
        arguments.update(group_size=group, ratio=1.0, all_layers=True)
    compressed = nncf.compress_weights(model, **arguments)
    log.info("mmedge: weights compressed in %.1f s", time.perf_counter() - start)
    return compressed


def weights_record(weights: str) -> dict:
    """How NNCF compressed the weights (method, mode, group size, NNCF version): for records and manifests."""
    mode, group = WEIGHT_MODES[weights]
    from importlib.metadata import version

    return {"method": "nncf.compress_weights", "mode": mode, "group_size": group, "nncf_version": version("nncf")}


def _can_export(device: str) -> bool:
    try:
        return "EXPORT_IMPORT" in [str(c) for c in core().get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return False


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else "no detail"
