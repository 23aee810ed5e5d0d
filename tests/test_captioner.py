"""Captioner on tiny BLIP-2 artifacts: token-identical to transformers' generate, streaming, sampling, CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmedge
from mmedge.cli import main
from mmedge.errors import BackendError, InputError
from mmedge.pipelines import Captioner

VQA = "Question: what is in the picture? Answer:"


@pytest.fixture(scope="module")
def captioner(blip2_artifact):
    with mmedge.load(blip2_artifact, threads=1) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def hf(tiny_blip2_dir):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    return (Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_dir).eval(),
            AutoProcessor.from_pretrained(tiny_blip2_dir))


def hf_text(hf, photo, prompt=None, **generation):
    model, processor = hf
    inputs = processor(images=Image.open(photo).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **generation)
    new = out[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out[0]  # HF echoes given ids
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("prompt", [None, VQA])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_token_identical_to_transformers_generate(captioner, hf, photos, prompt, num_beams):
    for photo in photos[:3]:
        expected = hf_text(hf, photo, prompt, max_new_tokens=12, num_beams=num_beams)
        assert captioner.caption(photo, prompt, max_new_tokens=12, num_beams=num_beams) == expected


def test_ask_uses_blip2_question_prompt(captioner, hf, photos):
    assert captioner.ask(photos[0], "what is in the picture?",
                         max_new_tokens=8) == hf_text(hf, photos[0], VQA, max_new_tokens=8)


def test_batch_equals_single(captioner, photos):
    batch = captioner.caption(photos[:3], max_new_tokens=10)
    assert batch == [captioner.caption(p, max_new_tokens=10) for p in photos[:3]]


def test_a_stream_dropped_half_way_lets_the_decoder_go(captioner, photos):
    """A stream left after its first piece (`for piece in stream: return piece`) held the Captioner's decoder until the
    next garbage collection: this thread's next call was refused, other threads' calls waited. Dropping it now ends
    it at once; the collector is off here so that only that can end it."""
    import gc

    expected = captioner.caption(photos[1], max_new_tokens=6)
    gc.disable()
    try:
        stream = captioner.stream(photos[0], max_new_tokens=6)
        next(stream)
        del stream
        assert captioner.caption(photos[1], max_new_tokens=6) == expected
    finally:
        gc.enable()


def test_stream_joins_to_caption(captioner, photos):
    for beams in (1, 2):
        pieces = list(captioner.stream(photos[1], max_new_tokens=14, num_beams=beams))
        assert "".join(pieces) == captioner.caption(photos[1], max_new_tokens=14, num_beams=beams)
    assert len(list(captioner.stream(photos[1], max_new_tokens=14))) > 1  # really incremental


def test_a_question_streams_as_ask_answers_it(captioner, photos):
    """stream(image, question=...) as the Triton client's stream takes it (the README's client snippet): the pieces
    join to ask(); a question beside a prompt, or an empty one, is refused at the call."""
    question = "what color is the circle?"
    assert "".join(captioner.stream(photos[0], question=question, max_new_tokens=8)) == \
        captioner.ask(photos[0], question, max_new_tokens=8)
    with pytest.raises(InputError, match="both prompt= and question="):
        captioner.stream(photos[0], "a photo of", question=question)
    with pytest.raises(InputError, match="the question is empty"):
        captioner.stream(photos[0], question=" ")


def test_an_empty_eos_list_turns_the_end_token_off(captioner, photos):
    """eos_token_id=None means the model's own (a call's None is 'not given'); the refusal of [] said "pass None for
    no end-of-sequence token", which did nothing. [] is that: every new token is generated."""
    assert captioner.generation_settings(eos_token_id=[]).eos_token_ids == ()
    own = captioner.generation_settings().eos_token_ids
    assert own and captioner.generation_settings(eos_token_id=None).eos_token_ids == own
    stream = captioner.stream(photos[0], max_new_tokens=9, eos_token_id=[])
    "".join(stream)
    assert stream.tokens == 9 and stream.finish_reason == "length"


def test_an_ordinary_token_as_an_end_token_stays_in_the_text_as_in_transformers(captioner, hf, photos):
    """``eos_token_id=[2, <the id of ".">]`` stops at the full stop and keeps it, as transformers' decode does: the
    text dropped a last end token whatever it was, where only a special token is dropped."""
    model, processor = hf
    inputs = processor(images=Image.open(photos[0]).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=6)[0].tolist()  # no prompt: new ids only
    ordinary = ids[-3]
    assert ordinary not in processor.tokenizer.all_special_ids
    ends = [*captioner.generation_settings().eos_token_ids, ordinary]
    caption = captioner.caption(photos[0], max_new_tokens=6, eos_token_id=ends)
    assert caption == hf_text(hf, photos[0], max_new_tokens=6, eos_token_id=ends)
    assert caption.endswith(processor.tokenizer.decode([ordinary]).strip())


