"""Quantize graphs whose weights live in ``<name>.onnx.data`` without loading them all (BLIP-2 OPT-2.7B's
decoder: 10.6 GB of FP32 weights).

Why not ONNX Runtime's entry points as they are (onnxruntime 1.32, read in its source):

- ``quantize_dynamic`` / ``quantize_static`` start with ``load_model_with_shape_infer``, which runs shape
  inference on the file and then ``onnx.load``s it with every external weight;
- their quantizers read each weight with ``tensor_proto_to_array`` → ``onnx.numpy_helper.to_array``, which
  for an external tensor stores the bytes *inside the TensorProto* (``load_external_data_for_tensor``), so
  every FP32 weight stays resident beside its quantized copy until the graph is saved;
- ``MatMulNBitsQuantizer`` takes a ModelProto (or ``onnx.load``s the path, weights included) and reads
  weights with ``ir.from_proto(...).numpy()``, which needs the bytes in the proto;
- ``convert_float_to_float16`` converts only ``raw_data``: an external tensor would be relabelled FLOAT16
  while its file still holds FP32 bytes.

So mmedge runs those same quantizer classes (same arithmetic, same nodes, same names) on the graph *skeleton*
(``onnx.load(..., load_external_data=False)``: nodes and tensor headers, no weight bytes) and routes their
weight traffic through ``StreamedWeights``: a weight is read from the source ``.data`` file when the quantizer
asks for it (a fresh array, never kept in the proto), and every quantized tensor larger than ``SPILL_BYTES``
is appended to the new graph's ``.data`` file as soon as the quantizer adds it. At most one FP32 weight (plus
what the quantizer derives from it) is in memory at a time. Saving copies the untouched float tensors (biases,
norms) from the old ``.data`` file to the new one, one at a time.

The hooks replace module-level names in ``onnxruntime.quantization`` for the duration of one call
(``_routed``); ``tests/test_streaming_quantize.py`` compares every streamed recipe with the in-memory one on
the same graph, so a change in those internals shows up as a failing test, not as a wrong artifact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
from onnx import TensorProto, helper

from mmedge.export.streaming import ALIGNMENT, INLINE_BYTES

SPILL_BYTES = 64 * 1024  # quantized tensors above this go to the new .data file at once; smaller ones at save
COPY_CHUNK = 64 * 1024 * 1024  # bytes copied at a time from the old .data file to the new one


def _np_dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _external(tensor: TensorProto) -> dict[str, str] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def stored_array(tensor: TensorProto, folder: Path, *, mapped: bool = False) -> np.ndarray:
    """The value of ``tensor``: from the proto, or from its external data file in ``folder`` (read into a new array,
    or memory-mapped read-only when ``mapped``: nothing is loaded until it is used)."""
    info = _external(tensor)
    if info is None or tensor.raw_data:
        return onnx.numpy_helper.to_array(tensor)
    return _file_array(tensor, Path(folder) / info["location"], int(info.get("offset", 0)), mapped)


def _file_array(tensor: TensorProto, path: Path, offset: int, mapped: bool = False) -> np.ndarray:
    """``tensor``'s bytes at ``offset`` in ``path``, as an array of its dtype and shape (read, or memory-mapped)."""
    dtype, shape = _np_dtype(tensor), tuple(tensor.dims)
    if mapped:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    count = int(np.prod(shape, dtype=np.int64))
    return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)


