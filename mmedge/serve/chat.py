"""``POST /v1/chat/completions``: OpenAI's chat format in; a caption or an answer out, whole or streamed as server-sent
events in OpenAI's chunk format.

What a request means to each kind of captioner:
- one image per request (BLIP-2): the image may sit in any user message; the text of the last user message is a
  question, asked with the artifact's VQA prompt (``Question: ... Answer:``), or with ``"prompt_mode": "continue"`` a
  text the answer continues; no text at all asks for a caption (and ``prompt_mode`` is then refused: it would change
  nothing). A message's ``name`` is checked to be a string and is not part of the prompt.
- interleaved prompts (IDEFICS: captioners whose ``interleaved`` is true): the parts of every message, in order,
  form one prompt of images and texts (``Captioner.stream``); roles add no text of their own.

Settings (all judged before the request waits for a captioner): ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` (0, or below 1e-5: greedy; above: sampling;
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

from mmedge.errors import MmedgeError
from mmedge.generation import MAX_NEW_TOKENS_CAP, GenerationConfig, TextStream
from mmedge.generation.config import MIN_TEMPERATURE, most_new_tokens, positions_taken
from mmedge.manifest import family_section
from mmedge.pipelines.captioner import vqa_prompt
from mmedge.pipelines.prefix_inputs import CHARS_PER_TOKEN
from mmedge.serve.errors import from_mmedge, invalid
from mmedge.serve.inputs import bounded, check_fields, field, image_bytes, strings, typed
from mmedge.serve.models import ServedModel
from mmedge.serve.options import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, ServeOptions

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "n", "user", "num_beams", "top_k", "min_tokens", "repetition_penalty", "length_penalty",
          "prompt_mode")
ROLES = ("system", "developer", "user", "assistant")
PROMPT_MODES = ("question", "continue")
DETAILS = ("auto", "low")  # OpenAI's image_url.detail values the model's fixed input size keeps
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
    field(data, "user", "string")  # OpenAI's end-user id, for abuse monitoring: checked, not used
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
    max_field = next((name for name in ("max_completion_tokens", "max_tokens") if data.get(name) is not None), None)
    _check_combination(generation, defaults, max_field)
    max_new_tokens = generation.get("max_new_tokens", defaults.max_new_tokens)
    messages = parse_messages(data, options)
    if model.captioner.interleaved:
        if data.get("prompt_mode") is not None:
            raise invalid(f"field 'prompt_mode' was given for model '{model.id}' ({model.family})",
                          "no prompt_mode for an interleaved model: its messages' images and texts, in order, are the "
                          "prompt itself", "leave out prompt_mode, or pick a one-image model (BLIP-2)", "prompt_mode")
        prompt, prompt_tokens, images = _interleaved(messages, model)
        inputs: tuple = (prompt,)
    else:
        image, text, prompt_tokens = _one_image(messages, model, field(data, "prompt_mode", "string"))
        inputs, images = (image, text), [image]
    _check_positions(model, inputs, max_new_tokens, max_field)
    try:  # every other refusal before the request waits for a captioner: a busy server would answer it 503
        model.captioner.generation_settings(**generation)
    except MmedgeError as exc:
        error = from_mmedge(exc)
        error.param = max_field if error.param == "max_tokens" and max_field else error.param
        raise error from None

    def call(pipeline):
        return pipeline.stream(*inputs, **generation)

    return ChatJob(model, call, stream, include_usage, prompt_tokens, images=images)


def _interleaved(messages: list, model: ServedModel) -> tuple[list, int, list]:
    """Every message's images and texts, in order, as one prompt (IDEFICS), its usage tokens and its images."""
    items = [part for _, parts in messages for part in parts]
    if not any(isinstance(part, bytes) or part.strip() for part in items):
        raise invalid("the messages hold no image and no text", f"at least one image or text part for model "
                      f"'{model.id}' ({model.family})", "send an image_url part, and the text the answer continues",
                      "messages", code="missing_image")
    texts = _checked_chars([part for part in items if isinstance(part, str)], model)
    text_tokens = 1 + sum(_tokens(model.captioner, text, special=False) for text in texts)  # BOS + texts
    _check_prompt_tokens(text_tokens, model)
    images = [part for part in items if isinstance(part, bytes)]
    return items, text_tokens + len(images) * _image_tokens(model), images


