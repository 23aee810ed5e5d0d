"""BLIP-2's prompts as decoder inputs: one image per prompt → prefix embeddings, then the prompt's tokens.

The prompt enters the decoder the way transformers' ``Blip2ForConditionalGeneration.generate`` does it: the prefix
rows (Q-Former outputs projected into the LLM), then the embedded ``tokenizer(prompt)`` ids, which start with BOS
(just ``[BOS]`` for a plain caption). The manifest's ``blip2.image_tokens`` records this.

``Captioner`` takes its inputs from a builder of this shape (``mmedge.families``: the row's ``inputs``); the
Flamingo builder beside it is ``mmedge.pipelines.interleaved.FlamingoInputs``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmedge.errors import InputError
from mmedge.generation.config import most_new_tokens, positions_taken

MAX_PROMPT_TOKENS = 512
CHARS_PER_TOKEN = 8  # English text has 4-5 characters per token: a longer text cannot fit the token cap


class PrefixInputs:
    """Images (+ one prompt text for all of them) → ``{"embeds", "mask", "ids"}`` for the decoder's prefill.

    ``settings``: the manifest's ``blip2`` object. ``run(name, feeds)``: runs an encoder component and returns its
    outputs by name. ``embeddings``: the token table (``[vocab, width]``, rows looked up by id).
    ``max_prompt_tokens``: the cap on prompt tokens (BOS included) before the decoder's positions are counted.
    """

    def __init__(self, settings: dict, tokenizer, preprocessor, run: Callable[[str, dict], dict], embeddings,
                 max_prompt_tokens: int | None = None):
        self.settings = settings
        self.tokenizer, self.preprocessor, self.run, self.embeddings = tokenizer, preprocessor, run, embeddings
        self.max_prompt_tokens = max_prompt_tokens or MAX_PROMPT_TOKENS

    def prefix(self, images, prompts: list | None = None) -> np.ndarray:
        """Prefix embeddings ``[batch, num_query_tokens, width]``: the components the manifest's ``prefix.components``
        names, in order (one graph, or vision → Q-Former), each fed the tensors of the ones before by name and
        ``prefix_inputs(prompts)`` (one prompt per image; a prefix that reads text: InstructBLIP); the result is their
        ``prefix.output``."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        chain = self.settings["prefix"]
        values = {"pixel_values": self.preprocessor(batch),  # [batch, 3, height, width]
                  **self.prefix_inputs(prompts if prompts is not None else [None] * len(batch))}
        for name in chain["components"]:
            values.update(self.run(name, values))
        return values[chain["output"]]

    def prefix_inputs(self, prompts: list) -> dict[str, np.ndarray]:
        """The prefix's inputs beyond the pixels, for these prompts (one per image): none for BLIP-2."""
        return {}

    def default_prompt(self, prompt: str | None) -> str | None:
        """The prompt a caption without one uses (the manifest's ``prompts.caption``; None: no prompt)."""
        return self.settings["prompts"].get("caption") if prompt is None else prompt

    def for_images(self, images, prompt: str | None, max_new_tokens: int = 0) -> dict:
        """``{"embeds" [batch, queries + tokens, width], "mask" [batch, queries + tokens], "ids" [batch, queries +
        tokens]}``: each image's prefix rows, then the same prompt tokens (``ids`` holds what HF passes as
        ``input_ids``: image-token placeholders, then the prompt; the repetition-penalty context)."""
        prompt = _checked_type(self.default_prompt(prompt))  # before the prefix: InstructBLIP's Q-Former reads it
        count = len(images) if isinstance(images, (list, tuple)) else 1
        queries = int(self.settings["num_query_tokens"])  # the prefix's rows; the prompt is judged before it runs
        prompt_ids = self.prompt_ids(prompt, self.prompt_budget(queries, max_new_tokens), queries,
                                     max_new_tokens)  # [tokens]
        prefix = self.prefix(images, [prompt] * count)  # [batch, queries, width]
        batch = prefix.shape[0]
        text = self.embeddings[prompt_ids]  # [tokens, width]
        embeds = np.concatenate([prefix, np.broadcast_to(text, (batch, *text.shape)).astype(prefix.dtype)], axis=1)
        mask = np.ones(embeds.shape[:2], dtype=np.int64)  # [batch, queries + tokens]
        image_token = self.settings["image_tokens"].get("hf_image_token_id")
        placeholder = np.full((queries,), image_token if image_token is not None else 0, dtype=np.int64)
        ids = np.broadcast_to(np.concatenate([placeholder, prompt_ids]), (batch, queries + prompt_ids.shape[0]))
        return {"embeds": embeds, "mask": mask, "ids": np.ascontiguousarray(ids)}

    def prompt_ids(self, prompt: str | None, budget: int, queries: int = 0, max_new_tokens: int = 0) -> np.ndarray:
        """``[tokens]``: BOS, then the prompt's tokens. A prompt over ``budget`` tokens is refused, as the other
        families refuse theirs: cutting it would change the question (its start, "Question:", goes first)."""
        if _checked_type(prompt) is None:
            return np.array([self.settings["bos_token_id"]], dtype=np.int64)
        ids = self.encoded(prompt)  # [tokens], starts with BOS
        if ids.shape[0] > budget:
            self._refuse_long_prompt(int(ids.shape[0]), budget, queries, max_new_tokens)
        return ids

    def encoded(self, prompt: str) -> np.ndarray:
        """``tokenizer(prompt)`` ids, ``[tokens]``: a prompt far over the token cap refused before tokenizing, and
        one holding the image placeholder after."""
        check_prompt_chars(prompt, self.max_prompt_tokens)
        ids = self.tokenizer.encode_all(prompt)
        refuse_image_placeholder(ids, self.settings["image_tokens"].get("hf_image_token_id"), self.tokenizer)
        return ids

    def prompt_positions(self, image, prompt: str | None) -> int:
        """Decoder positions of one image's prompt: the image's query rows, then BOS and the prompt's tokens."""
        prompt = _checked_type(self.default_prompt(prompt))
        tokens = 1 if prompt is None else int(self.encoded(prompt).shape[0])
        return int(self.settings["num_query_tokens"]) + tokens

    @property
    def least_prompt_positions(self) -> int:
        """Decoder positions every prompt takes before its text: the image's query rows and BOS."""
        return least_prompt_positions(self.settings)

    def _refuse_long_prompt(self, tokens: int, budget: int, queries: int, max_new_tokens: int) -> None:
        if budget >= self.max_prompt_tokens:  # the cap binds, not the positions
            raise InputError(f"the prompt has {tokens} tokens (BOS included)",
                             f"at most {self.max_prompt_tokens}", "shorten the prompt")
        positions = self.settings["decoder"]["max_positions"]
        fits = most_new_tokens(positions, queries + tokens)
        raise InputError(
            f"the prompt has {tokens} tokens (BOS included); with the image's {queries} rows and "
            f"max_new_tokens={max_new_tokens} that is {positions_taken(tokens + queries, max_new_tokens)} positions "
            "(the last new token is never fed back)",
            f"at most the decoder's {positions} positions",
            f"lower max_new_tokens to {fits} or less, or shorten the prompt" if fits > 0 else "shorten the prompt")

    def prompt_budget(self, queries: int, max_new_tokens: int) -> int:
        """Prompt tokens (BOS included) that fit: the cap, and the decoder's positions after the image rows and the
        new tokens."""
        max_positions = self.settings["decoder"].get("max_positions")
        if max_positions is None:
            return self.max_prompt_tokens
        return min(self.max_prompt_tokens, max_positions - positions_taken(queries, max_new_tokens))


