"""Streaming quantization (``mmedge.export.quantize_streaming``) on the tiny BLIP-2 with the streaming threshold
lowered, so its graphs keep their weights in ``.onnx.data`` as the full-size ones do.

Each recipe runs twice on the same FP32 graph: through ONNX Runtime's in-memory entry points (``quantize_dynamic``,
``quantize_static``, ``MatMulNBitsQuantizer`` on a loaded model, ``convert_float_to_float16``) and streamed. Both
use the same quantizer arithmetic on the same machine, so their outputs must be identical, bit for bit; the
streamed run must also never load a whole graph with its weights.
"""

import json
import shutil

import numpy as np
import onnx
import pytest

from mmedge.errors import QuantizationError
from mmedge.export import export_model, onnx_export, quantize
from mmedge.export.onnx_export import OnnxSession


@pytest.fixture(scope="module")
def streamed_fp32(tiny_blip2_dir, tmp_path_factory):
    """The tiny BLIP-2 at FP32 with every graph streamed to ``.onnx.data``, and its validation inputs."""
    root = tmp_path_factory.mktemp("streamed-quant")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
        out = export_model(str(tiny_blip2_dir), root / "fp32", progress=False)
    with np.load(out / "validation.npz") as data:
        samples = {key: data[key] for key in data.files}
    feeds = {name: {k.split("/")[-1]: v for k, v in samples.items() if k.startswith(f"{name}/inputs/")}
             for name in ("prefix", "decoder")}
    return out, feeds


@pytest.fixture
def no_whole_graph_loads(monkeypatch):
    """Fail any ``onnx.load`` that would read a graph's external weights (what streaming must avoid)."""
    real = onnx.load_model

    def guarded(f, *args, load_external_data=True, **kwargs):
        if load_external_data and str(f).endswith(".onnx") and (onnx_export.Path(str(f) + ".data")).is_file():
            raise AssertionError(f"streaming quantization loaded all of {f}")
        return real(f, *args, load_external_data=load_external_data, **kwargs)

    monkeypatch.setattr(onnx, "load", guarded)
    monkeypatch.setattr(onnx, "load_model", guarded)


def _both(source, folder, recipe, monkeypatch):
    """``recipe(source, dest)`` in memory and streamed; returns (in-memory graph, streamed graph, recipes)."""
    folder.mkdir()
    memory, streamed = folder / "memory" / source.name, folder / "streamed" / source.name
    memory.parent.mkdir(), streamed.parent.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(quantize, "streams", lambda path: False)
        first = recipe(source, memory)
    second = recipe(source, streamed)
    return memory, streamed, first, second


def _assert_identical_outputs(memory, streamed, feeds):
    expected, actual = OnnxSession(memory).run(feeds), OnnxSession(streamed).run(feeds)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype and actual[name].shape == expected[name].shape
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_streamed_int8_dynamic_matches_the_in_memory_quantizer(streamed_fp32, tmp_path, monkeypatch):
    out, feeds = streamed_fp32
    for name in ("prefix", "decoder"):
        memory, streamed, first, second = _both(out / f"{name}.onnx", tmp_path / name, quantize.quantize_int8_dynamic,
                                                monkeypatch)
        assert first == second
        assert _ops(memory) == _ops(streamed) and "MatMulInteger" in _ops(streamed)
        assert (streamed.parent / f"{name}.onnx.data").is_file()  # quantized weights written beside the graph
        _assert_identical_outputs(memory, streamed, feeds[name])


def test_streamed_int4_matches_the_in_memory_quantizer(streamed_fp32, tmp_path, monkeypatch):
    out, feeds = streamed_fp32

    def recipe(source, dest):
        return quantize.quantize_int4_weights(source, dest, block_size=32, accuracy_level=4)

    memory, streamed, first, second = _both(out / "decoder.onnx", tmp_path / "decoder", recipe, monkeypatch)
    assert first == second and first["quantized_matmuls"] >= 2 * 6 + 1 and first["gemm_rewritten"] > 0
    assert not second["float_weight_matmuls"]
    assert second["eight_bit_blocks"] and min(second["eight_bit_blocks"].values()) > 32  # K read from a streamed graph
    assert _ops(memory) == _ops(streamed)
    _assert_identical_outputs(memory, streamed, feeds["decoder"])


def test_streamed_int8_static_qdq_matches_the_in_memory_quantizer(streamed_fp32, tmp_path, monkeypatch):
    out, feeds = streamed_fp32
    pixels = feeds["prefix"]["pixel_values"]  # [2, 3, H, W]

    def recipe(source, dest):
        calibration = [{"pixel_values": pixels[i:i + 1]} for i in range(len(pixels))]
        return quantize.quantize_int8_static(source, dest, calibration, method="minmax")

    memory, streamed, first, second = _both(out / "prefix.onnx", tmp_path / "prefix", recipe, monkeypatch)
    assert first == second and first["calibration"]["samples"] == 2
    assert _ops(memory) == _ops(streamed) and "DequantizeLinear" in _ops(streamed)
    _assert_identical_outputs(memory, streamed, feeds["prefix"])


