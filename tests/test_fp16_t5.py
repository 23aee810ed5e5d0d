"""FP16 safety for T5 (issue 16): the FP16 range guard (``mmedge.export.fp16_ranges``) on the T5 encoder (+ cross K/V)
and the KV-cached T5 decoder of a BLIP-2 Flan-T5 checkpoint whose activations pass FP16's range.

The checkpoint is the tiny BLIP-2 Flan-T5 (``make_tiny_blip2_t5``) with its residual stream made to grow layer by
layer as in the real flan-t5-xl/xxl: every block's output projections (self- and cross-attention ``o``, the gated-GELU
feed-forward ``wo``) are scaled by ``GROWTH ** (layer + 1)``, so each layer writes updates ``GROWTH`` times larger
than the one before (encoder stream: about 6e2 after block 0, 9e4 after block 1; the decoder's alike). T5's RMS
norms hand every sublayer a normalized stream, so in FP32 it is still a working model whose export is
token-identical to transformers' ``generate``; converted whole to FP16, the feed-forward output, the residual adds and
the norms' squares pass 65504 and the graphs compute inf, then NaN. Guarded, the same conversion keeps exactly the
nodes touching those activations in FP32 and the FP16 artifact's captions equal the FP32 artifact's.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import mmedge
from mmedge.export import export_model, fp16_ranges, quantize
from mmedge.export.specs.blip2_t5 import t5_decoder_feeds
from mmedge.generation import generate
from mmedge.metrics import compare_outputs, cosine_rows
from tests.support.fp16 import TrueFp16Graph, component_feeds, validation_samples
from tests.support.token_parity import SAFETY, compare_generation
from tests.test_blip2_t5 import PROMPT_BATCHES, hf_tokens, prepared

GROWTH = 150.0
LLM = ("encoder", "decoder")


def grow_residual_stream(language_model, growth: float) -> None:
    """Scale the output projections of block ``k`` of the T5 encoder and decoder by ``growth ** (k + 1)``."""
    with torch.no_grad():
        for stack in (language_model.encoder, language_model.decoder):
            for k, block in enumerate(stack.block):
                for name, module in block.named_modules():
                    if name.endswith((".o", ".wo")):  # SelfAttention.o, EncDecAttention.o, DenseReluDense.wo
                        module.weight.mul_(growth ** (k + 1))


@pytest.fixture(scope="module")
def overflowing_t5(tiny_blip2_t5_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("overflowing-t5")
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2_t5_dir).eval()
    grow_residual_stream(model.language_model, GROWTH)
    for name, param in model.language_model.named_parameters():
        assert param.abs().max().item() < fp16_ranges.FP16_MAX, name  # every weight itself still fits FP16
    model.save_pretrained(path)
    Blip2Processor.from_pretrained(tiny_blip2_t5_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(overflowing_t5):
    return (Blip2ForConditionalGeneration.from_pretrained(overflowing_t5).eval(),
            Blip2Processor.from_pretrained(overflowing_t5))


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    from mmedge.export.calibration import bundled

    return [Image.open(p).convert("RGB") for p in bundled("holdout")[:3]]


@pytest.fixture(scope="module")
def artifacts(overflowing_t5, tmp_path_factory):
    root = tmp_path_factory.mktemp("overflowing-t5-artifacts")
    return {precision: export_model(str(overflowing_t5), root / precision, progress=False, precision=precision)
            for precision in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def captioners(artifacts):
    loaded = {precision: mmedge.load(path, threads=1) for precision, path in artifacts.items()}
    yield loaded
    for pipeline in loaded.values():
        pipeline.close()


def stream_peaks(hf, images, prompts) -> dict[str, list[float]]:
    """The largest |value| of the residual stream after each encoder and decoder block, on one greedy generate."""
    model, processor = hf
    llm = model.language_model
    peaks = {"encoder": [0.0] * len(llm.encoder.block), "decoder": [0.0] * len(llm.decoder.block)}

    def hook(stack, k):
        def record(module, args, out):
            peaks[stack][k] = max(peaks[stack][k], out[0].abs().max().item())
        return record

    hooks = [block.register_forward_hook(hook(stack, k)) for stack in peaks
             for k, block in enumerate(getattr(llm, stack).block)]
    try:
        with torch.no_grad():
            model.generate(**processor(images=images, text=prompts, return_tensors="pt", padding=True),
                           max_new_tokens=6, do_sample=False)
    finally:
        for handle in hooks:
            handle.remove()
    return peaks


def test_the_stream_grows_past_fp16_and_the_fp32_export_still_says_what_transformers_says(hf, captioners, images):
    peaks = stream_peaks(hf, images, PROMPT_BATCHES["different lengths"])
    for stack, values in peaks.items():
        assert values == sorted(values) and values[-1] > fp16_ranges.FP16_MAX > 50 * values[0], (stack, values)
    captioner = captioners["fp32"]
    for prompts in PROMPT_BATCHES.values():
        embeds, mask, ids = prepared(captioner, images, prompts)
        ours = generate(captioner.decoder, embeds, mask, captioner._config({"max_new_tokens": 10}), prompt_ids=ids)
        assert ours == hf_tokens(hf, images, prompts, max_new_tokens=10)
    assert len({tuple(t) for t in hf_tokens(hf, images, PROMPT_BATCHES["caption"], max_new_tokens=10)}) == 3


def true_fp16_greedy(encoder: Path, decoder: Path, captioner, images, prompts, steps: int = 10,
                     forced: list[list[int]] | None = None) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens of an encoder and a decoder graph run as a GPU runs them (``TrueFp16Graph``), with the cache and
    feeds of mmedge's loop, on ``captioner``'s own encoder inputs and embedding table: each row up to and including
    its first EOS, and the logits of every step ``[rows, steps, vocab]``. ``forced``: feed these tokens instead of
    the argmax (teacher forcing)."""
    section = captioner.artifact.manifest["blip2_t5"]
    layout, start, eos = section["decoder"]["kv_cache"], section["decoder"]["decoder_start_token_id"], \
        section["eos_token_id"]
    embeds, mask = captioner.inputs.encoder_inputs(images, list(prompts))  # [rows, tokens, d_model], [rows, tokens]
    cross = TrueFp16Graph(encoder)({"inputs_embeds": embeds, "attention_mask": mask})
    cross = [torch.from_numpy(cross[layout["cross"] % (layer, kind)]) for layer in range(layout["layers"])
             for kind in ("key", "value")]
    step, past, ids, rows, logits = TrueFp16Graph(decoder), None, np.full((len(embeds), 1), start), [], []
    for t in range(steps):
        feeds = t5_decoder_feeds(torch.from_numpy(np.asarray(captioner.embeddings[ids], np.float32)),
                                 torch.from_numpy(mask), cross, past, layout)
        out = step({k: v.numpy() for k, v in feeds.items()})
        logits.append(out["logits"][:, -1])  # [rows, vocab]
        chosen = logits[-1].argmax(-1) if forced is None else np.array([row[min(t, len(row) - 1)] for row in forced])
        ids = chosen[:, None]  # [rows, 1]
        past = [torch.from_numpy(out[layout["present"] % (layer, kind)]) for layer in range(layout["layers"])
                for kind in ("key", "value")]
        rows.append(logits[-1].argmax(-1).tolist())
    tokens = [list(row) for row in zip(*rows)]
    return [row[: row.index(eos) + 1] if eos in row else row for row in tokens], np.stack(logits, 1)


