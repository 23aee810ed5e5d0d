"""Train the demo models that ship in ``mmedge/demo/models`` from scratch, on CPU: a small CLIP and a small BLIP-2
(OPT) by default; the BLIP-2 Flan-T5 and IDEFICS ones are steps of their own (flags below).

    python examples/train_demo_models.py                 # CLIP and BLIP-2, then measure them and write their cards
    python examples/train_demo_models.py --only clip     # one of them
    python examples/train_demo_models.py --evaluate      # re-measure the saved models, rewrite the cards
    python examples/train_demo_models.py --idefics       # the Flamingo (IDEFICS) demo model alone, a step of its own
                                                         # (after CLIP: its frozen vision tower is the demo CLIP's)
    python examples/train_demo_models.py --blip2-t5      # the BLIP-2 Flan-T5 demo model alone (examples/t5_demo.py;
                                                         # after BLIP-2: its frozen ViT and Q-Former are BLIP-2's)

Data: procedural scenes (``examples/scenes.py``), seeded train / validation / test splits. Every model is a
real transformers model (``CLIPModel``, ``Blip2ForConditionalGeneration`` with an OPT or a T5 decoder,
``IdeficsForVisionText2Text``) written with
``save_pretrained``: safetensors weights, config, tokenizer.json and preprocessor_config.json, so
``mmedge export`` loads them like any published checkpoint. Needs ``pip install "mmedge[export]"``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from mmedge.cli_args import count, non_negative
from mmedge.export.specs.blip2 import cache_kwarg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "mmedge" / "demo" / "models"  # and ../images: the bundled scenes
MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP's, as BLIP-2 checkpoints use too
STD = [0.26862954, 0.26130258, 0.27577711]
TEST_SCENES = 480  # per evaluation split (CLIP: 20 per label)

# --- tokenizers: byte-level BPE learned on the scene grammar ----------------------------------------
CLIP_BOS, CLIP_EOS, END_OF_WORD = "<|startoftext|>", "<|endoftext|>", "</w>"
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's order: BOS is </s> (id 2), as in facebook/opt
IMAGE_TOKEN, NEWLINE = "<image>", "Ċ"  # BLIP-2 OPT checkpoints stop generating at the newline token


def grammar_corpus() -> list[str]:
    """Every word form the captions, labels and questions use, in sentences."""
    lines = []
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    for c in colours:
        for s in shapes:
            lines.append(f"a {c} {s}")
            lines.append(f"a {c} {s}, a {c} {s} and a {c} {s}")
            lines.append(scenes.VQA_TEMPLATE.format(f"what color is the {s}?") + f" {c}")
            lines.append(scenes.VQA_TEMPLATE.format(f"what shape is the {c} one?") + f" {s}")
    for n in scenes.NUMBERS:
        lines.append(scenes.VQA_TEMPLATE.format("how many shapes are there?") + f" {n}")
    lines += [f"a photo of a {c} {s}." for c in colours for s in shapes]
    return lines


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(words: list[tuple[str, ...]], limit: int = 400) -> list[tuple[str, str]]:
    """Deterministic BPE: merge the most frequent adjacent pair (ties by text) until every word is one token.
    ``words``: a list of symbol tuples, or a Counter of them (symbol tuple → count)."""
    counts, merges = Counter(words), []
    while len(merges) < limit:
        pairs = Counter()
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        counts = Counter({_merge(w, best): n for w, n in counts.items()})
    return merges


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters in CLIP/OPT vocab order (printable bytes first)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in sorted(table, key=lambda b: (table[b] != chr(b), ord(table[b])))]


def make_clip_tokenizer(max_length: int):
    """A CLIPTokenizer laid out like openai/clip's: bytes, bytes + "</w>", merges, then BOS and EOS."""
    backend = transformers.CLIPTokenizer()._tokenizer  # CLIP's normalizer and pre-tokenizer
    text = backend.normalizer.normalize_str("\n".join(grammar_corpus()))
    words = [tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    merges = learn_merges(words)
    tokens = byte_alphabet()
    tokens += [t + END_OF_WORD for t in tokens]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += [CLIP_BOS, CLIP_EOS]
    tokenizer = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def make_opt_tokenizer():
    """A GPT-2 byte-level BPE laid out like facebook/opt's (``</s>`` first in every text) plus BLIP-2's ``<image>``."""
    from tokenizers import pre_tokenizers

    text = "\n".join(grammar_corpus())
    words = [tuple(w) for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]
    merges = [m for m in learn_merges(words) if NEWLINE not in "".join(m)]  # "\n" stays its own token: EOS
    tokens = list(OPT_SPECIALS) + byte_alphabet()
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokenizer = transformers.GPT2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, bos_token="</s>", eos_token="</s>",
        unk_token="<unk>", pad_token="<pad>", add_bos_token=True, add_prefix_space=False, errors="replace")
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


# --- data --------------------------------------------------------------------------------------------
def _pixels(chosen: list) -> np.ndarray:
    return np.stack([np.asarray(s.render()) for s in chosen])  # [n, 64, 64, 3] uint8