def _one_image(messages: list, model: ServedModel, mode: str | None) -> tuple[bytes, str | None, int]:
    """One image and a question, a text to continue, or nothing (a caption): BLIP-2; with the usage tokens."""
    image, prompt = _one_image_prompt(messages, model, mode)
    text_tokens = _tokens(model.captioner, prompt, special=True) if prompt is not None else 1  # BOS
    _check_prompt_tokens(text_tokens, model)
    return image, prompt, text_tokens + _image_tokens(model)


def _check_combination(generation: dict, defaults: GenerationConfig, max_field: str | None) -> None:
    """The request's settings together with the model's defaults, refused in the request's words (the pipeline's own
    refusals name mmedge's settings: do_sample, max_new_tokens)."""
    samples = generation.get("do_sample", defaults.do_sample)
    beams = generation.get("num_beams", defaults.num_beams)
    if samples and beams > 1:
        expected = "num_beams 1 when the answer samples (beam search decodes greedily; beam sampling is not supported)"
        if "num_beams" in generation:
            why = "temperature, top_p or top_k given" if "do_sample" in generation else "the model's default"
            raise invalid(f"field 'num_beams' is {beams} while the answer samples ({why})", expected,
                          "send temperature 0 with num_beams for beam search, or leave out num_beams", "num_beams")
        raise invalid(f"the request samples (temperature, top_p or top_k given), and the model's default is beam "
                      f"search (num_beams={beams})", expected, "send \"num_beams\": 1 to sample, or leave out the "
                      "sampling fields for beam search", "temperature")
    max_new = generation.get("max_new_tokens", defaults.max_new_tokens)
    min_new = generation.get("min_new_tokens", defaults.min_new_tokens)
    if min_new > max_new:
        if "min_new_tokens" in generation or max_field is None:
            raise invalid(f"field 'min_tokens' is {min_new}", f"at most max_tokens ({max_new}"
                          f"{'' if max_field else ', the model default'})", "lower min_tokens or raise max_tokens",
                          "min_tokens")
        raise invalid(f"field '{max_field}' is {max_new}", f"at least the model's default min_tokens ({min_new})",
                      f"raise {max_field} to {min_new} or more, or send a lower min_tokens", max_field)


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
    seed = bounded(data, "seed", "integer", -(1 << 63), (1 << 63) - 1)  # OpenAI's seed: an int64
    if seed is not None:
        settings["seed"] = seed % (1 << 64)  # mmedge's generator takes one of 0 or more: the same 64 bits, unsigned
    min_tokens = bounded(data, "min_tokens", "integer", 0, MAX_NEW_TOKENS_CAP)
    if min_tokens is not None:
        settings["min_new_tokens"] = min_tokens
    repetition_penalty = field(data, "repetition_penalty", "number")
    if repetition_penalty is not None:
        if repetition_penalty <= 0:
            raise invalid(f"field 'repetition_penalty' is {repetition_penalty}", "a number above 0 (1 = off)",
                          "send 1 for no penalty, or about 1.2 to discourage repeats", "repetition_penalty")
        settings["repetition_penalty"] = repetition_penalty
    length_penalty = field(data, "length_penalty", "number")
    if length_penalty is not None:
        settings["length_penalty"] = length_penalty
    num_beams = bounded(data, "num_beams", "integer", 1, MAX_BEAMS)
    if num_beams is not None:
        settings["num_beams"] = num_beams
    stop = strings(data, "stop")
    empty = next((index for index, text in enumerate(stop or []) if not text), None)
    if empty is not None:
        raise invalid("field 'stop' holds an empty string", "non-empty stop strings (an empty one would end every "
                      "answer before it starts)", "remove the empty string", f"stop[{empty}]" if len(stop) > 1
                      else "stop")
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
        field(message, "name", "string", where=where)  # OpenAI's participant name: checked, not part of the prompt
        # (chat frameworks send it with multi-agent turns; refusing it would refuse their requests, as BLIP-2 takes
        # their system messages and earlier turns without using them)
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
        detail = field(image_url, "detail", "string", where=where + "image_url.")
        if detail not in (None, *DETAILS):  # the model reads every image at its own small size: "low" is what it gets
            raise invalid(f"field '{where}image_url.detail' is '{detail[:20]}'", f"one of {', '.join(DETAILS)}: the "
                          "model reads every image at its own fixed, small size (high detail is not available)",
                          "send \"auto\" or \"low\", or leave out detail", where + "image_url.detail")
        return image_bytes(field(image_url, "url", "string", required=True, where=where + "image_url."),
                           where + "image_url.url", options)
    return image_bytes(field(part, "image_url", "string", required=True, where=where), where + "image_url", options)