def test_sampling_reproducible_under_seed(captioner, photos):
    kwargs = dict(max_new_tokens=12, do_sample=True, top_p=0.9, temperature=1.3)
    first = captioner.caption(photos[0], seed=7, **kwargs)
    assert captioner.caption(photos[0], seed=7, **kwargs) == first
    assert any(captioner.caption(photos[0], seed=s, **kwargs) != first for s in range(8, 14))


@pytest.mark.parametrize("settings,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"), ({"num_beams": 0}, "num_beams"), ({"colour": "red"}, "unknown"),
    ({"constraint": None}, r"unknown generation setting\(s\) \['constraint'\]"),  # a misspelt name, even as None
    # transformers' own names the loop does not run are not misspelt: said so
    ({"no_repeat_ngram_size": 2}, r"\['no_repeat_ngram_size'\] are transformers' but mmedge's generation loop does "
                                  "not run them.*fix: drop them"),
    ({"min_new_tokens": 3, "eos_token_id": []}, r"min_new_tokens=3 would change nothing.*an end token to hold off"),
    # under 1e-5 the scores overflow float32: 1e-39 drew NaN-weighted tokens (a string of BOS) instead of refusing
    ({"do_sample": True, "temperature": 1e-39}, r"temperature=1e-39 is not usable.*at least 1e-05"),
    # settings greedy decoding or one beam never read: refused as the CLI refuses --temperature without --sample
    ({"temperature": 0.5}, r"temperature=0.5 would change nothing.*do_sample=True"),
    ({"top_p": 0.5}, "top_p=0.5 would change nothing"), ({"top_k": 5}, "top_k=5 would change nothing"),
    ({"seed": 1}, "seed=1 would change nothing"), ({"num_beams": 3, "seed": 1}, "seed=1 would change nothing"),
    ({"length_penalty": 0.6}, r"length_penalty=0.6 would change nothing.*num_beams above 1"),
    ({"early_stopping": True, "do_sample": True}, "early_stopping=True would change nothing"),
    # the model's own ids: a caller's pad_token_id (padding is never returned) or bos_token_id changed no text
    ({"pad_token_id": 5}, r"pad_token_id=5 would change nothing; expected no pad_token_id.*fix: drop pad_token_id"),
    ({"bos_token_id": 5}, r"bos_token_id=5 would change nothing; expected no bos_token_id.*fix: drop bos_token_id"),
])
def test_absurd_generation_settings(captioner, photos, settings, match):
    with pytest.raises(InputError, match=match):
        captioner.caption(photos[0], **settings)


def test_settings_that_are_read_are_taken(captioner, photos):
    """The refusals above are of idle settings only: the same settings where they are read, and the manifest's own
    settings (which a user did not pass), go through."""
    assert "<s>" not in captioner.caption(photos[0], do_sample=True, temperature=1e-5, seed=1, max_new_tokens=6)
    assert captioner.caption(photos[0], num_beams=2, length_penalty=0.6, early_stopping=True, max_new_tokens=6)
    assert captioner.caption(photos[0], temperature=None, seed=None, max_new_tokens=6)  # None: not given


def test_prompt_positions_are_counted_without_running_a_graph(captioner, photos):
    """What a server checks before a request waits for the decoder: the positions the prompt will take, and the
    settings a call would use, refused as the call refuses them."""
    for prompt in (None, "Question: what is it? Answer:"):
        built = captioner.inputs.for_images(photos[0], prompt)
        assert captioner.prompt_positions(photos[0], prompt) == built["embeds"].shape[1]
    assert captioner.max_positions == captioner.settings["decoder"]["max_positions"]
    assert captioner.generation_settings(max_new_tokens=7).max_new_tokens == 7
    with pytest.raises(InputError, match="length_penalty=0.6 would change nothing"):
        captioner.generation_settings(length_penalty=0.6)


def test_bad_prompts(captioner, photos):
    with pytest.raises(InputError, match="question is empty"):
        captioner.ask(photos[0], "  ")
    with pytest.raises(InputError, match="the question is a int"):
        captioner.ask(photos[0], 5)
    with pytest.raises(InputError, match="one image"):
        captioner.stream(photos[:2])  # at the call, not at the first piece
    with pytest.raises(InputError, match="max_new_tokens=-1"):
        captioner.stream(photos[0], max_new_tokens=-1)