def render(split: str, count: int, counts=(1, 2, 3), workers: int = 1, chunk: int = 1000) -> tuple[list, np.ndarray]:
    """Scenes of a split and their pixels, uint8 ``[count, 64, 64, 3]``; ``workers`` processes draw them, ``chunk``
    scenes at a time (the same pixels for any number: each scene is seeded by its split and index)."""
    chosen = scenes.split(split, count, counts)
    if workers <= 1 or count <= chunk:
        return chosen, _pixels(chosen)
    import concurrent.futures

    chunks = [chosen[i:i + chunk] for i in range(0, count, chunk)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return chosen, np.concatenate(list(pool.map(_pixels, chunks)))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, 64, 64, 3]`` → normalized float ``[n, 3, 64, 64]``; the saved processors do the same
    (the scenes are already at the model's size, so their resize and crop change nothing)."""
    x = torch.from_numpy(images).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def update(model, optimizer, sched, loss, step: int, steps: int, loads: list[float]) -> bool:
    """One optimizer step (gradients clipped at norm 1); True every 100 steps and at the last, when the caller logs
    (and the machine's load average is sampled for the model card)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sched.step()
    if step % 100 == 0 or step == steps - 1:
        loads.append(os.getloadavg()[0])
        return True
    return False


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- CLIP ----------------------------------------------------------------------------------------------
VISION = dict(hidden=64, layers=4, heads=4, patch=8)  # the same ViT shape in both models: BLIP-2 starts from CLIP's
CLIP_SIZES = dict(vision_hidden=VISION["hidden"], vision_layers=VISION["layers"], text_hidden=64, text_layers=2,
                  projection=64, patch=VISION["patch"])
SINGLE_SHAPE_SHARE = 0.5  # of each CLIP batch: one-shape scenes, whose captions are the zero-shot prompts


def clip_config(tokenizer) -> transformers.CLIPConfig:
    s = CLIP_SIZES
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=s["text_hidden"],
                         intermediate_size=s["text_hidden"] * 4,
                         num_hidden_layers=s["text_layers"], num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=vision_config(),
        projection_dim=s["projection"])


def vision_config(**extra) -> dict:
    return dict(hidden_size=VISION["hidden"], intermediate_size=VISION["hidden"] * 4,
                num_hidden_layers=VISION["layers"],
                num_attention_heads=VISION["heads"], image_size=scenes.IMAGE_SIZE, patch_size=VISION["patch"],
                hidden_act="quick_gelu", layer_norm_eps=1e-5, **extra)


def train_clip(out: Path, train: tuple, steps: int, batch: int, lr: float = 2e-3) -> dict:
    """Contrastive training (CLIP's symmetric loss; scenes with the same caption count as positives)."""
    tokenizer = make_clip_tokenizer(32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(clip_config(tokenizer))
    train_scenes, images = train
    captions = sorted({s.caption for s in train_scenes})
    caption_id = torch.tensor([captions.index(s.caption) for s in train_scenes])
    text = tokenizer(captions, padding=True, return_tensors="pt")
    single = torch.tensor([len(s.shapes) == 1 for s in train_scenes])
    weights = torch.where(single, SINGLE_SHAPE_SHARE / single.sum(), (1 - SINGLE_SHAPE_SHARE) / (~single).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(i, steps, steps // 20))
    generator = torch.Generator().manual_seed(0)
    start, cpu, model, loads = time.time(), time.process_time(), model.train(), []
    for step in range(steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=generator)
        unique, inverse = torch.unique(caption_id[idx], return_inverse=True)  # encode each distinct caption once
        outputs = model(input_ids=text["input_ids"][unique], attention_mask=text["attention_mask"][unique],
                        pixel_values=to_pixels(images[idx.numpy()]))
        logits = outputs.logits_per_image  # [images, distinct captions]
        image_loss = F.cross_entropy(logits, inverse)
        positives = (inverse[None, :] == torch.arange(len(unique))[:, None]).float()  # [captions, images]
        text_loss = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(-1)).sum(1).mean()
        loss = (image_loss + text_loss) / 2
        if update(model, optimizer, sched, loss, step, steps, loads):
            log(f"clip step {step}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f}")
    seconds, cpu = time.time() - start, time.process_time() - cpu
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    transformers.CLIPImageProcessor(size={"shortest_edge": scenes.IMAGE_SIZE},
                                    crop_size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE},
                                    image_mean=MEAN, image_std=STD).save_pretrained(out)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
            "load_average": round(np.mean(loads), 2),
            "steps": steps, "batch": batch,
            "lr": lr, "single_shape_share": SINGLE_SHAPE_SHARE}


@torch.no_grad()
def evaluate_clip(folder: Path, count: int = TEST_SCENES) -> dict:
    """Zero-shot top-1 over the 24 colour×shape labels, prompt "a {label}", on held-out test scenes."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    names = scenes.labels()
    text = tokenizer([f"a {n}" for n in names], padding=True, return_tensors="pt")
    bank = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)  # [labels, dim]
    result = {}
    for key, counts in (("one_shape", (1,)), ("two_or_three_shapes", (2, 3))):
        chosen, images = render("test", count, counts)
        embeds = F.normalize(model.get_image_features(pixel_values=to_pixels(images)).pooler_output, dim=-1)
        top1 = (embeds @ bank.T).argmax(-1).tolist()
        if key == "one_shape":
            result["zero_shot_top1"] = float(np.mean([names[t] == s.label for t, s in zip(top1, chosen)]))
        else:
            result["multi_shape_top1_present"] = float(np.mean([names[t] in s.present_labels for t,
                                                                s in zip(top1, chosen)]))
    result["test_scenes"] = count
    return result


# --- BLIP-2 --------------------------------------------------------------------------------------------
BLIP2_SIZES = dict(vision_hidden=VISION["hidden"], vision_layers=VISION["layers"], qformer_hidden=128, qformer_layers=3,
                   queries=8, llm_hidden=128, llm_layers=2, patch=VISION["patch"])
LLM_POSITIONS = 64
BLIP2_SHAPE_COUNT_SHARE = {1: 0.2, 2: 0.4, 3: 0.4}  # of training images: more of the scenes that need binding
COUNT_QUESTION_WEIGHT = 0.25  # "how many shapes" is learnt early; colour and shape questions need more


def blip2_config(tokenizer, qformer_dropout: float = 0.0) -> transformers.Blip2Config:
    s = BLIP2_SIZES
    newline = tokenizer.convert_tokens_to_ids(NEWLINE)
    return transformers.Blip2Config(
        vision_config=vision_config(initializer_range=0.02),
        qformer_config=dict(hidden_size=s["qformer_hidden"], intermediate_size=s["qformer_hidden"] * 4,
                            num_hidden_layers=s["qformer_layers"], num_attention_heads=4, cross_attention_frequency=1,
                            max_position_embeddings=64, vocab_size=64,
                            hidden_dropout_prob=qformer_dropout, attention_probs_dropout_prob=qformer_dropout),
        text_config=transformers.OPTConfig(
            vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=s["llm_hidden"],
            word_embed_proj_dim=s["llm_hidden"],
            ffn_dim=s["llm_hidden"] * 4, num_hidden_layers=s["llm_layers"], num_attention_heads=4,
            max_position_embeddings=LLM_POSITIONS, bos_token_id=tokenizer.bos_token_id, eos_token_id=newline,
            pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0),
        num_query_tokens=s["queries"], image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


@functools.lru_cache(maxsize=None)
def sequence(tokenizer, prompt: str | None, target: str) -> tuple[list[int], int]:
    """Token ids of ``[BOS] prompt target "\\n"`` and where the target starts (what the loss is on)."""
    head = tokenizer(prompt)["input_ids"] if prompt else [tokenizer.bos_token_id]
    tail = tokenizer(target if prompt is None else " " + target, add_special_tokens=False)["input_ids"]
    return head + tail + [tokenizer.convert_tokens_to_ids(NEWLINE)], len(head)


def lm_batch(tokenizer, items: list[tuple[str | None, str]],
             pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the targets) for (prompt, target) pairs."""
    encoded = [sequence(tokenizer, p, t) for p, t in items]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(items), width), pad)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    for row, (seq, start) in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def blip2_batch(tokenizer, train: tuple, idx: np.ndarray, questions_per_image: int, rng: np.random.Generator) -> tuple:
    """``blip2_loss``'s arguments after the model for the training scenes ``idx``: pixels, sequences per image, ids,
    mask, labels. Each image brings its caption and ``questions_per_image`` of its questions, drawn with ``rng``."""
    train_scenes, images = train
    items = []
    for i in idx:
        scene = train_scenes[i]
        items.append((None, scene.caption))
        pairs = scene.questions()  # colour and shape of each object, then the count
        weights = np.array([1.0] * (len(pairs) - 1) + [COUNT_QUESTION_WEIGHT])
        for k in rng.choice(len(pairs), size=questions_per_image, replace=False, p=weights / weights.sum()):
            items.append((scenes.VQA_TEMPLATE.format(pairs[k][0]), pairs[k][1]))
    return to_pixels(images[idx]), 1 + questions_per_image, *lm_batch(tokenizer, items, tokenizer.pad_token_id)


