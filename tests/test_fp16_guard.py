"""FP16 exports keep in FP32 exactly the nodes whose activations leave FP16's range (``mmedge.export.fp16_ranges``).

The checkpoint is the tiny CLIP with one vision MLP's output weights scaled by 1e5: from that layer on, the vision
tower's residual stream is far past 65504 (the final LayerNorm brings it back), as random ViT-g activations are in
the full-size BLIP-2 and T5's feed-forward activations are. Converted whole, that graph computes inf/NaN on the
validation inputs; guarded, it passes the FP16 gate (cosine >= 0.999 vs FP32). Nothing here is CLIP-specific: the
check runs on any component's graph and its validation inputs.
"""

import json

import numpy as np
import onnx
import pytest
import torch
import transformers

from mmedge.export import export_model, fp16_ranges, onnx_export, quantize
from mmedge.export.onnx_export import OnnxSession
from tests.support.fp16 import component_feeds, validation_samples, vs_fp32

SCALE = 1e5
SCALED = "vision_model.encoder.layers.0.mlp.fc2"


def _save_beside(model, tiny_clip_dir, path):
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "preprocessor_config.json"):
        if (tiny_clip_dir / name).is_file():
            (path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    return path


@pytest.fixture(scope="module")
def overflowing_clip(tiny_clip_dir, tmp_path_factory):
    """The tiny CLIP with ``SCALED``'s weight and bias times ``SCALE`` (the weights themselves still fit FP16)."""
    model = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    layer = model.get_submodule(SCALED)
    with torch.no_grad():
        layer.weight.mul_(SCALE)
        layer.bias.mul_(SCALE)
    assert layer.weight.abs().max().item() < fp16_ranges.FP16_MAX
    return _save_beside(model, tiny_clip_dir, tmp_path_factory.mktemp("overflowing-clip"))


@pytest.fixture(scope="module")
def underflowing_clip(tiny_clip_dir, tmp_path_factory):
    """The tiny CLIP with every vision weight but the layer norms' drawn at std 1e-10: what a random-weight export of
    BLIP-2 OPT-2.7B's published config (vision ``initializer_range`` 1e-10) holds. FP16's smallest subnormal is 6e-8."""
    model = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.vision_model.named_parameters():
            if "norm" not in name:  # the layer norms keep their 1 / 0, as the published init does
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-10)
    return _save_beside(model, tiny_clip_dir, tmp_path_factory.mktemp("underflowing-clip"))


@pytest.fixture(scope="module")
def fp32_export(overflowing_clip, tmp_path_factory):
    out = export_model(str(overflowing_clip), tmp_path_factory.mktemp("fp32") / "a", progress=False)
    return out, validation_samples(out)


def test_ranges_find_the_overflow_and_only_in_the_scaled_tower(fp32_export):
    out, samples = fp32_export
    vision_over, checked, largest = fp16_ranges.over_limit(out / "vision.onnx", component_feeds(samples, "vision"))
    assert checked > 20 and vision_over
    assert largest == max(vision_over.values()) > fp16_ranges.FP16_MAX  # a real overflow, not just the headroom
    text_over, _, text_largest = fp16_ranges.over_limit(out / "text.onnx", component_feeds(samples, "text"))
    # its causal mask's -finfo(float32).max is a sentinel, not an activation
    assert text_over == {} and 0 < text_largest < fp16_ranges.FP16_SAFE_MAX


def test_naive_fp16_fails_and_the_guarded_conversion_passes(fp32_export, tmp_path):
    out, samples = fp32_export
    feeds = component_feeds(samples, "vision")
    naive = quantize.convert_fp16(out / "vision.onnx", tmp_path / "naive.onnx")
    assert naive["fp32_nodes"] == [] and "range_check" not in naive
    naive_cosines = [m["cosine"] for m in vs_fp32(out / "vision.onnx", tmp_path / "naive.onnx", feeds).values()]
    naive_out = OnnxSession(tmp_path / "naive.onnx").run(feeds)
    assert not all(np.isfinite(v).all() for v in naive_out.values()) or min(naive_cosines) < 0.999

    guarded = quantize.convert_fp16(out / "vision.onnx", tmp_path / "guarded.onnx", feeds)
    assert guarded["fp32_nodes"] and guarded["range_check"]["activations_over"] > 0
    metrics = vs_fp32(out / "vision.onnx", tmp_path / "guarded.onnx", feeds)
    assert min(m["cosine"] for m in metrics.values()) >= 0.999
    graph = onnx.load(str(tmp_path / "guarded.onnx"))
    kept = {n.name for n in graph.graph.node if n.name in set(guarded["fp32_nodes"])}
    assert kept == set(guarded["fp32_nodes"])  # every listed node is in the graph, by name
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types.values()  # the rest is FP16
    assert len(guarded["fp32_nodes"]) < len(graph.graph.node) / 2
    # no FP16 round trip between two kept nodes (ONNX Runtime's converter puts one there; inf on the way)
    producers = {out: n for n in graph.graph.node for out in n.output}
    to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None) for n in graph.graph.node}
    round_trips = [n.name for n in graph.graph.node if n.op_type == "Cast" and to[n.name] == onnx.TensorProto.FLOAT
                   and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Cast"
                   and to[producers[n.input[0]].name] == onnx.TensorProto.FLOAT16]
    assert round_trips == []


