"""INT4 weight-only quantization (MatMulNBits) for decoder LLMs, and INT4/INT8 rows for embedding tables.

Recipe, in order:

1. Fold ``Identity`` nodes that merely forward an initializer (the tracer deduplicates equal
   constants, e.g. zero biases, that way), so every weight is seen as the constant it is.
2. Rewrite each ``Gemm`` whose weight is constant into ``MatMul`` (+ ``Add`` for the bias):
   ``Y = alpha * A @ op(B) + beta * C`` with ``op(B) = B.T`` when ``transB``. PyTorch exports some
   ``nn.Linear`` layers (OPT's fc1/fc2) as Gemm, which MatMulNBits does not replace.
3. ``onnxruntime``'s ``MatMulNBitsQuantizer`` (RTN, block-wise along K) turns every MatMul with a
   constant 2-D weight into ``com.microsoft.MatMulNBits``: 4-bit weights, one float32 scale and one
   4-bit zero point per ``block_size`` weights (``symmetric=True``: no zero points). Attention's
   activation × activation MatMuls stay float. ``accuracy_level`` is the MatMulNBits compute type on
   CPU (4 = int8 activations, fastest; 0 = unset, float math).
4. **The LM head is not 4-bit** (``head``, default ``"int8"``): the MatMuls that make the ``logits``
   output (``output_projections``) are left out of step 3 and get a second pass at 8 bits (MatMulNBits
   ``bits=8``, same blocks), or stay FP32. Every token choice goes through the head, and its error
   lands on the logits unmixed by any later layer; INT4 LLM recipes keep it above 4 bits for that
   reason (llama.cpp's Q4_K_M stores ``output.weight`` at Q6_K; AWQ and GPTQ leave ``lm_head``
   unquantized). Measured (``benchmarks/int4_sensitivity.py``, RESULTS.md): on the demo IDEFICS, a
   4-bit head alone costs more answers than every other layer group at 4 bits together (82% of the
   held-out answers identical to FP32 with only the head at 4 bits; 87-92% with every layer but the
   head at 4 bits); zero points halve the demo BLIP-2's logit error at block 32. The recipe records
   which nodes stayed at which precision, and why (``head``, ``kept``, ``matmuls_by_bits``). Cost at
   full size (BLIP-2 OPT-2.7B, head 50272 x 2560): the head at 8 bits is 149 MB instead of 80 MB.

5. **8-bit nodes take large blocks.** At 8 bits the step between levels is 16x finer than at 4, so a block of 256
   weights costs the logits nothing measurable, while ONNX Runtime's 8-bit MatMulNBits kernel runs much faster over
   long blocks than over 32-weight ones: on the benchmark BLIP-2 (OPT-125m shapes, 2-core Xeon) blocks of 256 made
   the whole INT4 decode step 1.11x and a 33-token prefill 1.09x faster than blocks of 32, logits cosine vs FP32
   0.985509 vs 0.985516 (``benchmarks/int4_decoder_cpu.py``, RESULTS.md).

The embedding table lives outside the graph (``inputs_embeds`` go in); ``quantize_rows_int4`` and
``quantize_rows_int8`` store it at the same precision; the device reads it back with
``mmedge.embeddings.dequantize_rows`` (re-exported here).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import numpy as np

from mmedge.embeddings import dequantize_rows  # noqa: F401  re-exported: the device-side reader of these tables
from mmedge.errors import QuantizationError
from mmedge.export.quantize import quiet as _quiet

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# MatMulNBits' block sizes: powers of two, at least 16; ONNX Runtime's quantizer (MLAS) takes at most 256
BLOCK_SIZES = (16, 32, 64, 128, 256)
EIGHT_BIT_MAX_BLOCK = 256  # weights per scale of the 8-bit nodes (the LM head), at most
HEAD_PRECISIONS = ("int8", "fp32", "int4")
HEAD_WHY = {
    "int8": "the output projection (LM head) at 8 bits: every token choice goes through it and its error reaches the "
            "logits unmixed; a 4-bit head was the largest single source of changed answers (mmedge.export.int4)",
    "fp32": "the output projection (LM head) kept FP32 (--int4-head fp32): the logits' last layer unquantized",
    "int4": "the output projection (LM head) at 4 bits like every other layer (--int4-head int4): smallest, least "
            "faithful"}


def check_int4_settings(block_size: int, accuracy_level: int) -> None:
    """Raise QuantizationError for a block size or accuracy level MatMulNBits cannot take."""
    if not _is_int(block_size) or block_size not in BLOCK_SIZES:
        raise QuantizationError(f"INT4 block size {block_size!r} is not supported",
                                f"an int, a power of two from {BLOCK_SIZES[0]} to {BLOCK_SIZES[-1]} "
                                f"({', '.join(map(str, BLOCK_SIZES))}; 32, 64 or 128 are usual)",
                                "pass --int4-block-size 32 (the default; 16 is more accurate) or 128 (smaller)")
    if not _is_int(accuracy_level) or accuracy_level not in ACCURACY_LEVELS:
        raise QuantizationError(f"INT4 accuracy level {accuracy_level!r} is not supported",
                                "0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8 activations)",
                                "pass --int4-accuracy-level 4 for CPU speed, 0 for float math")


def _is_int(value) -> bool:
    """An integer (Python's or numpy's): not a float that equals one (32.0 would fail after tracing), nor a bool."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def quantize_int4(source: Path, dest: Path, *, block_size: int = 32, accuracy_level: int = 4,
                  symmetric: bool = False, head: str = "int8", keep: dict[str, str] | None = None,
                  eight_bit_max_block: int = EIGHT_BIT_MAX_BLOCK) -> dict:
    """Quantize the float MatMul/Gemm weights of ``source`` to 4 bits into ``dest``; returns the manifest recipe.

    ``head``: the precision of the output projection (``output_projections``: the MatMuls that make ``logits``),
    one of ``HEAD_PRECISIONS``. ``keep``: more nodes (by name, as traced) at ``"int8"`` or ``"fp32"``.
    ``eight_bit_max_block``: the 8-bit nodes' largest block (``eight_bit_block``; ``block_size`` keeps theirs at the
    4-bit block, as before, for comparison)."""
    check_int4_settings(block_size, accuracy_level)
    check_head_precision(head)
    try:
        with _opened(Path(source), Path(dest)) as (model, weights):
            folded = fold_initializer_identities(model.graph)
            rewritten = gemm_to_matmul(model.graph, weights)
            kept, heads = kept_nodes(model.graph, head, keep or {}), output_projections(model.graph)
            rows = weight_rows(model.graph)  # a weight whose K is not read from the graph keeps the 4-bit block
            eight = {name: eight_bit_block(rows[name], block_size, eight_bit_max_block) if name in rows else block_size
                     for name, precision in kept.items() if precision == "int8"}
            model = _matmul_nbits(model, _config(block_size, accuracy_level, symmetric, 4), weights, exclude=kept)
            for block in sorted(set(eight.values())):  # a pass per block size over the nodes left out, at 8 bits
                model = _matmul_nbits(model, _config(block, accuracy_level, symmetric, 8), weights,
                                      include=[name for name, size in eight.items() if size == block])
            if weights is not None:
                weights.save(model)
            else:
                save_model(model, Path(dest))
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"INT4 weight-only quantization of '{Path(source).name}' failed "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})",
                                "a float32 ONNX graph with MatMul/Gemm weights as initializers",
                                "export --llm-precision int8 or fp32 meanwhile, and report this with "
                                "the model id") from exc
    ops = [n.op_type for n in model.graph.node]
    bits = [_attr(n, "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    return {
        "method": "int4-weight-only", "format": "MatMulNBits", "algorithm": "rtn", "bits": 4,
        "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": symmetric,
        "scales": "float32 per block", "activations": "float32" if accuracy_level in (0, 1) else
        {2: "float16", 3: "bfloat16", 4: "int8 (dynamic, per block)"}[accuracy_level],
        "quantized_matmuls": ops.count("MatMulNBits"), "gemm_rewritten": rewritten, "identities_folded": folded,
        "matmuls_by_bits": {"4": bits.count(4), "8": bits.count(8)},
        "eight_bit_blocks": dict(sorted(eight.items())),
        "head": {"precision": head, "nodes": heads, "why": HEAD_WHY[head]},
        "kept": dict(sorted(kept.items())),
        "float_weight_matmuls": float_weight_matmuls(model.graph),
    }


def _attr(node, name: str):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def eight_bit_block(rows: int, block_size: int, largest: int = EIGHT_BIT_MAX_BLOCK) -> int:
    """Weights per scale of an 8-bit node with ``rows`` input features: the largest power of two up to ``largest``
    that fits in ``rows`` (MatMulNBits pads a row to whole blocks), never under the 4-bit ``block_size``."""
    block = block_size
    while block * 2 <= min(rows, largest):
        block *= 2
    return block


def weight_rows(graph) -> dict[str, int]:
    """{MatMul name: K} for the MatMuls whose weight ``[K, N]`` is an initializer (read from its dims: a streamed
    weight's bytes stay in its data file)."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    return {n.name: int(dims[n.input[1]][0]) for n in graph.node
            if n.op_type == "MatMul" and len(dims.get(n.input[1], ())) == 2}


def check_head_precision(head: str) -> None:
    if head not in HEAD_PRECISIONS:
        raise QuantizationError(f"INT4 head precision {head!r} is not supported",
                                f"one of {', '.join(HEAD_PRECISIONS)}",
                                "pass --int4-head int8 (the default), fp32 or int4")


@contextlib.contextmanager
def _opened(source: Path, dest: Path):
    """(model, weights): the graph loaded whole and None, or, for weights in ``.onnx.data``, its skeleton and the
    ``quantize_streaming.StreamedWeights`` that read and write them one at a time."""
    import onnx

    from mmedge.export import quantize

    if not quantize.streams(source):
        yield onnx.load(str(source)), None
        return
    from mmedge.export import quantize_streaming

    with quantize_streaming.streamed(source, dest) as weights:
        yield quantize_streaming.load_skeleton(source), weights


def _config(block_size: int, accuracy_level: int, symmetric: bool, bits: int = 4):
    with _quiet():  # the module calls logging.basicConfig(level=INFO) when first imported
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                        accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",),
                                        quant_axes=(("MatMul", 0),), bits=bits)


def _matmul_nbits(model, config, weights=None, *, exclude=(), include=None):
    """MatMulNBits over every MatMul with a constant weight but those in ``exclude`` (or only those in ``include``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if include is not None:
        exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(include)]
    with _quiet():
        if weights is not None:
            from mmedge.export import quantize_streaming

            return quantize_streaming.matmul_nbits(model, weights, config, exclude=list(exclude))
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=list(exclude))
        quantizer.process()
    return quantizer.model.model


