"""The demo Flamingo model (``mmedge/demo/models/idefics``): a small ``IdeficsForVisionText2Text`` trained from scratch
on CPU on interleaved prompts over the procedural scenes (``examples/scenes.py``). Run it through
``python examples/train_demo_models.py --idefics`` (a step of its own, after CLIP: its vision tower starts from the
demo CLIP's and stays frozen, as Flamingo keeps its vision encoder frozen).

Tasks (``mmedge.demo.few_shot``): few-shot captions in the style the two examples in the prompt set (full caption,
colours only, shapes only), and questions that compare two images ("which image has more shapes?", "is the circle
in image 1 the same color as the square in image 2?"). The loss is next-token cross-entropy on the answer and its
end-of-sequence token, over the sequence ``IdeficsProcessor`` builds (the device builds the same).
"""

from __future__ import annotations

import json
import operator
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scenes
import torch
import torch.nn.functional as F
import transformers

from mmedge.demo import few_shot
from mmedge.pipelines.interleaved import image_attention_mask, prompt_text

FAKE, IMAGE = "<fake_token_around_image>", "<image>"
FORMAT = {"bos_token": "<s>", "image_token": IMAGE, "fake_image_token": FAKE, "end_of_utterance_token": None}
SIZES = dict(llm_hidden=128, llm_layers=3, llm_intermediate=192, cross_layer_interval=1, latents=16,
             resampler_depth=1, positions=128)
TASK_SHARE = {"few-shot": 0.5, "more shapes": 0.2, "same color": 0.3}  # of each training batch
TASKS = ("few-shot caption", "few-shot colors", "few-shot shapes", "more shapes", "same color")
AIM = 0.85  # exact answers per task the issue aims at
HELD_OUT_SCENES = 200  # the test-split scenes the held-out prompts draw on
TRIED = (  # what the probe runs around the shipped runs showed
    "the vision tower frozen at the demo CLIP's (its features computed once per scene), which makes a step cheap "
    "enough for a 10-minute budget; the style of the examples is learnt within a few hundred steps (answers come "
    "in the right form and count), colour and shape naming comes next (after 1,200 steps the few-shot answers name "
    "the right items in 60-100% of prompts), and the left-to-right order of the items is what stays slow: in the "
    "shipped model almost every wrong few-shot answer names the right items in another order (second column above). "
    "More training helps a little: the first shipped run (1,574 steps, one thread on a loaded machine) scored "
    "49.5% / 61% / 60% on the three few-shot tasks, this one (3,415 steps, two threads on a quiet one) the figures "
    "above. Probes of 200 s each (40 prompts per task): 64 resampler latents instead of 16 learn slower (caption 20% "
    "vs 50%, 1.5x the cost per step); no resampler at all (the cross-attention reading the ViT's 65 patch features, "
    "which carry their positions) learns slower too (caption 32.5%); more of each batch for the few-shot tasks (70% "
    "instead of 50%) moved them within the probes' noise; supervising the second example's text too, and a learning "
    "rate of 4e-3, were no better in earlier probes. What would close the gap: a resampler that keeps where each "
    "feature came from (IDEFICS' has no position input; the ViT's position embeddings are all it gets), or a longer "
    "budget; training the vision tower too, as the demo BLIP-2 does, costs 2.3x per step and had learnt far less "
    "after the same 200 s (caption 5%). "
    "\"same color\" stays near chance. In its prompt each text token sees only the latest image, so one token (the "
    "<fake_token_around_image> between the two images) carries what image 1 showed to the answer; but giving that "
    "more room did not help (probes of 2026-12-07): labelling the "
    "images ([\"... image 1:\", image, \"image 2:\", image, \"Answer:\"]) gave 50% after 200 s; each part of the "
    "question after the image it is about ([image, \"Question: is the circle in this image\", image, \"the same color "
    "as the square in this one? Answer:\"], so each shape word reads its own image in one step) gave 57.5% after "
    "200 s, and 52% after the full 10 minutes (2,672 steps) with a fourth task added for the colour read alone "
    "(\"what color is the circle in this image?\": 73%; the few-shot tasks as above). The model learns to read a "
    "named shape's colour; comparing two colours for a yes / no is what this budget does not teach it. Weighting "
    "each prompt alike in the loss (its yes / no is 2 of some 15 answer tokens per prompt in a batch otherwise) left "
    "it at chance too (35% of 40 after 200 s).")
