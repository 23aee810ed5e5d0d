"""Captioning, VQA and interleaved prompts: images (+ text) → decoder inputs → LLM decoder with a KV cache → text.

One class for every captioning family. The family's input builder (``mmedge.families``: the row's ``inputs``) turns
images and text into the decoder's prefill inputs: BLIP-2's ``PrefixInputs`` (image → prefix rows, then the prompt's
tokens) and IDEFICS' ``FlamingoInputs`` (interleaved prompts; vision and resampler once per image, the
cross-attention K/V once per prompt, handed to the decoder as context for the prefill and every step). Families with
interleaved prompts also answer ``generate([img1, "An image of two cats.", img2, "An image of"])``.

Threads: one Captioner may be shared by any number of threads. Its decoder owns one KV cache, so
generation is serialized by a lock (the image inputs are computed outside it); results equal those of
serial calls. For captions in parallel, load one Captioner per thread. A thread that calls the
Captioner again while it still iterates one of its own ``stream()`` generators gets an InputError
instead of a deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Iterator

from mmedge.artifact import Artifact
from mmedge.errors import BackendError, InputError, ManifestError
from mmedge.families import FAMILIES, input_builder_class
from mmedge.generation import GenerationConfig, StreamEnd, TextStream, generate_text, stream
from mmedge.manifest import family_section
from mmedge.pipelines.common import closed_error, pipeline_repr

if TYPE_CHECKING:
    from mmedge.backends import Plan


def vqa_prompt(template: str, question: Any) -> str:
    """The family's VQA prompt (``template``: the manifest's ``prompts.vqa``, "{}" where the question goes) around
    ``question``, stripped; an empty one is refused (it would silently make a caption instead)."""
    if not isinstance(question, str):
        raise InputError(f"the question is a {type(question).__name__}", "a question string",
                         "pass a question, e.g. 'what is it?'")
    if not question.strip():
        raise InputError("the question is empty", "a non-empty question string",
                         "pass a question, e.g. 'what is it?'")
    return template.replace("{}", question.strip())


def is_prompt_batch(prompt: Any) -> bool:
    """Whether ``generate()``'s ``prompt`` is a batch of interleaved prompts (a list of lists) rather than one; an
    InputError for anything else (here and on a Triton server's client alike)."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError("generate() needs an interleaved prompt", "a non-empty list of images and strings",
                         "pass e.g. [image, 'An image of two cats.', image2, 'An image of']")
    lists = [isinstance(p, (list, tuple)) for p in prompt]
    if any(lists) and not all(lists):
        raise InputError(f"generate() got prompt item {lists.index(True)} as a list among images and strings",
                         "one prompt (a list of images and strings) or a batch of prompts (a list of such lists)",
                         "pass [image, 'text', ...] for one prompt, or wrap every prompt in its own list")
    return all(lists)


def check_stream_call(image: Any, prompt: str | None, question: str | None, interleaved: bool) -> None:
    """What ``stream()`` refuses at the call, locally and on a Triton server's client alike: a list of images where
    the family takes one image (``interleaved``: it takes a prompt list), a batch of prompts, and a prompt or question
    beside an interleaved list or beside each other."""
    is_list = isinstance(image, (list, tuple))
    if is_list and not interleaved:
        raise InputError("stream() got a list of images", "one image",
                         "call stream() per image, or caption() for a batch")
    refuse_prompt_batch(image)
    given = [name for name, value in (("prompt", prompt), ("question", question)) if value is not None]
    if is_list and given:  # the list is the whole prompt: a text beside it had been dropped unread
        raise InputError(f"stream() got {given[0]}= with an interleaved prompt", "the text written into the prompt "
                         "list itself", f"put the text in the list (e.g. [image, 'Question: ... Answer:']), or drop "
                         f"{given[0]}=")
    if len(given) == 2:
        raise InputError("stream() got both prompt= and question=", "one of them: question= is answered with the "
                         "family's question prompt, prompt= is a text the answer continues", "drop one of them")


def unusable_default(exc: InputError) -> ManifestError:
    """The manifest's own generation settings refused (``exc``): the artifact is at fault, not the call."""
    return ManifestError(f"manifest.json field 'generation' holds an unusable default: {exc.what}", exc.expected,
                         "re-export the artifact; do not edit manifest.json by hand")


