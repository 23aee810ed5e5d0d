"""BLIP-2 export on a tiny random checkpoint: parity per component, the KV-cache decoder, the manifest,
quantized fidelity, and captions / answers token-identical to ``model.generate``."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from mmedge.artifact import Artifact, sha256_file
from mmedge.errors import InputError
from mmedge.export import export_model
from mmedge.export.families.blip2 import Blip2Family
from mmedge.export.int4 import dequantize_rows
from mmedge.export.onnx_export import run_onnx
from mmedge.export.specs.blip2 import CHECK_SIZES, decoder_feeds
from mmedge.manifest import RECIPE_REVISION
from mmedge.preprocess import ImagePreprocessor
from mmedge.tokenizer import TextTokenizer

VQA_PROMPT = "Question: what is it? Answer:"
VARIANTS = {
    "fp32": {},
    "split": {"extra": {"fused_prefix": False}},
    "fused": {"extra": {"fused_attention": True}},  # FP32, one MultiHeadAttention node per decoder layer
    "int4": {"precision": "int8", "llm_precision": "int4"},  # INT8 dynamic prefix, INT4 decoder
    "split-int8-static": {"precision": "int8", "quantization": "static", "extra": {"fused_prefix": False}},
}


@pytest.fixture(scope="module")
def artifacts(tiny_blip2_dir, tmp_path_factory):
    """Export variants of the tiny BLIP-2, each once per module: ``artifacts("int4")``."""
    root, made = tmp_path_factory.mktemp("blip2-artifacts"), {}

    def get(name):
        if name not in made:
            made[name] = export_model(str(tiny_blip2_dir), root / name, progress=False, **VARIANTS[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def hf(tiny_blip2_dir):
    return (Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir).eval(),
            Blip2Processor.from_pretrained(tiny_blip2_dir))


@pytest.fixture(scope="module")
def images():
    """Four of the exporter's held-out photos."""
    from mmedge.export.calibration import bundled

    return [Image.open(p).convert("RGB") for p in bundled("holdout")[:4]]


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def table_of(path):
    """The artifact's token-embedding table, dequantized to float32 [vocab, width]."""
    entry = manifest(path)["blip2"]["embeddings"]
    with np.load(path / entry["file"]) as data:
        arrays = {k: data[k] for k in data.files}
    return dequantize_rows(arrays, entry["storage"], entry["shape"][1], entry.get("block_size"))


def device_prompt(path, images, prompt):
    """What the device computes before the decoder: prefix rows, then embedded prompt ids ([batch, tokens, width])."""
    m = manifest(path)
    pixels = ImagePreprocessor(m["preprocess"])(images)
    prefix = run_onnx(path / "prefix.onnx", {"pixel_values": pixels})["prefix_embeds"]
    if prompt is None:
        ids = np.full((len(images), 1), m["blip2"]["bos_token_id"], dtype=np.int64)
    else:
        ids = TextTokenizer.from_file(path / "tokenizer.json", m["tokenizer"]).encode([prompt] * len(images))[0]
    return np.concatenate([prefix, table_of(path)[ids]], axis=1), ids


# --- FP32 parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["fp32", "split", "fused"])
def test_fp32_parity_per_component_on_fresh_shapes(artifacts, variant):
    m = manifest(artifacts(variant))
    assert set(m["components"]) == ({"vision", "qformer", "decoder"} if variant == "split" else {"prefix", "decoder"})
    for name, comp in m["components"].items():
        parity = comp["parity"]
        assert all(shape[0] == 3 for shape in parity["inputs"].values())  # traced at batch 2
        for output, figures in [*parity["outputs"].items(), *parity["validation_samples"].items()]:
            assert figures["cosine"] >= 0.99999 and figures["max_abs"] <= 1e-4, (name, output, figures)
    past = m["components"]["decoder"]["parity"]["inputs"]["past_key_values.0.key"]
    assert past[2] == CHECK_SIZES["past"]  # traced with past 5, checked with past 6


