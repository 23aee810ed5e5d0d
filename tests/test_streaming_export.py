"""Streaming export for models past protobuf's 2 GB limit (BLIP-2 OPT-2.7B), exercised on a tiny BLIP-2
by lowering the threshold: graphs traced without weights, weights written tensor by tensor into one
aligned ``.data`` file, towers freed once their graph is checked."""

import json

import numpy as np
import onnx
import pytest
import torch

import mmedge
import mmedge.export.onnx_export as onnx_export
from mmedge.export import export_model
from mmedge.export.streaming import ALIGNMENT, free_weights


@pytest.fixture(scope="module")
def streamed(tiny_blip2_dir, tmp_path_factory):
    """FP32 and INT4 exports of the tiny BLIP-2, with and without streaming."""
    root = tmp_path_factory.mktemp("streamed")
    plain = {p: export_model(str(tiny_blip2_dir), root / f"plain-{p}", progress=False, llm_precision=p)
             for p in ("fp32", "int4")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
        big = {p: export_model(str(tiny_blip2_dir), root / f"streamed-{p}", progress=False, llm_precision=p)
               for p in ("fp32", "int4")}
    return plain, big


def test_streamed_graphs_keep_weights_in_one_aligned_data_file(streamed):
    _, big = streamed
    manifest = json.loads((big["fp32"] / "manifest.json").read_text())
    for name in ("prefix", "decoder"):
        entry = manifest["components"][name]
        assert entry["external_data"]["file"] == f"{name}.onnx.data"
        graph = onnx.load(str(big["fp32"] / f"{name}.onnx"), load_external_data=False)
        assert [i.name for i in graph.graph.input] == list(entry["inputs"])  # no weight left as an input
        external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert len(external) > 10
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            assert info["location"] == f"{name}.onnx.data" and int(info["offset"]) % ALIGNMENT == 0
        weights = {t.name for t in graph.graph.initializer}
        assert not [n for n in graph.graph.node if n.op_type in ("Transpose", "Identity") and n.input[0] in weights]
        assert entry["parity"]["outputs"] and entry["parity"]["validation_samples"]
        for metrics in entry["parity"]["outputs"].values():
            assert metrics["max_abs"] < 1e-4


def test_streamed_export_gives_the_same_outputs_and_captions(streamed, photos):
    plain, big = streamed
    for name in ("prefix", "decoder"):
        a = json.loads((plain["fp32"] / "manifest.json").read_text())
        a = a["components"][name]["parity"]["validation_samples"]
        b = json.loads((big["fp32"] / "manifest.json").read_text())["components"][name]["parity"]["validation_samples"]
        for output in a:
            assert b[output]["max_abs"] < 1e-4 and b[output]["cosine"] > 0.99999
    for precision in ("fp32", "int4"):
        with mmedge.load(plain[precision]) as one, mmedge.load(big[precision]) as other:
            for photo in photos[:3]:
                assert one.caption(photo, max_new_tokens=12) == other.caption(photo, max_new_tokens=12)


def test_int4_from_a_streamed_graph_quantizes_every_llm_matmul(streamed):
    _, big = streamed
    graph = onnx.load(str(big["int4"] / "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulNBits") >= 2 * 6 + 1  # q, k, v, out, fc1, fc2 per layer, and the LM head
    assert "Gemm" not in ops
    fidelity = json.loads((big["int4"] / "manifest.json").read_text())["components"]["decoder"]["parity"]["fidelity"]
    assert fidelity["logits_cosine_mean"] > 0.95


def test_free_weights_keeps_what_later_components_share():
    shared = torch.nn.Linear(4, 4)
    first = torch.nn.Sequential(torch.nn.Linear(4, 4), shared)
    second = torch.nn.Sequential(shared, torch.nn.Linear(4, 2))
    tied = torch.nn.Linear(4, 4)
    third = torch.nn.Sequential(tied)
    third.append(torch.nn.Module())
    third[1].weight_alias = tied.weight  # a tied weight registered twice
    freed = free_weights(first, [second])
    assert freed == (16 + 4) * 4
    assert first[0].weight.device.type == "meta" and first[0].weight.shape == (4, 4)
    assert shared.weight.device.type == "cpu" and second[1].weight.device.type == "cpu"
    assert free_weights(third, []) == (16 + 4) * 4  # tied weight counted once
    assert third[1].weight_alias.device.type == "meta" and tied.weight.device.type == "meta"
    with pytest.raises(TypeError, match="meta"):  # a freed weight can not be read by mistake
        first[0].weight.detach().numpy()
    assert np.isfinite(second(torch.ones(1, 4)).detach().numpy()).all()
