"""Which nodes of an FP32 graph must stay FP32 when the rest becomes FP16: those whose activations leave FP16's range.

FP16 holds magnitudes up to 65504. Random-weight ViT-g (BLIP-2's vision tower) and T5's feed-forward blocks produce
activations far past that; converted whole, such a graph computes inf, then NaN. The FP32 graph is run once on the
component's validation inputs with, for every float tensor, the largest magnitude it took appended as an extra scalar
output (``Abs → ReduceMax`` beside the tensor; the tensors themselves are not kept, so a 10 GB decoder needs no more
activation memory than a plain run). Every node that reads or writes a tensor past ``FP16_SAFE_MAX`` (or one whose
values are all below FP16's smallest normal, ``FP16_TINY``, but not all 0) is kept FP32 in the conversion
(``node_block_list``): the producer so that the value is computed, the consumers so that it is never cast down to
FP16 on the way in. The float arithmetic that ends in an integer (a ``Cast`` to an integer type: index computations
such as T5's relative-position buckets) stays FP32 as well, since FP16's rounding changes the index. The same for any
family's components: nothing here knows what the graph is.

Values at float32's own extremes (``|x| >= SENTINEL``: the ``-finfo(float32).max`` that attention masks add) are not
activations: the converter clamps them to FP16's largest value, which masks just as well, so they are not counted.

Weights too small for FP16 are the other half (``weights_fp16_cannot_hold``): the converter maps every magnitude below
FP16's smallest subnormal (6e-8) to that subnormal, so a layer initialised at ``initializer_range`` 1e-10 (BLIP-2
OPT-2.7B's published vision config, which random-weight exports use) would be multiplied by ~600. A weight whose FP16
version differs from it by more than ``WEIGHT_MAX_ERROR`` (relative L2 norm) stays FP32 with every node that reads it,
directly or through a shape-only op (Transpose, Reshape, ...). A trained checkpoint's weights (~1e-2) pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mmedge.export.quantize_streaming import stored_array

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_SAFE_MAX = FP16_MAX / 4  # headroom: inputs other than the validation samples may reach a little further
FP16_TINY = float(np.finfo(np.float16).tiny)  # 6.1e-5, the smallest normal: a tensor whose largest value is below
# it (and not 0) keeps at most 10 bits of its values in FP16, and below 6e-8 none: it stays FP32 as well
SENTINEL = 1e30  # masks' "minus infinity" in float32; the converter clamps it, and it still masks
ROWS = 4  # rows per ONNX Runtime call over a large graph (as the fidelity checks)
RANGE_SUFFIX = "/mmedge_fp16_range"
WEIGHT_MAX_ERROR = 1e-3  # relative L2 change of a weight by the FP16 conversion past which it stays FP32
WEIGHT_CHUNK = 1 << 22  # elements checked at a time (16 MB of float32), so a 500 MB LM head is never copied whole
SHAPE_ONLY_OPS = {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Expand"}


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's float32 activations (node outputs whose inferred type is float32), in node order."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    initializers = {t.name for t in model.graph.initializer}
    seen, names = set(), []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in seen and name not in initializers and types.get(name) == TensorProto.FLOAT:
                seen.add(name)
                names.append(name)
    for value in model.graph.input:  # the graph's own float inputs too (pixel values in, embeddings in)
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in seen:
            names.append(value.name)
    return names


def with_range_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """``model`` plus one scalar output per name: the largest ``|x|`` below ``SENTINEL`` the tensor took."""
    graph = model.graph
    zero = helper.make_tensor("mmedge_fp16_range/zero", TensorProto.FLOAT, [1], [0.0])
    sentinel = helper.make_tensor("mmedge_fp16_range/sentinel", TensorProto.FLOAT, [], [SENTINEL])
    flat = helper.make_tensor("mmedge_fp16_range/flat", TensorProto.INT64, [1], [-1])
    graph.initializer.extend([zero, sentinel, flat])
    for i, name in enumerate(names):
        base = f"mmedge_fp16_range/{i}"
        graph.node.extend([  # an empty tensor (a first step's past keys) reduces to 0 through the appended zero
            helper.make_node("Reshape", [name, flat.name], [f"{base}/flat"], name=f"{base}/Reshape"),
            helper.make_node("Concat", [f"{base}/flat", zero.name], [f"{base}/padded"], name=f"{base}/Concat", axis=0),
            helper.make_node("Abs", [f"{base}/padded"], [f"{base}/abs"], name=f"{base}/Abs"),
            helper.make_node("Less", [f"{base}/abs", sentinel.name], [f"{base}/finite"], name=f"{base}/Less"),
            helper.make_node("Where", [f"{base}/finite", f"{base}/abs", zero.name], [f"{base}/kept"],
                             name=f"{base}/Where"),
            helper.make_node("ReduceMax", [f"{base}/kept"], [name + RANGE_SUFFIX], name=f"{base}/ReduceMax",
                             keepdims=0),
        ])
        graph.output.append(helper.make_tensor_value_info(name + RANGE_SUFFIX, TensorProto.FLOAT, []))
    return model


def _chunks(feeds: dict[str, np.ndarray], rows: int) -> list[dict[str, np.ndarray]]:
    sizes = {v.shape[0] for v in feeds.values() if np.ndim(v)}
    total = sizes.pop() if len(sizes) == 1 else 0
    if total <= rows:
        return [feeds]
    return [{k: v[start:start + rows] for k, v in feeds.items()} for start in range(0, total, rows)]


def activation_ranges(source: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, float]:
    """Largest magnitude (below ``SENTINEL``) of every float32 activation of the graph ``source`` on ``feeds``.

    The augmented graph is written beside ``source`` as a skeleton that points at the same ``.onnx.data``: no weight
    is copied or loaded here beyond what ONNX Runtime's session maps."""
    from mmedge.export.onnx_export import OnnxSession, external_data_path

    source = Path(source)
    large = external_data_path(source) is not None
    model = onnx.load(str(source), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    names = float_tensors(model)
    model = with_range_outputs(model, names)
    ranges = dict.fromkeys(names, 0.0)
    # beside the source, so that its relative external-data location resolves: a skeleton of a few MB for a large
    # graph (weights stay in the source's .onnx.data), the whole graph for a small one
    augmented = source.parent / f".{source.stem}.fp16-ranges.onnx"
    try:
        onnx.save(model, str(augmented))
        del model
        session = OnnxSession(augmented, threads)
        for chunk in _chunks(feeds, ROWS if large else 1 << 30):
            out = session.run(chunk)
            for name in names:
                value = float(out[name + RANGE_SUFFIX])
                ranges[name] = max(ranges[name], value) if not np.isnan(value) else float("inf")
        del session
    finally:
        augmented.unlink(missing_ok=True)
    return ranges


def fp16_error(values: np.ndarray) -> float:
    """Relative L2 change of ``values`` (float32) by ONNX Runtime's FP16 conversion (its clamping included)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    flat = values.reshape(-1)
    change = norm = 0.0
    for start in range(0, flat.size, WEIGHT_CHUNK):
        part = np.asarray(flat[start:start + WEIGHT_CHUNK], dtype=np.float32)
        part = part[np.isfinite(part)]
        change += float(np.sum(np.square(convert_np_to_float16(part).astype(np.float32) - part, dtype=np.float64)))
        norm += float(np.sum(np.square(part, dtype=np.float64)))
    return (change / norm) ** 0.5 if norm > 0 else 0.0


def weights_fp16_cannot_hold(source: Path, limit: float = WEIGHT_MAX_ERROR) -> dict[str, float]:
    """The float32 initializers of ``source`` that FP16 changes by more than ``limit`` (name → relative change), and
    the tensors derived from them by shape-only ops (same change), so that every node reading one stays FP32."""
    source = Path(source)
    model = onnx.load(str(source), load_external_data=False)
    changed = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and int(np.prod(tensor.dims, dtype=np.int64)) > 1:
            error = fp16_error(stored_array(tensor, source.parent, mapped=True))
            if error > limit:
                changed[tensor.name] = error
    grown = True
    while grown:  # follow each such weight through Transpose / Reshape / ... to the node that really reads it
        grown = False
        for node in model.graph.node:
            if node.op_type in SHAPE_ONLY_OPS and node.input and node.input[0] in changed:
                for out in node.output:
                    if out not in changed:
                        changed[out] = changed[node.input[0]]
                        grown = True
    return changed


INTEGER_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT64,
                 TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8, TensorProto.BOOL}


def index_math(model: onnx.ModelProto) -> set[int]:
    """Positions of the float nodes whose results become integers: everything upstream of a ``Cast`` to an integer
    type, through float tensors only. Such arithmetic computes indices, and FP16's rounding moves a value across an
    integer boundary: T5's relative-position buckets (``log(distance / max_exact) / log(...) * buckets`` then
    truncated) land in the neighbouring bucket at some distances, and the attention reads another bias (measured on
    the tiny test T5: logits cosine 0.996 vs FP32 from 9 positions on; 0.999999 with these nodes FP32). They carry no
    weights and little work."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    stack = [node.input[0] for node in graph.node if node.op_type == "Cast" and node.input
             and next((a.i for a in node.attribute if a.name == "to"), None) in INTEGER_TYPES]
    found: set[int] = set()
    while stack:
        tensor = stack.pop()
        position = producers.get(tensor)
        if position is None or position in found or types.get(tensor) != TensorProto.FLOAT:
            continue
        found.add(position)
        stack.extend(graph.node[position].input)
    return found


