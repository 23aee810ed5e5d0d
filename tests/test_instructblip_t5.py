"""InstructBLIP with Flan-T5 on a tiny random checkpoint saved with ``save_pretrained``: the Q-Former reads the
instruction (its own BERT tokenizer, saved in the artifact), component parity, greedy / beam tokens identical to
``model.generate`` for batches of instructions of different lengths, the captioner and the split prefix."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import mmedge
from mmedge.generation import generate
from mmedge.pipelines.instruct import InstructCaptioner, InstructSeq2SeqInputs
from mmedge.tokenizer import TextTokenizer

INSTRUCTIONS = ["What is in the picture?", "a photo of", "Question: how many people are there in the picture? Answer:"]


@pytest.fixture(scope="module")
def artifacts(tiny_instructblip_t5_dir, tmp_path_factory):
    from mmedge.export import export_model

    root, made = tmp_path_factory.mktemp("instructblip-t5"), {}
    variants = {"fp32": {}, "split": {"extra": {"fused_prefix": False}},
                # the tiny random LLM's INT4 logits move far more than a trained model's: the gate is lowered
                "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.75}}}

    def get(name):
        if name not in made:
            made[name] = export_model(str(tiny_instructblip_t5_dir), root / name, progress=False, **variants[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def hf(tiny_instructblip_t5_dir):
    return (InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip_t5_dir).eval(),
            InstructBlipProcessor.from_pretrained(tiny_instructblip_t5_dir))


@pytest.fixture(scope="module")
def images():
    from mmedge.export.calibration import bundled

    return [Image.open(p).convert("RGB") for p in bundled("holdout")[:3]]


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def hf_tokens(hf, images, prompts, **settings) -> list[list[int]]:
    model, processor = hf
    inputs = processor(images=images, text=list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **settings).numpy()
    return [row[: row.index(1) + 1] if 1 in row else row for row in out[:, 1:].tolist()]  # after start, up to EOS


def our_tokens(captioner, images, prompts, **settings) -> list[list[int]]:
    built = captioner.inputs.for_images(images, list(prompts))
    captioner.decoder.set_context(built["prefill"], built["step"])
    return generate(captioner.decoder, built["embeds"], built["mask"], captioner._config(settings),
                    prompt_ids=built["ids"])


@pytest.mark.parametrize("variant", ["fp32", "split"])
def test_components_parity_and_the_qformer_tokenizer(artifacts, hf, variant):
    path = artifacts(variant)
    m = manifest(path)
    prefix = ["prefix"] if variant == "fp32" else ["vision", "qformer"]
    assert m["family"] == "instructblip_t5" and list(m["components"]) == [*prefix, "encoder", "decoder"]
    for name, entry in m["components"].items():
        for output, figures in [*entry["parity"]["outputs"].items(), *entry["parity"]["validation_samples"].items()]:
            assert figures["cosine"] >= 0.99999 and figures["max_abs"] <= 1e-3, (name, output, figures)
    reads_instruction = m["components"][prefix[-1]]["inputs"]
    assert {"qformer_input_ids", "qformer_attention_mask"} <= set(reads_instruction)
    entry = m["instructblip_t5"]["qformer_tokenizer"]
    device = TextTokenizer.from_file(path / entry["file"], entry)
    expected = hf[1].qformer_tokenizer(INSTRUCTIONS, padding=True, return_tensors="np")
    ids, mask = device.encode(INSTRUCTIONS)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])


@pytest.mark.parametrize("variant", ["fp32", "split"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_tokens_identical_to_generate(artifacts, hf, images, variant, num_beams):
    with mmedge.load(artifacts(variant), threads=1) as captioner:
        ours = our_tokens(captioner, images, INSTRUCTIONS, max_new_tokens=10, num_beams=num_beams)
    assert ours == hf_tokens(hf, images, INSTRUCTIONS, max_new_tokens=10, num_beams=num_beams)


def test_captioner_uses_the_instruction_and_a_default_one(artifacts, hf, images):
    decode = hf[1].tokenizer.decode
    with mmedge.load(artifacts("fp32"), threads=1) as captioner:
        assert isinstance(captioner, InstructCaptioner) and isinstance(captioner.inputs, InstructSeq2SeqInputs)
        caption = captioner.caption(images[0], max_new_tokens=8)
        assert caption == decode(hf_tokens(hf, images[:1], ["A short image description:"], max_new_tokens=8)[0],
                                 skip_special_tokens=True).strip()
        assert captioner.ask(images[1], "what is it?", max_new_tokens=8) == decode(
            hf_tokens(hf, images[1:2], ["what is it?"], max_new_tokens=8)[0], skip_special_tokens=True).strip()
        assert "".join(captioner.stream(images[2], "a photo of", max_new_tokens=8)) == captioner.caption(
            images[2], "a photo of", max_new_tokens=8)


def test_int4_llm_and_int8_prefix_with_the_instruction(artifacts, images):
    m = manifest(artifacts("int4"))
    assert [m["components"][n]["precision"] for n in ("prefix", "encoder", "decoder")] == ["int8", "int4", "int4"]
    prefix = m["components"]["prefix"]["parity"]["fidelity"]
    assert prefix["instruction"] and prefix["embedding_cosine_mean"] >= 0.98
    assert m["components"]["decoder"]["parity"]["fidelity"]["logits_cosine_mean"] >= 0.75
    with mmedge.load(artifacts("int4")) as captioner:
        assert all(isinstance(t, str) for t in captioner.caption(images, INSTRUCTIONS, max_new_tokens=6))


def test_checkpoint_goes_to_its_family(tiny_instructblip_t5_dir):
    from mmedge.export.loading import checkpoint_family

    assert checkpoint_family(str(tiny_instructblip_t5_dir)) == "instructblip_t5"


def test_bundled_full_size_config_is_the_published_architecture():
    """``Salesforce/instructblip-flan-t5-xl`` for --random-weights: its family, built at full size on the meta device,
    and the Q-Former tokenizer a random-weights export writes (no hub: ids inside the Q-Former's vocabulary)."""
    from types import SimpleNamespace

    import transformers

    from mmedge.export.families.instruction import qformer_tokenizer
    from mmedge.export.loading import _bundled_config, checkpoint_family

    name = "Salesforce/instructblip-flan-t5-xl"
    assert checkpoint_family(name, random_weights=True) == "instructblip_t5"
    config = transformers.AutoConfig.for_model(**_bundled_config(name)["config"])
    text, vision, qformer = config.text_config, config.vision_config, config.qformer_config
    assert (text.model_type, text.d_model, text.d_ff, text.d_kv, text.num_heads, text.num_layers,
            text.num_decoder_layers, text.vocab_size, text.feed_forward_proj) == (
        "t5", 2048, 5120, 64, 32, 24, 24, 32128, "gated-gelu")
    assert text.scale_decoder_outputs is False  # Flan-T5: tie_word_embeddings false, no decoder-output rescaling
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (1408, 39, 16, 6144, 224, 14)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.cross_attention_frequency,
            qformer.encoder_hidden_size, qformer.vocab_size, config.num_query_tokens) == (768, 12, 2, 1408, 30523, 32)
    with torch.device("meta"):  # builds at full size without allocating weights
        model = InstructBlipForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 3.9e9 < params < 4.0e9  # 3.96 B: the published 4.02 B less the LM head transformers 5 ties (README)
    loaded = SimpleNamespace(source={"model": name, "random_weights": True}, model=model)
    tokenizer = qformer_tokenizer(loaded)
    ids = tokenizer("What is unusual about this image?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and max(ids) < qformer.vocab_size  # [CLS] ... [SEP], as BERT's
    assert tokenizer.unk_token_id not in ids


SHRUNK_LLMS = {  # the bundled configs' LLMs cut to a few MB; everything else (token ids, kinds, vocabularies) kept
    "Salesforce/instructblip-flan-t5-xl": {"vocab_size": 400, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
                                           "num_decoder_layers": 1, "num_heads": 4},
    "Salesforce/instructblip-vicuna-7b": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                          "num_attention_heads": 4, "num_key_value_heads": 4},
}