MAX_IMAGES = 3


@dataclass(frozen=True)
class Ref:
    """An image in a training prompt: its row in the feature table."""

    index: int


# --- tokenizer and model ---------------------------------------------------------------------------------
def _words(tokenizer, texts: list[str]) -> Counter:
    """Words as the tokenizer's Metaspace pre-tokenizer leaves them ("▁" starting each word after a space), split at
    special tokens and before every "▁": merges are learned inside words, so every caption spells word by word."""
    specials = set(tokenizer.all_special_tokens) | {FAKE, IMAGE}
    words: Counter = Counter()
    for text in texts:
        run: list[str] = []
        for token in [*tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]), FAKE]:
            if (token in specials or token == "▁") and run:
                words[tuple(run)] += 1
                run = []
            if token not in specials:
                run.append(token)
    return words


def make_tokenizer(corpus: list[str], merges_limit: int = 320):
    """A Llama-style tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, Metaspace "▁") with a BPE learned on the task
    prompts and answers, and IDEFICS' ``<fake_token_around_image>`` and ``<image>`` after the base vocabulary."""
    from train_demo_models import learn_merges

    chars = sorted({c for text in corpus for c in text.replace(" ", "▁")} | {"▁"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}

    def build(merges):
        table = dict(vocab)
        for left, right in merges:
            table.setdefault(left + right, len(table))
        tokenizer = transformers.LlamaTokenizer(vocab=table, merges=merges, pad_token="<unk>")
        tokenizer.add_tokens([transformers.AddedToken(t, normalized=False, special=True) for t in (FAKE, IMAGE)],
                             special_tokens=True)
        return tokenizer

    return build(learn_merges(_words(build([]), corpus), merges_limit))


def config(tokenizer) -> transformers.IdeficsConfig:
    from train_demo_models import VISION

    s = SIZES
    return transformers.IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=s["llm_hidden"],
        intermediate_size=s["llm_intermediate"], num_hidden_layers=s["llm_layers"], num_attention_heads=4,
        cross_layer_interval=s["cross_layer_interval"], qk_layer_norms=False, alpha_initializer="ones",
        alpha_type="float", max_position_embeddings=s["positions"], use_resampler=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, freeze_vision_encoder=True,
        vision_config=dict(embed_dim=VISION["hidden"], image_size=scenes.IMAGE_SIZE, patch_size=VISION["patch"],
                           num_hidden_layers=VISION["layers"], num_attention_heads=VISION["heads"],
                           intermediate_size=VISION["hidden"] * 4, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=s["latents"],
                              resampler_depth=s["resampler_depth"], resampler_n_heads=4, resampler_head_dim=16,
                              qk_layer_norms_perceiver=False))


@torch.no_grad()
def vision_from_clip(model, clip_folder: Path) -> int:
    """Copy the demo CLIP's ViT into IDEFICS' (the same module layout); returns the tensors copied."""
    clip = transformers.CLIPModel.from_pretrained(clip_folder)
    source = clip.vision_model.state_dict()
    target = model.model.vision_model
    missing = target.load_state_dict(source, strict=False)
    if missing.missing_keys:
        raise RuntimeError(f"the CLIP vision tower lacks {missing.missing_keys}")
    return len(source)


# --- tasks -------------------------------------------------------------------------------------------------
class Tasks:
    """Draws the training (or evaluation) prompts over a pool of scenes: ``draw(kind, rng)`` → (items, answer, task)
    with ``Ref`` images."""

    def __init__(self, chosen: list):
        self.labels = [s.present_labels for s in chosen]
        self.by_shape_colour: dict[tuple[str, str], list[int]] = {}
        for i, labels in enumerate(self.labels):
            for label in labels:
                colour, shape = label.split(" ")
                self.by_shape_colour.setdefault((shape, colour), []).append(i)

    def scene(self, i: int) -> tuple:
        return Ref(i), self.labels[i]

    def draw(self, kind: str, rng: np.random.Generator) -> tuple[list, str, str]:
        n = len(self.labels)
        if kind == "few-shot":
            style = few_shot.STYLES[rng.integers(len(few_shot.STYLES))]
            picked = rng.choice(n, size=3, replace=False)
            items, answer = few_shot.few_shot([self.scene(int(i)) for i in picked[:2]], self.scene(int(picked[2])),
                                              style)
            return items, answer, f"few-shot {style}"
        a = int(rng.integers(n))
        if kind == "more shapes":
            while True:
                b = int(rng.integers(n))
                if len(self.labels[b]) != len(self.labels[a]):
                    return (*few_shot.more_shapes(self.scene(a), self.scene(b)), kind)
        colour1, shape1 = self.labels[a][rng.integers(len(self.labels[a]))].split(" ")
        same = rng.random() < 0.5
        while True:
            shape2 = str(rng.choice(scenes.SHAPES))
            colour2 = colour1 if same else str(rng.choice([c for c in scenes.COLOURS if c != colour1]))
            pool = [i for i in self.by_shape_colour.get((shape2, colour2), []) if i != a]
            if pool:
                b = int(pool[rng.integers(len(pool))])
                return (*few_shot.same_color(self.scene(a), self.scene(b), shape1, shape2), kind)