def test_streamed_fp16_matches_the_in_memory_conversion(streamed_fp32, tmp_path, monkeypatch):
    out, feeds = streamed_fp32
    memory, streamed, _, _ = _both(out / "decoder.onnx", tmp_path / "decoder", quantize.convert_fp16, monkeypatch)
    graph = onnx.load(str(streamed), load_external_data=False)
    assert {t.data_type for t in graph.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    _assert_identical_outputs(memory, streamed, feeds["decoder"])


def test_streaming_never_loads_a_whole_graph(streamed_fp32, tmp_path, no_whole_graph_loads):
    out, feeds = streamed_fp32
    dest = tmp_path / "decoder.onnx"
    quantize.quantize_int4_weights(out / "decoder.onnx", dest, block_size=32, accuracy_level=4)
    quantize.quantize_int8_dynamic(out / "decoder.onnx", tmp_path / "int8.onnx")
    with pytest.raises(AssertionError, match="loaded all"):  # the guard itself works
        onnx.load(str(out / "decoder.onnx"))
    assert OnnxSession(dest).run(feeds["decoder"])["logits"].shape[-1] > 0


def test_a_failed_streamed_quantization_leaves_no_files(streamed_fp32, tmp_path):
    out, _ = streamed_fp32
    source = tmp_path / "src"
    shutil.copytree(out, source)
    data = source / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # truncated weights
    dest = tmp_path / "q" / "decoder.onnx"
    dest.parent.mkdir()
    with pytest.raises(QuantizationError):
        quantize.quantize_int8_dynamic(source / "decoder.onnx", dest)
    assert list(dest.parent.iterdir()) == []


def test_an_export_streams_its_quantized_graphs(tiny_blip2_dir, tmp_path, no_whole_graph_loads, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = export_model(str(tiny_blip2_dir), tmp_path / "int4", progress=False, precision="int8", llm_precision="int4")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["decoder"]["quantization"]["method"] == "int4-weight-only"
    assert manifest["components"]["decoder"]["external_data"]["file"] == "decoder.onnx.data"
    assert manifest["components"]["decoder"]["parity"]["fidelity"]["logits_cosine_mean"] > 0.95


def test_a_bf16_checkpoint_loads_as_stored_and_exports_fp32_graphs(tiny_blip2_dir, tmp_path):
    """transformers 5 loads a checkpoint in its stored dtype: half the memory for BF16; each exported part is upcast
    to FP32 before its references are taken, so graphs and parity are FP32's."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    checkpoint = tmp_path / "bf16"
    shutil.copytree(tiny_blip2_dir, checkpoint)
    Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir).to(torch.bfloat16).save_pretrained(checkpoint)
    out = export_model(str(checkpoint), tmp_path / "art", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["dtype"] == "bfloat16"
    for name in ("prefix", "decoder"):
        graph = onnx.load(str(out / f"{name}.onnx"))
        assert {t.data_type for t in graph.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT}
        for metrics in manifest["components"][name]["parity"]["outputs"].values():
            assert metrics["cosine"] > 0.99999 and metrics["max_abs"] < 1e-3


def test_at_most_a_couple_of_weights_are_in_memory_at_once(streamed_fp32, tmp_path, monkeypatch):
    """Every weight the quantizers read comes from ``StreamedWeights.read``; count how many of those arrays (or
    arrays viewing them) are alive at each read."""
    import weakref

    from mmedge.export import quantize_streaming

    out, _ = streamed_fp32
    refs, most = [], [0]
    real = quantize_streaming.StreamedWeights.read

    def counted(self, tensor):
        array = real(self, tensor)
        refs.append(weakref.ref(array))
        most[0] = max(most[0], sum(ref() is not None for ref in refs))
        return array

    monkeypatch.setattr(quantize_streaming.StreamedWeights, "read", counted)
    source = out / "decoder.onnx"
    quantize.quantize_int8_dynamic(source, tmp_path / "int8.onnx")
    quantize.quantize_int4_weights(source, tmp_path / "int4.onnx", block_size=32, accuracy_level=4)
    quantize.convert_fp16(source, tmp_path / "fp16.onnx")
    weights = [t for t in onnx.load(str(source), load_external_data=False).graph.initializer if len(t.dims) == 2]
    assert len(weights) >= 10 and len(refs) >= 3 * len(weights) and 1 <= most[0] <= 2, (most, len(refs))


def test_fidelity_runs_a_large_graph_a_few_rows_at_a_time(streamed_fp32, monkeypatch):
    from mmedge.export import pipeline

    out, feeds = streamed_fp32
    pixels = np.concatenate([feeds["prefix"]["pixel_values"]] * 5)  # [10, 3, H, W]
    calls = []
    real = OnnxSession.run
    monkeypatch.setattr(OnnxSession, "run", lambda self, f: calls.append(len(f["pixel_values"])) or real(self, f))
    chunked = pipeline.run_in_batches(out / "prefix.onnx", {"pixel_values": pixels}, None, rows=4)
    assert calls == [4, 4, 2]
    whole = OnnxSession(out / "prefix.onnx").run({"pixel_values": pixels})
    np.testing.assert_allclose(chunked["prefix_embeds"], whole["prefix_embeds"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def wide_graph(tmp_path_factory):
    """60 MatMuls chained over 4 MB FP32 weights (240 MB) in ``.onnx.data``: big enough to see in RSS."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width, count = 1024, 60
    nodes, inits, last = [], [], "x"
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) / 32, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        last = f"h{i}"
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="wide.onnx.data")
    return path, width * width * 4 * count


