"""``POST /v1/embeddings`` and ``POST /v1/classify`` for CLIP artifacts. Their calls run in worker threads, in
parallel (a CLIP pipeline may be shared by any number of threads), at most ``--workers`` at once per artifact
(``queue.CallQueue``).

Embeddings: OpenAI's request (``input``: a string or a list of strings; ``encoding_format``: ``float`` or ``base64``),
plus ``images``, a list of data URIs; the answer lists the texts' embeddings, then the images', unit-norm.
Classify (mmedge's own): ``images`` and ``labels`` (none for an artifact with labels baked in), optional
``templates`` and ``top_k``; per image its labels sorted by probability.
"""

from __future__ import annotations

import base64
from contextlib import contextmanager

import numpy as np

from mmedge.errors import ImageError, TokenizerError
from mmedge.pipelines.common import CUT_CHARS_PER_TOKEN, overlong_text
from mmedge.pipelines.embedder import unembeddable_text
from mmedge.pipelines.zero_shot import DEFAULT_TEMPLATES, MAX_LABELS
from mmedge.serve.errors import from_mmedge, invalid
from mmedge.serve.inputs import check_fields, field, image_bytes, strings, undecodable
from mmedge.serve.models import ServedModel
from mmedge.serve.options import MAX_EMBEDDING_INPUTS, ServeOptions

EMBED_FIELDS = ("model", "input", "images", "encoding_format", "user")
CLASSIFY_FIELDS = ("model", "images", "labels", "templates", "top_k", "user")
ENCODINGS = ("float", "base64")
CHECKED_BANKS = 64  # (labels, templates) whose prompts were found to fit, per server: not tokenized again


def embeddings(data: dict, model: ServedModel, options: ServeOptions):
    """Check the request; returns the call (run in a worker thread) that answers it."""
    check_fields(data, EMBED_FIELDS)
    embedder = _pipeline(model, "embed", "/v1/embeddings")
    texts = strings(data, "input") or []
    images = _images(data, "images", options, required=False)
    field(data, "user", "string")  # OpenAI's end-user id: checked, not used
    encoding = field(data, "encoding_format", "string", default="float")
    if encoding not in ENCODINGS:
        raise invalid(f"field 'encoding_format' is '{encoding[:20]}'", f"one of {', '.join(ENCODINGS)}",
                      "use 'float' (JSON numbers) or 'base64' (little-endian float32)", "encoding_format")
    if not texts and not images:
        raise invalid("the request has no input", "texts in 'input' or data URIs in 'images'",
                      "send e.g. {\"input\": [\"a red circle\"]}", "input")
    if len(texts) + len(images) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"the request has {len(texts) + len(images)} inputs",
                      f"at most {MAX_EMBEDDING_INPUTS} texts and images",
                      "split it into several requests", "input")
    if texts and (embedder.tokenizer is None or "text" not in embedder.runners):
        raise invalid(f"model '{model.id}' has no text encoder (it was exported with labels baked in)",
                      "images only, in field 'images'", "send images, or pick a model that embeds texts from GET "
                      "/v1/models",
                      "input")
    params = ["input"] if isinstance(data.get("input"), str) else [f"input[{i}]" for i in range(len(texts))]
    _refuse_unembeddable(embedder.tokenizer, texts, params)  # before the request takes a place in the queue

    def run() -> dict:
        tokens = sum(_text_tokens(embedder.tokenizer, model, texts, params,
                                  "shorten the text or split it into several inputs"))
        parts = []
        with _image_fields(images):
            if texts:
                parts.append(embedder.embed_texts(texts))  # [texts, dim]
            if images:
                parts.append(embedder.embed_images(images))  # [images, dim]
        vectors = np.concatenate(parts, axis=0)  # [texts + images, dim], unit-norm rows
        return {"object": "list", "model": model.id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i,
                         v in enumerate(vectors)]}

    return run