def encode(tokenizer, items: list, answer: str | None) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """(ids of the prompt [+ answer + EOS], the spans the loss is on, the images' feature rows in order).

    The spans: the answer (and its EOS); in a few-shot prompt also the second example's text, which the first
    example's style already sets (a one-shot answer inside the prompt). Tokens split at the image markers, so the
    ids of a prompt's head are a prefix of the whole prompt's."""
    text, images = prompt_text(items, FORMAT)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = []
    if answer is not None:
        spans.append((len(ids), len(ids) + 1 + len(tokenizer(answer, add_special_tokens=False)["input_ids"])))
        ids = ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(items) == 5 and not isinstance(items[0], str):  # [image, text, image, text, image]: few-shot
            head = [len(tokenizer(prompt_text(items[:k], FORMAT)[0], add_special_tokens=False)["input_ids"])
                    for k in (3, 4)]
            spans.append((head[0], head[1]))
    return ids, spans, [image.index for image in images]


def batch(tokenizer, drawn: list, features: torch.Tensor) -> dict:
    """Right-padded ids, mask, labels (-100 outside answers), image mask and features ``[batch, 3, tokens, w]``."""
    encoded = [encode(tokenizer, items, answer) for items, answer, _ in drawn]
    width = max(len(ids) for ids, _, _ in encoded)
    rows = len(encoded)
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full((rows, width), -100)
    seen = torch.zeros((rows, width, MAX_IMAGES), dtype=torch.long)
    images = torch.zeros((rows, MAX_IMAGES, *features.shape[1:]))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    for row, (seq, spans, refs) in enumerate(encoded):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        for start, end in spans:
            labels[row, start:end] = torch.tensor(seq[start:end])
        seen[row, :len(seq)] = torch.from_numpy(image_attention_mask(np.array(seq), image_id, tokenizer.eos_token_id,
                                                                     MAX_IMAGES))
        images[row, :len(refs)] = features[refs]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_attention_mask": seen,
            "image_encoder_embeddings": images}


def loss_of(model, inputs: dict) -> torch.Tensor:
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits  # [batch, tokens, vocab + 2]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


# --- training -------------------------------------------------------------------------------------------------
def corpus() -> list[str]:
    """Prompts and answers of every form, for the tokenizer's merges."""
    rng = np.random.default_rng(0)
    tasks = Tasks(scenes.split("validation", 300))
    texts = []
    for kind in TASK_SHARE:
        for _ in range(300):
            items, answer, _ = tasks.draw(kind, rng)
            texts += [prompt_text(items, FORMAT)[0], answer]
    return texts


