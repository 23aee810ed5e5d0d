"""The torch backend's fast paths, checked on the CPU where the logic is the same as on CUDA: the model's dtype
(BLIP-2's Q-Former stays FP32), the greedy choice made by the decoder (``step_greedy``), buffers and captured steps
kept per (batch, capacity), the mask sent only when it changes, ``torch.compile`` of the step and its fallback,
and bitsandbytes layers built without initialising weights on the CPU. The CUDA-only halves (graph capture and
replay, pinned copies) are the ``gpu``-marked tests in ``tests/test_torch_backend.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmedge.artifact import Artifact
from mmedge.errors import BackendUnavailableError
from tests.support.battery import api_error
from tests.support.torch_cases import blip2_decoder_pair, load_quietly, prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def decoders(pytorch_artifacts):
    reference, decoder = blip2_decoder_pair(pytorch_artifacts("blip2"))
    yield reference, decoder
    reference.close()
    decoder.close()


# --- dtypes --------------------------------------------------------------------------------------------
def test_half_precision_keeps_the_modules_the_model_class_keeps_in_fp32(pytorch_artifacts):
    """BLIP-2's query tokens and Q-Former come first in parameters() and stay FP32; the rest is FP16, whether
    from_pretrained(dtype=...) casts or the fallback cast does (a transformers release without dtype=)."""
    from mmedge.runtimes.torch_backend import cast_keeping_fp32_modules, load_reference_model, weights_folder

    folder = weights_folder(Artifact.open(pytorch_artifacts("blip2")))
    loaded = load_reference_model(folder, "blip2", torch.device("cpu"), torch.float16)
    fp32 = transformers.Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    assert next(fp32.parameters()).dtype == torch.float32  # query_tokens: what the old check looked at
    cast = cast_keeping_fp32_modules(fp32, torch.float16)
    for model in (loaded, cast):
        assert model.query_tokens.dtype == torch.float32
        assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}
        assert {p.dtype for p in model.language_model.parameters()} == {torch.float16}
        assert {p.dtype for p in model.vision_model.parameters()} == {torch.float16}
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in cast.named_parameters()}


# --- greedy on the decoder's device --------------------------------------------------------------------
def test_step_greedy_is_the_argmax_of_step_with_banned_tokens(decoders, photos):
    reference, decoder = decoders
    embeds, mask = prompt(reference, photos)
    first = decoder.start(embeds, mask)
    step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    ids = np.argmax(first, axis=-1)
    logits = decoder.step(ids, step_mask)
    decoder.start(embeds, mask)
    chosen = decoder.step_greedy(ids, step_mask)
    assert chosen.dtype == np.int64 and chosen.tolist() == np.argmax(logits, axis=-1).tolist()
    banned = tuple(int(t) for t in chosen)  # ban the winners: the runners-up come next
    decoder.start(embeds, mask)
    second = decoder.step_greedy(ids, step_mask, banned)
    masked = logits.copy()
    masked[:, list(banned)] = -np.inf
    assert second.tolist() == np.argmax(masked, axis=-1).tolist() and second.tolist() != chosen.tolist()


class _Spy:
    """A decoder wrapper that counts how the loop calls it."""

    def __init__(self, decoder):
        self.decoder, self.vocab_size, self.max_positions = decoder, decoder.vocab_size, decoder.max_positions
        self.calls = {"step": 0, "step_greedy": 0}

    def start(self, embeds, mask):
        return self.decoder.start(embeds, mask)

    def step(self, ids, mask):
        self.calls["step"] += 1
        return self.decoder.step(ids, mask)

    def step_greedy(self, ids, mask, banned=()):
        self.calls["step_greedy"] += 1
        return self.decoder.step_greedy(ids, mask, banned)

    def reorder(self, rows):
        self.decoder.reorder(rows)


@pytest.mark.parametrize("settings,on_device", [
    ({"max_new_tokens": 12, "min_new_tokens": 12}, True),  # EOS banned for all 12 tokens: a bias on the device
    ({"max_new_tokens": 12, "repetition_penalty": 1.3}, False),  # the penalty needs the logits on the host
    ({"max_new_tokens": 12, "do_sample": True, "seed": 3}, False),
])
def test_the_loop_takes_greedy_tokens_from_the_device_when_only_tokens_are_banned(decoders, photos, settings,
                                                                                   on_device):
    from mmedge.generation import GenerationConfig, generate

    reference, decoder = decoders
    embeds, mask = prompt(reference, photos)
    config = GenerationConfig(**settings)
    spy = _Spy(decoder)
    got = generate(spy, embeds, mask, config)
    assert got == generate(reference.decoder, embeds, mask, config)
    assert (spy.calls["step_greedy"] > 0, spy.calls["step"] > 0) == (on_device, not on_device)
    if settings.get("min_new_tokens"):
        eos = set(config.eos_token_ids)
        assert all(len(row) == 12 and not eos & set(row) for row in got)


def test_a_changed_mask_is_sent_again(decoders, photos):
    """The device keeps the mask between steps; a caller whose mask is not the previous one plus a column of ones
    (here: a real column of row 1 masked out, and a padding step) gets its own mask, as the reference does."""
    reference, decoder = decoders
    embeds, mask = prompt(reference, photos)
    ids = np.argmax(decoder.start(embeds, mask), axis=-1)
    reference.decoder.start(embeds, mask)
    changed = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    changed[1, 3] = 0
    np.testing.assert_allclose(decoder.step(ids, changed), reference.decoder.step(ids, changed), atol=1e-4)
    padded = np.concatenate([changed, np.array([[1], [0]], dtype=np.int64)], axis=1)
    np.testing.assert_allclose(decoder.step(ids, padded), reference.decoder.step(ids, padded), atol=1e-4)


# --- buffers per (batch, capacity) ---------------------------------------------------------------------
def test_beam_captions_keep_both_batch_sizes_and_reuse_them(decoders, photos):
    """Beam search prefills B rows and steps B x beams: both buffer sets stay (each with its captured step on CUDA),
    so a second beam caption allocates nothing and recaptures nothing; greedy after it reuses the B buffers."""
    from mmedge.generation import GenerationConfig, generate

    reference, decoder = decoders
    embeds, mask = prompt(reference, photos)
    beams = GenerationConfig(max_new_tokens=6, num_beams=3)
    want = generate(reference.decoder, embeds, mask, beams)
    assert generate(decoder, embeds, mask, beams) == want
    kept = dict(decoder._states)
    assert {batch for batch, _ in kept} == {2, 6}
    assert generate(decoder, embeds, mask, beams) == want
    assert decoder._states.keys() == kept.keys() and all(decoder._states[k] is kept[k] for k in kept)
    generate(decoder, embeds, mask, GenerationConfig(max_new_tokens=6))
    assert all(decoder._states[k] is kept[k] for k in kept)


def test_growing_drops_the_smaller_buffers_and_the_lru_is_bounded(decoders, photos):
    reference, decoder = decoders
    embeds, mask = prompt(reference, photos)
    decoder.reserve(embeds.shape[1] + 1)
    ids = np.argmax(decoder.start(embeds, mask), axis=-1)
    step_mask = mask
    for _ in range(12):  # past the first block of 8: the cache grows
        step_mask = np.concatenate([step_mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        ids = decoder.step_greedy(ids, step_mask)
    sizes = [capacity for batch, capacity in decoder._states if batch == 2]
    assert sizes == [decoder._state.capacity] and decoder._state.capacity >= step_mask.shape[1]
    for rows in (1, 3, 4, 5, 7):
        decoder.start(embeds[:1].repeat(rows, axis=0), mask[:1].repeat(rows, axis=0))
    assert len(decoder._states) == decoder.max_states


# --- torch.compile -------------------------------------------------------------------------------------
def test_compiled_step_gives_the_same_tokens(pytorch_artifacts, photos):
    """The step compiled whole (fullgraph: no graph break in the model, the cache or the mask update); aot_eager
    traces and partitions it exactly as inductor would, without code generation (which takes minutes here)."""
    from mmedge.generation import GenerationConfig, generate
    from mmedge.runtimes.torch_decoder import create_decoder

    artifact = Artifact.open(pytorch_artifacts("blip2"))
    plain = create_decoder(artifact, device="cpu")
    compiled = create_decoder(artifact, device="cpu", compile="aot_eager")
    reference = load_quietly(pytorch_artifacts("blip2"))
    embeds, mask = prompt(reference, photos)
    for config in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=6, num_beams=2)):
        assert generate(compiled, embeds, mask, config) == generate(plain, embeds, mask, config)
    assert compiled.compile_status == "on (aot_eager)" and plain.compile_status == "off"
    for decoder in (plain, compiled):
        decoder.close()
    reference.close()


def test_compile_failure_falls_back_and_says_why():
    from mmedge.runtimes.torch_graphs import Compiled

    def host_round_trip(x):  # .tolist() leaves the graph: fullgraph=True refuses it
        return torch.tensor(x.tolist()) * 2

    fn = Compiled(host_round_trip, "aot_eager", "test function")
    assert fn(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert fn.status.startswith("off (compilation failed: ") and fn.fn is fn.eager

    def broken(x):
        raise ValueError("a real error, not compilation's")

    with pytest.raises(ValueError, match="a real error"):
        Compiled(broken, "aot_eager", "broken")(torch.ones(1))


def test_compile_settings(pytorch_artifacts):
    from mmedge.runtimes.torch_graphs import compile_backend

    assert compile_backend(None, default=True) == "inductor" and compile_backend(None, default=False) is None
    assert compile_backend(True, default=False) == "inductor" and compile_backend(False, default=True) is None
    assert compile_backend("aot_eager", default=False) == "aot_eager"
    api_error(lambda: compile_backend("fastest", default=True), BackendUnavailableError, "'fastest'", "aot_eager")
    captioner = load_quietly(pytorch_artifacts("blip2"), backend="torch",
                             backend_options={"torch": {"compile": "aot_eager"}})
    assert captioner.decoder.compile_status == "on (aot_eager)"
    assert captioner.runners["prefix"].graph_report()["compile"] == "on (aot_eager)"
    captioner.close()


# --- bitsandbytes layers -------------------------------------------------------------------------------
def test_bitsandbytes_layers_are_built_without_initialising_weights_on_the_cpu(pytorch_artifacts, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from mmedge.runtimes.torch_backend import load_reference_model, weights_folder
    from mmedge.runtimes.torch_bnb import output_head_names, quantize_linear_layers

    model = load_reference_model(weights_folder(Artifact.open(pytorch_artifacts("blip2"))), "blip2",
                                 torch.device("cpu"),
                                 torch.float32)
    llm = model.language_model
    before = llm.get_input_embeddings()(torch.arange(5))
    initialised = []
    original = torch.nn.init.kaiming_uniform_

    def kaiming_uniform_(tensor, *args, **kwargs):  # what nn.Linear's reset_parameters calls on every new layer
        initialised.append(tensor.device.type)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", kaiming_uniform_)
    report = quantize_linear_layers(llm, "nf4", compute_dtype=torch.float32, device=torch.device("cpu"),
                                    skip=output_head_names(llm))
    assert report["replaced_layers"] > 0 and set(initialised) <= {"meta"}
    assert all(p.device.type == "cpu" for p in llm.parameters())
    torch.testing.assert_close(llm.get_input_embeddings()(torch.arange(5)), before)
    api_error(lambda: quantize_linear_layers(llm, "int3", compute_dtype=torch.float32, device=torch.device("cpu")),
              BackendUnavailableError, "'int3'")


# --- one step ahead ------------------------------------------------------------------------------------
def test_greedy_steps_run_one_ahead_and_are_taken_or_run_again(pytorch_artifacts, photos):
    """run_ahead (on by default where the step is a CUDA graph; forced here, where each launch runs at once): the
    step after a greedy choice starts on that choice; the loop takes it when its next call matches, and gets it run
    again when not (a different mask, different bans). The tokens are the reference's either way."""
    from mmedge.generation import generate
    from mmedge.runtimes.torch_decoder import create_decoder

    reference = load_quietly(pytorch_artifacts("blip2"))
    decoder = create_decoder(Artifact.open(pytorch_artifacts("blip2")), device="cpu")
    decoder.run_ahead = True
    embeds, mask = prompt(reference, photos)
    config = reference._config({"max_new_tokens": 10, "min_new_tokens": 10})  # the artifact's EOS, banned throughout
    assert config.eos_token_ids
    assert generate(decoder, embeds, mask, config) == generate(reference.decoder, embeds, mask, config)
    assert decoder.steps_ahead == {"taken": 8, "redone": 0}  # steps 2..9 (none past the reserved 10 tokens)
    assert decoder._ahead is None and decoder.past_length == embeds.shape[1] + 9

    # EOS stops being banned after 3 tokens: the step at the change is redone
    decoder.steps_ahead.update(taken=0, redone=0)
    config = reference._config({"max_new_tokens": 10, "min_new_tokens": 3})
    assert generate(decoder, embeds, mask, config) == generate(reference.decoder, embeds, mask, config)
    assert decoder.steps_ahead["redone"] == 1

    ids = np.argmax(decoder.start(embeds, mask), axis=-1)
    reference.decoder.start(embeds, mask)
    step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    ids = decoder.step_greedy(ids, step_mask)  # launches the next step ahead
    reference.decoder.step(np.argmax(reference.decoder.start(embeds, mask), axis=-1), step_mask)
    changed = np.concatenate([step_mask, np.array([[1], [0]], dtype=np.int64)], axis=1)  # row 1 pads this step
    redone = decoder.steps_ahead["redone"]
    got = decoder.step_greedy(ids, changed)
    assert decoder.steps_ahead["redone"] == redone + 1
    assert got.tolist() == np.argmax(reference.decoder.step(ids, changed), axis=-1).tolist()
    decoder.close()
    reference.close()


# --- attention masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "blip2", "blip2-split", "idefics"])
def test_attention_masks_have_the_queries_dtype_in_half_precision(pytorch_artifacts, kind, monkeypatch):
    """Every scaled_dot_product_attention call of every component at FP16 gets a mask that is boolean or of the
    queries' dtype. PyTorch's cuDNN attention (the default on sm90) reads any other float mask as the queries' dtype
    (pytorch#191612): IDEFICS' float32 image bias beside FP16 queries gave logits cosine 0.80 on an H200, while the
    CPU's attention promotes it correctly."""
    import torch.nn.functional as F

    from mmedge.runtimes.torch_backend import create_runner
    from mmedge.validate import load_validation_samples

    seen = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        seen.append((query.dtype, None if attn_mask is None else attn_mask.dtype))
        return original(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    artifact = Artifact.open(pytorch_artifacts(kind))
    samples = load_validation_samples(artifact)
    for name in artifact.components:
        runner = create_runner(None, name, artifact.component(name), artifact=artifact, device="cpu", dtype="float16")
        runner.infer(samples[name]["inputs"])
        runner.close()
    masked = [(q, m) for q, m in seen if m is not None]
    assert seen and all(m in (torch.bool, q) for q, m in masked), sorted(set(masked), key=str)