class StreamedWeights:
    """Weight bytes of one graph rewrite: read from ``source``'s data file on demand, written to ``dest``'s.

    ``derive(name, ...)`` registers a tensor computed from another when first read (the transposed weight of a
    Gemm rewritten to MatMul), so even derived weights are made one at a time.
    """

    def __init__(self, source: Path, dest: Path):
        self.source_dir = Path(source).parent
        self.dest = Path(dest)
        self.data_name = self.dest.name + ".data"
        self._out = open(self.dest.parent / self.data_name, "wb")  # noqa: SIM115  closed by save/close/streamed
        self._derived: dict[str, Callable[[], np.ndarray]] = {}
        self._written: dict[str, tuple[int, int]] = {}  # tensor name -> (offset, length) in the new data file

    # --- reading -------------------------------------------------------------------------------------
    def deferred(self, tensor: TensorProto) -> bool:
        """Whether ``tensor``'s bytes are not in the proto (in a data file, or derived on demand)."""
        return tensor.name in self._derived or (_external(tensor) is not None and not tensor.raw_data)

    def read(self, tensor: TensorProto) -> np.ndarray:
        """The value of ``tensor`` as a new array; the proto is left as it is."""
        if tensor.name in self._derived:
            return self._derived[tensor.name]()
        if tensor.name in self._written and _external(tensor) is not None and not tensor.raw_data:
            self._out.flush()  # a tensor this rewrite already wrote: read it back from the new data file
            return _file_array(tensor, self.dest.parent / self.data_name, self._written[tensor.name][0])
        return stored_array(tensor, self.source_dir)

    def derive(self, name: str, like: TensorProto, dims: list[int],
               make: Callable[[np.ndarray], np.ndarray]) -> TensorProto:
        """A placeholder initializer ``name`` whose value is ``make(value of like)``, computed when read."""
        self._derived[name] = lambda: make(self.read(like))
        placeholder = TensorProto(name=name, dims=dims, data_type=like.data_type)
        placeholder.data_location = TensorProto.EXTERNAL  # no bytes here: consumers must ask ``read``
        placeholder.external_data.add(key="location", value="<derived>")
        return placeholder

    # --- writing -------------------------------------------------------------------------------------
    def _append(self, name: str, chunks) -> tuple[int, int]:
        self._out.write(b"\0" * (-self._out.tell() % ALIGNMENT))
        start = self._out.tell()
        for chunk in chunks:
            self._out.write(chunk)
        self._written[name] = (start, self._out.tell() - start)
        return self._written[name]

    def _point(self, tensor: TensorProto, offset: int, length: int) -> None:
        tensor.ClearField("raw_data")
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)

    def spill(self, tensor: TensorProto, threshold: int = SPILL_BYTES) -> None:
        """Move ``tensor``'s in-proto bytes to the new data file when they pass ``threshold``."""
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
            self._point(tensor, *self._append(tensor.name, [tensor.raw_data]))
        elif not tensor.HasField("raw_data") and tensor.data_location != TensorProto.EXTERNAL:
            size = _typed_bytes(tensor)
            if size is not None and len(size) >= threshold:
                self._point(tensor, *self._append(tensor.name, [size]))

    def _copy_external(self, tensor: TensorProto) -> None:
        if tensor.name in self._written:  # already in the new file (a spilled quantized tensor)
            self._point(tensor, *self._written[tensor.name])
            return
        if tensor.name in self._derived:
            value = np.ascontiguousarray(self.read(tensor))
            self._point(tensor, *self._append(tensor.name, [memoryview(value).cast("B")]))
            return
        info = _external(tensor)
        path, offset = self.source_dir / info["location"], int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else _np_dtype(tensor).itemsize * int(np.prod(tensor.dims))

        def chunks():
            with open(path, "rb") as handle:
                handle.seek(offset)
                left = length
                while left:
                    chunk = handle.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path} ends before tensor '{tensor.name}' does")
                    left -= len(chunk)
                    yield chunk

        self._point(tensor, *self._append(tensor.name, chunks()))

    def save(self, model: onnx.ModelProto, dest: Path | None = None) -> Path:
        """Write every weight of ``model`` to the new data file (copied, derived or spilled), then the graph."""
        dest = Path(dest or self.dest)
        for tensor in _all_initializers(model.graph):
            if self.deferred(tensor):
                self._copy_external(tensor)
            else:
                self.spill(tensor, INLINE_BYTES)
        self._out.close()
        data = dest.parent / self.data_name
        if data.stat().st_size == 0:
            data.unlink()
        onnx.save(model, str(dest))
        return dest

    def close(self) -> None:
        if not self._out.closed:
            self._out.close()