def train_idefics(out: Path, train: tuple, steps: int, batch_size: int, clip_folder: Path, lr: float = 2e-3,
                  budget_seconds: float | None = None) -> dict:
    """Train for ``steps`` steps, or until ``budget_seconds`` of wall time have passed when that comes first: the
    cosine schedule follows whichever is further along, so a slow machine still ends on a fully decayed rate."""
    from train_demo_models import log, schedule, to_pixels, update

    tokenizer = make_tokenizer(corpus())
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(config(tokenizer))
    copied = vision_from_clip(model, clip_folder)
    for p in model.model.vision_model.parameters():
        p.requires_grad_(False)
    chosen, pixels = train
    with torch.no_grad():  # the frozen tower's features, once per training scene
        features = torch.cat([model.model.vision_model(pixel_values=to_pixels(pixels[i:i + 500])).last_hidden_state
                              for i in range(0, len(pixels), 500)])  # [scenes, patches + 1, vision width]
    log(f"idefics: vision tower from {clip_folder} ({copied} tensors), features of {len(chosen)} scenes")
    tasks, rng = Tasks(chosen), np.random.default_rng(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    start, cpu, loads = time.time(), time.process_time(), []
    budget = budget_seconds or float("inf")

    def progress(step: int) -> int:  # the step the schedule is at: by count, or by wall time when that is further
        return max(step, int(steps * (time.time() - start) / budget))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule(progress(i), steps, steps // 20))
    kinds, share = list(TASK_SHARE), np.array(list(TASK_SHARE.values()))
    model.train()
    done = 0
    while progress(done) < steps:
        drawn = [tasks.draw(str(k), rng) for k in rng.choice(kinds, size=batch_size, p=share)]
        loss = loss_of(model, batch(tokenizer, drawn, features))
        if update(model, optimizer, sched, loss, done, steps, loads):
            log(f"idefics step {done} (schedule at {progress(done)}/{steps}) loss {loss.item():.4f}")
        done += 1
    seconds, cpu = time.time() - start, time.process_time() - cpu
    model = model.eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                            max_new_tokens=24)
    model.save_pretrained(out)
    save_processor(out, tokenizer)
    return {"train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
            "load_average": round(float(np.mean(loads)), 2), "steps": done, "schedule_steps": steps,
            "budget_seconds": budget_seconds, "batch": batch_size, "lr": lr,
            "task_share": TASK_SHARE, "vision_init": f"the demo CLIP's ViT ({clip_folder.name}/), frozen",
            "train_scenes": len(chosen)}


def save_processor(out: Path, tokenizer) -> None:
    from train_demo_models import MEAN, STD

    image_processor = transformers.IdeficsImageProcessor(image_size=scenes.IMAGE_SIZE, image_mean=MEAN, image_std=STD)
    image_processor.save_pretrained(out)  # preprocessor_config.json, as AutoImageProcessor reads it
    transformers.IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# --- evaluation ---------------------------------------------------------------------------------------------------
def held_out_prompts(count: int, split: str = "test", seed: int = 1) -> list[dict]:
    """``count`` prompts of each task over ``split`` scenes: ``[{"task", "prompt" (PIL images), "answer"}]``."""
    chosen = scenes.split(split, HELD_OUT_SCENES)  # the same pool for any count: a smaller count is a prefix
    rendered = [s.render() for s in chosen]
    tasks, rng = Tasks(chosen), np.random.default_rng(seed)
    wanted = {task: count for task in TASKS}
    out = []
    while any(wanted.values()):
        kind = str(rng.choice(list(TASK_SHARE)))
        items, answer, task = tasks.draw(kind, rng)
        if wanted[task]:
            wanted[task] -= 1
            out.append({"task": task, "answer": answer,
                        "prompt": [rendered[i.index] if isinstance(i, Ref) else i for i in items]})
    return out


@torch.no_grad()
def hf_answers(model, processor, prompts: list[list], chunk: int = 40) -> list[str]:
    """Greedy continuations from transformers' own ``generate`` (left-padded batches)."""
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), chunk):
        inputs = processor(text=prompts[i:i + chunk], return_tensors="pt", padding=True)
        generated = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=24)
        out += [t.strip() for t in processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                                    skip_special_tokens=True)]
    return out


def scores(answers: list[str], prompts: list[dict], same=operator.eq) -> dict:
    by_task: dict[str, list[bool]] = {}
    for got, p in zip(answers, prompts):
        by_task.setdefault(p["task"], []).append(same(got, p["answer"]))
    return {task: float(np.mean(ok)) for task, ok in by_task.items()}


def listed(answer: str) -> list[str]:
    """The items a list answer names, in sorted order: "a red circle and a blue square" -> ["a blue square", "a red
    circle"]; a one-item answer ("yes", "image 1") is its own list."""
    return sorted(part.strip() for part in re.split(r",| and ", answer) if part.strip())


def same_items(got: str, truth: str) -> bool:
    """The answer names the truth's items, in any order (the truth lists them left to right)."""
    return listed(got) == listed(truth)


def evaluate_idefics(folder: Path, count: int) -> dict:
    model = transformers.IdeficsForVisionText2Text.from_pretrained(folder).eval()
    processor = transformers.IdeficsProcessor.from_pretrained(folder)
    prompts = held_out_prompts(count)
    answers = hf_answers(model, processor, [p["prompt"] for p in prompts])
    return {"exact_by_task": scores(answers, prompts), "items_any_order_by_task": scores(answers, prompts, same_items),
            "prompts_per_task": count,
            "examples": [{"task": p["task"], "truth": p["answer"], "answer": a}
                         for p, a in list(zip(prompts, answers))[:6]]}


