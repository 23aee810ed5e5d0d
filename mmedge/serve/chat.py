"""``POST /v1/chat/completions``: OpenAI's chat format in; a caption or an answer out, whole or streamed as server-sent
events in OpenAI's chunk format.

What a request means to each kind of captioner:
- one image per request (BLIP-2): the image may sit in any user message; the text of the last user message is a
  question, asked with the artifact's VQA prompt (``Question: ... Answer:``), or with ``"prompt_mode": "continue"`` a
  text the answer continues; no text at all asks for a caption.
- interleaved prompts (IDEFICS: captioners whose ``interleaved`` is true): the parts of every message, in order,
  form one prompt of images and texts (``Captioner.stream``); roles add no text of their own.

Settings: ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0, or below 1e-5: greedy; above: sampling;
absent: the artifact's own settings, greedy for the demo models), ``top_p`` (0: greedy), ``seed`` (any int64, read
when the answer samples, as OpenAI takes it at any temperature), ``stop``; extensions ``num_beams`` (beam
search), ``top_k``, ``min_tokens``, ``repetition_penalty``, ``length_penalty``, ``prompt_mode``.
``usage`` counts the prompt's text tokens plus the image tokens the decoder reads (BLIP-2's query tokens, IDEFICS'
latents per image), and the tokens the model generated, the one that ended the answer included; ``finish_reason`` is
how the generation ended ("stop": end of sequence or a stop string; "length": max_tokens reached).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from mmedge.generation import MAX_NEW_TOKENS_CAP, GenerationConfig, TextStream
from mmedge.generation.config import MIN_TEMPERATURE
from mmedge.manifest import decoder_settings, family_section
from mmedge.pipelines.captioner import vqa_prompt
from mmedge.serve.errors import invalid
from mmedge.serve.inputs import bounded, check_fields, field, image_bytes, strings, typed
from mmedge.serve.models import ServedModel
from mmedge.serve.options import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, ServeOptions

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "n", "user", "num_beams", "top_k", "min_tokens", "repetition_penalty", "length_penalty",
          "prompt_mode")
ROLES = ("system", "developer", "user", "assistant")
PROMPT_MODES = ("question", "continue")
MAX_BEAMS = 8
MAX_STOP = 4


@dataclass
class ChatJob:
    model: ServedModel
    call: Callable[[object], TextStream]  # captioner -> the pieces of the answer
    stream: bool
    include_usage: bool
    prompt_tokens: int
    id: str = dataclass_field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclass_field(default_factory=lambda: int(time.time()))
    answer: TextStream | None = None
    images: list = dataclass_field(default_factory=list)  # the prompt's images (FieldImage: they know their field)

    def start(self, pipeline) -> TextStream:
        """The generation, run by the queue's worker thread; it says how it ended once its pieces are taken."""
        self.answer = self.call(pipeline)
        return self.answer

    def usage(self) -> tuple[dict, str]:
        """OpenAI's ``usage`` and the ``finish_reason`` of a finished answer."""
        completion = self.answer.tokens or 0
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        return usage, self.answer.finish_reason

    def completion(self, text: str) -> dict:
        usage, finish = self.usage()
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}], "usage": usage}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model.id,
                "choices": choices}
        if usage:
            body["usage"] = usage
        return json.dumps(body)


def parse_chat(data: dict, model: ServedModel, options: ServeOptions) -> ChatJob:
    check_fields(data, FIELDS)
    if model.queue is None:
        raise invalid(f"model '{model.id}' ({model.family}) does not generate text",
                      "a captioning artifact (BLIP-2, IDEFICS) for /v1/chat/completions",
                      "use /v1/classify or /v1/embeddings for CLIP, or pick a captioning model from GET /v1/models",
                      "model")
    if field(data, "n", "integer", default=1) != 1:
        raise invalid(f"field 'n' is {data['n']}", "1 (one choice per request)",
                      "send n=1 and repeat the request for more",
                      "n")
    stream = field(data, "stream", "boolean", default=False)
    stream_options = field(data, "stream_options", "object", default={})
    if data.get("stream_options") is not None and not stream:
        raise invalid("field 'stream_options' was given without streaming", "stream_options only with \"stream\": true",
                      "set \"stream\": true, or leave out stream_options", "stream_options")
    check_fields(stream_options, ("include_usage",), "stream_options.")
    include_usage = field(stream_options, "include_usage", "boolean", default=False, where="stream_options.")
    generation = generation_settings(data)
    defaults = GenerationConfig.from_dict(model.manifest.get("generation") or {})
    if "seed" in generation and not generation.get("do_sample", defaults.do_sample):
        del generation["seed"]  # OpenAI takes a seed at any temperature: an answer that draws nothing needs none
    max_new_tokens = generation.get("max_new_tokens", defaults.max_new_tokens)
    messages = parse_messages(data, options)
    if model.captioner.interleaved:
        if data.get("prompt_mode") is not None:
            raise invalid(f"field 'prompt_mode' was given for model '{model.id}' ({model.family})",
                          "no prompt_mode for an interleaved model: its messages' images and texts, in order, are the "
                          "prompt itself", "leave out prompt_mode, or pick a one-image model (BLIP-2)", "prompt_mode")
        call, prompt_tokens, images = _interleaved(messages, model, generation)
    else:
        mode = field(data, "prompt_mode", "string", default="question")
        call, prompt_tokens, images = _one_image(messages, model, generation, max_new_tokens, mode)
    return ChatJob(model, call, stream, include_usage, prompt_tokens, images=images)