def _typed_bytes(tensor: TensorProto) -> bytes | None:
    """float_data/int32_data/... of a tensor as raw bytes (quantizers sometimes build tensors that way)."""
    if tensor.data_type == TensorProto.STRING:
        return None
    return np.ascontiguousarray(onnx.numpy_helper.to_array(tensor)).tobytes()


def _all_initializers(graph) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_initializers(sub)


def load_skeleton(source: Path) -> onnx.ModelProto:
    """The graph without its external weight bytes (nodes, shapes, tensor headers): a few MB for a 10 GB graph."""
    return onnx.load(str(source), load_external_data=False)


@contextlib.contextmanager
def streamed(source: Path, dest: Path) -> Iterator[StreamedWeights]:
    """A ``StreamedWeights`` for one rewrite; on failure the half-written ``dest`` files are removed."""
    weights = StreamedWeights(source, dest)
    try:
        yield weights
    except BaseException:
        weights.close()
        for path in (Path(dest), Path(dest).parent / weights.data_name):
            path.unlink(missing_ok=True)
        raise
    weights.close()


# --- ONNX Runtime's quantizers, weights routed through StreamedWeights -----------------------------------
@contextlib.contextmanager
def _routed(weights: StreamedWeights) -> Iterator[None]:
    """Point ``tensor_proto_to_array`` (how ORT's INT8 quantizers read weights) at ``weights.read``."""
    from onnxruntime.quantization import base_quantizer, onnx_quantizer, qdq_quantizer, quant_utils

    original = quant_utils.tensor_proto_to_array

    def read(initializer):
        if weights.deferred(initializer) and initializer.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return weights.read(initializer)
        return original(initializer)  # in-proto bytes, or ORT's own error for a non-float weight

    with contextlib.ExitStack() as stack:
        for module in (base_quantizer, onnx_quantizer, qdq_quantizer, quant_utils):
            stack.enter_context(mock.patch.object(module, "tensor_proto_to_array", read))
        # Dynamic mode rewrites Gemm(transB=1) as MatMul over a transposed copy of the weight, then reloads the
        # graph to re-infer shapes (saving it with every weight): both made lazy / skeleton-only here.
        stack.enter_context(mock.patch.object(onnx_quantizer, "save_and_reload_model_with_shape_infer", _inferred))
        stack.enter_context(_lazy_transposes(weights))
        yield


@contextlib.contextmanager
def _spilling(weights: StreamedWeights, onnx_model) -> Iterator[None]:
    """Make ``onnx_model.add_initializer`` / ``initializer_extend`` (how ORT's quantizers add quantized weights) move
    each large new tensor to the new data file *before* the graph copies it: bytes copied into the model's protobuf
    arena stay there until the whole model is freed, even once the field is cleared."""
    add, extend = onnx_model.add_initializer, onnx_model.initializer_extend

    def add_and_spill(tensor):
        weights.spill(tensor)
        add(tensor)

    def extend_and_spill(tensors):
        for tensor in tensors:
            weights.spill(tensor)
        extend(tensors)

    with mock.patch.object(onnx_model, "add_initializer", add_and_spill), \
            mock.patch.object(onnx_model, "initializer_extend", extend_and_spill):
        yield


class _Lazy:
    """Stands for an external weight (or its transpose) where ORT's Gemm rewrite calls ``to_array(B).T``."""

    def __init__(self, tensor: TensorProto, transposed: bool = False):
        self.tensor, self.transposed = tensor, transposed

    @property
    def T(self) -> _Lazy:  # numpy's name for the transpose
        return _Lazy(self.tensor, not self.transposed)