def test_graphs_equal_transformers_on_real_photos(artifacts, hf, images):
    """The processor's pixels through the graphs give the model's image features, and mmedge's
    preprocessing gives the processor's pixels."""
    model, processor = hf
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # [4, 3, 32, 32]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
    reference = features.pooler_output.numpy()  # [4, queries, width]
    fused = run_onnx(artifacts("fp32") / "prefix.onnx", {"pixel_values": pixels.numpy()})["prefix_embeds"]
    np.testing.assert_allclose(fused, reference, atol=1e-4)
    split = artifacts("split")
    image_embeds = run_onnx(split / "vision.onnx", {"pixel_values": pixels.numpy()})["image_embeds"]
    np.testing.assert_allclose(image_embeds, features.last_hidden_state.numpy(), atol=1e-4)
    ours = ImagePreprocessor(manifest(split)["preprocess"])(images)
    np.testing.assert_allclose(ours, pixels.numpy(), atol=1e-5)


def test_fused_prefix_equals_vision_then_qformer(artifacts, images):
    pixels = ImagePreprocessor(manifest(artifacts("fp32"))["preprocess"])(images)
    fused = run_onnx(artifacts("fp32") / "prefix.onnx", {"pixel_values": pixels})["prefix_embeds"]
    image_embeds = run_onnx(artifacts("split") / "vision.onnx", {"pixel_values": pixels})["image_embeds"]
    split = run_onnx(artifacts("split") / "qformer.onnx", {"image_embeds": image_embeds})["prefix_embeds"]
    np.testing.assert_allclose(fused, split, atol=1e-5)


# --- the decoder and its KV cache ----------------------------------------------------------------------
def decode(path, embeds, mask, past):
    layout = manifest(path)["blip2"]["decoder"]["kv_cache"]
    feeds = decoder_feeds(torch.from_numpy(embeds), torch.from_numpy(mask), past, layout)
    out = run_onnx(path / "decoder.onnx", {k: v.numpy() for k, v in feeds.items()})
    present = [torch.from_numpy(out[layout["present"] % (i, kind)]) for i in range(layout["layers"])
               for kind in ("key", "value")]
    return out["logits"], present


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_the_lm_head_runs_on_the_positions_asked_for(artifacts, images, variant):
    """logits_positions picks the rows the LM head runs on: the generation loop's prefill asks for the last one and
    gets exactly that row of the every-position logits; any rows, in any order, per batch row."""
    from mmedge.generation.kv_layout import LOGITS_POSITIONS

    path = artifacts(variant)
    layout = manifest(path)["blip2"]["decoder"]["kv_cache"]
    embeds, _ = device_prompt(path, images[:2], VQA_PROMPT)  # [2, queries + 9, width]
    feeds = {k: v.numpy() for k, v in decoder_feeds(torch.from_numpy(embeds), torch.ones(embeds.shape[:2],
                                                                                          dtype=torch.long),
                                                    None, layout).items()}
    every = run_onnx(path / "decoder.onnx", feeds)["logits"]  # [2, tokens, vocab]
    assert every.shape[1] == embeds.shape[1]
    tokens = embeds.shape[1]
    picked = np.array([[tokens - 1], [tokens - 1]])
    last = run_onnx(path / "decoder.onnx", feeds | {LOGITS_POSITIONS: picked})["logits"]  # [2, 1, vocab]
    np.testing.assert_allclose(last[:, 0], every[:, -1], atol=1e-5)
    rows = np.array([[3, 0], [tokens - 1, 5]])
    some = run_onnx(path / "decoder.onnx", feeds | {LOGITS_POSITIONS: rows})["logits"]  # [2, 2, vocab]
    np.testing.assert_allclose(some, np.stack([every[0, [3, 0]], every[1, [tokens - 1, 5]]]), atol=1e-5)
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    decoder = OrtDecoder(str(path / "decoder.onnx"), table_of(path), layout)  # the loop's prefill: the last row
    np.testing.assert_allclose(decoder.start(embeds, np.ones(embeds.shape[:2], dtype=np.int64)), every[:, -1],
                               atol=1e-5)


def test_prefill_then_single_token_steps_equal_a_recompute_without_cache(artifacts, hf, images):
    """Past 0 (prefill) then 1-token steps through the cache give HF's logits for the whole sequence."""
    path = artifacts("fp32")
    model, _ = hf
    embeds, _ = device_prompt(path, images[:2], VQA_PROMPT)  # [2, queries + 9, width]
    mask = np.ones(embeds.shape[:2], dtype=np.int64)
    logits, past = decode(path, embeds, mask, None)
    table = table_of(path)
    for _ in range(3):
        token = logits[:, -1].argmax(-1)  # [2]
        embeds = np.concatenate([embeds, table[token][:, None]], axis=1)
        mask = np.ones(embeds.shape[:2], dtype=np.int64)
        logits, past = decode(path, embeds[:, -1:], mask, past)
        assert logits.shape[1] == 1 and past[0].shape[2] == embeds.shape[1]
        with torch.no_grad():  # HF computes positions from the mask itself, no cache
            full = model.language_model(inputs_embeds=torch.from_numpy(embeds),
                                        attention_mask=torch.from_numpy(mask)).logits.numpy()
        np.testing.assert_allclose(logits[:, -1], full[:, -1], atol=1e-4)