def test_naive_fp16_computes_garbage_and_wrong_captions(artifacts, captioners, images, tmp_path):
    """The same converter with the guard off (no validation inputs: nothing kept FP32), run as a GPU runs FP16:
    outputs unrelated to FP32's on the stored validation inputs, and greedy captions that are not the FP32 ones."""
    fp32, samples = artifacts["fp32"], validation_samples(artifacts["fp32"])
    for name in LLM:
        feeds = component_feeds(samples, name)
        over, _, largest = fp16_ranges.over_limit(fp32 / f"{name}.onnx", feeds)
        assert over and largest > fp16_ranges.FP16_MAX, name  # a real overflow on the stored samples
        recipe = quantize.convert_fp16(fp32 / f"{name}.onnx", tmp_path / f"{name}.onnx")
        assert recipe["fp32_nodes"] == []
        metrics = compare_outputs(TrueFp16Graph(fp32 / f"{name}.onnx")(feeds), TrueFp16Graph(tmp_path / f"{name}.onnx")(
            feeds))
        assert not min(m["cosine"] for m in metrics.values()) >= 0.5, (name, metrics)  # NaN counts as failing too
    prefix_over, _, _ = fp16_ranges.over_limit(fp32 / "prefix.onnx", component_feeds(samples, "prefix"))
    assert prefix_over == {}  # the image prefix was not scaled
    for batch, prompts in PROMPT_BATCHES.items():
        expected, _ = true_fp16_greedy(fp32 / "encoder.onnx", fp32 / "decoder.onnx", captioners["fp32"], images,
                                       prompts)
        naive, _ = true_fp16_greedy(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx", captioners["fp16"], images,
                                    prompts)
        assert all(a != b for a, b in zip(naive, expected)), (batch, naive, expected)


