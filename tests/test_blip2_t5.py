"""BLIP-2 with Flan-T5 end to end on a tiny random checkpoint saved with ``save_pretrained``: component parity, the
encoder's cross K/V computed once per prompt, greedy / beam / VQA tokens identical to ``model.generate`` (batches of
prompts of different lengths included), the captioner, the CLI, the bundled full-size config."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import mmedge
from mmedge.cli import main
from mmedge.generation import generate
from mmedge.pipelines.captioner import Captioner
from mmedge.pipelines.seq2seq import Seq2SeqInputs

VQA = "Question: what is in the picture? Answer:"
PROMPT_BATCHES = {
    "caption": [None, None, None],
    "vqa": [VQA] * 3,
    "different lengths": ["Question: what is it? Answer:", "a photo of",
                          "Question: how many people are there in the picture? Answer:"],
}


@pytest.fixture(scope="module")
def hf(tiny_blip2_t5_dir):
    return (Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_t5_dir).eval(),
            Blip2Processor.from_pretrained(tiny_blip2_t5_dir))


@pytest.fixture(scope="module")
def images():
    from mmedge.export.calibration import bundled

    return [Image.open(p).convert("RGB") for p in bundled("holdout")[:3]]


@pytest.fixture(scope="module")
def captioner(blip2_t5_artifact):
    with mmedge.load(blip2_t5_artifact, threads=1) as pipeline:
        yield pipeline


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def hf_tokens(hf, images, prompts, **settings) -> list[list[int]]:
    """transformers' new tokens per row (the decoder start token and the padding after EOS dropped)."""
    model, processor = hf
    texts = None if prompts[0] is None else list(prompts)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **settings).numpy()
    rows = []
    for row in out[:, 1:].tolist():  # encoder-decoder: the start token first, then the new tokens
        rows.append(row[: row.index(1) + 1] if 1 in row else row)  # up to EOS (</s> = 1), as mmedge returns them
    return rows


def prepared(captioner, images, prompts) -> tuple:
    """``(embeds, mask, ids)`` of the decoder's start token, its context (the encoder's cross K/V) set: what the
    captioner does before its generation loop."""
    built = captioner.inputs.for_images(images, list(prompts))
    captioner.decoder.set_context(built["prefill"], built["step"])
    return built["embeds"], built["mask"], built["ids"]


def our_tokens(captioner, images, prompts, **settings) -> list[list[int]]:
    embeds, mask, ids = prepared(captioner, images, prompts)
    return generate(captioner.decoder, embeds, mask, captioner._config(settings), prompt_ids=ids)


# --- export ---------------------------------------------------------------------------------------
def test_components_and_their_parity(blip2_t5_artifact):
    m = manifest(blip2_t5_artifact)
    assert m["family"] == "blip2_t5" and list(m["components"]) == ["prefix", "encoder", "decoder"]
    for name, entry in m["components"].items():
        assert entry["parity"]["reference"] == "torch-fp32"
        for output, figures in [*entry["parity"]["outputs"].items(), *entry["parity"]["validation_samples"].items()]:
            assert figures["cosine"] >= 0.99999 and figures["max_abs"] <= 1e-3, (name, output, figures)
    decoder = m["components"]["decoder"]
    assert "position_ids" not in decoder["inputs"]  # relative positions, from the cache length
    assert decoder["parity"]["inputs"]["past_key_values.0.key"][2] == 6  # traced with past 5, checked with 6
    assert decoder["parity"]["inputs"]["cross_key_values.1.value"][2] == 13  # and another encoder length
    encoder = m["components"]["encoder"]
    assert set(encoder["outputs"]) == {f"cross_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")}
    section = m["blip2_t5"]
    assert section["decoder"]["decoder_start_token_id"] == 0 and section["encoder"]["padding_side"] == "right"
    assert section["embeddings"]["shape"] == [171, 64] and m["generation"]["eos_token_id"] == 1