def _refuse_unembeddable(tokenizer, texts: list[str], params: list[str]) -> None:
    """400 naming the field of a text ``Embedder.embed_texts`` refuses (``unembeddable_text``), before the request
    queues."""
    found = unembeddable_text(texts, tokenizer)
    if found:
        index, problem, expected, fix = found
        raise invalid(f"field '{params[index]}' {problem}", expected, fix, params[index])


def classify(data: dict, model: ServedModel, options: ServeOptions):
    """Check the request; returns the call (run in a worker thread) that answers it."""
    check_fields(data, CLASSIFY_FIELDS)
    classifier = _pipeline(model, "zero-shot", "/v1/classify")
    images = _images(data, "images", options, required=True)
    labels = strings(data, "labels")
    templates = strings(data, "templates")
    top_k = field(data, "top_k", "integer")
    field(data, "user", "string")
    if top_k is not None and top_k < 1:
        raise invalid(f"field 'top_k' is {top_k}", "a positive integer (how many labels to return per image)",
                      "send e.g. \"top_k\": 5, or leave it out for every label", "top_k")
    if classifier.fused:
        _check_baked(classifier.baked_labels, labels, templates, model)
    else:
        _check_labels(labels)
        _check_templates(templates)

    def run() -> dict:
        if not classifier.fused:
            _check_prompts(classifier.tokenizer, model, labels, templates)
        with _image_fields(images):
            ranked = classifier(images, labels=labels, templates=templates, top_k=top_k)  # per image: [{label, score}]
        return {"object": "list", "model": model.id,
                "data": [{"object": "classification", "index": i, "predictions": p} for i, p in enumerate(ranked)]}

    return run


def _check_baked(baked: list[str], labels: list[str] | None, templates: list[str] | None, model: ServedModel) -> None:
    """An artifact with labels baked into its graph takes neither other labels nor templates."""
    given = "labels" if labels is not None and labels != baked else "templates" if templates is not None else None
    if given:
        shown = ", ".join(baked[:5]) + (", ..." if len(baked) > 5 else "")
        raise invalid(f"field '{given}' was given, and model '{model.id}' has {len(baked)} labels baked into its "
                      "graph", f"no 'labels' or 'templates' for this model (its labels: {shown}; GET /v1/models "
                      "lists them all)", "leave out 'labels' and 'templates', or pick a model without baked labels "
                      "from GET /v1/models to choose labels per request", given)


def _check_labels(labels: list[str] | None) -> None:
    if labels is None:
        raise invalid("no labels were given", "field 'labels': the labels to score (this model has none baked in)",
                      "send e.g. \"labels\": [\"cat\", \"dog\"]", "labels")
    if not labels:
        raise invalid("field 'labels' is empty", "at least one label", "send e.g. \"labels\": [\"cat\", \"dog\"]",
                      "labels")
    if len(labels) > MAX_LABELS:
        raise invalid(f"field 'labels' has {len(labels):,} labels", f"at most {MAX_LABELS:,} labels per request",
                      f"classify against at most {MAX_LABELS:,} labels at a time (e.g. a coarse list first, then its "
                      "best group), or rank embeddings from /v1/embeddings yourself", "labels")
    for index, label in enumerate(labels):
        if not label.strip():
            raise invalid(f"field 'labels[{index}]' is blank", "non-empty labels", "remove or fill in that label",
                          f"labels[{index}]")
    seen: set[str] = set()
    for index, label in enumerate(labels):
        if label in seen:
            raise invalid(f"field 'labels' holds duplicates ({label[:40]!r})",
                          "each label once, so each probability means one class", "remove the repeated labels",
                          f"labels[{index}]")
        seen.add(label)


def _check_templates(templates: list[str] | None) -> None:
    if templates is not None and not templates:
        raise invalid("field 'templates' is empty", "at least one prompt template such as 'a photo of a {}.'",
                      "leave out 'templates' for the default", "templates")
    for index, template in enumerate(templates or []):
        if template.count("{}") != 1:
            raise invalid(f"field 'templates[{index}]' ({template[:40]!r}) has {template.count('{}')} '{{}}'",
                          "exactly one '{}' where the label goes", "send e.g. 'a photo of a {}.'",
                          f"templates[{index}]")
        if template in templates[:index]:
            raise invalid(f"field 'templates' holds duplicates ({template[:40]!r})",
                          "each template once (a repeat weighs its prompts twice in the label average)",
                          "remove the repeated templates", f"templates[{index}]")


