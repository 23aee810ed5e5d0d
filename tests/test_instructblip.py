"""InstructBLIP with a decoder-only (Llama-family, as Vicuna) LLM on a tiny random checkpoint saved with
``save_pretrained``: the Q-Former reads the instruction, BLIP-2's decoder and prompt layout; captions, answers and
beams identical to ``model.generate``; the split prefix; INT4 LLM."""

import json

import pytest
import torch
from PIL import Image
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import mmedge
from mmedge.errors import InputError
from mmedge.pipelines.instruct import InstructCaptioner


@pytest.fixture(scope="module")
def artifacts(tiny_instructblip_dir, tmp_path_factory):
    from mmedge.export import export_model

    root, made = tmp_path_factory.mktemp("instructblip"), {}
    variants = {"fp32": {}, "split": {"extra": {"fused_prefix": False}},
                # the tiny random LLM's INT4 logits move far more than a trained model's: the gate is lowered
                "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.75}}}

    def get(name):
        if name not in made:
            made[name] = export_model(str(tiny_instructblip_dir), root / name, progress=False, **variants[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def hf(tiny_instructblip_dir):
    return (InstructBlipForConditionalGeneration.from_pretrained(tiny_instructblip_dir).eval(),
            InstructBlipProcessor.from_pretrained(tiny_instructblip_dir))


@pytest.fixture(scope="module")
def images():
    from mmedge.export.calibration import bundled

    return [Image.open(p).convert("RGB") for p in bundled("holdout")[:3]]


def hf_texts(hf, images, instruction, **settings) -> list[str]:
    model, processor = hf
    inputs = processor(images=images, text=[instruction] * len(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **settings)
    return [processor.tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            for row in out]  # a decoder-only LLM echoes the prompt ids first


@pytest.mark.parametrize("variant", ["fp32", "split"])
def test_components_and_their_parity(artifacts, variant):
    m = json.loads((artifacts(variant) / "manifest.json").read_text())
    prefix = ["prefix"] if variant == "fp32" else ["vision", "qformer"]
    assert m["family"] == "instructblip" and list(m["components"]) == [*prefix, "decoder"]
    for name, entry in m["components"].items():
        for output, figures in [*entry["parity"]["outputs"].items(), *entry["parity"]["validation_samples"].items()]:
            assert figures["cosine"] >= 0.99999 and figures["max_abs"] <= 1e-3, (name, output, figures)
    assert {"qformer_input_ids", "qformer_attention_mask"} <= set(m["components"][prefix[-1]]["inputs"])
    assert m["instructblip"]["qformer_tokenizer"]["file"] == "qformer_tokenizer.json"


@pytest.mark.parametrize("variant", ["fp32", "split"])
@pytest.mark.parametrize("instruction", [None, "What is in the picture?"], ids=["caption", "instruction"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_text_identical_to_generate(artifacts, hf, images, variant, instruction, num_beams):
    with mmedge.load(artifacts(variant), threads=1) as captioner:
        assert isinstance(captioner, InstructCaptioner)
        ours = captioner.caption(images, instruction, max_new_tokens=8, num_beams=num_beams)
    assert ours == hf_texts(hf, images, instruction or "A short image description:", max_new_tokens=8,
                            num_beams=num_beams)


def test_ask_stream_and_int4(artifacts, hf, images):
    with mmedge.load(artifacts("fp32"), threads=1) as captioner:
        assert captioner.ask(images[0], "what is it?", max_new_tokens=8) == hf_texts(hf, images[:1], "what is it?",
                                                                                      max_new_tokens=8)[0]
        assert "".join(captioner.stream(images[1], max_new_tokens=8)) == captioner.caption(images[1],
                                                                                           max_new_tokens=8)
        with pytest.raises(InputError, match="prompt is a list; expected a string or None"):  # not the Q-Former's
            captioner.caption(images[:2], ["a", "b"])  # tokenizer speaking of its "text 0"
    m = json.loads((artifacts("int4") / "manifest.json").read_text())
    assert m["components"]["decoder"]["precision"] == "int4"
    assert m["components"]["prefix"]["parity"]["fidelity"]["instruction"]
    assert m["components"]["decoder"]["parity"]["fidelity"]["logits_cosine_mean"] >= 0.75
    with mmedge.load(artifacts("int4")) as captioner:
        assert isinstance(captioner.ask(images[0], "what is it?", max_new_tokens=6), str)


def test_bundled_full_size_config_is_the_published_architecture():
    """``Salesforce/instructblip-vicuna-7b`` for --random-weights: its family, and built at full size on the meta
    device (Vicuna-7B keeps its own LM head: Llama honours tie_word_embeddings false)."""
    import transformers

    from mmedge.export.loading import _bundled_config, checkpoint_family

    name = "Salesforce/instructblip-vicuna-7b"
    assert checkpoint_family(name, random_weights=True) == "instructblip"
    config = transformers.AutoConfig.for_model(**_bundled_config(name)["config"])
    text = config.text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.intermediate_size, text.vocab_size, text.rms_norm_eps, text.max_position_embeddings) == (
        "llama", 4096, 32, 32, 11008, 32001, 1e-6, 2048)
    assert (config.qformer_config.vocab_size, config.vision_config.num_hidden_layers, config.num_query_tokens) == (
        30523, 39, 32)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    llm = model.language_model
    assert llm.get_output_embeddings().weight is not llm.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    assert 7.85e9 < params < 7.95e9  # 7.91 B: ViT-g 1.0 B, Q-Former 0.19 B, Vicuna-7B 6.74 B


def test_a_prompt_is_judged_before_the_prefix_reads_it(artifacts, images):
    """The Q-Former reads the instruction, so the prefix ran (and warned of the cut) before an over-long prompt was
    refused; and the image placeholder in the text, on which transformers' generate fails, was taken as text."""
    with mmedge.load(artifacts("fp32")) as captioner:
        ran = []
        run = captioner.inputs.run
        captioner.inputs.run = lambda name, feeds: ran.append(name) or run(name, feeds)
        with pytest.raises(InputError, match="the prompt has 5,000 characters"):
            captioner.caption(images[0], prompt="word " * 1000)
        image_token = captioner.settings["image_tokens"]["hf_image_token_id"]
        placeholder = captioner.tokenizer.decode([image_token], skip_special_tokens=False)
        with pytest.raises(InputError, match=f"the prompt holds '{placeholder}', the image placeholder"):
            captioner.caption(images[0], prompt=f"what is {placeholder} here?")
        assert ran == []
        assert captioner.caption(images[0], prompt="what is here?", max_new_tokens=2) is not None and ran