def blip2_loss(model, pixel_values, per_image: int, ids, mask, labels) -> torch.Tensor:
    """Next-token loss on the targets, with the sequence the device builds: prefix rows, then embed(ids).

    The ``per_image`` sequences of an image share its prefix, and under the causal mask the prefix never sees what
    follows it. So the LLM runs the prefix once per image and each sequence continues from a copy of its KV cache, as
    the device does. Loss and gradients are those of ``full_sequences_loss``, with the query rows computed once per
    image instead of once per sequence.
    """
    prefix = model.get_image_features(pixel_values=pixel_values).pooler_output  # [images, queries, width]
    lm = model.language_model
    out = lm.model(inputs_embeds=prefix, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # per layer [images, heads, queries, dim]
    cache.batch_repeat_interleave(per_image)  # per layer [sequences, heads, queries, dim]; gradients flow back
    full_mask = torch.cat([torch.ones(ids.shape[0], prefix.shape[1], dtype=torch.long), mask], dim=1)
    logits = lm(inputs_embeds=lm.get_input_embeddings()(ids), attention_mask=full_mask,
                **{cache_kwarg(lm): cache}).logits  # [sequences, T, vocab]
    # position t predicts ids[t + 1]; ids[0] (BOS, predicted from the prefix) is never a target
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def full_sequences_loss(model, pixel_values, per_image: int, ids, mask, labels) -> torch.Tensor:
    """``blip2_loss`` computed the plain way, every sequence run whole ([prefix rows, embed(ids)]): the reference the
    tests and ``benchmarks/train_step.py`` compare it with."""
    prefix = model.get_image_features(pixel_values=pixel_values).pooler_output  # [images, queries, width]
    prefix = prefix.repeat_interleave(per_image, dim=0)  # [sequences, queries, width]
    lm = model.language_model
    embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask], dim=1)
    logits = lm(inputs_embeds=embeds, attention_mask=full_mask).logits  # [sequences, queries + T, vocab]
    predicted = logits[:, prefix.shape[1] - 1:-1]  # position q+t-1 predicts ids[t]
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def clip_vision_into_blip2(clip, blip2, pixel_values: torch.Tensor) -> float:
    """Start BLIP-2's ViT from the trained CLIP's, as BLIP-2 starts from a pretrained CLIP-style ViT.

    The layers map one to one (q, k, v → one qkv; out_proj → projection). BLIP-2's ViT has no pre-layernorm, so
    CLIP's is folded into the embeddings with its average statistics on ``pixel_values``. Returns the mean cosine
    of the two towers' patch features on those images (1.0 would be exact).
    """
    cv, bv = clip.vision_model, blip2.vision_model
    embeds = cv.embeddings(pixel_values)  # [images, tokens, width], what CLIP's pre-layernorm normalizes per token
    mean, std = embeds.mean(-1).mean(), embeds.std(-1, unbiased=False).mean()
    gain, shift = cv.pre_layrnorm.weight / std, cv.pre_layrnorm.bias - cv.pre_layrnorm.weight * mean / std  # [width]
    e = bv.embeddings
    e.patch_embedding.weight.copy_(cv.embeddings.patch_embedding.weight * gain[:, None, None, None])
    e.patch_embedding.bias.copy_(shift)
    e.position_embedding.copy_((cv.embeddings.position_embedding.weight * gain)[None])
    e.class_embedding.copy_((cv.embeddings.class_embedding * gain + shift)[None, None])
    for c, b in zip(cv.encoder.layers, bv.encoder.layers):
        a = c.self_attn
        b.self_attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        b.self_attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        b.self_attn.projection.load_state_dict(a.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2"):
            getattr(b, name).load_state_dict(getattr(c, name).state_dict())
        b.mlp.load_state_dict(c.mlp.state_dict())
    bv.post_layernorm.load_state_dict(cv.post_layernorm.state_dict())
    reference = cv.post_layernorm(cv(pixel_values=pixel_values).last_hidden_state)  # [images, tokens, width]
    mapped = bv(pixel_values=pixel_values).last_hidden_state
    return float(F.cosine_similarity(reference, mapped, dim=-1).mean())


def train_blip2(out: Path, train: tuple, steps: int, batch: int, questions_per_image: int = 3, lr: float = 2e-3,
                vision_lr: float = 1e-3, clip_folder: Path | None = None, qformer_dropout: float = 0.0) -> dict:
    tokenizer = make_opt_tokenizer()
    config = blip2_config(tokenizer, qformer_dropout)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # HF zero-inits the queries: identical queries would stay identical
        model.query_tokens.normal_(0.0, 0.5)
    train_scenes, images = train
    init = {}
    if clip_folder is not None:
        clip = transformers.CLIPModel.from_pretrained(clip_folder).eval()
        init = {"vision_init": f"the demo CLIP's ViT ({clip_folder.name}/)",
                "vision_init_cosine": round(clip_vision_into_blip2(clip, model, to_pixels(images[:256])), 4)}
        log(f"blip2 vision tower from {clip_folder}: feature cosine {init['vision_init_cosine']}")
    vision = list(model.vision_model.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("vision_model.")]
    optimizer = torch.optim.AdamW([{"params": vision, "lr": vision_lr}, {"params": others, "lr": lr}],
                                  weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(i, steps, steps // 20))
    rng = np.random.default_rng(0)
    share = np.array([BLIP2_SHAPE_COUNT_SHARE[len(s.shapes)] for s in train_scenes])
    share /= share.sum()
    start, cpu, model, loads = time.time(), time.process_time(), model.train(), []
    for step in range(steps):
        idx = rng.choice(len(train_scenes), size=batch, p=share)
        loss = blip2_loss(model, *blip2_batch(tokenizer, train, idx, questions_per_image, rng))
        if update(model, optimizer, sched, loss, step, steps, loads):
            log(f"blip2 step {step}/{steps} loss {loss.item():.4f}")
    seconds, cpu = time.time() - start, time.process_time() - cpu
    model = model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=config.text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=24)
    model.save_pretrained(out)
    save_blip2_processors(out, tokenizer, config)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
            "load_average": round(np.mean(loads), 2),
            "steps": steps, "batch": batch, "lr": lr, "vision_lr": vision_lr,
            "sequences_per_image": 1 + questions_per_image,
            "qformer_dropout": qformer_dropout,
            "shape_count_share": BLIP2_SHAPE_COUNT_SHARE, **init}


def save_blip2_processors(out: Path, tokenizer, config) -> None:
    """preprocessor_config.json (what AutoImageProcessor reads) and the Blip2Processor with the tokenizer."""
    processor = transformers.BlipImageProcessor(size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE},
                                                resample=3, image_mean=MEAN, image_std=STD)  # bicubic, as BLIP-2
    processor.save_pretrained(out)
    transformers.Blip2Processor(image_processor=processor, tokenizer=tokenizer,
                                num_query_tokens=config.num_query_tokens).save_pretrained(out)