@pytest.mark.parametrize("variant", ["fp32", "fused"])
def test_left_padded_prompts_match_transformers(artifacts, hf, images, variant):
    """Rows of different lengths, left-padded: positions cumsum(mask) - 1 reproduce HF's own."""
    path = artifacts(variant)
    model, _ = hf
    long, _ = device_prompt(path, images[:1], VQA_PROMPT)  # [1, queries + 9, width]
    short, _ = device_prompt(path, images[1:2], None)  # [1, queries + 1, width]
    pad = long.shape[1] - short.shape[1]
    embeds = np.concatenate([long, np.concatenate([np.zeros_like(long[:, :pad]), short], axis=1)])
    mask = np.ones(embeds.shape[:2], dtype=np.int64)
    mask[1, :pad] = 0
    logits, _ = decode(path, embeds, mask, None)
    with torch.no_grad():
        reference = model.language_model(inputs_embeds=torch.from_numpy(embeds),
                                         attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(logits[0], reference[0], atol=1e-4)
    np.testing.assert_allclose(logits[1, pad:], reference[1, pad:], atol=1e-4)  # padded slots are undefined


@pytest.mark.parametrize("variant", ["fp32", "fused"])
def test_decoder_graph_io_matches_the_manifest(artifacts, variant):
    path = artifacts(variant)
    m = manifest(path)
    kv = m["blip2"]["decoder"]["kv_cache"]
    assert m["components"]["decoder"]["kv_cache"] == kv
    assert {k: kv[k] for k in ("layers", "heads", "head_dim", "past", "present")} == {
        "layers": 2, "heads": 4, "head_dim": 16, "past": "past_key_values.%d.%s", "present": "present.%d.%s"}
    graph = onnx.load(str(path / "decoder.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value
                     for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert dims["inputs_embeds"] == ["batch", "sequence", 64]
    assert dims["attention_mask"] == ["batch", "total_sequence"] and dims["position_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 4, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 4, "total_sequence", 16]
    assert dims["logits"] == ["batch", "logits_sequence", 576]
    assert dims["logits_positions"] == ["batch", "logits_sequence"]  # the rows the LM head runs on
    assert [i.name for i in graph.input][:3] == ["inputs_embeds", "attention_mask", "position_ids"]


# --- manifest ----------------------------------------------------------------------------------------
def test_manifest_blip2_section(artifacts, hf, tiny_blip2_dir):
    path = artifacts("fp32")
    m = manifest(path)
    model, processor = hf
    tokenizer = processor.tokenizer
    assert m["family"] == "blip2" and m["tasks"] == ["caption", "vqa"]
    assert m["export"]["recipe_revision"] == RECIPE_REVISION  # which default recipes wrote it (caches compare it)
    assert m["preprocess"]["resize"] == {"height": 32, "width": 32} and m["preprocess"]["resample"] == "bicubic"
    assert m["preprocess"]["center_crop"] is None
    assert m["generation"] == {"max_new_tokens": 30, "min_new_tokens": 0, "num_beams": 1, "length_penalty": 1.0,
                               "early_stopping": False, "do_sample": False, "temperature": 1.0, "top_k": 50,
                               "top_p": 1.0, "repetition_penalty": 1.0, "bos_token_id": 2,
                               "eos_token_id": tokenizer.convert_tokens_to_ids("Ċ"), "pad_token_id": 1}
    b = m["blip2"]
    assert b["num_query_tokens"] == 6 and b["prefix"]["components"] == ["prefix"]
    assert b["prefix"]["shape"] == ["batch", 6, 64] and b["prefix"]["output"] == "prefix_embeds"
    assert (b["bos_token_id"], b["pad_token_id"]) == (tokenizer.bos_token_id, tokenizer.pad_token_id) == (2, 1)
    assert b["eos_token_id"] == model.generation_config.eos_token_id
    assert b["image_tokens"]["hf_image_token_id"] == model.config.image_token_index \
        == tokenizer.convert_tokens_to_ids("<image>")
    assert b["image_tokens"]["in_prompt_ids"] is False
    assert b["prompts"] == {"caption": None, "vqa": "Question: {} Answer:"}
    assert b["decoder"]["position_offset"] == 0 and b["decoder"]["max_positions"] == 128
    emb = b["embeddings"]
    assert emb["file"] == "embed_tokens.npz" and emb["sha256"] == sha256_file(path / "embed_tokens.npz")
    assert emb["storage"] == "float32" and emb["shape"] == [576, 64] and emb["tied_to_lm_head"] is True
    np.testing.assert_array_equal(table_of(path), model.language_model.get_input_embeddings().weight.detach().numpy())
    assert sorted(p.name for p in path.iterdir() if p.name != "engines") == [  # engines/: this device's caches
        "decoder.onnx", "embed_tokens.npz", "manifest.json", "prefix.onnx", "tokenizer.json", "validation.npz"]
    Artifact.open(path)  # the device's reader accepts it


def test_device_tokenizer_gives_the_processor_ids_after_the_image_tokens(artifacts, hf, images):
    """HF puts num_query_tokens <image> ids first, then tokenizer(prompt); the device uses the rest as is."""
    _, processor = hf
    _, ids = device_prompt(artifacts("fp32"), images[:1], VQA_PROMPT)
    hf_ids = processor(images=images[:1], text=VQA_PROMPT, return_tensors="np")["input_ids"]
    image_token = manifest(artifacts("fp32"))["blip2"]["image_tokens"]["hf_image_token_id"]
    assert (hf_ids[0, :6] == image_token).all()
    np.testing.assert_array_equal(hf_ids[:, 6:], ids)


# --- quantized variants --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,storage", [("int4", "int4-block"), ("split-int8-static", "int8-per-row")])
def test_quantized_exports_record_fidelity(artifacts, variant, storage):
    m = manifest(artifacts(variant))
    fp32 = manifest(artifacts("fp32"))
    decoder = m["components"]["decoder"]
    fidelity = decoder["parity"]["fidelity"]
    assert decoder["precision"] == ("int4" if variant == "int4" else "int8")
    assert fidelity["reference"] == "onnx-fp32" and fidelity["sequences"] == 8 * 3
    assert fidelity["logits_cosine_mean"] >= 0.95, fidelity
    assert 0.0 <= fidelity["greedy_identical_share"] <= fidelity["greedy_common_prefix_share"] <= 1.0
    assert fidelity["generation_loop"] in ("mmedge.generation", "export-greedy")
    assert m["blip2"]["embeddings"]["storage"] == storage == fidelity["embeddings"]
    assert decoder["size_bytes"] < 0.4 * fp32["components"]["decoder"]["size_bytes"]
    for name in m["components"].keys() - {"decoder"}:
        comp = m["components"][name]
        assert comp["precision"] == "int8" and comp["parity"]["fidelity"]["embedding_cosine_mean"] >= 0.98
    if variant == "int4":
        assert decoder["quantization"]["block_size"] == 32 and decoder["quantization"]["accuracy_level"] == 4
        assert decoder["quantization"]["float_weight_matmuls"] == []
    else:
        assert m["components"]["qformer"]["quantization"]["calibration"]["source"].endswith("through FP32 vision")
        assert decoder["quantization"]["method"] == "int8-dynamic"  # the decoder is never statically calibrated


def decoder_ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph.node]


def test_fused_attention_is_one_node_per_layer_and_recorded(artifacts):
    """--fused-attention writes one com.microsoft.MultiHeadAttention node per decoder layer and no attention ops of its
    own; by default (INT4 included) the decoder keeps transformers' ops, which TensorRT builds; the manifest says which,
    and TensorRT planning refuses the fused graph with the reason."""
    from mmedge.runtimes.tensorrt_planning import unbuildable_reason

    layers = manifest(artifacts("fp32"))["blip2"]["decoder"]["kv_cache"]["layers"]
    for variant, fused in (("fp32", False), ("int4", False), ("fused", True)):
        entry = manifest(artifacts(variant))["components"]["decoder"]
        ops = decoder_ops(artifacts(variant))
        assert entry["attention"]["op"] == ("com.microsoft.MultiHeadAttention" if fused else "standard"), variant
        assert ops.count("MultiHeadAttention") == (layers if fused else 0), variant
        assert ("Softmax" in ops) != fused, variant  # no attention left outside the fused nodes
    assert len(decoder_ops(artifacts("fused"))) < 0.75 * len(decoder_ops(artifacts("fp32")))
    fused = manifest(artifacts("fused"))["components"]["decoder"]
    assert "--fused-attention" in fused["attention"]["why"]
    assert "MultiHeadAttention" in unbuildable_reason("decoder", fused)
    assert unbuildable_reason("decoder", manifest(artifacts("fp32"))["components"]["decoder"]) is None
    assert fused["parity"]["reference"] == "torch-fp32"  # checked against transformers' own attention


def test_fused_attention_refuses_a_decoder_it_cannot_rewrite():
    """A Llama-family LLM (rotary embeddings) keeps its attention; asking to fuse it is refused with the reason."""
    import transformers

    from mmedge.export.families.blip2 import decoder_attention

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    assert decoder_attention(False, llama)["op"] == "standard"
    with pytest.raises(InputError, match="--fused-attention cannot rewrite .*LlamaAttention"):
        decoder_attention(True, llama)


def test_int4_llm_with_its_table_is_much_smaller(artifacts):
    fp32, int4 = artifacts("fp32"), artifacts("int4")
    size = lambda p: (p / "decoder.onnx").stat().st_size + (p / "embed_tokens.npz").stat().st_size  # noqa: E731
    assert size(int4) < 0.3 * size(fp32), (size(int4), size(fp32))


# --- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [({"task": "zero-shot"}, "not a BLIP-2 task"),
                                             ({"extra": {"fused": True}}, "unknown BLIP-2 export setting"),
                                             ({"labels": ["cat"]}, "--labels")])
def test_bad_options_fail_before_writing(tiny_blip2_dir, tmp_path, overrides, match):
    with pytest.raises(InputError, match=match):
        export_model(str(tiny_blip2_dir), tmp_path / "out", progress=False, **overrides)
    assert list(tmp_path.iterdir()) == []


def test_bundled_configs_are_the_published_architecture():
    import transformers

    from mmedge.export.loading import _bundled_config

    config = transformers.AutoConfig.for_model(**_bundled_config("Salesforce/blip2-opt-2.7b")["config"])
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1408, 39)
    assert (config.qformer_config.hidden_size, config.num_query_tokens, config.image_token_index) == (768, 32, 50265)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.vocab_size) == (2560, 32, 32, 50304)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (2, 50118, 1)
    bench = transformers.AutoConfig.for_model(**_bundled_config("mmedge/blip2-vitb-opt125m")["config"])
    assert (bench.text_config.hidden_size, bench.text_config.num_hidden_layers,
            bench.text_config.vocab_size) == (768, 12, 50272)
    assert bench.qformer_config.encoder_hidden_size == bench.vision_config.hidden_size == 768
    tokenizer = Blip2Family.synthetic_tokenizer(config)
    assert tokenizer("a cat")["input_ids"][0] == 2 and tokenizer.convert_tokens_to_ids("<image>") == 50265
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]