def test_cross_kv_equals_the_decoders_own_projection_of_the_encoder_output(blip2_t5_artifact, hf):
    """The encoder graph's K/V are what T5's cross-attention computes from the encoder output (HF's first step)."""
    from mmedge.export.onnx_export import run_onnx

    model, _ = hf
    llm = model.language_model
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 9, 64, generator=generator)  # [batch, tokens, d_model]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        hidden = llm.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        value = llm.decoder.block[1].layer[1].EncDecAttention.v(hidden).view(2, 9, 4, 16).transpose(1, 2)
    graph = run_onnx(blip2_t5_artifact / "encoder.onnx",
                     {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(graph["cross_key_values.1.value"], value.numpy(), atol=1e-5)


# --- generation: the FP32 artifact says what transformers says -------------------------------------
@pytest.mark.parametrize("batch", list(PROMPT_BATCHES))
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_tokens_identical_to_generate(captioner, hf, images, batch, num_beams):
    prompts = PROMPT_BATCHES[batch]
    expected = hf_tokens(hf, images, prompts, max_new_tokens=10, num_beams=num_beams)
    assert our_tokens(captioner, images, prompts, max_new_tokens=10, num_beams=num_beams) == expected


def test_caption_ask_and_stream_equal_transformers_text(captioner, hf, images, photos):
    _, processor = hf
    decode = processor.tokenizer.decode
    answer = hf_tokens(hf, images[:1], [VQA], max_new_tokens=8)[0]
    assert captioner.ask(images[0], "what is in the picture?", max_new_tokens=8) == decode(
        answer, skip_special_tokens=True).strip()
    questions = [f"Question: {q} Answer:" for q in ("what is it?", "how many people are there in the picture?", "a?")]
    answers = captioner.caption(images, questions, max_new_tokens=8)  # one prompt per image
    expected = hf_tokens(hf, images, questions, max_new_tokens=8)
    assert answers == [decode(t, skip_special_tokens=True).strip() for t in expected]
    for beams in (1, 2):
        assert "".join(captioner.stream(images[1], max_new_tokens=10, num_beams=beams)) == captioner.caption(
            images[1], max_new_tokens=10, num_beams=beams)
    assert captioner.caption(images, max_new_tokens=6) == [captioner.caption(i, max_new_tokens=6) for i in images]


def test_the_encoder_runs_once_per_call_and_beams_never_copy_the_cross_kv(captioner, images):
    encoder = captioner.runners["encoder"]
    calls = []
    infer = encoder.infer
    encoder.infer = lambda feeds: calls.append(feeds) or infer(feeds)
    decoder = captioner.decoder
    gathers = []
    try:
        start, _, ids = prepared(captioner, images[:2], [VQA, None])
        original = decoder.reorder

        def reorder(rows):
            before = decoder._context["step"]["cross_key_values.0.key"]
            original(rows)
            gathers.append(decoder._context["step"]["cross_key_values.0.key"] is not before)

        decoder.reorder = reorder
        generate(decoder, start, None, captioner._config({"num_beams": 3, "max_new_tokens": 8}), prompt_ids=ids)
    finally:
        encoder.infer = infer
        del decoder.reorder
    assert len(calls) == 1 and calls[0]["inputs_embeds"].shape[0] == 2  # once, one row per prompt
    assert gathers[0] and len(gathers) > 3 and not any(gathers[1:])  # expanded to beams once, then never copied
    assert decoder._context["step"]["cross_key_values.0.key"].shape[0] == 6  # 2 prompts x 3 beams


def test_load_and_cli_answer_a_question(blip2_t5_artifact, captioner, photos, capsys):
    assert isinstance(captioner, Captioner) and isinstance(captioner.inputs, Seq2SeqInputs)
    assert main(["run", str(blip2_t5_artifact), photos[0], "--question", "what is it?", "--max-new-tokens", "6",
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "Question: what is it? Answer:"
    assert line["text"] == captioner.ask(photos[0], "what is it?", max_new_tokens=6)


def test_bad_prompt_lists_are_refused(captioner, images):
    from mmedge.errors import InputError

    with pytest.raises(InputError, match="2 prompts were given for 3 images"):
        captioner.caption(images, ["a", "b"])
    with pytest.raises(InputError, match="prompt is a int"):
        captioner.caption(images[:2], ["what?", 3])
    image_token = captioner.settings["image_tokens"]["hf_image_token_id"]
    if image_token is not None:  # transformers 5's BLIP-2 processors add one
        placeholder = captioner.tokenizer.decode([image_token], skip_special_tokens=False)
        with pytest.raises(InputError, match="the image placeholder"):
            captioner.caption(images[0], f"a {placeholder} b")
    with pytest.raises(InputError, match="characters"):  # before seconds of tokenizing
        captioner.caption(images[0], "word " * 1_000_000)
    # the prompt is the encoder's: the decoder's positions start at its start token, and are not bounded
    assert captioner.prompt_positions(images[0], "Question: what is it? Answer:") == 1
    assert captioner.max_positions is None
    with pytest.raises(InputError, match="prompt is a int"):  # judged as the call judges it
        captioner.prompt_positions(images[0], 3)


# --- the family and the full-size config --------------------------------------------------------------
def test_checkpoints_go_to_the_family_of_their_language_model(tiny_blip2_t5_dir, tiny_blip2_dir):
    from mmedge.export.loading import checkpoint_family

    assert checkpoint_family(str(tiny_blip2_t5_dir)) == "blip2_t5"
    assert checkpoint_family(str(tiny_blip2_dir)) == "blip2"
    assert checkpoint_family("Salesforce/blip2-flan-t5-xl", random_weights=True) == "blip2_t5"
    assert checkpoint_family("Salesforce/blip2-opt-2.7b", random_weights=True) == "blip2"


def test_bundled_flan_t5_xl_config_is_the_published_architecture():
    import transformers

    from mmedge.export.loading import _bundled_config

    entry = _bundled_config("Salesforce/blip2-flan-t5-xl")
    config = transformers.AutoConfig.for_model(**entry["config"])
    text = config.text_config
    assert (text.model_type, text.d_model, text.d_ff, text.d_kv, text.num_heads) == ("t5", 2048, 5120, 64, 32)
    assert (text.num_layers, text.num_decoder_layers, text.vocab_size, text.feed_forward_proj) == (
        24, 24, 32128, "gated-gelu")
    assert (config.vision_config.num_hidden_layers, config.vision_config.hidden_size, config.num_query_tokens) == (
        39, 1408, 32)
    assert config.image_token_index == 32100
    with torch.device("meta"):  # builds at full size without allocating weights
        model = Blip2ForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 3.8e9 < params < 4.0e9  # 3.88 B: transformers 5 ties T5's LM head to the shared table


# --- INT8 / INT4 language model ------------------------------------------------------------------------
QUANTIZED = {
    # Random tiny LLMs have no redundancy: 4-bit weights move their logits far more than a trained model's (cosine
    # about 0.83 here vs >= 0.95 expected of real checkpoints), so the gate is lowered for this test, as for IDEFICS.
    "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.75}},
    "int8": {"precision": "int8"},
}


@pytest.fixture(scope="module")
def quantized(tiny_blip2_t5_dir, tmp_path_factory):
    from mmedge.export import export_model

    root, made = tmp_path_factory.mktemp("blip2-t5-quantized"), {}

    def get(name):
        if name not in made:
            made[name] = export_model(str(tiny_blip2_t5_dir), root / name, progress=False, **QUANTIZED[name])
        return made[name]

    return get


@pytest.mark.parametrize("variant,storage,floor", [("int4", "int4-block", 0.75), ("int8", "int8-per-row", 0.95)])
def test_quantized_llm_lowers_encoder_and_decoder_and_records_fidelity(quantized, blip2_t5_artifact, images, variant,
                                                                        storage, floor):
    import onnx

    path = quantized(variant)
    m, fp32 = manifest(path), manifest(blip2_t5_artifact)
    for name in ("encoder", "decoder"):
        entry = m["components"][name]
        assert entry["precision"] == variant
        assert entry["quantization"]["method"] == ("int4-weight-only" if variant == "int4" else "int8-dynamic")
        assert entry["size_bytes"] < 0.45 * fp32["components"][name]["size_bytes"]
        graph = onnx.load(str(path / f"{name}.onnx"))
        weights = {i.name for i in graph.graph.initializer}
        assert not [n for n in graph.graph.node if n.op_type == "MatMul" and set(n.input) & weights]  # every weight
        if variant == "int4":
            ops = [n.op_type for n in graph.graph.node]
            # encoder: q, k, v, o, wi_0, wi_1, wo per layer + cross k, v per decoder layer; decoder: q, k, v, o
            # (self), q, o (cross), wi_0, wi_1, wo per layer + the LM head
            assert ops.count("MatMulNBits") == (2 * 7 + 2 * 2 if name == "encoder" else 2 * 9 + 1)
        fidelity = entry["parity"]["fidelity"]
        assert fidelity["components"] == ["encoder", "decoder"] and fidelity["reference"] == "onnx-fp32"
        assert fidelity["sequences"] == 8 * 3 and fidelity["logits_cosine_mean"] >= floor, fidelity
        assert 0.0 <= fidelity["greedy_identical_share"] <= fidelity["greedy_common_prefix_share"] <= 1.0
    assert m["blip2_t5"]["embeddings"]["storage"] == storage
    assert m["components"]["prefix"]["precision"] == "int8"
    assert m["components"]["prefix"]["parity"]["fidelity"]["embedding_cosine_mean"] >= 0.98
    with mmedge.load(path) as captioner:
        answers = captioner.caption(images, ["Question: what is it? Answer:", "a photo of", "a?"], max_new_tokens=6)
        assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_int4_below_the_logits_gate_is_refused_and_nothing_is_written(tiny_blip2_t5_dir, tmp_path):
    """At the default gate (0.95) the tiny random model's INT4 LLM (cosine about 0.83) fails, naming both parts."""
    from mmedge.errors import ParityError
    from mmedge.export import export_model

    with pytest.raises(ParityError, match="encoder\\+decoder.*logits"):
        export_model(str(tiny_blip2_t5_dir), tmp_path / "int4", progress=False, llm_precision="int4")
    assert not (tmp_path / "int4").exists()


def test_tensorrt_profiles_are_derived_for_every_component(blip2_t5_artifact):
    """Every dynamic axis has a profile rule (no TensorRT needed to plan): the encoder's length is ``tokens``."""
    from mmedge.runtimes.tensorrt_planning import derive_profile

    m = manifest(blip2_t5_artifact)
    for name in m["components"]:
        assert derive_profile(m, name), name  # {input: (min, opt, max) shapes}
    decoder = derive_profile(m, "decoder")
    assert decoder["cross_key_values.0.key"][0][2] == 1 and decoder["past_key_values.0.key"][0][2] == 0


def test_fp16_goes_through_the_shared_fp16_conversion_and_agrees_up_to_near_ties(tiny_blip2_t5_dir, captioner,
                                                                                  images, tmp_path):
    """``--precision fp16`` lowers the encoder and decoder with the exporter's one FP16 conversion (what any FP16 guard
    acts on); teacher-forced logits and tokens agree with FP32 up to near-ties (``tests/support/token_parity.py``)."""
    from mmedge.export import export_model
    from tests.support.token_parity import compare_generation

    path = export_model(str(tiny_blip2_t5_dir), tmp_path / "fp16", progress=False, precision="fp16")
    m = manifest(path)
    for name in ("prefix", "encoder", "decoder"):
        assert m["components"][name]["precision"] == "fp16"
        assert m["components"][name]["quantization"]["method"] == "fp16"
    with mmedge.load(path, threads=1) as fp16:
        for num_beams in (1, 3):
            sides = []
            for pipeline in (captioner, fp16):
                sides.append(prepared(pipeline, images, PROMPT_BATCHES["different lengths"]))
            # 10 new tokens: from 9 attended positions on, T5's relative-position buckets come from a log of the
            # distance, which computed in FP16 lands in the neighbouring bucket (logits cosine 0.996 vs FP32 here until
            # the FP16 conversion kept that index arithmetic FP32: fp16_ranges.index_math)
            config = captioner._config({"max_new_tokens": 10, "num_beams": num_beams})
            # A random tiny model's top-2 margins are narrow (a trained one's are wide, see test_conformance): FP16's
            # measured error leaves about a third of its greedy steps decided, still enough to catch a wrong token.
            # Beams also follow unlikely tokens, whose flatter logits show FP16's error more (cosine 0.9936 measured
            # there); a wrong cache or reorder gives far less (test_token_parity).
            compare_generation(captioner.decoder, fp16.decoder, *sides, config).check(
                0.999 if num_beams == 1 else 0.99, min_decided=0.25)


@pytest.mark.parametrize("mode", ["numpy", "kept"])
def test_runner_decoder_gives_the_ort_decoders_tokens(captioner, images, mode):
    """``RunnerDecoder`` (how the decoder runs on TensorRT) over an ONNX Runtime runner of the T5 decoder: no
    position ids fed, the cross K/V as context; the same tokens as ``OrtDecoder``, greedy and beams."""
    from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner
    from mmedge.runtimes.ort_session import OrtOptions
    from mmedge.runtimes.runner_decoder import RunnerDecoder

    artifact = captioner.artifact
    options = OrtOptions() if mode == "numpy" else OrtOptions(io_binding=True, keep_on_device=True)
    runner = OnnxRuntimeRunner(artifact.component_path("decoder"), "decoder", artifact.component("decoder"), options)
    other = RunnerDecoder.for_artifact(runner, artifact.manifest, captioner.embeddings)
    try:
        built = captioner.inputs.for_images(images, PROMPT_BATCHES["different lengths"])
        start, ids = built["embeds"], built["ids"]
        for decoder in (other, captioner.decoder):
            decoder.set_context(built["prefill"], built["step"])
        for num_beams in (1, 3):
            config = captioner._config({"max_new_tokens": 8, "num_beams": num_beams})
            assert generate(other, start, None, config, prompt_ids=ids) == generate(captioner.decoder, start, None,
                                                                                     config, prompt_ids=ids)
    finally:
        other.close()


def test_the_decoder_is_planned_on_tensorrt_on_a_gpu(blip2_t5_artifact):
    """Planning only (no GPU needed): on an RTX 4090 the T5 encoder and decoder go to TensorRT like any float graph."""
    from mmedge.selection import plan
    from tests.test_tensorrt import RTX_4090

    chosen = plan(RTX_4090, manifest(blip2_t5_artifact), backend="auto")
    assert chosen.components["decoder"].backend == "tensorrt" and chosen.components["encoder"].backend == "tensorrt"
    why = next(r for r in chosen.reasons if "the KV-cached decoder as a TensorRT engine" in r)
    assert "cross_key_values" in why  # context inputs are fed beside the cache