@torch.no_grad()
def hf_generate(model, tokenizer, pixel_values: torch.Tensor, prompt: str | None,
                max_new_tokens: int = 24) -> list[str]:
    """Greedy text from transformers' own ``generate`` (image tokens, then the prompt, as Blip2Processor builds it)."""
    config = model.config
    head = tokenizer(prompt)["input_ids"] if prompt else [config.text_config.bos_token_id]
    ids = torch.tensor([[config.image_token_index] * config.num_query_tokens + head]).repeat(len(pixel_values), 1)
    out = model.generate(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
                         do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    if config.use_decoder_only_language_model:  # OPT: the prompt, then the new tokens; T5: the decoder's tokens only
        out = out[:, ids.shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def evaluate_blip2(folder: Path, count: int = TEST_SCENES) -> dict:
    """Exact-match greedy captions and answers (transformers generate) on held-out test scenes."""
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    chosen, images = render("test", count)
    pixels = to_pixels(images)
    captions = []
    for i in range(0, len(chosen), 96):
        captions += hf_generate(model, tokenizer, pixels[i:i + 96], None)
    caption_exact = [c == s.caption for c, s in zip(captions, chosen)]
    by_kind: dict[str, list[bool]] = {"color": [], "shape": [], "count": []}
    for question, asked in scenes.questions_by_text(chosen).items():
        rows = [i for i, _ in asked]
        answers = hf_generate(model, tokenizer, pixels[rows], scenes.VQA_TEMPLATE.format(question), 6)
        by_kind[scenes.question_kind(question)] += [got == want for got, (_, want) in zip(answers, asked)]
    counts = Counter(len(s.shapes) for s in chosen)
    per_count = {str(n): float(np.mean([ok for ok,
                                        s in zip(caption_exact,
                                                 chosen) if len(s.shapes) == n])) for n in sorted(counts)}
    return {"caption_exact": float(np.mean(caption_exact)), "caption_exact_by_shape_count": per_count,
            "vqa_color_shape": float(np.mean(by_kind["color"] + by_kind["shape"])),
            "vqa_color": float(np.mean(by_kind["color"])), "vqa_shape": float(np.mean(by_kind["shape"])),
            "vqa_count": float(np.mean(by_kind["count"])), "test_scenes": count,
            "questions": sum(len(v) for v in by_kind.values()), "examples": [
                {"truth": s.caption, "caption": c} for s, c in list(zip(chosen, captions))[:5]]}


# --- model cards -------------------------------------------------------------------------------------------
def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_card(folder: Path, name: str, training: dict, scores: dict, card=None) -> None:
    """README.md (the model card: ``card``, else ``name``'s) and training.json (the same facts, machine-readable)."""
    params = sum(p.numel() for p in _load(folder, name).parameters())
    facts = {"model": name, "parameters": params, "training": training, "test_split": scores,
             "machine": {"cpu_threads": torch.get_num_threads(),
                         "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "transformers": transformers.__version__}}
    (folder / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    (folder / "README.md").write_text((card or CARDS[name])(params, training, scores, facts) + "\n")


def _load(folder: Path, name: str):
    cls = transformers.CLIPModel if name == "clip" else transformers.Blip2ForConditionalGeneration
    return cls.from_pretrained(folder)


DATA_TEXT = (
    "Procedural scenes from `examples/scenes.py`: 64×64 images of one to three shapes ({shapes}) in six colours "
    "({colours}), two sizes, random positions and small rotations, on a dark background with noise. Colours and "
    "shapes are distinct within a scene. Splits are seeded (`scenes.split(name, n)`): training draws from the "
    "`train` split only; the scores below are on the `test` split, never trained on.")


def _common(training: dict) -> str:
    return (f"Trained from scratch on CPU ({training['cpu_threads']} threads) in {training['train_seconds'] / 60:.1f} "
            "min of wall "
            f"time ({training['train_cpu_seconds'] / 60:.1f} CPU-minutes; {training['steps']} steps × "
            f"{training['batch']} "
            f"images, {training['train_scenes']} training scenes, AdamW lr {training['lr']:g}"
            + (f", vision tower {training['vision_lr']:g}" if "vision_lr" in training
               else "") + ", cosine schedule):\n\n"
            f"```bash\n{training['command']}\n```\n\n"
            + (f"Training both demo models took {training['both_models_train_seconds'] / 60:.1f} min; the whole script "
               f"(rendering the scenes, training and measuring both) ran in {training['script_seconds'] / 60:.1f} min. "
               if "script_seconds" in training else "")
            + f"The machine's mean 1-minute load average during training was "
            f"{training['load_average']:.1f} (2.0: this job alone on both cores; more: other jobs shared them).")


def _vision_init(training: dict) -> str:
    if "vision_init" not in training:
        return "All of it from random initialisation. "
    return ("As BLIP-2 starts from a pretrained CLIP-style ViT, the vision tower starts from "
            f"{training['vision_init']}: its "
            "layers copied one to one, CLIP's pre-layernorm folded into the patch embedding (patch features "
            "at the start: "
            f"cosine {training['vision_init_cosine']} to CLIP's); then every part is trained together. ")


def clip_card(params: int, training: dict, scores: dict, facts: dict) -> str:
    return f"""# mmedge demo CLIP (shapes)

A small `CLIPModel` ({params / 1e6:.2f} M parameters: ViT {CLIP_SIZES['vision_layers']} layers × {CLIP_SIZES['vision_hidden']},
patch {CLIP_SIZES['patch']}, 64×64 input; text transformer {CLIP_SIZES['text_layers']} layers × {CLIP_SIZES['text_hidden']};
byte-level BPE tokenizer learned on the scene grammar) that ships with mmedge for `mmedge demo` and the examples.
It knows colours and shapes, nothing else: it is a demonstration of the SDK, not a general model.

## Data

{DATA_TEXT.format(shapes=', '.join(scenes.SHAPES), colours=', '.join(scenes.COLOURS))}
The text of each scene is its caption ("a red circle and a blue square"); the loss is CLIP's symmetric contrastive
loss, with scenes that share a caption counted as positives of each other.

## Training

{_common(training)}

## Test-split scores (PyTorch FP32, measured by the training script)

| metric | score |
|---|---|
| zero-shot top-1, 24 labels (`"a {{colour}} {{shape}}"`), one-shape test scenes ({scores['test_scenes']}) | {scores['zero_shot_top1']:.1%} |
| top-1 label is one of the shapes present, two- and three-shape test scenes ({scores['test_scenes']}) | {scores['multi_shape_top1_present']:.1%} |

`tests/test_demo_models.py` re-measures zero-shot top-1 (floor 90%) on a smaller slice of the same test split, in FP32
and as the INT8 fused zero-shot export, and checks INT8 top-1 agreement with FP32 (floor 99%).

Zero-shot prompts: template `"a {{}}"` with labels like `"red circle"`. Files: `model.safetensors`, `config.json`,
`tokenizer.json`, `preprocessor_config.json`; facts in `training.json`."""


def blip2_card(params: int, training: dict, scores: dict, facts: dict) -> str:
    s = BLIP2_SIZES
    examples = "\n".join(f"| {e['truth']} | {e['caption']} |" for e in scores["examples"])
    per_count = ", ".join(f"{n} shape(s) {v:.0%}" for n, v in scores["caption_exact_by_shape_count"].items())
    return f"""# mmedge demo BLIP-2 (shapes)

A small `Blip2ForConditionalGeneration` ({params / 1e6:.2f} M parameters): ViT {s['vision_layers']} layers × {s['vision_hidden']}
(patch {s['patch']}, 64×64 input), Q-Former {s['qformer_layers']} layers × {s['qformer_hidden']} with {s['queries']} queries,
OPT decoder {s['llm_layers']} layers × {s['llm_hidden']} (FFN {s['llm_hidden'] * 4}, {LLM_POSITIONS} positions). The tokenizer is
OPT's layout (`<s> <pad> </s> <unk>`, `</s>` = BOS first in every text, `<image>` at `image_token_index`) with a
byte-level BPE learned on the scene grammar; generation stops at the newline token, as BLIP-2 OPT checkpoints do.
It ships with mmedge for `mmedge demo` and the examples; it captions and answers questions about shape scenes only.

## Data

{DATA_TEXT.format(shapes=', '.join(scenes.SHAPES), colours=', '.join(scenes.COLOURS))}
Each training image is seen with its caption (shapes named left to right: "a red circle, a blue square and a green
cross") and {training['sequences_per_image'] - 1} of its questions in BLIP-2's VQA prompt (`Question: what color is the circle? Answer:` → `red`;
`what shape is the red one?` → `circle`; `how many shapes are there?` → `two`). Loss: next-token cross-entropy on
the caption or answer, over the sequence the device builds (prefix rows, then the embedded prompt). The LLM runs
each image's query prefix once and continues its caption and questions from copies of that KV cache: the same loss
and gradients as full sequences, with the query rows computed once per image. The Q-Former trains without dropout
(rate {training.get('qformer_dropout', 0.1):g}; BLIP-2's is 0.1): these small models then fit the scenes in fewer steps.

## Training

{_vision_init(training)}{_common(training)}

## Test-split scores (PyTorch FP32, transformers `generate`, greedy; {scores['test_scenes']} test scenes)

| metric | score |
|---|---|
| caption exactly equal to the ground truth | {scores['caption_exact']:.1%} ({per_count}) |
| answers to colour and shape questions exactly right | {scores['vqa_color_shape']:.1%} (colour {scores['vqa_color']:.1%}, shape {scores['vqa_shape']:.1%}) |
| answers to "how many shapes are there?" | {scores['vqa_count']:.1%} |

| ground truth | greedy caption |
|---|---|
{examples}

`tests/test_demo_models.py` re-measures caption exact match (floor 70%) and colour/shape answers (floor 90%) on a
smaller slice of the same test split through the FP32 ONNX export, and checks that the export with an INT4 LLM
writes the same caption as FP32 on ≥ 90% of the images."""


CARDS = {"clip": clip_card, "blip2": blip2_card}


def write_demo_images(folder: Path, count: int) -> None:
    """The first ``count`` test-split scenes as PNGs, with truth.json (labels, prompt template, ground truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("scene-*.png"):
        old.unlink()
    chosen = scenes.split("test", count)
    paths = scenes.save_images(chosen, folder)
    truth = {"generator": "examples/scenes.py", "split": "test", "labels": scenes.labels(), "templates": ["a {}"],
             "vqa_template": scenes.VQA_TEMPLATE, "images": {p.name: s.truth() for p, s in zip(paths, chosen)}}
    (folder / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")


def positive_seconds(text: str) -> float:
    """A time budget: a number of seconds above 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} seconds: expected a finite number above 0")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder that gets clip/ and blip2/ (blip2_t5/, idefics/ with their flags)")
    parser.add_argument("--only", choices=["clip", "blip2"])
    parser.add_argument("--evaluate", action="store_true",
                        help="no training: re-measure the saved models, rewrite their cards")
    parser.add_argument("--train-scenes", type=count, default=60000)
    parser.add_argument("--clip-scenes", type=count, default=20000,
                        help="CLIP trains on the first N training scenes (its caption set is small; BLIP-2 "
                        "uses them all)")
    parser.add_argument("--clip-steps", type=count, default=2500)
    parser.add_argument("--blip2-steps", type=count, default=2600)
    parser.add_argument("--batch", type=count, default=64)
    parser.add_argument("--blip2-questions", type=non_negative, default=3,
                        help="questions per training image beside its caption")
    parser.add_argument("--blip2-vision-lr", type=float, default=1e-3)
    parser.add_argument("--blip2-qformer-dropout", type=float, default=0.0,
                        help="BLIP-2 uses 0.1; off, these small models fit the scenes in fewer steps")
    parser.add_argument("--test-scenes", type=count, default=TEST_SCENES,
                        help="held-out scenes each score is measured on")
    parser.add_argument("--threads", type=count, default=os.cpu_count())
    parser.add_argument("--demo-images", type=non_negative, default=6, help="test scenes bundled for `mmedge demo`")
    parser.add_argument("--idefics", action="store_true",
                        help="train (with --evaluate: re-measure) only the IDEFICS demo model (examples/flamingo_demo.py)")
    parser.add_argument("--idefics-steps", type=count, default=6000,
                        help="the IDEFICS cosine schedule's length in steps (it follows wall time when that is further)")
    parser.add_argument("--idefics-budget-seconds", type=positive_seconds, default=570.0,
                        help="IDEFICS training stops after this much wall time (with a fully decayed learning rate)")
    parser.add_argument("--idefics-scenes", type=count, default=16000, help="training scenes the IDEFICS prompts draw on")
    parser.add_argument("--idefics-test-prompts", type=count, default=200, help="held-out prompts per IDEFICS task")
    parser.add_argument("--blip2-t5", action="store_true",
                        help="train (with --evaluate: re-measure) only the BLIP-2 Flan-T5 demo model (examples/t5_demo.py)")
    parser.add_argument("--t5-steps", type=count, default=4000,
                        help="the BLIP-2 Flan-T5 cosine schedule's length in steps (it follows wall time when further)")
    parser.add_argument("--t5-budget-seconds", type=positive_seconds, default=570.0,
                        help="BLIP-2 Flan-T5 training stops after this much wall time (with a fully decayed rate)")
    parser.add_argument("--t5-scenes", type=count, default=16000,
                        help="training scenes for BLIP-2 Flan-T5 (their frozen query outputs are computed once)")
    parser.add_argument("--t5-batch", type=count, default=32, help="BLIP-2 Flan-T5 training images per step")
    parser.add_argument("--t5-export-scenes", type=non_negative, default=240,
                        help="test scenes the BLIP-2 Flan-T5 exports (FP32, INT4 LLM) are measured on; 0: none")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.blip2_t5:
        if args.only or args.idefics:
            raise SystemExit("--blip2-t5 trains the BLIP-2 Flan-T5 model alone: drop --only and --idefics")
        return train_t5_step(args, "python examples/train_demo_models.py " + shlex.join(
            sys.argv[1:] if argv is None else argv))
    if args.idefics:
        if args.only:
            raise SystemExit("--idefics trains the IDEFICS model alone: drop --only")
        return train_idefics_step(args, "python examples/train_demo_models.py " + shlex.join(
            sys.argv[1:] if argv is None else argv))
    names = [args.only] if args.only else ["clip", "blip2"]
    write_demo_images(args.out.parent / "images", args.demo_images)
    command = "python examples/train_demo_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    train, started, done = None, time.time(), {}
    if not args.evaluate:
        log(f"rendering {args.train_scenes} training scenes")
        train = render("train", args.train_scenes, workers=args.threads)
    for name in names:
        folder = args.out / name
        if args.evaluate:
            training = json.loads((folder / "training.json").read_text())["training"]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
            log(f"training {name}")
            if name == "clip":
                # the first scenes of the same split
                subset = (train[0][:args.clip_scenes], train[1][:args.clip_scenes])
                training = train_clip(folder, subset, args.clip_steps, args.batch * 2) | {"clip_scenes": len(subset[0])}
            else:
                clip = args.out / "clip"
                # train CLIP first: BLIP-2's ViT starts from it
                clip = clip if (clip / "config.json").is_file() else None
                training = train_blip2(folder, train, args.blip2_steps, args.batch, args.blip2_questions,
                                       vision_lr=args.blip2_vision_lr, clip_folder=clip,
                                       qformer_dropout=args.blip2_qformer_dropout)
            training |= {"train_scenes": training.pop("clip_scenes", args.train_scenes), "cpu_threads": args.threads,
                         "command": command.strip()}
        log(f"measuring {name} on the test split")
        scores = (evaluate_clip if name == "clip" else evaluate_blip2)(folder, args.test_scenes)
        log(f"{name}: {json.dumps({k: v for k, v in scores.items() if k != 'examples'})}")
        done[name] = (folder, training, scores)
    for name, (folder, training, scores) in done.items():
        if not args.evaluate and len(done) == 2:  # both trained in this run: the time budget is about both
            training["script_seconds"] = round(time.time() - started, 1)
            training["both_models_train_seconds"] = round(sum(t["train_seconds"] for _, t, _ in done.values()), 1)
        write_card(folder, name, training, scores)
        log(f"{name}: {folder} holds {folder_size(folder) / 1e6:.2f} MB")
    return 0


def train_idefics_step(args, command: str) -> int:
    """The IDEFICS demo model: train (unless --evaluate), measure on held-out prompts, write its card."""
    import flamingo_demo

    folder, clip = args.out / "idefics", args.out / "clip"
    if args.evaluate:
        training = json.loads((folder / "training.json").read_text())["training"]
    else:
        if not (clip / "config.json").is_file():
            raise SystemExit(f"{clip} is missing: train the CLIP demo model first (its vision tower starts IDEFICS')")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        log(f"rendering {args.idefics_scenes} training scenes")
        train = render("train", args.idefics_scenes, workers=args.threads)
        log("training idefics")
        training = flamingo_demo.train_idefics(folder, train, args.idefics_steps, args.batch, clip,
                                               budget_seconds=args.idefics_budget_seconds)
        training |= {"cpu_threads": args.threads, "command": command.strip()}
    log("measuring idefics on held-out test prompts")
    measured = flamingo_demo.evaluate_idefics(folder, args.idefics_test_prompts)
    log(f"idefics: {json.dumps(measured['exact_by_task'])}")
    flamingo_demo.write(folder, training, measured)
    log(f"idefics: {folder} holds {folder_size(folder) / 1e6:.2f} MB")
    return 0


def train_t5_step(args, command: str) -> int:
    """The BLIP-2 Flan-T5 demo model: train (unless --evaluate), measure on the test split (transformers, then its
    FP32 and INT4-LLM exports), write its card."""
    import t5_demo

    folder, blip2 = args.out / "blip2_t5", args.out / "blip2"
    if args.evaluate:
        training = json.loads((folder / "training.json").read_text())["training"]
    else:
        if not (blip2 / "config.json").is_file():
            raise SystemExit(f"{blip2} is missing: train the BLIP-2 demo model first (its ViT and Q-Former start "
                             "this one)")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        log(f"rendering {args.t5_scenes} training scenes")
        train = render("train", args.t5_scenes, workers=args.threads)
        log("training blip2_t5")
        training = t5_demo.train_t5(folder, train, args.t5_steps, args.t5_batch, blip2, questions=args.blip2_questions,
                                    budget_seconds=args.t5_budget_seconds)
        training |= {"cpu_threads": args.threads, "command": command.strip()}
    log("measuring blip2_t5 on the test split")
    scores = evaluate_blip2(folder, args.test_scenes)
    log(f"blip2_t5: {json.dumps({k: v for k, v in scores.items() if k != 'examples'})}")
    if args.t5_export_scenes:
        log(f"exporting blip2_t5 (FP32, INT4 LLM) and measuring the graphs on {args.t5_export_scenes} test scenes")
        scores["exports"] = t5_demo.measure_exports(folder, args.t5_export_scenes)
        log(f"blip2_t5 exports: {json.dumps(scores['exports'])}")
    write_card(folder, "blip2_t5", training, scores, t5_demo.card)
    log(f"blip2_t5: {folder} holds {folder_size(folder) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
