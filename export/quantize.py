"""Quantization: a separate step on ONNX graphs, never on PyTorch modules.

- ``int8-dynamic``: weights INT8 per channel, activations quantized at run time. The fastest INT8 on
  ONNX Runtime CPU (measured: ViT-B/32 15.8 ms vs 18.9 ms for the best static QDQ form), and needs
  no calibration. The patch-embedding Conv stays FP32: ONNX Runtime's ConvInteger is slower than the
  FP32 convolution it replaces (4.3 ms vs about 1 ms for ViT-B/32).
- ``int8-static-qdq``: weights and activations INT8, symmetric, per-channel weights, scales from
  calibration data, stored as QuantizeLinear/DequantizeLinear pairs: the form TensorRT's explicit
  quantization wants. ONNX Runtime CPU runs it too, but cannot fuse per-channel symmetric QDQ
  MatMuls and is slower than FP32 on it, so it is the GPU/TensorRT recipe, not the CPU one.
- ``fp16``: weights and math in float16, inputs and outputs kept float32.

Both INT8 recipes keep weights in 7 bits (``reduce_range``): x86 CPUs without VNNI (AVX2 only: AMD Zen 2/3, older
Xeons) multiply uint8 activations by int8 weights with ``vpmaddubsw``, whose int16 pair sums saturate at full 8-bit
range and wreck accuracy (measured on an AVX2 EPYC: the tiny test CLIP's text embeddings fell to cosine 0.87, the
demo CLIP's held-out top-1 agreement to 0.94). At 7 bits no pair sum can saturate (2 x 255 x 64 < 32767), so every
CPU, VNNI or not, and TensorRT compute the same integers: the fidelity an export records holds on any device.

Each returns the recipe that goes into the manifest under ``quantization``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mmedge.errors import CalibrationError, QuantizationError

# Ops whose weights carry almost all of a transformer's bytes and time.
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")
STATIC_OPS = ("MatMul", "Gemm", "Conv")
WEIGHTS = "int8 symmetric per-channel, 7-bit range (exact on CPUs without VNNI)"


@contextlib.contextmanager
def quiet():
    """onnxruntime.quantization logs per node and prints tips: keep the user's terminal readable without touching the
    application's own logging. Its module loggers are raised to ERROR; what it logs on the root logger itself
    (``logging.info``) is dropped by a filter that passes every other caller's record, and a NullHandler on the root
    while it runs keeps ``logging.info`` (and ``basicConfig`` at an import) from adding a handler there (a stderr
    handler had stayed for good: an application's ``basicConfig`` afterwards did nothing). Nested and concurrent
    uses share one guard, put in place by the first and taken away by the last. Its prints go to a buffer: stdout is
    the process's, so another thread's prints meanwhile are lost too (README: export in a process of its own where
    that matters)."""
    _enter_quiet()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        _leave_quiet()


_QUIET = {"users": 0, "level": logging.NOTSET, "guard": None, "filter": None}
_QUIET_LOCK = threading.Lock()


def _enter_quiet() -> None:
    with _QUIET_LOCK:
        _QUIET["users"] += 1
        if _QUIET["users"] > 1:
            return
        import onnxruntime

        root, ours = logging.getLogger(), logging.getLogger("onnxruntime")
        _QUIET.update(level=ours.level, guard=logging.NullHandler(),
                      filter=_FromPackage(Path(onnxruntime.__file__).parent))
        root.addHandler(_QUIET["guard"])
        root.addFilter(_QUIET["filter"])
        ours.setLevel(logging.ERROR)


def _leave_quiet() -> None:
    with _QUIET_LOCK:
        _QUIET["users"] -= 1
        if _QUIET["users"]:
            return
        root = logging.getLogger()
        logging.getLogger("onnxruntime").setLevel(_QUIET["level"])
        root.removeFilter(_QUIET["filter"])
        root.removeHandler(_QUIET["guard"])


class _FromPackage(logging.Filter):
    """Drops the records logged from the files of one package (below ERROR)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = os.path.join(str(folder), "")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(self.folder)


@contextlib.contextmanager
def _prepared(source: Path) -> Iterator[Path]:
    """ONNX Runtime's recommended pre-pass (shape inference, graph optimization) in a scratch file."""
    from onnxruntime.quantization import quant_pre_process

    from mmedge.export.onnx_export import external_data_path

    large = external_data_path(source) is not None
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with quiet():
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, skip_optimization=large,
                              save_as_external_data=large, all_tensors_to_one_file=True,
                              external_data_location="prepared.onnx.data")
        yield prepared


def _large(graph: Path) -> bool:
    from mmedge.export.onnx_export import EXTERNAL_DATA_THRESHOLD, external_data_path

    data = external_data_path(graph)
    return data is not None and data.stat().st_size > EXTERNAL_DATA_THRESHOLD // 4


def streams(source: Path) -> bool:
    """Whether ``source`` keeps its weights in ``.onnx.data``: then they are quantized one at a time
    (``mmedge.export.quantize_streaming``) instead of loading the whole graph."""
    from mmedge.export.onnx_export import external_data_path

    return external_data_path(Path(source)) is not None


