"""The demo BLIP-2 with a Flan-T5-style LLM (``mmedge/demo/models/blip2_t5``): the demo BLIP-2's vision tower and
Q-Former (``models/blip2``, trained first), frozen, feeding a small T5 encoder-decoder trained from scratch on CPU.
Run it through ``python examples/train_demo_models.py --blip2-t5`` (a step of its own, after the BLIP-2 demo).

As BLIP-2's second stage keeps its image encoder frozen, this variant keeps the trained demo's ViT and Q-Former as
they are: their query outputs for every training scene are computed once, and only the language projection and the
T5 learn (the same captions and questions as the OPT demo, the same loss on the target and its ``</s>``). The T5 is
laid out like Flan-T5: gated-GELU feed-forward, untied LM head, relative positions, a SentencePiece-Unigram
tokenizer (``<pad>`` 0, ``</s>`` 1 appended to every text, ``<unk>`` 2) whose pieces are the scene grammar's words.
"""

from __future__ import annotations

import functools
import json
import string
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scenes
import torch
import transformers

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in google/flan-t5-*
IMAGE_TOKEN = "<image>"
SIZES = dict(d_model=128, heads=4, d_ff=128, encoder_layers=2, decoder_layers=2)  # equal depths: transformers
# 5.25 `generate` sizes the decoder cache by the encoder depth
FEATURE_CHUNK = 500  # scenes per no-grad pass through the frozen tower and Q-Former


# --- tokenizer and model --------------------------------------------------------------------------------
def make_tokenizer():
    """A ``T5Tokenizer`` laid out like google/flan-t5's: the specials, then "▁"-prefixed words of the scene grammar
    (punctuation split off), then single characters (printable ASCII and "▁", so any English prompt spells), scored
    so whole words win over their pieces; BLIP-2's ``<image>`` added after them."""
    from train_demo_models import grammar_corpus

    words = Counter("▁" + w.strip(string.punctuation) for line in grammar_corpus() for w in line.split())
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {"▁"})
    pieces = [(t, 0.0) for t in T5_SPECIALS]
    pieces += [(word, -1.0 - 1.0 / n) for word, n in sorted(words.items()) if len(word) > 1]
    known = {piece for piece, _ in pieces}
    pieces += [(ch, -8.0) for ch in chars if ch not in known]
    tokenizer = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