def nodes_to_keep_fp32(model: onnx.ModelProto, tensors: Iterable[str], indices: bool = False) -> list[str]:
    """Names of the nodes that read or write one of ``tensors`` (activations outside FP16's range, weights FP16 cannot
    hold), and with ``indices`` the float nodes computing integer indices (``index_math``); unnamed ones are named
    here, ``mmedge_fp32/<index>``, so the converter's ``node_block_list`` can hold them."""
    over = set(tensors)
    index_nodes = index_math(model) if indices else set()
    kept = []
    for i, node in enumerate(model.graph.node):
        if over.intersection(node.input) or over.intersection(node.output) or i in index_nodes:
            if not node.name:
                node.name = f"mmedge_fp32/{i}"
            kept.append(node.name)
    return kept


def over_limit(source: Path, feeds: dict[str, np.ndarray], threads: int | None = None,
               limit: float = FP16_SAFE_MAX, tiny: float = FP16_TINY) -> tuple[dict[str, float], int, float]:
    """The activations of ``source`` on ``feeds`` that FP16 cannot hold: whose largest magnitude passes ``limit``
    (inf for NaN) or is below ``tiny`` but not 0 (name → largest magnitude); how many float activations were
    checked, and the largest magnitude of all."""
    ranges = activation_ranges(source, feeds, threads)
    outside = {name: value for name, value in ranges.items() if not value <= limit or 0 < value < tiny}
    return outside, len(ranges), max(ranges.values(), default=0.0)


def skip_cast_round_trips(model: onnx.ModelProto) -> int:
    """Let FP32 nodes read each other's FP32 outputs directly; returns how many round trips were removed.

    ONNX Runtime's converter (``float16.convert_float_to_float16`` with ``node_block_list``) casts every kept-FP32
    node's output down to FP16 and back up before the next kept-FP32 node: an activation past 65504 would become inf
    on the way, which is what keeping the nodes FP32 is for. Each ``Cast(to=float32)`` of a ``Cast(to=float16)`` of
    a float32 tensor is replaced by that tensor (exact, and more precise), and Casts left unread are removed."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node) -> int | None:
        if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    alias = {}
    for node in graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        down = producers.get(node.input[0])
        if cast_to(down) == TensorProto.FLOAT16 and types.get(down.input[0]) == TensorProto.FLOAT:
            alias[node.output[0]] = down.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    while True:  # drop Casts nobody reads any more (the round trips' halves)
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if cast_to(n) is not None and not read.intersection(n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    return len(alias)