@pytest.mark.parametrize("name", list(SHRUNK_LLMS))
def test_random_weight_exports_of_the_bundled_configs_run_offline(name, tmp_path, monkeypatch, photos):
    """``--random-weights`` of each bundled InstructBLIP config, shrunk: both tokenizers synthetic (no hub), the
    artifact loads and answers."""
    from mmedge.export import export_model, loading

    entry = loading._bundled_config(name)
    config = entry["config"]
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28)
    config["qformer_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    encoder_hidden_size=32)
    config["text_config"].update(SHRUNK_LLMS[name])
    config["num_query_tokens"] = 4
    if config.get("image_token_index") is not None:
        config["image_token_index"] = 300  # after the synthetic T5 tokenizer's pieces, inside the shrunk vocabulary
    entry["preprocess"]["resize"] = {"height": 28, "width": 28}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "shrunk.json").write_text(json.dumps(entry))
    monkeypatch.setattr(loading, "CONFIG_DIR", tmp_path / "configs")
    out = export_model(name, tmp_path / "art", random_weights=True, progress=False)
    m = manifest(out)
    assert m["source"]["random_weights"] and m["source"]["model"] == name
    assert (out / "qformer_tokenizer.json").is_file()
    with pytest.warns(UserWarning), mmedge.load(out) as captioner:
        assert isinstance(captioner.ask(photos[0], "what is it?", max_new_tokens=4), str)