def config(tokenizer, base: transformers.Blip2Config) -> transformers.Blip2Config:
    """The demo BLIP-2's vision and Q-Former configs with a T5 ``text_config`` (BLIP-2 Flan-T5's token ids)."""
    s = SIZES
    return transformers.Blip2Config(
        vision_config=base.vision_config.to_dict(), qformer_config=base.qformer_config.to_dict(),
        text_config=transformers.T5Config(
            vocab_size=len(tokenizer), d_model=s["d_model"], d_kv=s["d_model"] // s["heads"], d_ff=s["d_ff"],
            num_layers=s["encoder_layers"], num_decoder_layers=s["decoder_layers"], num_heads=s["heads"],
            feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        num_query_tokens=base.num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def untie_head(lm) -> None:
    """Give the T5 its own LM head, as Flan-T5 has. transformers 5.25 builds every T5 with the head tied to the
    shared embeddings (``T5Config`` forces ``tie_word_embeddings``; a checkpoint holding both tensors, as Flan-T5's
    do, loads them untied). Drawn at std d_model^-0.5: T5's own init (std 1) starts near loss 60."""
    weight = torch.randn(lm.lm_head.weight.shape) * lm.config.d_model ** -0.5
    lm.lm_head.weight = torch.nn.Parameter(weight)


@torch.no_grad()
def encoders_from_blip2(model, source) -> int:
    """Copy the trained demo BLIP-2's vision tower, Q-Former and query tokens; returns the tensors copied."""
    copied = 0
    for name in ("vision_model", "qformer"):
        state = getattr(source, name).state_dict()
        getattr(model, name).load_state_dict(state)
        copied += len(state)
    model.query_tokens.copy_(source.query_tokens)
    return copied + 1


@torch.no_grad()
def query_features(model, pixels: np.ndarray) -> torch.Tensor:
    """The frozen Q-Former's outputs for uint8 scenes ``[n, 64, 64, 3]`` → ``[n, queries, qformer width]``."""
    from train_demo_models import to_pixels

    out = []
    for i in range(0, len(pixels), FEATURE_CHUNK):
        image = model.vision_model(pixel_values=to_pixels(pixels[i:i + FEATURE_CHUNK])).last_hidden_state
        queries = model.query_tokens.expand(len(image), -1, -1)
        mask = torch.ones(image.shape[:-1], dtype=torch.long)
        out.append(model.qformer(query_embeds=queries, encoder_hidden_states=image,
                                 encoder_attention_mask=mask).last_hidden_state)
    return torch.cat(out)


# --- batches and loss -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def encoded(tokenizer, text: str | None) -> tuple[int, ...]:
    """``tokenizer(text)`` (ends with ``</s>``); no text: ``[bos_token_id]`` (``</s>``), as BLIP-2's generate feeds
    the encoder for a caption."""
    return tuple(tokenizer(text)["input_ids"]) if text is not None else (1,)


def t5_batch(tokenizer, train_scenes: list, idx: np.ndarray, questions: int, rng: np.random.Generator) -> tuple:
    """(scene index per sequence, prompt ids, prompt mask, labels): each scene's caption (no prompt) and
    ``questions`` of its questions in the VQA prompt; labels are the target's ids and ``</s>``, -100 after."""
    from train_demo_models import COUNT_QUESTION_WEIGHT

    rows, items = [], []
    for i in idx:
        scene = train_scenes[i]
        pairs = scene.questions()  # colour and shape of each object, then the count
        weights = np.array([1.0] * (len(pairs) - 1) + [COUNT_QUESTION_WEIGHT])
        picked = rng.choice(len(pairs), size=questions, replace=False, p=weights / weights.sum())
        items += [(None, scene.caption)] + [(scenes.VQA_TEMPLATE.format(pairs[k][0]), pairs[k][1]) for k in picked]
        rows += [int(i)] * (1 + questions)
    prompts = [encoded(tokenizer, p) for p, _ in items]
    targets = [encoded(tokenizer, t) for _, t in items]
    ids = torch.zeros((len(items), max(map(len, prompts))), dtype=torch.long)  # right-padded with <pad>
    mask = torch.zeros_like(ids)
    labels = torch.full((len(items), max(map(len, targets))), -100)
    for row, (p, t) in enumerate(zip(prompts, targets)):
        ids[row, :len(p)], mask[row, :len(p)], labels[row, :len(t)] = torch.tensor(p), 1, torch.tensor(t)
    return torch.tensor(rows), ids, mask, labels


def t5_loss(model, features: torch.Tensor, rows, ids, mask, labels) -> torch.Tensor:
    """Next-token loss on the targets, with the encoder input BLIP-2 builds: [projected query rows ; embed(prompt)]
    and its mask; the decoder is fed the labels shifted right from ``<pad>`` (T5's own ``labels`` path)."""
    prefix = model.language_projection(features[rows])  # [sequences, queries, d_model]
    lm = model.language_model
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask], dim=1)
    return lm(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss


# --- training -----------------------------------------------------------------------------------------------
def train_t5(out: Path, train: tuple, steps: int, batch: int, blip2_folder: Path, lr: float = 2e-3,
             questions: int = 3, budget_seconds: float | None = None) -> dict:
    """Train for ``steps`` steps, or until ``budget_seconds`` of wall time (the frozen features' pass included)
    have passed when that comes first; the cosine schedule follows whichever is further along."""
    from train_demo_models import BLIP2_SHAPE_COUNT_SHARE, log, save_blip2_processors, schedule, update

    tokenizer = make_tokenizer()
    source = transformers.Blip2ForConditionalGeneration.from_pretrained(blip2_folder).eval()
    cfg = config(tokenizer, source.config)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg)
    copied = encoders_from_blip2(model, source)
    untie_head(model.language_model)
    train_scenes, pixels = train
    start, cpu, loads = time.time(), time.process_time(), []
    model.eval()
    features = query_features(model, pixels)  # [scenes, queries, qformer width]
    feature_seconds = time.time() - start
    log(f"blip2_t5: vision tower and Q-Former from {blip2_folder} ({copied} tensors, frozen), query outputs of "
        f"{len(train_scenes)} scenes in {feature_seconds:.0f} s")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [*model.language_projection.parameters(), *model.language_model.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    budget = budget_seconds or float("inf")

    def progress(step: int) -> int:  # the step the schedule is at: by count, or by wall time when that is further
        return max(step, int(steps * (time.time() - start) / budget))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(progress(i), steps, steps // 20))
    rng = np.random.default_rng(0)
    share = np.array([BLIP2_SHAPE_COUNT_SHARE[len(s.shapes)] for s in train_scenes])
    share /= share.sum()
    model.language_projection.train()
    model.language_model.train()
    done = 0
    while progress(done) < steps:
        idx = rng.choice(len(train_scenes), size=batch, p=share)
        loss = t5_loss(model, features, *t5_batch(tokenizer, train_scenes, idx, questions, rng))
        if update(model, optimizer, sched, loss, done, steps, loads):
            log(f"blip2_t5 step {done} (schedule at {progress(done)}/{steps}) loss {loss.item():.4f}")
        done += 1
    seconds, cpu = time.time() - start, time.process_time() - cpu
    model = model.eval()
    model.generation_config = transformers.GenerationConfig(decoder_start_token_id=0, bos_token_id=1, eos_token_id=1,
                                                            pad_token_id=0, max_new_tokens=24)
    model.save_pretrained(out)
    save_blip2_processors(out, tokenizer, cfg)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
            "feature_seconds": round(feature_seconds, 1), "load_average": round(float(np.mean(loads)), 2),
            "steps": done, "schedule_steps": steps, "budget_seconds": budget_seconds, "batch": batch, "lr": lr,
            "sequences_per_image": 1 + questions, "shape_count_share": BLIP2_SHAPE_COUNT_SHARE,
            "vision_init": f"the trained demo BLIP-2's ({blip2_folder.name}/), frozen",
            "train_scenes": len(train_scenes)}


# --- through the exported graphs ------------------------------------------------------------------------------
EXPORTS = {"fp32": {}, "int4": {"precision": "int8", "llm_precision": "int4"}}  # ExportOptions per artifact


def export(folder: Path, out: Path) -> dict[str, Path]:
    """The FP32 artifact and the INT8-encoders + INT4-LLM one (default fidelity gate) under ``out``."""
    from mmedge.export import ExportOptions, export_model

    return {name: Path(export_model(str(folder), out / name, ExportOptions(**options, progress=False)))
            for name, options in EXPORTS.items()}


def through_exports(artifacts: dict[str, Path], chosen: list) -> dict:
    """Exact captions and answers per artifact on ``chosen`` scenes (ONNX Runtime), and the INT4 artifact's caption
    agreement with FP32's."""
    import mmedge

    images = [s.render() for s in chosen]
    measured, captions = {}, {}
    for name, path in artifacts.items():
        with mmedge.load(path) as captioner:
            captions[name] = captioner.caption(images)
            right: dict[str, list[bool]] = {"color": [], "shape": [], "count": []}
            for question, asked in scenes.questions_by_text(chosen).items():
                got = captioner.caption([images[i] for i, _ in asked], captioner.vqa_template.replace("{}", question))
                right[scenes.question_kind(question)] += [g == want for g, (_, want) in zip(got, asked)]
        measured[name] = {"caption_exact": float(np.mean([c == s.caption for c, s in zip(captions[name], chosen)])),
                          "vqa_color_shape": float(np.mean(right["color"] + right["shape"])),
                          "vqa_count": float(np.mean(right["count"]))}
    measured["int4_identical_captions"] = float(np.mean([a == b for a, b in zip(captions["fp32"],
                                                                                  captions["int4"])]))
    fidelity = json.loads((artifacts["int4"] / "manifest.json").read_text())["components"]["decoder"]["parity"]
    measured["int4_gate"] = {k: fidelity["fidelity"][k] for k in ("logits_cosine_mean", "greedy_identical_share")}
    measured["test_scenes"] = len(chosen)
    return measured


def measure_exports(folder: Path, count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return through_exports(export(folder, Path(tmp)), scenes.split("test", count))


# --- the model card ----------------------------------------------------------------------------------------------
def _row(name: str, figures: dict) -> str:
    cells = (figures[k] for k in ("caption_exact", "vqa_color_shape", "vqa_count"))
    return f"| {name} | " + " | ".join(f"{v:.1%}" for v in cells) + " |"


def card(params: int, training: dict, scores: dict, facts: dict) -> str:
    from train_demo_models import DATA_TEXT, _common

    s = SIZES
    examples = "\n".join(f"| {e['truth']} | {e['caption']} |" for e in scores["examples"])
    per_count = ", ".join(f"{n} shape(s) {v:.0%}" for n, v in scores["caption_exact_by_shape_count"].items())
    answers = f"{scores['vqa_color_shape']:.1%} (colour {scores['vqa_color']:.1%}, shape {scores['vqa_shape']:.1%})"
    exports = scores.get("exports")
    through = "" if not exports else f"""
## Through the exported graphs (ONNX Runtime CPU, first {exports['test_scenes']} test scenes)

| artifact | exact captions | colour/shape answers | count answers |
|---|---|---|---|
{_row("FP32", exports["fp32"])}
{_row("INT8 encoders + INT4 LLM", exports["int4"])}

The INT4 LLM writes the FP32 caption on **{exports['int4_identical_captions']:.1%}** of these images; its export
passed the default fidelity gate (teacher-forced logits cosine vs FP32 {exports['int4_gate']['logits_cosine_mean']:.4f}
on held-out photos, gate 0.95).
"""
    return f"""# mmedge demo BLIP-2 Flan-T5 (shapes)

A small `Blip2ForConditionalGeneration` with a T5 language model ({params / 1e6:.2f} M parameters): the demo
BLIP-2's ViT and Q-Former (`blip2/`, frozen), a language projection, and a T5 encoder-decoder laid out like
Flan-T5 ({s["encoder_layers"]} encoder layers, {s['decoder_layers']} decoder layers, d_model {s['d_model']},
{s['heads']} heads, gated-GELU feed-forward {s['d_ff']}, relative positions, untied LM head). The tokenizer is
Flan-T5's layout (SentencePiece Unigram: `<pad>` 0, `</s>` 1 appended to every text, `<unk>` 2; `<image>` at
`image_token_index`) with the scene grammar's words as pieces. The decoder starts from `<pad>` and stops at `</s>`,
as BLIP-2 Flan-T5 checkpoints do. It captions and answers questions about shape scenes only.

## Data

{DATA_TEXT.format(shapes=', '.join(scenes.SHAPES), colours=', '.join(scenes.COLOURS))}
Each training image is seen with its caption (the encoder gets the query rows and `</s>`, as BLIP-2's `generate`
builds it with no prompt) and {training['sequences_per_image'] - 1} of its questions in BLIP-2's VQA prompt
(`Question: what color is the circle? Answer:` → `red`). Loss: next-token cross-entropy on the target and its `</s>`.

## Training

The vision tower, Q-Former and query tokens are {training['vision_init']}: their query outputs for every
training scene are computed once ({training['feature_seconds']:.0f} s, inside the training time below); the language
projection and the T5 train from random initialisation, for {training['steps']} steps (cosine schedule over
{training['schedule_steps']} steps or {training['budget_seconds']:.0f} s of wall time, whichever is further along).
{_common(training).replace("Trained from scratch on CPU", "The T5 side trained on CPU", 1)}

## Test-split scores (PyTorch FP32, transformers `generate`, greedy; {scores['test_scenes']} test scenes)

| metric | score |
|---|---|
| caption exactly equal to the ground truth | {scores['caption_exact']:.1%} ({per_count}) |
| answers to colour and shape questions exactly right | {answers} |
| answers to "how many shapes are there?" | {scores['vqa_count']:.1%} |

| ground truth | greedy caption |
|---|---|
{examples}
{through}
`tests/test_demo_t5.py` exports it (FP32, and INT8 encoders + INT4 LLM at the default gate), re-measures exact
captions and answers on a slice of the same test split through the FP32 graphs, and the INT4 LLM's caption agreement
with FP32."""