class Captioner:
    """``caption(images)``, ``ask(image, question)``, ``stream(image)``, ``generate(interleaved prompt)`` where the
    family takes them; generation settings as keywords."""

    task = "caption"
    plan: Plan | None = None  # the backends ``mmedge.load`` chose per component (set by load)

    def __init__(self, artifact: Artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        self.artifact = artifact
        self.runners = runners  # the encoder components; the decoder is separate
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.embeddings = embeddings  # [vocab, width] table, rows dequantized on lookup
        family = artifact.manifest["family"]
        settings = family_section(artifact.manifest)  # the family's generative section (blip2, idefics)
        self.settings = settings
        self.interleaved = FAMILIES[family].interleaved  # takes prompts mixing several images and texts
        self.inputs = self._input_builder(settings, tokenizer, preprocessor, embeddings)
        self.defaults = dict(artifact.manifest.get("generation") or {})
        self.vqa_template = settings["prompts"]["vqa"]
        self._lock = threading.Lock()  # guards the decoder's KV cache
        self._closed = False
        self._owner: int | None = None  # the thread generating now
        try:
            self._config({})  # the manifest's own settings must work before any call relies on them
        except InputError as exc:
            raise unusable_default(exc) from None

    # --- public API ------------------------------------------------------------------------------
    def _input_builder(self, settings: dict, tokenizer, preprocessor, embeddings, **extra):
        """The family's input builder (``mmedge.families``), given ``extra`` keywords a subclass adds."""
        return input_builder_class(self.artifact.manifest["family"])(settings, tokenizer, preprocessor,
                                                                     component_caller(self.runners), embeddings,
                                                                     **extra)

    def caption(self, images, prompt: str | None = None, **generation: Any) -> str | list[str]:
        """A caption per image (a string for one image, a list for a list). ``prompt`` continues a text."""
        single = not isinstance(images, (list, tuple))
        config = self._config(generation)  # bad settings are refused before any graph runs
        texts = self._generate(self.inputs.for_images(images, prompt, config.max_new_tokens), config)
        return texts[0] if single else texts

    __call__ = caption

    def ask(self, image, question: str, **generation: Any) -> str | list[str]:
        """Answer a question about an image with the family's VQA prompt (BLIP-2: ``Question: … Answer:``)."""
        return self.caption(image, vqa_prompt(self.vqa_template, question), **generation)

    def generate(self, prompt: list, **generation: Any) -> str | list[str]:
        """Continue an interleaved prompt (a list of images and strings), or a list of such prompts."""
        self._require_interleaved("generate()")
        batched = is_prompt_batch(prompt)
        config = self._config(generation)  # bad settings are refused before any graph runs
        prompts = [list(p) for p in prompt] if batched else [list(prompt)]
        texts = self._generate(self.inputs.build(prompts, config.max_new_tokens), config)
        return texts if batched else texts[0]

    def stream(self, image, prompt: str | None = None, *, question: str | None = None,
               **generation: Any) -> TextStream:
        """The text of one image (+ ``prompt``), of one image's answer to ``question`` (as ``ask``), or of one
        interleaved prompt list, in pieces as tokens arrive; the pieces join to ``caption(image, prompt)`` or
        ``ask(image, question)``. Once exhausted, the stream's ``tokens`` and ``finish_reason`` say how the answer
        ended (:class:`mmedge.generation.TextStream`). Bad settings and a list where one image goes are refused here,
        at the call; the image is read, and the prompt judged, when the first piece is asked for."""
        check_stream_call(image, prompt, question, self.interleaved)
        if question is not None:
            prompt = vqa_prompt(self.vqa_template, question)
        config = self._config(generation)
        return TextStream(lambda result: self._pieces(image, prompt, config, result))

    def _pieces(self, image, prompt: str | None, config: GenerationConfig, result: StreamEnd) -> Iterator[str]:
        if self._closed:  # since stream() was called
            raise closed_error(self)
        if isinstance(image, (list, tuple)):
            built = self.inputs.build([list(image)], config.max_new_tokens)
        else:
            built = self.inputs.for_images(image, prompt, config.max_new_tokens)
        with self._decoder_in_use():  # held while the caller iterates: the decoder's cache is in use
            self._set_context(built)
            answer = stream(self.decoder, built["embeds"], built["mask"], config, self.tokenizer,
                            prompt_ids=built["ids"])
            yield from _strip_stream(answer)
            result.finished(answer.tokens, answer.finish_reason)

    def generation_settings(self, **generation: Any) -> GenerationConfig:
        """The generation settings a call with these keywords would use (the manifest's defaults, overridden), checked
        as the call checks them: InputError for one that cannot work or would change nothing."""
        return self._config(generation)

    @property
    def max_positions(self) -> int | None:
        """The decoder's positions, shared by the prompt and the new tokens (a TensorRT engine's profile may hold
        fewer than the model); None where they are not bounded (Flan-T5's relative positions)."""
        return getattr(self.decoder, "max_positions", None) or self.settings["decoder"].get("max_positions")

    def prompt_positions(self, image, prompt: str | None = None) -> int:
        """Decoder positions the prompt of ``stream(image, prompt)`` (``image``: one image, or an interleaved prompt
        list) takes before the first new token, image rows included; counted without running a graph or reading the
        image. InputError for a prompt the call would refuse for its text."""
        if self._closed:
            raise closed_error(self)
        return self.inputs.prompt_positions(image, prompt)

    # --- generation ------------------------------------------------------------------------------
    def _generate(self, built: dict, config: GenerationConfig) -> list[str]:
        with self._decoder_in_use():
            self._set_context(built)
            texts = generate_text(self.decoder, built["embeds"], built["mask"], config, self.tokenizer,
                                  prompt_ids=built["ids"])
        return [t.strip() for t in texts]

    def _set_context(self, built: dict) -> None:
        """Per-prompt tensors the decoder reads beside its cache (IDEFICS: image mask and cross-attention K/V)."""
        if "prefill" in built:
            self.decoder.set_context(built["prefill"], built["step"])

    def _require_interleaved(self, call: str) -> None:
        if not self.interleaved:
            label = FAMILIES[self.artifact.manifest["family"]].label
            raise InputError(f"{call} takes interleaved prompts, which {label} models do not",
                             "a Flamingo-style (IDEFICS) captioning artifact",
                             "call caption(image, prompt) or ask(image, question) instead")

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
            except BackendError as exc:
                if self._closed:  # closed by another thread (or before a stream's next piece): the decoder refused
                    raise closed_error(self) from exc
                raise
            finally:
                self._owner = None

    def _config(self, overrides: dict) -> GenerationConfig:
        """The call's settings over the manifest's, checked before the prompt is read: ``max_new_tokens`` against
        the least any prompt takes (the input builder judges it again against the prompt's own length)."""
        if self._closed:  # every call judges its settings first
            raise closed_error(self)
        known = {f.name for f in dataclasses.fields(GenerationConfig)}  # a misspelt name is refused, even as None
        settings = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None or k not in known}}
        if settings.get("stop_strings") is None:
            settings.pop("stop_strings", None)
        config = GenerationConfig.from_dict(settings).refuse_idle(overrides)
        return config.validate(max_positions=self.settings["decoder"].get("max_positions"),
                               vocab_size=self.embeddings.shape[0],
                               prompt_length=getattr(self.inputs, "least_prompt_positions", 0), least_prompt=True)

    def close(self) -> None:
        self._closed = True
        for runner in self.runners.values():
            runner.close()
        self.decoder.close()

    def __repr__(self) -> str:
        return pipeline_repr(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def refuse_prompt_batch(image) -> None:
    """``stream()`` takes one interleaved prompt, not a batch of them (here and on a server: mmedge.triton_client)."""
    if isinstance(image, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in image):
        raise InputError(f"stream() got a batch of {len(image)} prompts", "one interleaved prompt (a list of "
                         "images and texts)", "call stream() per prompt, or generate() for a batch")


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


def component_caller(runners: dict):
    """``run(name, values)``: encoder component ``name`` run on the inputs it declares, taken from ``values`` by name.
    It holds the runners, not the Captioner: a bound method held by the input builder made a reference cycle, so a
    Captioner dropped without ``close()`` (with its sessions, ~10 MB for the demo BLIP-2) waited for the garbage
    collector."""

    def run(name: str, values: dict) -> dict:
        runner = runners[name]
        return runner.infer({input_name: values[input_name] for input_name in runner.input_metadata()})

    return run