@pytest.mark.parametrize("recipe", ["int4", "int8", "fp16"])
def test_streamed_quantization_memory_stays_near_one_weight(wide_graph, tmp_path, recipe):
    """Peak RSS while quantizing 240 MB of weights grows by far less than the weights (the whole graph would be
    240 MB more, the in-memory quantizers twice that)."""
    from mmedge.export.memory import StepPeak, current_rss

    source, total = wide_graph
    run = {"int4": lambda s, d: quantize.quantize_int4_weights(s, d, block_size=32, accuracy_level=4),
           "int8": quantize.quantize_int8_dynamic, "fp16": quantize.convert_fp16}[recipe]
    run(source, tmp_path / "warm.onnx")  # imports and one-off allocations first
    before = current_rss()
    meter = StepPeak(interval=0.005)
    run(source, tmp_path / "out.onnx")
    growth = meter.stop() - before
    assert growth < total / 4, f"{recipe}: RSS grew {growth / 1e6:.0f} MB for {total / 1e6:.0f} MB of weights"
    feeds = {"x": np.ones((2, 1024), np.float32)}
    assert OnnxSession(tmp_path / "out.onnx").run(feeds)[f"h{59}"].shape == (2, 1024)


def test_weights_stored_in_fp32_load_as_stored_whatever_config_json_says(tiny_blip2_dir, tmp_path):
    """A config.json saying float16 beside FP32 weights (real repos have them): transformers' dtype "auto" takes the
    config's word, so the weights were rounded to FP16 on load, and parity, measured against that rounded model, read
    1.0. They load as stored, with a warning, and the graph computes what the FP32 weights do."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import Blip2ForConditionalGeneration

    checkpoint = tmp_path / "said-fp16"
    shutil.copytree(tiny_blip2_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    with pytest.warns(UserWarning, match="says dtype float16, but its weights are stored as float32: they are loaded "
                                         "as stored"):
        out = export_model(str(checkpoint), tmp_path / "art", progress=False)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir, dtype=torch.float32).eval()
    pixels = np.random.default_rng(0).standard_normal(
        (1, 3, *[model.config.vision_config.image_size] * 2)).astype(np.float32)
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    reference = getattr(reference, "pooler_output", reference)  # [1, queries, hidden]
    session = ort.InferenceSession(str(out / "prefix.onnx"), providers=["CPUExecutionProvider"])
    prefix = session.run(None, {"pixel_values": pixels})[0]
    assert prefix.shape[-1] == reference.shape[-1] and np.abs(prefix - reference.numpy()).max() < 1e-4
    assert json.loads((out / "manifest.json").read_text())["source"]["dtype"] == "float32"


def test_an_fp16_checkpoint_with_modules_kept_fp32_loads_as_transformers_saved_it(tiny_blip2_dir, tmp_path):
    """BLIP-2 saved at FP16 keeps its Q-Former FP32 (the class's _keep_in_fp32_modules): the weights load at the
    dtype most of their bytes have, the Q-Former staying FP32 (all of it had been loaded FP32: twice the memory of a
    2.7B LLM), without a warning (config.json says float16, as the weights are)."""
    import warnings

    import torch
    from transformers import Blip2ForConditionalGeneration

    checkpoint = tmp_path / "fp16"
    shutil.copytree(tiny_blip2_dir, checkpoint)
    Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir, dtype=torch.float16).save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))  # as FP16 hub repos say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_model(str(checkpoint), tmp_path / "art", progress=False)
    assert json.loads((out / "manifest.json").read_text())["source"]["dtype"] == "float16+float32"
