"""INT4 weight-only quantization (MatMulNBits) of the tiny BLIP-2's decoder graph, its LM head kept at 8 bits (or
FP32, or 4 bits on request), and the Gemm rewrite it relies on."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import Blip2ForConditionalGeneration

from mmedge.errors import QuantizationError
from mmedge.export.int4 import (
    dequantize_rows,
    eight_bit_block,
    float_weight_matmuls,
    gemm_to_matmul,
    output_projections,
    quantize_int4,
    quantize_rows_int4,
    quantize_rows_int8,
)
from mmedge.export.onnx_export import export_spec, run_onnx
from mmedge.export.specs.blip2 import DecoderWithPast, _FusedPrefix, decoder_feeds
from mmedge.metrics import compare


@pytest.fixture(scope="module")
def model(tiny_blip2_dir):
    return Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir).eval()


@pytest.fixture(scope="module")
def fp32_decoder(model, tmp_path_factory):
    spec = DecoderWithPast(model.language_model)
    return export_spec(spec, tmp_path_factory.mktemp("int4") / "decoder.onnx")


@pytest.fixture(scope="module")
def quantized(fp32_decoder, tmp_path_factory):
    """Quantize once per (block size, accuracy level, head, symmetric); returns (path, recipe)."""
    made = {}

    def get(block_size=32, accuracy_level=4, head="int8", symmetric=False):
        key = (block_size, accuracy_level, head, symmetric)
        if key not in made:
            dest = tmp_path_factory.mktemp("int4") / f"decoder-{'-'.join(map(str, key))}.onnx"
            made[key] = dest, quantize_int4(fp32_decoder, dest, block_size=block_size, accuracy_level=accuracy_level,
                                            head=head, symmetric=symmetric)
        return made[key]

    return get


def prompt_feeds(model) -> dict[str, np.ndarray]:
    """A realistic prefill: two random-image prefixes then an embedded prompt ([2, queries + 8, width])."""
    generator = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)  # [2, 3, H, W]
    ids = torch.tensor([[2, 312, 29, 342, 303, 541, 34, 321]] * 2)  # </s>Question: what is it? Answer
    with torch.no_grad():
        prefix = _FusedPrefix(model)(pixels)  # [2, queries, width]
        embeds = torch.cat([prefix, model.language_model.get_input_embeddings()(ids)], dim=1)
    layout = DecoderWithPast(model.language_model).kv_cache
    feeds = decoder_feeds(embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None, layout)
    return {k: v.numpy() for k, v in feeds.items()}


def test_no_float_weight_matmul_is_left_in_the_llm(quantized, model):
    path, recipe = quantized()
    graph = onnx.load(str(path)).graph
    layers = model.config.text_config.num_hidden_layers
    assert float_weight_matmuls(graph) == [] and recipe["float_weight_matmuls"] == []
    assert not [n.name for n in graph.node if n.op_type == "Gemm"]
    left = [n.name for n in graph.node if n.op_type == "MatMul"]
    # only attention's activation × activation products remain: scores (Q·Kᵀ) and weighted values, per layer
    assert len(left) == 2 * layers and all("/self_attn/" in name for name in left), left
    inits = {t.name for t in graph.initializer}
    assert all(i not in inits for n in graph.node if n.op_type == "MatMul" for i in n.input)
    # q, k, v, out_proj, fc1, fc2 per layer at 4 bits, and lm_head at 8 (the default head precision)
    assert recipe["quantized_matmuls"] == 6 * layers + 1 == sum(n.op_type == "MatMulNBits" for n in graph.node)
    assert recipe["matmuls_by_bits"] == {"4": 6 * layers, "8": 1}
    assert recipe["gemm_rewritten"] == 2 * layers  # OPT's fc1 / fc2 are traced as Gemm
    head = [n for n in graph.node if n.op_type == "MatMulNBits" and _bits(n) == 8]
    assert [n.output[0] for n in head] == ["logits"] and recipe["head"]["nodes"] == [n.name[:-3] for n in head]
    assert recipe["head"]["precision"] == "int8" and recipe["kept"] == {n.name[:-3]: "int8" for n in head}


def _bits(node) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == "bits")


def test_the_lm_head_is_the_matmul_that_makes_the_logits(fp32_decoder):
    graph = onnx.load(str(fp32_decoder)).graph
    gemm_to_matmul(graph)
    heads = output_projections(graph)
    assert len(heads) == 1 and "lm_head" in heads[0]
    assert output_projections(graph, "no_such_output") == []  # no logits output: no head kept off 4 bits


@pytest.mark.parametrize("head,ops,bits", [("fp32", {"MatMul"}, set()), ("int4", {"MatMulNBits"}, {4})])
def test_the_head_can_stay_fp32_or_go_to_4_bits(quantized, head, ops, bits):
    path, recipe = quantized(head=head)
    graph = onnx.load(str(path)).graph
    made = [n for n in graph.node if n.output[0] == "logits"]
    assert {n.op_type for n in made} == ops and {_bits(n) for n in made if n.op_type == "MatMulNBits"} == bits
    assert recipe["head"]["precision"] == head and len(recipe["head"]["nodes"]) == 1
    assert recipe["float_weight_matmuls"] == ([made[0].name] if head == "fp32" else [])
    assert recipe["matmuls_by_bits"]["8"] == 0


def test_an_8_bit_head_brings_the_logits_closer_to_fp32(quantized, fp32_decoder, model):
    feeds = prompt_feeds(model)
    reference = run_onnx(fp32_decoder, feeds)["logits"]
    error = {head: np.abs(run_onnx(quantized(head=head)[0], feeds)["logits"] - reference).mean()
             for head in ("int4", "int8", "fp32")}
    assert error["fp32"] <= error["int8"] < error["int4"], error


def test_unknown_nodes_to_keep_and_head_precisions_are_refused(fp32_decoder, tmp_path):
    with pytest.raises(QuantizationError, match="head precision"):
        quantize_int4(fp32_decoder, tmp_path / "q.onnx", head="int2")
    with pytest.raises(QuantizationError, match="nodes to keep"):
        quantize_int4(fp32_decoder, tmp_path / "q.onnx", keep={"no-such-node": "int8"})
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("block_size,accuracy_level", [(32, 4), (16, 0), (64, 4)])
def test_block_size_and_accuracy_level_are_selectable_and_recorded(quantized, block_size, accuracy_level):
    path, recipe = quantized(block_size, accuracy_level)
    assert recipe["block_size"] == block_size and recipe["accuracy_level"] == accuracy_level
    assert recipe["method"] == "int4-weight-only" and recipe["format"] == "MatMulNBits" and not recipe["symmetric"]
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MatMulNBits":
            assert len(node.input) == 4  # a zero point per block (asymmetric, the default)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            head = node.output[0] == "logits"
            assert attrs["bits"] == (8 if head else 4) and attrs.get("accuracy_level", 0) == accuracy_level
            expected = eight_bit_block(attrs["K"], block_size) if head else block_size
            assert attrs["block_size"] == expected, (node.name, attrs["block_size"], expected)
    assert set(recipe["eight_bit_blocks"].values()) == {eight_bit_block(64, block_size)}  # the tiny LLM: K = 64


def test_8_bit_nodes_take_the_longest_block_that_fits_up_to_256():
    """A power of two no longer than the row (MatMulNBits pads rows to whole blocks), at most 256, never shorter than
    the 4-bit layers' block."""
    assert [eight_bit_block(k, 32) for k in (768, 2560, 4096, 64, 48, 200)] == [256, 256, 256, 64, 32, 128]
    assert eight_bit_block(768, 32, largest=32) == 32 and eight_bit_block(768, 64) == 256