def _interleaved(messages: list, model: ServedModel, generation: dict):
    """Every message's images and texts, in order, as one prompt (IDEFICS); the pipeline checks its positions."""
    items = [part for _, parts in messages for part in parts]
    texts = _checked_chars([part for part in items if isinstance(part, str)])
    text_tokens = 1 + sum(_tokens(model.captioner, text, special=False) for text in texts)  # BOS + texts
    _check_prompt_tokens(text_tokens, MAX_PROMPT_TOKENS, model, generation.get("max_new_tokens"))

    def call(pipeline):
        return pipeline.stream(items, **generation)

    images = [part for part in items if isinstance(part, bytes)]
    return call, text_tokens + len(images) * _image_tokens(model), images


def _one_image(messages: list, model: ServedModel, generation: dict, max_new_tokens: int, mode: str):
    """One image and a question, a text to continue, or nothing (a caption): BLIP-2."""
    image, prompt = _one_image_prompt(messages, model, mode)
    text_tokens = _tokens(model.captioner, prompt, special=True) if prompt is not None else 1  # BOS
    positions = decoder_settings(model.manifest).get("max_positions")
    room = MAX_PROMPT_TOKENS if positions is None else min(MAX_PROMPT_TOKENS,
                                                           positions - _image_tokens(model) - max_new_tokens)
    _check_prompt_tokens(text_tokens, room, model, max_new_tokens)

    def call(pipeline):
        return pipeline.stream(image, prompt, **generation)

    return call, text_tokens + _image_tokens(model), [image]


def generation_settings(data: dict) -> dict:
    """mmedge's generation settings (``Captioner.stream`` keywords) from OpenAI's fields and the extensions."""
    settings = {}
    max_tokens = bounded(data, "max_tokens", "integer", 1, MAX_NEW_TOKENS_CAP)
    max_completion_tokens = bounded(data, "max_completion_tokens", "integer", 1, MAX_NEW_TOKENS_CAP)
    if None not in (max_tokens, max_completion_tokens) and max_tokens != max_completion_tokens:
        raise invalid(f"fields 'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({max_completion_tokens}) "
                      "differ", "one of them (max_completion_tokens is OpenAI's newer name for max_tokens), or both "
                      "equal", "send only max_completion_tokens", "max_completion_tokens")
    max_tokens = max_tokens if max_completion_tokens is None else max_completion_tokens
    if max_tokens is not None:
        settings["max_new_tokens"] = max_tokens
    temperature = bounded(data, "temperature", "number", 0, 2)
    top_p = bounded(data, "top_p", "number", 0, 1)
    top_k = field(data, "top_k", "integer")
    # OpenAI answers greedily at temperature 0, and at top_p 0 (a nucleus of the one best token); a temperature too
    # small to sample at (its scores overflow) is greedy too
    greedy = (temperature is not None and temperature < MIN_TEMPERATURE) or top_p == 0
    if greedy:
        if top_k is not None:  # an extension, refused; OpenAI's top_p is moot at temperature 0, as OpenAI takes it
            given = "temperature 0" if temperature is not None and temperature < MIN_TEMPERATURE else "top_p 0"
            raise invalid(f"field 'top_k' was given with {given} (greedy decoding)", "top_k only when sampling "
                          "(temperature and top_p above 0)", "drop top_k, or set a temperature", "top_k")
        settings["do_sample"] = False
    elif temperature is not None or top_p is not None or top_k is not None:  # OpenAI samples; top_k is off unless asked
        settings.update(do_sample=True, temperature=1.0 if temperature is None else float(temperature),
                        top_p=1.0 if top_p is None else float(top_p), top_k=0 if top_k is None else top_k)
    for openai_name, name, kind in (("seed", "seed", "integer"), ("min_tokens", "min_new_tokens", "integer"),
                                    ("repetition_penalty", "repetition_penalty", "number"),
                                    ("length_penalty", "length_penalty", "number")):
        value = field(data, openai_name, kind)
        if value is not None:
            # OpenAI's seed is any int64; mmedge's generator takes one of 0 or more: the same 64 bits, unsigned
            settings[name] = value % (1 << 64) if name == "seed" else value
    num_beams = bounded(data, "num_beams", "integer", 1, MAX_BEAMS)
    if num_beams is not None:
        settings["num_beams"] = num_beams
    stop = strings(data, "stop")
    if stop:
        if len(stop) > MAX_STOP:
            raise invalid(f"field 'stop' has {len(stop)} strings", f"at most {MAX_STOP}", "keep the most useful ones",
                          "stop")
        settings["stop_strings"] = stop
    return settings