def _one_image_prompt(messages: list, model: ServedModel, mode: str | None) -> tuple[bytes, str | None]:
    """The image and the prompt: the last user message's text as a question (``mode`` None or "question") or as a
    text to continue; None (a caption) when it has no text."""
    if mode is not None and mode not in PROMPT_MODES:
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
    _checked_chars([text], model)
    if not text:
        if mode is not None:  # a caption either way: the field would change nothing
            raise invalid(f"field 'prompt_mode' is '{mode}', and the last user message has no text",
                          "prompt_mode only with a text to ask about or continue (without one the model writes a "
                          "caption whatever the mode)", "leave out prompt_mode, or add a text part to the last user "
                          "message", "prompt_mode")
        return images[0], None  # a caption
    return images[0], text if mode == "continue" else vqa_prompt(model.captioner.vqa_template, text)


def _checked_chars(texts: list[str], model: ServedModel) -> list[str]:
    """The server's character cap, and the pipeline's (``check_prompt_chars``: more characters than its prompt
    tokens could hold), refused alike before tokenizing."""
    chars = sum(len(t) for t in texts)
    cap = min(MAX_PROMPT_CHARS, CHARS_PER_TOKEN * model.captioner.inputs.max_prompt_tokens)
    if chars > cap:
        raise invalid(f"the prompt has {chars:,} characters", f"at most {cap:,} for model '{model.id}'",
                      "shorten the text", "messages", code="prompt_too_long")
    return texts


def _tokens(captioner, text: str, special: bool) -> int:
    return int(captioner.tokenizer.encode_all(text, add_special_tokens=special).shape[0])


def _image_tokens(model: ServedModel) -> int:
    """Decoder inputs per image: BLIP-2's query tokens; IDEFICS' latents (read through cross-attention)."""
    section = family_section(model.manifest)
    return int(section.get("num_query_tokens") or (section.get("cross_kv") or {}).get("tokens_per_image") or 0)


def _check_prompt_tokens(tokens: int, model: ServedModel) -> None:
    if tokens > MAX_PROMPT_TOKENS:
        raise invalid(f"the prompt has {tokens} text tokens", f"at most {MAX_PROMPT_TOKENS} prompt tokens for model "
                      f"'{model.id}'", "shorten the text", "messages", code="prompt_too_long")


def _check_positions(model: ServedModel, inputs: tuple, max_new_tokens: int, max_field: str | None) -> None:
    """The prompt (image tokens included) and max_tokens within the decoder's positions, judged before the request
    waits for a captioner; the field to change is named: max_tokens where the prompt alone fits, else messages."""
    positions = model.captioner.max_positions
    try:
        used = model.captioner.prompt_positions(*inputs)
    except MmedgeError as exc:
        raise from_mmedge(exc, "messages") from None
    if positions is None or positions_taken(used, max_new_tokens) <= positions:
        return
    fits = most_new_tokens(positions, used)
    taken = positions_taken(used, max_new_tokens)
    if fits > 0 and max_field is not None:
        raise invalid(f"field '{max_field}' is {max_new_tokens}; with the prompt's {used} positions (image tokens "
                      f"included) that is {taken} (the last token is never fed back)", f"at most {fits} for this "
                      f"prompt: model "
                      f"'{model.id}' has {positions} positions for the prompt and the answer",
                      f"lower {max_field} to {fits} or less, or shorten the prompt", max_field)
    given = f"{max_field}={max_new_tokens}" if max_field else f"the model's default max_tokens ({max_new_tokens})"
    raise invalid(f"the prompt takes {used} positions (image tokens included); with {given} that is "
                  f"{taken}", f"at most the {positions} positions of model '{model.id}'",
                  f"shorten the text, pass fewer images or send a lower max_tokens (at most {fits})" if fits > 0
                  else "shorten the text or pass fewer images", "messages", code="prompt_too_long")