def test_cli_caption_and_stream(blip2_artifact, photos, capsys):
    assert main(["run", str(blip2_artifact), photos[0], "--max-new-tokens", "6", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"] == photos[0] and row["prompt"] is None and isinstance(row["text"], str)
    assert main(["run", str(blip2_artifact), photos[0], "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == f"{photos[0]}: {row['text']}".strip()
    assert main(["run", str(blip2_artifact), photos[0], "--question", "what is it?", "--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out
    assert main(["run", str(blip2_artifact), photos[0], "--task", "vqa", "--question", "what is it?",
                 "--max-new-tokens", "4"]) == 0  # the artifact's vqa task: the same answer
    assert capsys.readouterr().out == answer
    assert main(["run", str(blip2_artifact), photos[0], "--max-new-tokens", "-1"]) == 2
    capsys.readouterr()
    for empty in ("", "  "):  # refused, as ask() refuses it: not a caption printed as if it answered
        assert main(["run", str(blip2_artifact), photos[0], "--question", empty, "--max-new-tokens", "4"]) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and "the question is empty" in printed.err


def test_validate_covers_the_decoder(blip2_artifact, capsys):
    assert main(["validate", str(blip2_artifact)]) == 0
    out = capsys.readouterr().out
    # the decoder's backend is the plan's (OpenVINO takes an FP32 decoder on a CPU with VNNI)
    backend = mmedge.load(blip2_artifact).plan.components["decoder"].backend
    assert f"decoder.logits [fp32, {backend}]" in out and "prefix.prefix_embeds" in out


def test_load_returns_captioner(blip2_artifact):
    pipeline = mmedge.load(blip2_artifact, task="vqa")
    assert isinstance(pipeline, Captioner)  # one class captions and answers: its task says "caption"
    assert pipeline.embeddings.shape[1] == pipeline.inputs.prefix(np.zeros((8, 8, 3), np.uint8)).shape[2]


def test_the_prefix_chain_is_the_manifests(blip2_artifact, tmp_path):
    """The Captioner runs the components ``blip2.prefix`` names; a chain naming no component, or an output its last
    component does not have, is refused when the manifest is read."""
    from mmedge.errors import ManifestError
    from mmedge.manifest import parse_manifest

    manifest = json.loads((blip2_artifact / "manifest.json").read_text())
    chain = manifest["blip2"]["prefix"]
    assert chain["components"] and chain["output"] in manifest["components"][chain["components"][-1]]["outputs"]
    for field, value, words in (("components", ["nothing"], "names 'nothing'"), ("output", "image_embeds", "output")):
        broken = json.loads(json.dumps(manifest))
        broken["blip2"]["prefix"][field] = value
        with pytest.raises(ManifestError, match=f"blip2.prefix.{field}.*{words}"):
            parse_manifest(json.dumps(broken))


def test_max_new_tokens_advice_is_not_refused_by_the_next_check(captioner, photos):
    """Judged before the prompt is read, the first refusal said "lower max_new_tokens to 56" (the shortest prompt's
    count); the question's own check then refused 56 ("lower to 46 or less"). It now says whose count that is and
    how a longer prompt's is found, and that rule gives the count the question's check takes."""
    positions = captioner.max_positions
    least = captioner.inputs.least_prompt_positions
    with pytest.raises(InputError, match=rf"lower max_new_tokens to {positions + 1 - least} for the shortest prompt, "
                                         rf"or to {positions + 2 - least} minus the prompt's tokens \(BOS included\) "
                                         r"for a longer one"):
        captioner.ask(photos[0], "what is it?", max_new_tokens=4000)
    most = positions + 1 - captioner.prompt_positions(photos[0], "Question: what is it? Answer:")
    tokens = captioner.prompt_positions(photos[0], "Question: what is it? Answer:") - (least - 1)  # BOS included
    assert most == positions + 2 - least - tokens  # the advice's count
    assert captioner.ask(photos[0], "what is it?", max_new_tokens=most, eos_token_id=[])
    with pytest.raises(InputError, match=f"lower max_new_tokens to {most} or less"):
        captioner.ask(photos[0], "what is it?", max_new_tokens=most + 1)


def test_a_stream_of_a_closed_captioner_says_the_captioner_is_closed(blip2_artifact, photos):
    """A stream going on after close() answered "the decoder is closed; ... fix: create a new OrtDecoder", a class
    the user never made."""
    captioner = mmedge.load(blip2_artifact, threads=1)
    stream = iter(captioner.stream(photos[0], max_new_tokens=6, eos_token_id=[]))
    next(stream)
    captioner.close()
    with pytest.raises(BackendError, match="this Captioner is closed.*load the artifact again with mmedge.load"):
        list(stream)
    backends = ", ".join(f"{name}={chosen.backend}" for name, chosen in captioner.plan.components.items())
    assert repr(captioner) == f"Captioner({str(blip2_artifact)!r}, family=blip2, task=caption, {backends}, closed)"


def test_the_repr_names_the_backend_the_decoder_runs_on_not_the_planned_one(blip2_artifact):
    """Where auto gave OpenVINO a decoder it could not compile, the decoder runs on ONNX Runtime: the repr read the
    plan and named openvino."""
    import dataclasses

    with mmedge.load(blip2_artifact, backend="onnxruntime", threads=1) as captioner:
        planned = dict(captioner.plan.components, decoder=dataclasses.replace(captioner.plan.components["decoder"],
                                                                              backend="openvino"))
        captioner.plan = dataclasses.replace(captioner.plan, components=planned)
        assert captioner.decoder.backend == "onnxruntime"
        assert "decoder=onnxruntime" in repr(captioner) and "openvino" not in repr(captioner)
