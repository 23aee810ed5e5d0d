"""Rewrites of a traced FP32 image graph that keep its arithmetic and run faster on CPUs; the exporter measures the
graph's parity after them, as for any graph.

``split_long_inner_matmuls``: a MatMul by a constant ``[inner, columns]`` weight whose inner dimension is long (at
least ``MIN_INNER`` and twice the columns: a transformer MLP's down-projection, 3072 -> 768 in a ViT-B) becomes
Split -> two MatMuls over half the inner dimension each -> Add: the same sum in another order (outputs move by float
rounding, ~1e-6). ONNX Runtime's and OpenVINO's CPU SGEMMs run that shape at a lower rate than the up-projection of
the same size, and the two halves faster than the whole (``benchmarks/split_matmuls_cpu.py``: CLIP ViT-B/32's vision
tower, BLIP-2's prefix graph and IDEFICS-mid's image graph in a median 0.94 of their time, 0.84-1.05 over 30 rounds,
on both; a later run 0.97, 0.83-1.04 over 50). Decoders gain nothing (a 36-token prefill 1.00-1.08), and neither
does CLIP's text tower (2048 -> 512: 24 labels of 10 tokens took 1.02-1.06 of their time split in all 10 rounds of a
run on both backends, one query of 10 tokens and 8 texts of 77 tokens about 1.0; the script's text case), so only
image graphs are rewritten; GPU engines built from a rewritten graph are unmeasured (``--no-split-matmuls`` keeps
every MatMul whole).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_INNER = 2048  # shorter inner dimensions ran as fast whole (3072 and 4096 gained; 2048 at 36 rows did not)


def split_long_inner_matmuls(path: Path, min_inner: int | None = None) -> int:
    """Rewrite the graph at ``path`` in place with every MatMul by a constant ``[inner, columns]`` weight (``inner``
    even, at least ``min_inner`` (default ``MIN_INNER``) and twice ``columns``) split in two along ``inner``; returns
    how many were split. A graph whose weights live in an external file is left as it is (0): it is one too large to
    load whole here, and too large to run at FP32 on a CPU that would gain."""
    import onnx
    from onnx import helper, numpy_helper

    from mmedge.export.onnx_export import external_data_path, save_graph

    if external_data_path(path) is not None:
        return 0
    model = onnx.load(str(path))
    weights = _long_inner_weights(model, min_inner)
    nodes, split = [], 0
    for index, node in enumerate(model.graph.node):
        weight = weights.get(index)
        if weight is None:
            nodes.append(node)
            continue
        full = numpy_helper.to_array(weight)  # [inner, columns]
        half, name = full.shape[0] // 2, f"{node.name or node.output[0]}/split"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([half, half], np.int64), f"{name}/halves"),
            numpy_helper.from_array(np.ascontiguousarray(full[:half]), f"{name}/weight0"),  # [inner / 2, columns]
            numpy_helper.from_array(np.ascontiguousarray(full[half:]), f"{name}/weight1"),
        ])
        nodes += [helper.make_node("Split", [node.input[0], f"{name}/halves"], [f"{name}/x0", f"{name}/x1"],
                                   axis=-1, name=f"{name}/Split"),  # [..., inner] -> 2 x [..., inner / 2]
                  helper.make_node("MatMul", [f"{name}/x0", f"{name}/weight0"], [f"{name}/y0"], name=f"{name}/0"),
                  helper.make_node("MatMul", [f"{name}/x1", f"{name}/weight1"], [f"{name}/y1"], name=f"{name}/1"),
                  helper.make_node("Add", [f"{name}/y0", f"{name}/y1"], list(node.output), name=f"{name}/Add")]
        split += 1
    if not split:
        return 0
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [w for w in model.graph.initializer if w.name in used]  # the whole weights are gone
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    save_graph(model, path)
    return split


def count_long_inner_matmuls(path: Path, min_inner: int | None = None) -> int:
    """How many MatMuls ``split_long_inner_matmuls`` would split in the graph at ``path`` (0 for a graph whose weights
    live in an external file, which it leaves as it is); the graph is not changed."""
    import onnx

    from mmedge.export.onnx_export import external_data_path

    if external_data_path(path) is not None:
        return 0
    return len(_long_inner_weights(onnx.load(str(path)), min_inner))


def _long_inner_weights(model, min_inner: int | None) -> dict:
    """The graph's node index -> the constant ``[inner, columns]`` weight, of each MatMul to split."""
    least = MIN_INNER if min_inner is None else min_inner
    weights = {w.name: w for w in model.graph.initializer}
    found = {}
    for index, node in enumerate(model.graph.node):
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if weight is not None and len(weight.dims) == 2 and not weight.dims[0] % 2 \
                and weight.dims[0] >= max(least, 2 * weight.dims[1]):
            found[index] = weight
    return found


__all__ = ["MIN_INNER", "count_long_inner_matmuls", "split_long_inner_matmuls"]