def quantize_int8_dynamic(source: Path, dest: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mmedge.export import quantize_streaming

    try:
        if streams(source):
            with quiet():
                quantize_streaming.int8_dynamic(Path(source), Path(dest), op_types=DYNAMIC_OPS,
                                                extra_options={"MatMulConstBOnly": True})
        else:
            with _prepared(source) as prepared, quiet():
                quantize_dynamic(
                    prepared, dest, op_types_to_quantize=list(DYNAMIC_OPS), per_channel=True,
                    weight_type=QuantType.QInt8, reduce_range=True, extra_options={"MatMulConstBOnly": True},
                    use_external_data_format=_large(prepared),
                )
    except Exception as exc:
        raise QuantizationError(f"dynamic INT8 quantization of '{source.name}' failed ({exc})",
                                "a float32 ONNX graph", "export at --precision fp32 and report this") from exc
    return {"method": "int8-dynamic", "weights": WEIGHTS, "activations": "uint8 dynamic",
            "op_types": list(DYNAMIC_OPS)}


class _Reader:
    """onnxruntime CalibrationDataReader over an iterable of feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)
        self.count = 0

    def get_next(self):
        item = next(self._iter, None)
        if item is not None:
            self.count += 1
        return item

    def rewind(self):  # not needed by the one-pass calibrators used here
        raise QuantizationError("calibration data was asked for twice", "one pass", "report this")


def quantize_int8_static(source: Path, dest: Path, calibration: Iterable[dict[str, np.ndarray]], *,
                         method: str = "percentile", samples_note: str = "") -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise QuantizationError(f"unknown calibration method '{method}'", f"one of {', '.join(methods)}",
                                "pass --calibration-method minmax|percentile|entropy")
    from mmedge.export import quantize_streaming

    reader = _Reader(calibration)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.999,
             "CalibTensorRangeSymmetric": True}
    try:
        if streams(source):
            with quiet():
                ranges = quantize_streaming.calibrate(Path(source), reader, op_types=STATIC_OPS,
                                                      method=methods[method], extra_options=extra)
                quantize_streaming.int8_static(Path(source), Path(dest), ranges, op_types=STATIC_OPS,
                                               extra_options=extra)
        else:
            with _prepared(source) as prepared, quiet():
                quantize_static(
                    prepared, dest, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OPS),
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    reduce_range=True, calibrate_method=methods[method], extra_options=extra,
                )
    except CalibrationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"static INT8 quantization of '{source.name}' failed ({exc})",
                                "a float32 ONNX graph and calibration inputs matching it",
                                "check the calibration images, or use --quantization dynamic") from exc
    if reader.count == 0:
        raise CalibrationError("static INT8 quantization got no calibration samples", "at least one image",
                               "pass --calibration DIR with images, or leave it out to use the bundled set")
    return {"method": "int8-static-qdq", "format": "QDQ", "weights": WEIGHTS,
            "activations": "int8 symmetric per-tensor", "calibration": {"method": method, "samples": reader.count,
                                                                          "source": samples_note},
            "op_types": list(STATIC_OPS), "target": "TensorRT explicit quantization"}


def convert_fp16(source: Path, dest: Path, feeds: dict[str, np.ndarray] | None = None,
                 threads: int | None = None) -> dict:
    """FP16 weights and math, inputs and outputs float32. With ``feeds`` (the component's validation inputs), the
    nodes whose activations leave FP16's range on them, and those reading a weight FP16 cannot hold, stay FP32, and
    so does index arithmetic (``mmedge.export.fp16_ranges``); the recipe lists them under ``fp32_nodes``. Without:
    the naive conversion."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from mmedge.export import fp16_ranges, quantize_streaming

    over, checked, largest = ({}, 0, 0.0) if feeds is None else fp16_ranges.over_limit(Path(source), feeds, threads)
    small = {} if feeds is None else fp16_ranges.weights_fp16_cannot_hold(Path(source))
    protect = set(over) | set(small)
    try:
        if streams(source):
            with quiet():
                kept = quantize_streaming.fp16(Path(source), Path(dest), protect, indices=feeds is not None)
        else:
            model = onnx.load(str(source))
            kept = fp16_ranges.nodes_to_keep_fp32(model, protect, indices=feeds is not None)
            with quiet():
                graph = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
            if kept:
                fp16_ranges.skip_cast_round_trips(graph)
            onnx.save(graph, str(dest))
    except Exception as exc:
        raise QuantizationError(f"FP16 conversion of '{source.name}' failed ({exc})", "a float32 ONNX graph",
                                "export at --precision fp32 and report this") from exc
    recipe = {"method": "fp16", "io": "float32", "weights": "float16", "fp32_nodes": kept}
    if feeds is not None:
        recipe["range_check"] = {
            "inputs": "validation samples", "limit": fp16_ranges.FP16_SAFE_MAX, "activations_checked": checked,
            "activations_over": sum(v > fp16_ranges.FP16_SAFE_MAX or v != v for v in over.values()),
            "tiny": fp16_ranges.FP16_TINY, "activations_under": sum(v < fp16_ranges.FP16_TINY for v in over.values()),
            "largest_magnitude": largest,
            "rule": "nodes reading or writing an activation past the limit, or whose values are all below FP16's "
                    "smallest normal (tiny) but not all 0, stay FP32, and so do the float nodes computing integer "
                    "indices (upstream of a Cast to an integer type: e.g. T5's position buckets)"}
        recipe["weight_check"] = {
            "limit": fp16_ranges.WEIGHT_MAX_ERROR, "tensors_kept_fp32": len(small),
            "largest_change": max(small.values(), default=0.0),
            "rule": "nodes reading a weight whose FP16 conversion changes it by more than the limit (relative L2; "
                    "values below FP16's smallest subnormal are clamped up to it) stay FP32"}
    return recipe


def quantize_int4_weights(source: Path, dest: Path, *, block_size: int = 32, accuracy_level: int = 4,
                          head: str = "int8", symmetric: bool = False) -> dict:
    """INT4 weight-only (MatMulNBits) for decoder LLMs, the LM head at ``head``; see ``mmedge.export.int4``."""
    from mmedge.export.int4 import quantize_int4

    return quantize_int4(source, dest, block_size=block_size, accuracy_level=accuracy_level, head=head,
                         symmetric=symmetric)