@contextlib.contextmanager
def _lazy_transposes(weights: StreamedWeights) -> Iterator[None]:
    """During ``ONNXModel.replace_gemm_with_matmul``, ``from_array(to_array(B).T, name)`` of an external ``B`` makes
    a derived placeholder (``np.ascontiguousarray(B.T)`` when read: the bytes ``from_array`` would have stored)."""
    from onnx import numpy_helper
    from onnxruntime.quantization import onnx_model

    class Helper:
        @staticmethod
        def to_array(tensor, *args, **kwargs):
            if weights.deferred(tensor):
                return _Lazy(tensor)
            return numpy_helper.to_array(tensor, *args, **kwargs)

        @staticmethod
        def from_array(array, name=None):
            if isinstance(array, _Lazy):
                dims = list(array.tensor.dims)[::-1] if array.transposed else list(array.tensor.dims)
                make = (lambda a: np.ascontiguousarray(a.T)) if array.transposed else (lambda a: a)
                return weights.derive(name, array.tensor, dims, make)
            return numpy_helper.from_array(array, name)

    original = onnx_model.ONNXModel.replace_gemm_with_matmul

    def replace(self, *args, **kwargs):
        with mock.patch.object(onnx_model, "onnx_numpy_helper", Helper):
            return original(self, *args, **kwargs)

    with mock.patch.object(onnx_model.ONNXModel, "replace_gemm_with_matmul", replace):
        yield


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """``save_and_reload_model_with_shape_infer`` for a skeleton: ONNX shape inference in memory (no weight
    bytes to save), and the mark that tells ORT's quantizers it was done."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    inferred = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(inferred)
    return inferred


def _shape_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ``quant_pre_process(skip_optimization, skip_symbolic_shape)`` + ``load_model_with_shape_infer`` give
    a large graph (ONNX shape inference, both metadata marks), done on the skeleton in memory."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata, add_pre_process_metadata

    inferred = onnx.shape_inference.infer_shapes(model)
    add_pre_process_metadata(inferred)
    add_infer_metadata(inferred)
    return inferred


def int8_dynamic(source: Path, dest: Path, *, op_types, extra_options: dict) -> None:
    """``quantize_dynamic(per_channel, QInt8 weights, reduce_range)`` with streamed weights."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, update_opset_version

    with streamed(source, dest) as weights, _routed(weights):
        model = update_opset_version(_shape_inferred(load_skeleton(source)), QuantType.QInt8)
        quantizer = ONNXQuantizer(model, True, True, QuantizationMode.IntegerOps, False, QuantType.QInt8,
                                  QuantType.QUInt8, None, None, None, list(op_types), dict(extra_options))
        with _spilling(weights, quantizer.model):
            quantizer.quantize_model()
        quantizer.model.topological_sort()
        weights.save(quantizer.model.model)


def calibrate(prepared: Path, calibration, *, op_types, method, extra_options: dict):
    """Activation ranges as ``quantize_static`` computes them. The calibrator runs the FP32 graph in ONNX Runtime
    with every activation as an output: ORT's ``create_calibrator`` loads that graph whole (python side and
    session), which no streaming avoids, so a static export needs about twice the largest encoder graph."""
    import tempfile

    from onnxruntime.quantization.calibrate import create_calibrator

    keys = [("CalibTensorRangeSymmetric", "symmetric"), ("CalibMovingAverage", "moving_average"),
            ("CalibMovingAverageConstant", "averaging_constant"),
            ("CalibMaxIntermediateOutputs", "max_intermediate_outputs"), ("CalibPercentile", "percentile")]
    options = {key: extra_options[name] for name, key in keys if name in extra_options}
    with tempfile.TemporaryDirectory(dir=Path(prepared).parent) as tmp:
        calibrator = create_calibrator(Path(prepared), list(op_types),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, use_external_data_format=True, extra_options=options)
        calibrator.collect_data(calibration)
        ranges = calibrator.compute_data()
        del calibrator
    return ranges