def test_fp16_export_records_the_fp32_nodes_and_passes_the_gate(overflowing_clip, tmp_path):
    out = export_model(str(overflowing_clip), tmp_path / "fp16", precision="fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    vision, text = manifest["components"]["vision"], manifest["components"]["text"]
    assert vision["precision"] == "fp16" and vision["quantization"]["fp32_nodes"]
    assert vision["quantization"]["range_check"]["inputs"] == "validation samples"
    assert min(o["cosine"] for o in vision["parity"]["outputs"].values()) >= 0.999
    assert text["quantization"]["fp32_nodes"] == []  # nothing overflows there: all of it is FP16


def test_streamed_guarded_fp16_matches_the_in_memory_one(fp32_export, overflowing_clip, tmp_path, monkeypatch):
    """The streaming FP16 path (weights in ``.onnx.data``) keeps the same nodes FP32 and computes the same outputs."""
    _, samples = fp32_export
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
        out = export_model(str(overflowing_clip), tmp_path / "streamed-fp32", progress=False)
    source = out / "vision.onnx"
    assert onnx_export.external_data_path(source) is not None
    feeds = component_feeds(samples, "vision")
    (tmp_path / "memory").mkdir(), (tmp_path / "streamed").mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(quantize, "streams", lambda path: False)
        memory = quantize.convert_fp16(source, tmp_path / "memory" / "vision.onnx", feeds)
    streamed = quantize.convert_fp16(source, tmp_path / "streamed" / "vision.onnx", feeds)
    assert memory == streamed and streamed["fp32_nodes"]
    expected = OnnxSession(tmp_path / "memory" / "vision.onnx").run(feeds)
    actual = OnnxSession(tmp_path / "streamed" / "vision.onnx").run(feeds)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert not list(out.glob(".*fp16-ranges*"))  # the augmented range graph is removed


def test_weights_and_activations_below_fp16s_range_stay_fp32(underflowing_clip, tmp_path):
    """Naive FP16 clamps the 1e-10 weights up to 6e-8 (and the 1e-10 activations they make down to 0): the vision
    tower's output changes; guarded, the nodes reading those weights or those activations stay FP32."""
    out = export_model(str(underflowing_clip), tmp_path / "fp32", progress=False)
    feeds = component_feeds(validation_samples(out), "vision")
    source = out / "vision.onnx"
    small = fp16_ranges.weights_fp16_cannot_hold(source)
    assert small and min(small.values()) > fp16_ranges.WEIGHT_MAX_ERROR
    assert fp16_ranges.weights_fp16_cannot_hold(out / "text.onnx") == {}  # the text tower's weights fit FP16

    quantize.convert_fp16(source, tmp_path / "naive.onnx")
    naive = min(m["cosine"] for m in vs_fp32(source, tmp_path / "naive.onnx", feeds).values())
    assert naive < 0.999
    guarded = quantize.convert_fp16(source, tmp_path / "guarded.onnx", feeds)
    assert guarded["weight_check"]["tensors_kept_fp32"] == len(small) and guarded["fp32_nodes"]
    assert guarded["range_check"]["activations_under"] > 0
    metrics = vs_fp32(source, tmp_path / "guarded.onnx", feeds)
    assert min(m["cosine"] for m in metrics.values()) >= 0.999, (naive, metrics)


def test_trained_scale_weights_pass_the_weight_check(fp32_export):
    """Weights at a checkpoint's usual scale (std ~0.02) are not kept FP32 for their size."""
    out, _ = fp32_export
    assert fp16_ranges.weights_fp16_cannot_hold(out / "text.onnx") == {}
    assert fp16_ranges.fp16_error(np.float32([1e-10, 2e-10, -3e-10])) > 100  # clamped up to 6e-8: ~300x
    assert fp16_ranges.fp16_error(np.float32([0.02, -0.013, 0.5])) < fp16_ranges.WEIGHT_MAX_ERROR
