"""Captioning and VQA with an encoder-decoder LLM (BLIP-2 with Flan-T5): image → prefix → encoder → decoder → text.

``Seq2SeqInputs`` is the ``Captioner``'s input builder for these families (``mmedge.families``: the row's
``inputs``). Per call: the prefix runs once per image; the encoder once per prompt, over the prefix rows followed by
the embedded prompt (prompts of different lengths padded on the tokenizer's side, the manifest's
``encoder.padding_side``; ``caption(images, [one prompt per image])`` takes a list), and returns every decoder
layer's cross-attention K/V; the decoder gets them (and the encoder mask) as context for its first step and every
later one (``GraphDecoder.set_context``), and starts from ``decoder_start_token_id``. The generation loop is the
causal LMs' own (``mmedge.generation``): to it the decoder is a causal LM whose prompt is the start token. Beam
search reorders the decoder's self-attention cache only; the cross K/V follow the prompt, not the beam.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmedge.errors import InputError
from mmedge.pipelines.prefix_inputs import PrefixInputs


def encoder_inputs(prefix: np.ndarray, prompt_ids: Sequence[np.ndarray], table, padding_side: str = "right"):
    """``(inputs_embeds [batch, queries + tokens, width], attention_mask [batch, queries + tokens])`` for the
    encoder: each row's prefix rows, then its embedded prompt ids, padded to the longest prompt on
    ``padding_side`` (padding rows hold zeros, masked)."""
    batch, queries, width = prefix.shape
    longest = max(len(ids) for ids in prompt_ids)
    embeds = np.zeros((batch, queries + longest, width), dtype=np.float32)
    mask = np.zeros((batch, queries + longest), dtype=np.int64)
    for row, ids in enumerate(prompt_ids):
        text = np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)  # [tokens, width]
        tokens = np.concatenate([prefix[row].astype(np.float32), text], axis=0)  # [queries + tokens, width]
        start = 0 if padding_side == "right" else embeds.shape[1] - tokens.shape[0]
        embeds[row, start:start + tokens.shape[0]] = tokens
        mask[row, start:start + tokens.shape[0]] = 1
    return embeds, mask


class Seq2SeqInputs(PrefixInputs):
    """Images (+ one prompt for all, or one per image) → the decoder's start token as its prompt, and the encoder's
    cross K/V and mask as its context: ``{"embeds", "mask", "ids", "prefill", "step"}``."""

    least_prompt_positions = 1  # the decoder's own positions start at its start token; the prompt is the encoder's

    def prompt_positions(self, image, prompt: str | None) -> int:
        """The decoder's start token: the prompt (checked here as the call checks it) is the encoder's."""
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        budget = self.prompt_budget(int(self.settings["num_query_tokens"]), 0)
        for text in prompts:
            self.prompt_ids(self.default_prompt(text), budget)
        return self.least_prompt_positions

    def for_images(self, images, prompt: str | list[str] | None, max_new_tokens: int = 0) -> dict:
        embeds, mask = self.encoder_inputs(images, prompt)
        encoder = self.settings["encoder"]["component"]
        cross = self.run(encoder, {"inputs_embeds": embeds, "attention_mask": mask})  # once per prompt
        context = {"encoder_attention_mask": mask, **{k: np.asarray(v) for k, v in cross.items()}}
        start = int(self.settings["decoder"]["decoder_start_token_id"])
        ids = np.full((embeds.shape[0], 1), start, dtype=np.int64)  # the repetition penalty's context, as in HF
        return {"embeds": np.asarray(self.embeddings[ids], dtype=np.float32),  # [batch, 1, width]
                "mask": np.ones((embeds.shape[0], 1), dtype=np.int64), "ids": ids, "prefill": context, "step": context}

    def encoder_inputs(self, images, prompt) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's ``(inputs_embeds, attention_mask)``: prefix rows, then each row's embedded prompt."""
        batch = len(images) if isinstance(images, (list, tuple)) else 1
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * batch
        if len(prompts) != batch:
            raise InputError(f"{len(prompts)} prompts were given for {batch} images", "one prompt per image, or one "
                             "prompt for all", "pass a list as long as the image list, or a single string")
        prompts = [self.default_prompt(p) for p in prompts]
        budget = self.prompt_budget(int(self.settings["num_query_tokens"]), 0)  # judged before the prefix runs
        ids = [self.prompt_ids(p, budget) for p in prompts]  # each [tokens]
        prefix = self.prefix(images, prompts)  # [batch, queries, width]
        return encoder_inputs(prefix, ids, self.embeddings, self.settings["encoder"].get("padding_side", "right"))

    def prompt_ids(self, prompt: str | None, budget: int) -> np.ndarray:
        """``[tokens]``: ``tokenizer(prompt)`` (T5: ending with ``</s>``); ``[bos_token_id]`` without a prompt."""
        if prompt is None:
            return np.array([self.settings["bos_token_id"]], dtype=np.int64)
        if not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None", "pass prompt='a photo of'")
        ids = self.encoded(prompt)
        if ids.shape[0] > budget:
            raise InputError(f"the prompt has {ids.shape[0]} tokens", f"at most {budget}", "shorten the prompt")
        return ids