def test_fp16_export_keeps_the_overflowing_nodes_and_captions_equal_fp32(artifacts, captioners, images):
    """The ``--precision fp16`` artifact: the kept nodes in the manifest; logits cosine >= 0.999 vs FP32 and every
    greedy caption equal to the FP32 artifact's, both run as a GPU runs FP16 and through ``mmedge.load`` (ONNX
    Runtime CPU)."""
    fp32, fp16 = (json.loads((artifacts[p] / "manifest.json").read_text()) for p in ("fp32", "fp16"))
    samples = validation_samples(artifacts["fp32"])
    for name in LLM:
        entry = fp16["components"][name]
        recipe = entry["quantization"]
        assert entry["precision"] == "fp16" and recipe["fp32_nodes"], name
        check = recipe["range_check"]
        assert check["activations_over"] > 0 and check["largest_magnitude"] > fp16_ranges.FP16_MAX, (name, check)
        assert min(o["cosine"] for o in entry["parity"]["outputs"].values()) >= 0.999
        graph, feeds = artifacts["fp16"] / f"{name}.onnx", component_feeds(samples, name)
        metrics = compare_outputs(TrueFp16Graph(artifacts["fp32"] / f"{name}.onnx")(feeds), TrueFp16Graph(graph)(feeds))
        assert min(m["cosine"] for m in metrics.values()) >= 0.999, (name, metrics)
        nodes = {node.name: node for node in onnx.load(str(graph)).graph.node}
        assert len(recipe["fp32_nodes"]) < len(nodes) / 2  # q/k/v, wi, LM head: FP16
        kept_ops = {nodes[n].op_type for n in recipe["fp32_nodes"]}
        assert {"Pow", "ReduceMean", "Add", "MatMul"} <= kept_ops  # the norms' squares, the stream, wo and o
        assert "Log" in kept_ops  # the relative-position buckets: index arithmetic (fp16_ranges.index_math)
    assert fp16["components"]["prefix"]["quantization"]["fp32_nodes"] == []  # nothing overflows there
    assert fp32["components"]["decoder"]["quantization"] is None
    reference, candidate = captioners["fp32"], captioners["fp16"]
    for batch, prompts in PROMPT_BATCHES.items():
        # as a GPU runs FP16: teacher-forced logits along the FP32 tokens, and the free-running tokens
        expected, want = true_fp16_greedy(artifacts["fp32"] / "encoder.onnx", artifacts["fp32"] / "decoder.onnx",
                                          reference, images, prompts)
        graphs = (artifacts["fp16"] / "encoder.onnx", artifacts["fp16"] / "decoder.onnx")
        _, got = true_fp16_greedy(*graphs, candidate, images, prompts, forced=expected)
        live = np.arange(want.shape[1])[None, :] < np.array([len(row) for row in expected])[:, None]  # [rows, steps]
        assert cosine_rows(want[live], got[live]).min() >= 0.999, batch
        error = SAFETY * np.abs(got - want).max(-1)  # [rows, steps] each step's worst logit error, with headroom
        top2 = np.sort(want, axis=-1)[..., -2:]
        safe = top2[..., 1] - top2[..., 0] > 2 * error  # [rows, steps] decisions that error cannot change
        assert safe[live].mean() >= 0.5, (batch, safe[live].mean())  # the comparison says something
        free, _ = true_fp16_greedy(*graphs, candidate, images, prompts)
        for row, (a, b) in enumerate(zip(free, expected)):
            cut = next((t for t in range(len(b)) if not safe[row, t]), len(b))  # its first near-tie
            assert a[:cut] == b[:cut] and (cut < len(b) or a == b), (batch, row, a, b, cut)
        # through mmedge.load (ONNX Runtime CPU, the shipped path), by tests/support/token_parity
        report = compare_generation(reference.decoder, candidate.decoder, prepared(reference, images, prompts),
                                    prepared(candidate, images, prompts), reference._config({"max_new_tokens": 10}))
        report.check(0.999, min_decided=0.25, label=batch)
        assert report.reference == expected, batch  # both FP32 paths agree