@pytest.mark.parametrize("block_size,accuracy_level", [(24, 4), (8, 4), (32, 7)])
def test_bad_settings_are_refused(fp32_decoder, tmp_path, block_size, accuracy_level):
    with pytest.raises(QuantizationError, match="block size|accuracy level"):
        quantize_int4(fp32_decoder, tmp_path / "q.onnx", block_size=block_size, accuracy_level=accuracy_level)


def test_not_a_graph_is_a_quantization_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(QuantizationError, match="INT4 weight-only quantization of 'bad.onnx' failed"):
        quantize_int4(tmp_path / "bad.onnx", tmp_path / "q.onnx")


def test_zero_points_bring_a_trained_models_logits_closer_to_fp32(tmp_path):
    """Asymmetric blocks (the default) on the shipped demo BLIP-2's decoder, the bundled scenes: measured 0.023 mean
    abs logit error vs 0.079 symmetric. (On random Gaussian weights, symmetric by construction, zero points buy
    nothing: the tiny random model's error is 0.45 with them, 0.40 without.)"""
    from transformers import AutoImageProcessor

    from mmedge import demo
    from mmedge.export.preprocessing import preprocess_config_from_hf
    from mmedge.images import load_image
    from mmedge.preprocess import ImagePreprocessor

    folder = demo.model_path("blip2")
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    spec = DecoderWithPast(model.language_model)
    fp32 = export_spec(spec, tmp_path / "decoder.onnx")
    pixels = ImagePreprocessor(preprocess_config_from_hf(AutoImageProcessor.from_pretrained(folder)))(
        [load_image(p) for p in demo.images()])  # [scenes, 3, H, W]
    with torch.no_grad():
        prefix = _FusedPrefix(model)(torch.from_numpy(pixels))  # [scenes, queries, width]
        embeds = torch.cat([prefix, model.language_model.get_input_embeddings()(torch.full((len(pixels), 1), 2))], 1)
    feeds = {k: v.numpy() for k, v in decoder_feeds(embeds, torch.ones(embeds.shape[:2], dtype=torch.long), None,
                                                     spec.kv_cache).items()}
    reference = run_onnx(fp32, feeds)["logits"][:, -1]  # [scenes, vocab]: the first caption token
    error = {}
    for symmetric in (True, False):
        quantize_int4(fp32, tmp_path / f"q-{symmetric}.onnx", symmetric=symmetric)
        error[symmetric] = np.abs(run_onnx(tmp_path / f"q-{symmetric}.onnx", feeds)["logits"][:, -1] - reference).mean()
    assert error[False] < 0.6 * error[True], error
    graph = onnx.load(str(tmp_path / "q-True.onnx")).graph
    assert all(len(n.input) == 3 for n in graph.node if n.op_type == "MatMulNBits")  # no zero points