def int8_static(source: Path, dest: Path, tensors_range, *, op_types, extra_options: dict) -> None:
    """The QDQ rewrite of ``quantize_static`` (per-channel, QInt8 both, reduce_range) with streamed weights,
    given the calibrated ``tensors_range``."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import update_opset_version

    with streamed(source, dest) as weights, _routed(weights):
        model = _shape_inferred(load_skeleton(source))
        model = update_opset_version(model, QuantType.QInt8, QuantType.QInt8, extra_options.get("TensorQuantOverrides"),
                                     extra_options.get("BlockSize", 0))
        quantizer = QDQQuantizer(model, True, True, QuantType.QInt8, QuantType.QInt8, tensors_range, None, None,
                                 list(op_types), dict(extra_options))
        with _spilling(weights, quantizer.model):
            quantizer.quantize_model()
        quantizer.model.topological_sort()
        weights.save(quantizer.model.model)


class _OneWeightAtATime:
    """Wraps MatMulNBits' node quantizer: the node's weight is read into a scratch graph of its own, quantized there,
    and the packed INT4 blocks it adds are written to the new data file before their headers join the model. Weight
    bytes never enter the model's protobuf arena (which keeps every byte ever set until the model is freed)."""

    def __init__(self, inner, weights: StreamedWeights):
        self.inner, self.weights = inner, weights

    def quantize(self, node, graph_stack):
        graph = graph_stack[-1]
        weight = next((t for t in graph.initializer if len(node.input) > 1 and t.name == node.input[1]), None)
        if weight is None or not self.weights.deferred(weight):
            return self.inner.quantize(node, graph_stack)
        scratch = onnx.GraphProto()
        value = np.ascontiguousarray(self.weights.read(weight))
        scratch.initializer.append(onnx.numpy_helper.from_array(value, weight.name))
        del value
        out = self.inner.quantize(node, [*graph_stack[:-1], scratch])
        for added in scratch.initializer[1:]:
            self.weights.spill(added)
            graph.initializer.append(added)  # a header: its bytes are in the data file
        return out


def matmul_nbits(model: onnx.ModelProto, weights: StreamedWeights, config, exclude=()) -> onnx.ModelProto:
    """``MatMulNBitsQuantizer(model, config, nodes_to_exclude=exclude).process()`` on a skeleton, one weight in memory
    at a time."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=list(exclude))
    quantizer.node_quantizer = _OneWeightAtATime(quantizer.node_quantizer, weights)
    quantizer.process()
    return quantizer.model.model


# --- FP16 ----------------------------------------------------------------------------------------------
def fp16(source: Path, dest: Path, protect: set[str] | None = None, indices: bool = False) -> list[str]:
    """``convert_float_to_float16(keep_io_types=True)`` with each FP32 weight read, halved and written in turn; the
    nodes touching a tensor in ``protect`` (``fp16_ranges``: activations outside FP16's range, weights it cannot hold)
    and, with ``indices``, the index arithmetic (``fp16_ranges.index_math``) stay FP32 (their names are returned), and
    so do the weights only they read (copied as they are)."""
    from onnxruntime.transformers import float16

    from mmedge.export.fp16_ranges import nodes_to_keep_fp32, skip_cast_round_trips

    convert_tensor = float16.convert_tensor_float_to_float16

    with streamed(source, dest) as weights:
        def convert(tensor, *args, **kwargs):
            if weights.deferred(tensor) and tensor.data_type == TensorProto.FLOAT:
                # converted in a standalone copy, written, and only its header copied back: the model's protobuf
                # arena would keep the bytes of every weight ever set in it
                single = onnx.numpy_helper.from_array(np.ascontiguousarray(weights.read(tensor)), tensor.name)
                convert_tensor(single, *args, **kwargs)
                weights.spill(single, INLINE_BYTES)
                tensor.CopyFrom(single)
                return tensor
            return convert_tensor(tensor, *args, **kwargs)

        def value_info(tensor):  # the original reads the whole array just for its shape
            return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))

        model = load_skeleton(source)
        kept = nodes_to_keep_fp32(model, protect or set(), indices=indices)
        with mock.patch.object(float16, "convert_tensor_float_to_float16", convert), \
                mock.patch.object(float16, "make_value_info_from_tensor", value_info):
            model = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
        if kept:
            skip_cast_round_trips(model)
        weights.save(model)
    return kept
