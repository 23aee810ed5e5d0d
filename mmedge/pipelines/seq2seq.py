"""Captioning and VQA with an encoder-decoder LLM (BLIP-2 with Flan-T5): image → prefix → encoder → decoder → text.

``Seq2SeqCaptioner`` keeps ``Captioner``'s interface (``caption``, ``ask``, ``stream``, generation settings as
keywords) and adds a prompt per image (``caption(images, prompt=[...])``, ``ask(images, [questions])``). Per call:
the prefix runs once per image; the encoder once per prompt, over the prefix rows followed by the embedded prompt
(prompts of different lengths padded on the tokenizer's side, the manifest's ``encoder.padding_side``), and returns
every decoder layer's cross-attention K/V; the decoder gets them (and the encoder mask) as context for its first
step and every later one (``GraphDecoder.set_context``), and starts from ``decoder_start_token_id``. The generation
loop is the causal LMs' own (``mmedge.generation``): to it the decoder is a causal LM whose prompt is the start token.
Beam search reorders the decoder's self-attention cache only; the cross K/V follow the prompt, not the beam.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from mmedge.errors import InputError
from mmedge.generation import generate_text, stream
from mmedge.pipelines.captioner import Captioner, _strip_stream


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


class Seq2SeqCaptioner(Captioner):
    def __init__(self, artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        super().__init__(artifact, runners, preprocessor, tokenizer, decoder, embeddings)
        self.encoder = runners[self.settings["encoder"]["component"]]
        self.start_id = int(self.settings["decoder"]["decoder_start_token_id"])

    # --- public API ------------------------------------------------------------------------------
    def caption(self, images, prompt: str | list[str] | None = None, **generation: Any):
        """A caption per image (a string for one image, a list for a list). ``prompt``: one text for every image,
        or a list with one per image."""
        single = not isinstance(images, (list, tuple))
        config = self._config(generation)  # bad settings are refused before any graph runs
        embeds, mask = self._encoder_inputs(images, prompt)
        with self._decoder_in_use():
            start, ids = self._start(embeds, mask)
            texts = generate_text(self.decoder, start, None, config, self.tokenizer, prompt_ids=ids)
        texts = [t.strip() for t in texts]
        return texts[0] if single else texts

    __call__ = caption

    def ask(self, image, question: str | list[str], **generation: Any):
        """Answer a question about an image (or one question per image) with the ``Question: … Answer:`` prompt."""
        questions = question if isinstance(question, (list, tuple)) else [question]
        if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
            raise InputError("a question is empty", "non-empty question strings", "pass e.g. question='what is it?'")
        prompts = [self.vqa_template.replace("{}", q.strip()) for q in questions]
        return self.caption(image, prompts if isinstance(question, (list, tuple)) else prompts[0], **generation)

    def stream(self, image, prompt: str | None = None, **generation: Any) -> Iterator[str]:
        """Yield the caption of one image in pieces as tokens arrive; the pieces join to ``caption(image)``."""
        if isinstance(image, (list, tuple)):
            raise InputError("stream() got a list of images", "one image",
                             "call stream() per image, or caption() for a batch")
        config = self._config(generation)
        embeds, mask = self._encoder_inputs(image, prompt)
        with self._decoder_in_use():  # held while the caller iterates: the decoder's cache is in use
            start, ids = self._start(embeds, mask)
            yield from _strip_stream(stream(self.decoder, start, None, config, self.tokenizer, prompt_ids=ids))

    # --- building the inputs ---------------------------------------------------------------------
    def _encoder_inputs(self, images, prompt) -> tuple[np.ndarray, np.ndarray]:
        batch = len(images) if isinstance(images, (list, tuple)) else 1
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * batch
        if len(prompts) != batch:
            raise InputError(f"{len(prompts)} prompts were given for {batch} images", "one prompt per image, or one "
                             "prompt for all", "pass a list as long as the image list, or a single string")
        prompts = [self._default_prompt(p) for p in prompts]
        prefix = self.prefix(images, self._prefix_inputs(prompts))  # [batch, queries, width]
        queries = prefix.shape[1]
        budget = self._prompt_budget(queries, 0)
        ids = [self._prompt_ids(p, budget) for p in prompts]  # each [tokens]
        return encoder_inputs(prefix, ids, self.embeddings, self.settings["encoder"].get("padding_side", "right"))

    def _prompt_ids(self, prompt: str | None, budget: int) -> np.ndarray:
        """``[tokens]``: ``tokenizer(prompt)`` (T5: ending with ``</s>``); ``[bos_token_id]`` without a prompt."""
        if prompt is None:
            return np.array([self.settings["bos_token_id"]], dtype=np.int64)
        if not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None", "pass prompt='a photo of'")
        ids = self.tokenizer.encode_all(prompt)
        if ids.shape[0] > budget:
            raise InputError(f"the prompt has {ids.shape[0]} tokens", f"at most {budget}", "shorten the prompt")
        return ids

    def _start(self, embeds: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder, give its cross K/V to the decoder; the decoder's prompt: the start token per row
        (``[batch, 1, width]`` embeddings and ``[batch, 1]`` ids, the repetition penalty's context as in HF)."""
        cross = self.encoder.infer({"inputs_embeds": embeds, "attention_mask": mask})
        context = {"encoder_attention_mask": mask, **{k: np.asarray(v) for k, v in cross.items()}}
        self.decoder.set_context(context, context)
        ids = np.full((embeds.shape[0], 1), self.start_id, dtype=np.int64)
        return np.asarray(self.embeddings[ids], dtype=np.float32), ids