def parse_messages(data: dict, options: ServeOptions) -> list[tuple[str, list]]:
    """``[(role, [text or image bytes, ...]), ...]``; images decoded from their data URIs, at most --max-images."""
    messages = field(data, "messages", "list", required=True)
    if not messages:
        raise invalid("field 'messages' is empty", "at least one message",
                      "send e.g. [{\"role\": \"user\", \"content\": "
                      "[{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}]}]",
                      "messages")
    out, images = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        message = typed(message, "object", f"messages[{i}]")
        check_fields(message, ("role", "content", "name"), where)
        role = field(message, "role", "string", required=True, where=where)
        if role not in ROLES:
            raise invalid(f"field '{where}role' is '{role[:20]}'", f"one of {', '.join(ROLES)}",
                          "use one of those roles", where + "role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append((role, [content] if content else []))
            continue
        parts = []
        for j, part in enumerate(field(message, "content", "list", where=where)):
            part_where = f"{where}content[{j}]."
            part = typed(part, "object", part_where[:-1])
            kind = field(part, "type", "string", required=True, where=part_where)
            if kind == "text":
                check_fields(part, ("type", "text"), part_where)
                parts.append(field(part, "text", "string", required=True, where=part_where))
            elif kind == "image_url":
                images += 1
                if images > options.max_images:
                    raise invalid(f"the messages hold more than {options.max_images} images",
                                  f"at most {options.max_images} "
                                  "images per request (this server's --max-images)", "send fewer images",
                                  part_where + "image_url",
                                  code="too_many_images")
                parts.append(_image_part(part, part_where, options))
            else:
                raise invalid(f"field '{part_where}type' is '{kind[:20]}'", "'text' or 'image_url'",
                              "send text and images only", part_where + "type", code="unsupported_content")
        out.append((role, parts))
    return out


def _image_part(part: dict, where: str, options: ServeOptions) -> bytes:
    check_fields(part, ("type", "image_url"), where)
    image_url = part.get("image_url")
    if isinstance(image_url, dict):
        check_fields(image_url, ("url", "detail"), where + "image_url.")
        return image_bytes(field(image_url, "url", "string", required=True, where=where + "image_url."),
                           where + "image_url.url", options)
    return image_bytes(field(part, "image_url", "string", required=True, where=where), where + "image_url", options)


def _one_image_prompt(messages: list, model: ServedModel, mode: str) -> tuple[bytes, str | None]:
    if mode not in PROMPT_MODES:
        raise invalid(f"field 'prompt_mode' is '{mode[:20]}'", f"one of {', '.join(PROMPT_MODES)}",
                      "use 'question' (VQA prompting, the default) or 'continue'", "prompt_mode")
    users = [parts for role, parts in messages if role == "user"]
    images = [part for parts in users for part in parts if isinstance(part, bytes)]
    if len(images) != 1:
        raise invalid(f"the user messages hold {len(images)} images",
                      f"exactly one image_url part: model '{model.id}' ({model.family}) answers about one "
                      "image per request",
                      "send one image as a data URI in a user message", "messages",
                      code="too_many_images" if images else "missing_image")
    text = " ".join(part.strip() for part in users[-1] if isinstance(part, str) and part.strip())
    _checked_chars([text])
    if not text:
        return images[0], None  # a caption
    return images[0], vqa_prompt(model.captioner.vqa_template, text) if mode == "question" else text


def _checked_chars(texts: list[str]) -> list[str]:
    chars = sum(len(t) for t in texts)
    if chars > MAX_PROMPT_CHARS:
        raise invalid(f"the prompt has {chars:,} characters", f"at most {MAX_PROMPT_CHARS:,}", "shorten the text",
                      "messages", code="prompt_too_long")
    return texts


def _tokens(captioner, text: str, special: bool) -> int:
    return int(captioner.tokenizer.encode_all(text, add_special_tokens=special).shape[0])


def _image_tokens(model: ServedModel) -> int:
    """Decoder inputs per image: BLIP-2's query tokens; IDEFICS' latents (read through cross-attention)."""
    section = family_section(model.manifest)
    return int(section.get("num_query_tokens") or (section.get("cross_kv") or {}).get("tokens_per_image") or 0)


def _check_prompt_tokens(tokens: int, room: int, model: ServedModel, max_new_tokens: int | None) -> None:
    if tokens > room:
        settings = f", with max_tokens={max_new_tokens}" if max_new_tokens is not None else ""
        raise invalid(f"the prompt has {tokens} token{'s' if tokens != 1 else ''}{settings}",
                      f"at most {max(room, 0)} prompt tokens for model '{model.id}' (at most "
                      f"{MAX_PROMPT_TOKENS}, and the "
                      "prompt, the image tokens and max_tokens within the decoder's positions)",
                      "shorten the text or lower max_tokens", "messages", code="prompt_too_long")
