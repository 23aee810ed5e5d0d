"""Captioning and VQA with BLIP-2: image → prefix embeddings → LLM decoder with a KV cache → text.

The prompt enters the decoder the way transformers' ``Blip2ForConditionalGeneration.generate`` does
it: the prefix rows (Q-Former outputs projected into the LLM), then the embedded ``tokenizer(prompt)``
ids, which start with BOS (just ``[BOS]`` for a plain caption). The manifest's ``blip2.image_tokens``
records this.

Threads: one Captioner may be shared by any number of threads. Its decoder owns one KV cache, so
generation is serialized by a lock (the image prefix is computed outside it); results equal those of
serial calls. For captions in parallel, load one Captioner per thread. A thread that calls the
Captioner again while it still iterates one of its own ``stream()`` generators gets an InputError
instead of a deadlock.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from mmedge.artifact import Artifact
from mmedge.errors import InputError, ManifestError
from mmedge.generation import GenerationConfig, generate_text, stream
from mmedge.manifest import family_section

if TYPE_CHECKING:
    from mmedge.backends import Plan

MAX_PROMPT_TOKENS = 512
MAX_PROMPT_CHARS = 8 * MAX_PROMPT_TOKENS  # English text has 4-5 characters per token


class Captioner:
    """``caption(images)``, ``ask(image, question)``, ``stream(image)``; generation settings as keywords."""

    task = "caption"
    plan: Plan | None = None  # the backends ``mmedge.load`` chose per component (set by load)

    def __init__(self, artifact: Artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        self.artifact = artifact
        self.runners = runners  # prefix components only; the decoder is separate
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.embeddings = embeddings  # [vocab, width] table, rows dequantized on lookup
        settings = family_section(artifact.manifest)  # the blip2 or idefics section
        self.settings = settings
        self.defaults = dict(artifact.manifest.get("generation") or {})
        self.vqa_template = settings["prompts"]["vqa"]
        self._lock = threading.Lock()  # guards the decoder's KV cache
        self._owner: int | None = None  # the thread generating now
        try:
            self._config({})  # the manifest's own settings must work before any call relies on them
        except InputError as exc:
            raise ManifestError(f"manifest.json field 'generation' holds an unusable default: {exc.what}", exc.expected,
                                "re-export the artifact; do not edit manifest.json by hand") from None

    # --- public API ------------------------------------------------------------------------------
    def caption(self, images, prompt: str | None = None, **generation: Any):
        """A caption per image (a string for one image, a list for a list). ``prompt`` continues a text."""
        single = not isinstance(images, (list, tuple))
        config = self._config(generation)  # bad settings are refused before any graph runs
        embeds, mask, ids = self._inputs(images, prompt, config.max_new_tokens)
        with self._decoder_in_use():
            texts = generate_text(self.decoder, embeds, mask, config, self.tokenizer, prompt_ids=ids)
        texts = [t.strip() for t in texts]
        return texts[0] if single else texts

    __call__ = caption

    def ask(self, image, question: str, **generation: Any):
        """Answer a question about an image with BLIP-2's ``Question: … Answer:`` prompting."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty", "a non-empty question string", "pass e.g. question='what is it?'")
        return self.caption(image, self.vqa_template.replace("{}", question.strip()), **generation)

    def stream(self, image, prompt: str | None = None, **generation: Any) -> Iterator[str]:
        """Yield the caption of one image in pieces as tokens arrive; the pieces join to ``caption(image)``."""
        if isinstance(image, (list, tuple)):
            raise InputError("stream() got a list of images", "one image",
                             "call stream() per image, or caption() for a batch")
        config = self._config(generation)
        embeds, mask, ids = self._inputs(image, prompt, config.max_new_tokens)
        with self._decoder_in_use():  # held while the caller iterates: the decoder's cache is in use
            yield from _strip_stream(stream(self.decoder, embeds, mask, config, self.tokenizer, prompt_ids=ids))

    @contextlib.contextmanager
    def _decoder_in_use(self) -> Iterator[None]:
        """Hold the decoder for one generation; refuse (not deadlock) a second one from the same thread."""
        me = threading.get_ident()
        if self._owner == me:  # only this thread can have set it to its own id
            raise InputError(
                "this Captioner was called again while one of its stream() generators is still running in this thread",
                "one generation at a time per thread (a Captioner owns one KV cache)",
                "iterate the stream to its end or call its close() first, or load a second Captioner for "
                "the other call",
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    # --- building the decoder's inputs -----------------------------------------------------------
    def prefix(self, images, inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Prefix embeddings ``[batch, num_query_tokens, width]``: the components the manifest's ``prefix.components``
        names, in order (one graph, or vision → Q-Former), each fed the tensors of the ones before by name, and
        ``inputs`` (a prefix that also reads text: InstructBLIP's instruction tokens); the result is their
        ``prefix.output``."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        chain = self.settings["prefix"]
        values = {"pixel_values": self.preprocessor(batch), **(inputs or {})}  # pixels [batch, 3, height, width]
        for name in chain["components"]:
            runner = self.runners[name]
            values.update(runner.infer({input_name: values[input_name] for input_name in runner.input_metadata()}))
        return values[chain["output"]]

    def _prompt_ids(self, prompt: str | None, budget: int) -> np.ndarray:
        """``[tokens]``: BOS, then the prompt's tokens; a prompt over ``budget`` tokens keeps BOS and its end."""
        if prompt is None:
            return np.array([self.settings["bos_token_id"]], dtype=np.int64)
        if not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None", "pass prompt='a photo of'")
        text = prompt[-MAX_PROMPT_CHARS:]  # a longer text is cut before tokenizing: tokenizing it costs little
        ids = self.tokenizer.encode_all(text)  # [tokens], starts with BOS, not cut
        budget = max(budget, 1)
        if len(text) < len(prompt) or ids.shape[0] > budget:
            size = f"{len(prompt):,} characters" if len(text) < len(prompt) else f"{ids.shape[0]} tokens"
            warnings.warn(f"the prompt is too long ({size}; this call has room for {budget} tokens, BOS included): "
                          f"keeping BOS and its last {budget - 1} tokens at most; shorten the prompt or lower "
                          "max_new_tokens to keep more of it", stacklevel=4)
            ids = np.concatenate([ids[:1], ids[1:][ids.shape[0] - budget:]]) if ids.shape[0] > budget else ids
        return ids

    def _prompt_budget(self, queries: int, max_new_tokens: int) -> int:
        """Prompt tokens (BOS included) that fit: MAX_PROMPT_TOKENS, and the decoder's positions after the
        image rows and the new tokens."""
        max_positions = self.settings["decoder"].get("max_positions")
        if max_positions is None:
            return MAX_PROMPT_TOKENS
        return min(MAX_PROMPT_TOKENS, max_positions - queries - max_new_tokens)

    def _default_prompt(self, prompt: str | None) -> str | None:
        """The prompt a caption without one uses (the manifest's ``prompts.caption``; None: no prompt)."""
        return self.settings["prompts"].get("caption") if prompt is None else prompt

    def _prefix_inputs(self, prompts: list) -> dict[str, np.ndarray]:
        """The prefix's inputs beyond the pixels, for these prompts (one per image): none for BLIP-2."""
        return {}

    def _inputs(self, images, prompt, max_new_tokens: int = 0):
        prompt = self._default_prompt(prompt)
        count = len(images) if isinstance(images, (list, tuple)) else 1
        prefix = self.prefix(images, self._prefix_inputs([prompt] * count) if count else {})  # [batch, queries, width]
        batch, queries, _ = prefix.shape
        prompt_ids = self._prompt_ids(prompt, self._prompt_budget(queries, max_new_tokens))  # [tokens]
        text = self.embeddings[prompt_ids]  # [tokens, width]
        embeds = np.concatenate([prefix, np.broadcast_to(text, (batch, *text.shape)).astype(prefix.dtype)], axis=1)
        mask = np.ones(embeds.shape[:2], dtype=np.int64)  # [batch, queries + tokens]
        # What HF passes as input_ids: image-token placeholders, then the prompt (repetition-penalty context).
        image_token = self.settings["image_tokens"].get("hf_image_token_id")
        placeholder = np.full((queries,), image_token if image_token is not None else 0, dtype=np.int64)
        ids = np.broadcast_to(np.concatenate([placeholder, prompt_ids]), (batch, queries + prompt_ids.shape[0]))
        return embeds, mask, np.ascontiguousarray(ids)

    def _config(self, overrides: dict) -> GenerationConfig:
        settings = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if settings.get("stop_strings") is None:
            settings.pop("stop_strings", None)
        config = GenerationConfig.from_dict(settings)
        return config.validate(max_positions=self.settings["decoder"].get("max_positions"),
                               vocab_size=self.embeddings.shape[0])

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.decoder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces of ``text.strip()``: leading whitespace dropped, trailing whitespace held until more text."""
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield held + body
            held = ""
        held += piece[len(body):]
