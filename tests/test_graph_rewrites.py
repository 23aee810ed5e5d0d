"""``mmedge.export.graph_rewrites``: long-inner MatMuls split in two on a hand-built graph (which ones, the outputs
ONNX Runtime gives before and after), and a graph with external weights left alone; ``--no-split-matmuls`` refused
by the exporter where the image graph has nothing it would keep whole. The exports that apply the rewrite are tested
in tests/test_idefics.py (token identity with transformers through a rewritten image graph)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmedge.errors import InputError
from mmedge.export import graph_rewrites
from mmedge.export.graph_rewrites import count_long_inner_matmuls, split_long_inner_matmuls


def _graph(path, rng):
    """x [batch, 5, 64] through a [64, 16] down-projection (split), a [16, 16] square one (kept: short) and a
    [16, 64] up-projection (kept: inner under twice the columns); a [33, 8] weight (kept: odd inner); x by another
    input (kept: not a constant weight)."""
    weights = {"down": rng.standard_normal((64, 16), dtype=np.float32),  # inner 64 >= 2 * 16: split
               "square": rng.standard_normal((16, 16), dtype=np.float32),  # inner 16: kept
               "odd": rng.standard_normal((33, 8), dtype=np.float32),  # odd inner: kept
               "wide": rng.standard_normal((16, 64), dtype=np.float32)}  # inner 16 < 2 * 64: kept
    nodes = [helper.make_node("MatMul", ["x", "down"], ["h"], name="down"),
             helper.make_node("MatMul", ["h", "square"], ["s"], name="square"),
             helper.make_node("MatMul", ["s", "wide"], ["w"], name="wide"),
             helper.make_node("MatMul", ["odd_in", "odd"], ["o"], name="odd"),
             helper.make_node("MatMul", ["x", "other"], ["p"], name="by_input")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 64]),
         helper.make_tensor_value_info("odd_in", TensorProto.FLOAT, ["batch", 5, 33]),
         helper.make_tensor_value_info("other", TensorProto.FLOAT, [64, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 5, width])
         for n, width in (("w", 64), ("o", 8), ("p", 4))],
        [numpy_helper.from_array(w, n) for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_only_long_inner_constant_matmuls_are_split_and_the_outputs_stay(tmp_path):
    rng = np.random.default_rng(0)
    path = _graph(tmp_path / "g.onnx", rng)
    feeds = {"x": rng.standard_normal((3, 5, 64), dtype=np.float32),
             "odd_in": rng.standard_normal((3, 5, 33), dtype=np.float32),
             "other": rng.standard_normal((64, 4), dtype=np.float32)}
    before = _run(path, feeds)
    written = path.read_bytes()
    assert count_long_inner_matmuls(path, min_inner=32) == 1 and path.read_bytes() == written  # counts, changes nothing
    assert count_long_inner_matmuls(path, min_inner=128) == 0
    assert split_long_inner_matmuls(path, min_inner=32) == 1
    after = _run(path, feeds)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)  # the same sum in another order
    graph = onnx.load(str(path))
    kinds = [n.op_type for n in graph.graph.node]
    assert kinds.count("MatMul") == 6 and kinds.count("Split") == 1 and kinds.count("Add") == 1
    assert "down" not in {w.name for w in graph.graph.initializer}  # the whole weight is gone, its halves stay
    onnx.checker.check_model(graph)
    assert split_long_inner_matmuls(path, min_inner=64) == 0  # the [32, 16] halves are under it
    assert split_long_inner_matmuls(_graph(tmp_path / "h.onnx", rng), min_inner=128) == 0  # under the threshold


def test_a_graph_with_external_weights_is_left_as_it_is(tmp_path):
    path = _graph(tmp_path / "g.onnx", np.random.default_rng(0))
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="g.onnx.data", size_threshold=0)
    written = path.read_bytes()
    assert split_long_inner_matmuls(path, min_inner=32) == 0
    assert count_long_inner_matmuls(path, min_inner=32) == 0  # what the rewrite would do: nothing
    assert path.read_bytes() == written


def test_no_split_matmuls_is_refused_where_the_image_graph_has_nothing_to_keep_whole(tiny_clip_dir, tmp_path,
                                                                                     monkeypatch):
    """The tiny CLIP's MLPs (128 -> 32) are far under MIN_INNER: --no-split-matmuls would change nothing, so the
    export is refused once the image graph is traced, and nothing is written. With the threshold lowered under them
    the same option keeps them whole, and the manifest records no rewrite."""
    from mmedge.cli import main
    from mmedge.export import export_model

    out = tmp_path / "clip-whole"
    with pytest.raises(InputError, match="--no-split-matmuls changes nothing.*'vision'.*drop --no-split-matmuls"):
        export_model(str(tiny_clip_dir), out, split_matmuls=False, task="embed", progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    assert main(["export", str(tiny_clip_dir), str(out), "--task", "embed", "--no-split-matmuls"]) == 2

    monkeypatch.setattr(graph_rewrites, "MIN_INNER", 16)
    export_model(str(tiny_clip_dir), out, split_matmuls=False, task="embed", progress=False)
    vision = json.loads((out / "manifest.json").read_text())["components"]["vision"]
    assert "rewrites" not in vision
    assert count_long_inner_matmuls(out / "vision.onnx") > 0  # kept whole: the default export would split them
