"""One component's graph compiled by OpenVINO, through the ``engines/`` cache.

OpenVINO reads the artifact's ONNX graph directly (its ONNX front end; the com.microsoft ops mmedge writes,
MatMulNBits, QDQ and dynamic INT8, included). With ``OvOptions.weights`` the decoder's FP32 weights are compressed by
NNCF (``compress_weights``) before compiling; the compiled model is cached, so NNCF runs once per device. An artifact
exported with ``--openvino-weights`` carries the compressed model already (``components.decoder.openvino``, an
OpenVINO IR with its measured parity): that one is read instead, and NNCF does not run on the device.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import time
from pathlib import Path

from mmedge.errors import BackendError, BackendUnavailableError, InputError
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


def labelled_graph(label: str) -> str | None:
    """The graph's own precision in a ``precision_label`` whose weights NNCF compresses ("int4" of "int4+nncf-int8"),
    or None where the label names no NNCF weights."""
    graph, nncf, _ = label.partition("+nncf-")
    return graph if nncf else None


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
    """The key of the component's compiled model. ``exported``: the graph compiled is the export's OpenVINO IR for
    ``options.weights`` (its .xml and .bin sha256 from the manifest are in the key); NNCF run here: its version and
    settings are."""
    from mmedge import __version__

    ir = (component.get("openvino") or {}).get(options.weights) or {} if exported else {}
    return OvKey(onnx_sha256=str(component.get("sha256") or ""),
                 external_data_sha256=str((component.get("external_data") or {}).get("sha256") or ""),
                 precision=precision_label(component, options.weights, exported), device=options.device,
                 device_full_name=device_name(options.device), openvino_version=import_openvino().get_version(),
                 mmedge_version=__version__, inference_precision=str(options.compile_config().get(
                     "INFERENCE_PRECISION_HINT", "default")),
                 ir_sha256=f"{ir['sha256']}+{ir['weights_file']['sha256']}" if ir else "",
                 compression=weights_record(options.weights) if options.weights and not exported else {})


def require_available(device: str) -> None:
    """A device OpenVINO does not find here is refused as unavailable (compiling for it failed with a bare
    "Exception from src/inference/src/cpp/core.cpp" and read as a damaged graph)."""
    available = list(core().available_devices)  # CPU, GPU.0, NPU, ...
    if device in available or device in {name.split(".")[0] for name in available}:
        return
    raise BackendUnavailableError(f"OpenVINO finds no '{device}' device here", f"one of {', '.join(available)}",
                                  "leave the device unset for the CPU, or install that device's driver (`mmedge "
                                  "doctor` lists the devices OpenVINO finds)")


def compiled_model(path: str | os.PathLike, component_name: str, component: dict, options: OvOptions,
                   exported: bool = False):
    """(``openvino.CompiledModel``, where it came from: "cache", "compiled" or "compiled, cached as NAME").
    ``exported``: ``path`` is the IR the export compressed with ``options.weights`` (no NNCF here)."""
    require_available(options.device)
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
    start = time.perf_counter()  # what an uncached load costs: reading, any NNCF compression, compiling
    model = read_model(path, component_name)
    if options.weights and not exported:
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bar: stdout is the caller's (--json, pipes)
            model = compress_weights(model, component_name, component, options.weights)
    try:
        compiled = core().compile_model(model, options.device, config)
    except Exception as exc:
        raise refused(f"OpenVINO could not compile component '{component_name}' for {options.device} "
                      f"({type(exc).__name__}: {engine_detail(exc)})") from None
    seconds = time.perf_counter() - start
    source = f"compiled in {seconds:.1f} s"
    if cache is not None and _can_export(options.device):
        stream = io.BytesIO()
        compiled.export_model(stream)
        extra = {"inference_precision": inference_precision(compiled),
                 **({"weights": weights_record(options.weights)} if options.weights else {})}
        try:
            stored = cache.store(component_name, key, stream.getvalue(), extra)
            source += f", cached as {Path(stored).name}"
        except OSError as exc:  # read-only or full storage: the cache is optional, the model runs all the same
            _warn_uncached(cache.folder, component_name, exc, seconds)
            source += ", not cached"
    return compiled, source


_warned: set[str] = set()  # engines/ folders whose failed cache write was reported, once per process


def _warn_uncached(folder: Path, component_name: str, exc: OSError, seconds: float) -> None:
    if str(folder) in _warned:
        return
    _warned.add(str(folder))
    log.warning("mmedge: cannot cache OpenVINO's compiled %s in '%s' (%s): each load compiles it again (%.1f s "
                "here); make the folder writable, or free space, to cache it", component_name, folder,
                exc.strerror or exc, seconds)


@functools.lru_cache(maxsize=8)
def planned_inference_precision(device: str, precision_hint: str | None) -> str | None:
    """The inference precision OpenVINO compiles at on ``device`` under ``precision_hint``, asked by compiling a
    one-node model (milliseconds), or None where it cannot tell (the device or OpenVINO absent: loading says why)."""
    options = OvOptions(device=device, precision_hint=precision_hint)  # a bad value is refused here
    try:
        ov = import_openvino()
        parameter = ov.opset13.parameter([1], ov.Type.f32)
        probe = ov.Model([ov.opset13.relu(parameter)], [parameter])
        return inference_precision(core().compile_model(probe, device, options.compile_config()))
    except Exception:
        return None


def inference_precision(compiled) -> str | None:
    """The precision the compiled model runs at, as OpenVINO reports it (``f32``, ``bf16``, ``f16``; a CPU without
    FP16 runs an ``f16`` hint as ``bf16``), or None where the device does not report it."""
    try:
        return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    except Exception:
        return None


def read_model(path: str | os.PathLike, component_name: str):
    """The graph as OpenVINO reads it. The file's sha256 was checked against the manifest: a graph OpenVINO cannot
    read (an operator its ONNX front end lacks) is refused by OpenVINO, not a damaged artifact."""
    reader = core()  # openvino missing: BackendUnavailableError naming the install command, not a refused graph
    try:
        return reader.read_model(str(path))
    except Exception as exc:
        raise refused(f"OpenVINO could not read component '{component_name}' from '{Path(path).name}' "
                      f"({type(exc).__name__}: {engine_detail(exc)})") from None


def refused(what: str) -> BackendError:
    """The error for a graph OpenVINO cannot read or compile here (``what``: which, and OpenVINO's words)."""
    return BackendError(what, "a graph OpenVINO supports on this device", "use --backend onnxruntime for this "
                        "artifact (auto runs such a component on ONNX Runtime by itself), or another OpenVINO device")


def compress_weights(model, component_name: str, component: dict, weights: str):
    """The model with its MatMul weights compressed by NNCF (``WEIGHT_MODES[weights]``); the graph must be FP32."""
    if component.get("precision") != "fp32":
        raise InputError(f"OpenVINO weight compression '{weights}' was asked for component '{component_name}', whose "
                         f"graph is already {component.get('precision')}", "an FP32 decoder graph (NNCF compresses its "
                         "weights itself)", "load the FP32 export with weights='int4', or leave weights unset to run "
                         "this graph as it is")
    nncf = import_optional("nncf")  # OpenVINO's weight compression
    nncf.set_log_level(logging.WARNING)  # its tables: mmedge logs its own line below (its progress bar stays)
    start = time.perf_counter()
    log.info("mmedge: NNCF compresses %s's weights to %s (once per device; the compiled model is cached)",
             component_name, weights)
    arguments = nncf_arguments(weights)
    compressed = nncf.compress_weights(model, **{**arguments, "mode": nncf.CompressWeightsMode(arguments["mode"])})
    log.info("mmedge: weights compressed in %.1f s", time.perf_counter() - start)
    return compressed


def nncf_arguments(weights: str) -> dict:
    """``nncf.compress_weights``' arguments for ``weights`` (the mode by name)."""
    mode, group = WEIGHT_MODES[weights]
    return {"mode": mode, **({"group_size": group, "ratio": 1.0, "all_layers": True} if group else {})}


def weights_record(weights: str) -> dict:
    """How NNCF compresses the weights (method, its arguments, NNCF version): for cache keys, records, manifests."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        nncf_version = version("nncf")
    except PackageNotFoundError:  # compressing then names the install command
        nncf_version = "not installed"
    return {"method": "nncf.compress_weights", "group_size": None, **nncf_arguments(weights),
            "nncf_version": nncf_version}


def _can_export(device: str) -> bool:
    try:
        return "EXPORT_IMPORT" in [str(c) for c in core().get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return False


DETAIL_CHARS = 400


def engine_detail(exc: Exception) -> str:
    """OpenVINO's exception in one line: its meaningful lines (the failed check and what it says), without the
    "Exception from src/...cpp:N:" lines of the call stack that open each message, or "no detail"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith("Exception from ")] or lines
    text = " ".join(meaningful)
    return (text[:DETAIL_CHARS - 3] + "...") if len(text) > DETAIL_CHARS else text or "no detail"