def test_int4_logits_stay_close_to_fp32(quantized, fp32_decoder, model):
    feeds = prompt_feeds(model)
    reference = run_onnx(fp32_decoder, feeds)
    for settings in ((32, 4), (32, 0)):
        actual = run_onnx(quantized(*settings)[0], feeds)
        logits = compare(reference["logits"], actual["logits"])
        assert logits["cosine"] >= 0.95, (settings, logits)
        assert compare(reference["present.0.key"], actual["present.0.key"])["cosine"] >= 0.99


def test_int4_file_is_smaller(quantized, fp32_decoder):
    fp32 = fp32_decoder.stat().st_size
    sizes = {bs: quantized(bs, 4)[0].stat().st_size for bs in (16, 32, 64)}
    assert sizes[64] < sizes[32] < sizes[16] < 0.4 * fp32, (fp32, sizes)


def test_embedding_rows_match_matmulnbits_blocks_of_the_tied_lm_head(quantized, model):
    """The INT4 embedding table stored beside the graph is bit for bit the lm_head's MatMulNBits weight at 4 bits."""
    graph = onnx.load(str(quantized(32, 4, head="int4", symmetric=True)[0])).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    table = model.language_model.get_input_embeddings().weight.detach().numpy()  # [vocab, width]
    rows = quantize_rows_int4(table, 32)
    packed = inits[head.input[1]]  # [vocab, blocks, 16]
    assert np.array_equal(packed.reshape(len(table), -1), rows["weight"])
    np.testing.assert_allclose(inits[head.input[2]].reshape(rows["scales"].shape), rows["scales"], rtol=1e-6)


def test_embedding_row_codecs_round_trip():
    table = np.random.default_rng(0).standard_normal((50, 70)).astype(np.float32)
    for storage, arrays, tolerance in (("int4-block", quantize_rows_int4(table, 32), 0.99),
                                       ("int8-per-row", quantize_rows_int8(table), 0.9999)):
        restored = dequantize_rows(arrays, storage, 70, 32)
        assert restored.shape == table.shape and compare(table, restored)["cosine"] >= tolerance
        picked = np.array([[3, 1], [0, 49]])
        np.testing.assert_array_equal(dequantize_rows(arrays, storage, 70, 32, rows=picked), restored[picked])


def _gemm_graph(trans_b: int, alpha: float, beta: float) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b_alias"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    alias = helper.make_node("Identity", ["b"], ["b_alias"], name="dedup")  # how the tracer shares equal constants
    graph = helper.make_graph([alias, node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b,alpha,beta", [(1, 1.0, 1.0), (0, 0.5, 2.0)])
def test_gemm_rewrite_is_exact(tmp_path, trans_b, alpha, beta):
    model = _gemm_graph(trans_b, alpha, beta)
    onnx.save(model, str(tmp_path / "gemm.onnx"))
    assert gemm_to_matmul(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["Identity", "MatMul", "Add"]
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "matmul.onnx", {"x": x})["y"],
                               run_onnx(tmp_path / "gemm.onnx", {"x": x})["y"], rtol=1e-6, atol=1e-6)


def test_a_numpy_integer_block_size_is_taken_as_an_int():
    """np.int64(64) (a value read from an array) is an integer: taken, and recorded as Python's int."""
    import numpy as np

    from mmedge.export.int4 import check_int4_settings
    from mmedge.export.pipeline import ExportOptions

    check_int4_settings(np.int64(64), np.int32(4))
    settled = ExportOptions(llm_precision="int4", int4_block_size=np.int64(64)).settled("caption")
    assert type(settled.int4_block_size) is int and settled.int4_block_size == 64