# --- generation: the FP32 artifact says what PyTorch says ------------------------------------------------
def hf_new_tokens(hf, images, prompt, **settings):
    model, processor = hf
    inputs = processor(images=images, text=None if prompt is None else [prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, **settings)
    prompt_length = 6 + (1 if prompt is None else inputs["input_ids"].shape[1] - 6)
    return out[:, prompt_length:].numpy()


@pytest.mark.parametrize("prompt", [None, VQA_PROMPT])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("variant", ["fp32", "fused"])
def test_generation_is_token_identical_to_transformers(artifacts, hf, images, prompt, num_beams, variant):
    from mmedge.generation import GenerationConfig, generate, pad_rows
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    path = artifacts(variant)
    m = manifest(path)
    embeds, _ = device_prompt(path, images, prompt)
    decoder = OrtDecoder(str(path / "decoder.onnx"), table_of(path), m["blip2"]["decoder"]["kv_cache"])
    config = GenerationConfig.from_dict(m["generation"]).replace(max_new_tokens=8, num_beams=num_beams)
    ours = pad_rows(generate(decoder, embeds, None, config), m["generation"]["pad_token_id"])
    reference = hf_new_tokens(hf, images, prompt, num_beams=num_beams)
    np.testing.assert_array_equal(ours, reference[:, : ours.shape[1]])
    assert (reference[:, ours.shape[1]:] == m["generation"]["pad_token_id"]).all()