def _check_prompts(tokenizer, model: ServedModel, labels: list[str], templates: list[str] | None) -> None:
    """400 for a template, or a label in a template, longer than the text encoder takes (it would be cut)."""
    templates = list(templates or DEFAULT_TEMPLATES)
    key, checked = (tuple(labels), tuple(templates)), model.fitting_prompts
    with model.fitting_lock:
        if key in checked:
            checked.move_to_end(key)
            return
    fix = "shorten the template"
    _text_tokens(tokenizer, model, [t.replace("{}", "") for t in templates],
                 [f"templates[{i}]" for i in range(len(templates))], fix)
    for template in templates:
        _text_tokens(tokenizer, model, [template.replace("{}", label) for label in labels],
                     [f"labels[{i}]" for i in range(len(labels))], "shorten the label",
                     f" in template {template[:40]!r}")
    with model.fitting_lock:
        checked[key] = None
        while len(checked) > CHECKED_BANKS:
            checked.popitem(last=False)


def _text_tokens(tokenizer, model: ServedModel, texts: list[str], params: list[str], fix: str,
                 context: str = "") -> list[int]:
    """Each text's tokens, start and end tokens included; 400 naming the first text past the text encoder's length
    (``tokenizer.max_length``), which would otherwise be cut silently."""
    overlong = overlong_text(texts, tokenizer.max_length)  # refused before the costly tokenizing
    if overlong is not None:
        raise invalid(f"field '{params[overlong]}' has {len(texts[overlong]):,} characters{context}",
                      f"at most {tokenizer.max_length} tokens, start and end tokens included (the text encoder's "
                      f"maximum for model '{model.id}'; no text of over {CUT_CHARS_PER_TOKEN * tokenizer.max_length:,} "
                      "characters fits)", fix, params[overlong], code="context_length_exceeded")
    counts = []
    for text, param in zip(texts, params):
        try:
            counts.append(int(tokenizer.encode_all(text).shape[0]))
        except TokenizerError as exc:
            raise from_mmedge(exc, param) from None
        if counts[-1] > tokenizer.max_length:
            raise invalid(f"field '{param}' is {counts[-1]:,} tokens long{context}",
                          f"at most {tokenizer.max_length} tokens, start and end tokens included (the text "
                          f"encoder's maximum for model '{model.id}'; longer texts would be cut)", fix, param,
                          code="context_length_exceeded")
    return counts


@contextmanager
def _image_fields(images: list):
    """Re-raises a pipeline's ImageError with the field of the image that failed as ``param``."""
    try:
        yield
    except ImageError as exc:
        raise from_mmedge(exc, undecodable(images)) from exc


def _pipeline(model: ServedModel, task: str, endpoint: str):
    if task in model.clip:
        return model.clip[task]
    what = "zero-shot classification" if task == "zero-shot" else "embeddings"
    raise invalid(f"model '{model.id}' ({model.family}, tasks {', '.join(model.manifest['tasks'])}) does not do {what}",
                  f"a CLIP artifact exported for the task '{task}'",
                  "pick another model from GET /v1/models" + (", or use /v1/chat/completions" if model.queue else ""),
                  "model")


def _images(data: dict, name: str, options: ServeOptions, required: bool) -> list[bytes]:
    urls = strings(data, name, required=required) or []
    if required and not urls:
        raise invalid(f"field '{name}' is empty", "at least one image as a data URI", "send the images to classify",
                      name)
    if len(urls) > options.max_images:
        raise invalid(f"field '{name}' has {len(urls)} images",
                      f"at most {options.max_images} per request (this server's "
                      "--max-images)", "split them into several requests", name, code="too_many_images")
    return [image_bytes(url, f"{name}[{i}]", options) for i, url in enumerate(urls)]


def _encoded(vector: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