def save_model(model, dest: Path) -> Path:
    """Save ``model``, weights in ``<name>.data`` beside it when they pass protobuf's 2 GB limit."""
    from mmedge.export.onnx_export import save_graph

    return save_graph(model, dest)


# --- graph rewrites ------------------------------------------------------------------------------
def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _constant_array(name: str, graph, producers: dict | None = None) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a Constant node's output; None otherwise."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producers = producers if producers is not None else {o: n for n in graph.node for o in n.output}
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    if node is not None and node.op_type == "Identity":
        return _constant_array(node.input[0], graph, producers)
    return None


def fold_initializer_identities(graph) -> int:
    """Point consumers of ``Identity(initializer)`` at the initializer itself. Returns how many were folded."""
    inits = _initializers(graph)
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def gemm_to_matmul(graph, weights=None) -> int:
    """Replace every Gemm with a constant weight (and transA = 0) by MatMul [+ Add]. Returns the count.

    ``weights`` (a ``quantize_streaming.StreamedWeights``): the graph is a skeleton whose weights stay in their
    data file; each new ``[K, N]`` weight is then made when the quantizer reads it, not here."""
    from onnx import helper, numpy_helper

    producers = {o: n for n in graph.node for o in n.output}
    inits = _initializers(graph)
    new_nodes, rewritten, made = [], 0, {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = None
        if node.op_type == "Gemm":
            streamed = weights is not None and node.input[1] in inits and weights.deferred(inits[node.input[1]])
            weight = _Shape(inits[node.input[1]]) if streamed else _constant_array(node.input[1], graph, producers)
        if weight is None or attrs.get("transA", 0) or weight.ndim != 2:
            new_nodes.append(node)
            continue
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        key = (node.input[1], attrs.get("transB", 0), alpha)
        if key not in made:
            made[key] = f"{node.input[1]}_matmul_{len(made)}"
            make = functools.partial(_as_matmul_weight, transposed=bool(attrs.get("transB", 0)), alpha=alpha)
            if isinstance(weight, _Shape):
                dims = weight.shape[::-1] if attrs.get("transB", 0) else weight.shape
                graph.initializer.append(weights.derive(made[key], weight.tensor, list(dims), make))
            else:
                graph.initializer.append(numpy_helper.from_array(make(weight), made[key]))
        base = node.name or f"gemm_{rewritten}"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        matmul_out = f"{node.output[0]}_matmul" if bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], made[key]], [matmul_out], name=f"{base}_MatMul"))
        if bias:
            if beta != 1.0:
                scaled = (weights.read(inits[bias]) if weights is not None and bias in inits
                          else _constant_array(bias, graph, producers))
                bias = f"{bias}_beta_{rewritten}"
                graph.initializer.append(numpy_helper.from_array((scaled * np.float32(beta)).astype(scaled.dtype),
                                                                 bias))
            new_nodes.append(helper.make_node("Add", [matmul_out, bias], [node.output[0]], name=f"{base}_Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return rewritten


class _Shape:
    """A streamed weight's shape and type, without its bytes."""

    def __init__(self, tensor):
        self.tensor, self.shape, self.ndim = tensor, tuple(tensor.dims), len(tensor.dims)


def _as_matmul_weight(weight: np.ndarray, *, transposed: bool, alpha: float) -> np.ndarray:
    """Gemm's ``alpha * op(B)`` as MatMul's ``[K, N]`` weight, in B's dtype."""
    matrix = (weight.T if transposed else weight) * np.float32(alpha)  # [K, N]
    return np.ascontiguousarray(matrix, dtype=weight.dtype)


def _drop_unused_initializers(graph) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def float_weight_matmuls(graph) -> list[str]:
    """Names of MatMul/Gemm nodes that still multiply by a constant float weight (none after INT4)."""
    from onnx import helper

    producers = {o: n for n in graph.node for o in n.output}
    inits = _initializers(graph)
    left = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            if node.input[1] in inits:  # read the type, not the bytes (they may sit in a 10 GB data file)
                kind = np.dtype(helper.tensor_dtype_to_np_dtype(inits[node.input[1]].data_type)).kind
            else:
                weight = _constant_array(node.input[1], graph, producers)
                kind = None if weight is None else weight.dtype.kind
            if kind == "f":
                left.append(node.name)
    return left


# --- what stays above 4 bits ---------------------------------------------------------------------
PASS_THROUGH = ("Concat", "Add", "Mul", "Div", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Transpose",
                "Slice", "Tanh")  # between an LM head's MatMul and the logits output (IDEFICS: Concat of two heads)


def output_projections(graph, output: str = "logits") -> list[str]:
    """Names of the MatMuls with a constant weight that make the graph output ``output``: the LM head (IDEFICS': two,
    the base vocabulary's and the additional tokens', concatenated). Found walking back from the output through
    ``PASS_THROUGH`` nodes; empty when the graph has no such output."""
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}

    def constant(name: str) -> bool:  # read no bytes: a streamed weight stays in its data file
        node = producers.get(name)
        return name in inits or (node is not None and (node.op_type == "Constant" or (
            node.op_type == "Identity" and constant(node.input[0]))))

    found, stack, seen = [], [output], set()
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            if constant(node.input[1]):
                found.append(node.name)
        elif node.op_type in PASS_THROUGH:
            stack.extend(name for name in node.input if name)
    return sorted(found)


def kept_nodes(graph, head: str, keep: dict[str, str]) -> dict[str, str]:
    """{MatMul name: "int8" | "fp32"} of the nodes that do not go to 4 bits: the output projection at ``head`` (unless
    "int4"), then ``keep``. Unnamed MatMuls get a name first (the quantizer excludes by name)."""
    for i, node in enumerate(graph.node):
        if node.op_type == "MatMul" and not node.name:
            node.name = f"MatMul_{i}"
    names = {n.name for n in graph.node if n.op_type == "MatMul"}
    wrong = {k: v for k, v in keep.items() if k not in names or v not in ("int8", "fp32")}
    if wrong:
        raise QuantizationError(f"INT4 nodes to keep {wrong} are not MatMuls of this graph at int8 or fp32",
                                "MatMul node names of the FP32 graph, each with 'int8' or 'fp32'",
                                "list the graph's MatMul names with onnx, or leave the setting out")
    kept = {} if head == "int4" else {name: head for name in output_projections(graph)}
    return kept | dict(keep)


# --- embedding tables (outside the graph) --------------------------------------------------------
def quantize_rows_int8(table: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric INT8 per row: ``weight`` int8 [rows, width], ``scales`` float32 [rows, 1]."""
    table = np.asarray(table, dtype=np.float32)  # [rows, width]
    scales = np.abs(table).max(axis=1, keepdims=True) / 127.0  # [rows, 1]
    safe = np.where(scales == 0, 1.0, scales)
    weight = np.clip(np.rint(table / safe), -127, 127).astype(np.int8)
    return {"weight": weight, "scales": scales.astype(np.float32)}


def quantize_rows_int4(table: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """Symmetric INT4 in blocks of ``block_size`` along each row, the MatMulNBits way.

    Per block, the value of largest magnitude ``m`` sets ``scale = m / -8`` (so it maps to -8 exactly),
    ``q = clip(round(x / scale), -8, 7)``. Stored: ``weight`` uint8 [rows, padded_width / 2] holding
    ``q + 8``, two per byte, the even column in the low nibble; ``scales`` float32 [rows, blocks].
    """
    table = np.asarray(table, dtype=np.float32)  # [rows, width]
    rows, width = table.shape
    blocks = -(-width // block_size)
    padded = np.zeros((rows, blocks * block_size), dtype=np.float32)
    padded[:, :width] = table
    grouped = padded.reshape(rows, blocks, block_size)  # [rows, blocks, block]
    index = np.abs(grouped).argmax(axis=2)[..., None]
    scales = np.take_along_axis(grouped, index, axis=2) / -8.0  # [rows, blocks, 1]
    safe = np.where(scales == 0, 1.0, scales)
    q = (np.clip(np.rint(grouped / safe), -8, 7).astype(np.int16) + 8).astype(np.uint8).reshape(rows, -1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # [rows, padded_width / 2]
    return {"weight": packed, "scales": scales[..., 0].astype(np.float32)}