# --- the model card ----------------------------------------------------------------------------------------------
def card(params: int, training: dict, measured: dict, facts: dict) -> str:
    from train_demo_models import DATA_TEXT, _common

    s = SIZES
    any_order = measured.get("items_any_order_by_task", {})
    rows = "\n".join(f"| {task} | {measured['exact_by_task'][task]:.1%} | "
                     + (f"{any_order[task]:.1%} |" if task in any_order else " |") for task in TASKS)
    examples = "\n".join(f"| {e['task']} | {e['truth']} | {e['answer']} |" for e in measured["examples"])
    missed = [task for task in TASKS if measured["exact_by_task"][task] < AIM]
    below = (f"Below the {AIM:.0%} aim: {', '.join(missed)}. Tried: {TRIED}\n\n" if missed else "")
    return f"""# mmedge demo IDEFICS (Flamingo-style, shapes)

A small `IdeficsForVisionText2Text` ({params / 1e6:.2f} M parameters): the demo CLIP's ViT (frozen), a
Perceiver Resampler ({s['resampler_depth']} block, {s['latents']} latents), a Llama decoder
{s['llm_layers']} layers × {s['llm_hidden']} (FFN {s['llm_intermediate']}, {s['positions']} positions) with a gated
cross-attention block before every layer. Tokenizer: Llama layout (`<unk> <s> </s>`, Metaspace) with a BPE
learned inside the words of the task prompts; `<fake_token_around_image>` and `<image>` are IDEFICS' two
additional embeddings. It ships with mmedge for `mmedge demo` and `examples/few_shot.py`; it
knows shape scenes and these prompt forms only.

## Data and tasks

{DATA_TEXT.format(shapes=', '.join(scenes.SHAPES), colours=', '.join(scenes.COLOURS))}
Prompts are interleaved (`mmedge/demo/few_shot.py`):

- few-shot captions: `[image, "red and blue", image, "green", image]` → `yellow and white`: two examples set the
  style (`caption`: "a red circle and a blue square"; `colors`: "red and blue"; `shapes`: "circle and square");
- comparisons, question first: `["{few_shot.MORE_SHAPES}", image, image, "Answer:"]` → `image 1` / `image 2`;
  `["{few_shot.SAME_COLOR.format('circle', 'square')}", image, image, "Answer:"]` → `yes` / `no`.

Each training batch mixes them ({', '.join(f'{k} {v:.0%}' for k, v in TASK_SHARE.items())}); the loss is on the
answer and its end-of-sequence token.

## Training

The vision tower is {training['vision_init']}: its features of every training scene are computed once.
{_common(training)}

## Test-split scores (PyTorch FP32, transformers `generate`, greedy; {measured['prompts_per_task']} prompts per task)

| task | answer exactly right | the right items, in any order |
|---|---|---|
{rows}

The few-shot answers list a scene's items from left to right; the second column counts an answer that names the
right items in another order as right, to show what the model sees apart from where it sees it.

{below}| task | truth | greedy answer |
|---|---|---|
{examples}

`tests/test_demo.py` re-measures these on a slice of the same test prompts through the FP32 ONNX export (the fused
image graph and the decoder) and checks that the exports with an INT8 LLM and with an INT4 LLM give the FP32 answer on
≥ 90% of them. INT4 is the export's default recipe (LM head at 8 bits, a zero point per 32-weight block): 92.3% of the
test's 300 prompts, 91.6% of 200 per task (`benchmarks/demo_fidelity.py --idefics-prompts 200`), where the INT4
answers score as the FP32 ones within a point per task; with the head at 4 bits too, the first shipped model kept
75-78% (`benchmarks/int4_sensitivity.py`). See `mmedge demo`'s table for the bundled scenes."""


def write(folder: Path, training: dict, measured: dict) -> None:
    import platform

    params = sum(p.numel() for p in transformers.IdeficsForVisionText2Text.from_pretrained(folder).parameters())
    facts = {"model": "idefics", "parameters": params, "training": training, "test_split": measured,
             "machine": {"cpu_threads": torch.get_num_threads(),
                         "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "transformers": transformers.__version__}}
    (folder / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    (folder / "README.md").write_text(card(params, training, measured, facts) + "\n")