def least_prompt_positions(section: dict) -> int:
    """Decoder positions every prompt takes before its text in a decoder-only LLM, read from the family's manifest
    ``section``: an image prefix's query rows (BLIP-2, InstructBLIP; none for IDEFICS, whose images sit inside its
    text) and BOS. (Flan-T5's decoder positions are unbounded: its builder says 1, and no limit reads it.)"""
    return int(section.get("num_query_tokens") or 0) + 1


def check_prompt_chars(text: str, max_tokens: int, what: str = "the prompt") -> None:
    """A text far longer than ``max_tokens`` tokens could hold is refused before tokenizing, the costly part (a
    5-million-character prompt took seconds to be refused by its token count)."""
    limit = CHARS_PER_TOKEN * max_tokens
    if len(text) > limit:
        raise InputError(f"{what} has {len(text):,} characters", f"at most {limit:,} ({max_tokens} tokens at most)",
                         "shorten the text")


def refuse_image_placeholder(ids: np.ndarray, token_id: int | None, tokenizer) -> None:
    """A prompt whose text holds the checkpoint's image placeholder (BLIP-2's ``<image>``) is refused: the image's
    rows go before the text, and transformers' ``generate`` fails on such a prompt (more placeholders than rows)."""
    if token_id is not None and bool(np.any(ids == token_id)):
        token = tokenizer.decode([int(token_id)], skip_special_tokens=False)
        raise InputError(f"the prompt holds {token!r}, the image placeholder (token {token_id})",
                         "plain text: the image is passed as an image, and its rows come before the prompt",
                         f"remove {token!r} from the prompt")


def _checked_type(prompt):
    """``prompt`` when it is a string or None (one prompt for every image of the call); else InputError."""
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None (one prompt for every image)",
                         "pass prompt='a photo of'")
    return prompt
