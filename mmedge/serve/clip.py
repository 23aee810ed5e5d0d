"""``POST /v1/embeddings`` and ``POST /v1/classify`` for CLIP artifacts. Their calls run in worker threads, in
parallel (a CLIP pipeline may be shared by any number of threads).

Embeddings: OpenAI's request (``input``: a string or a list of strings; ``encoding_format``: ``float`` or ``base64``),
plus ``images``, a list of data URIs; the answer lists the texts' embeddings, then the images', unit-norm.
Classify (mmedge's own): ``images`` and ``labels`` (none for an artifact with labels baked in), optional
``templates`` and ``top_k``; per image its labels sorted by probability.
"""

from __future__ import annotations

import base64

import numpy as np

from mmedge.serve.errors import invalid
from mmedge.serve.inputs import check_fields, field, image_bytes, strings
from mmedge.serve.models import ServedModel
from mmedge.serve.options import MAX_EMBEDDING_INPUTS, ServeOptions

EMBED_FIELDS = ("model", "input", "images", "encoding_format", "user")
CLASSIFY_FIELDS = ("model", "images", "labels", "templates", "top_k", "user")
ENCODINGS = ("float", "base64")


def embeddings(data: dict, model: ServedModel, options: ServeOptions):
    """Check the request; returns the call (run in a worker thread) that answers it."""
    check_fields(data, EMBED_FIELDS)
    embedder = _pipeline(model, "embed", "/v1/embeddings")
    texts = strings(data, "input") or []
    images = _images(data, "images", options, required=False)
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

    def run() -> dict:
        parts = []
        if texts:
            parts.append(embedder.embed_texts(texts))  # [texts, dim]
        if images:
            parts.append(embedder.embed_images(images))  # [images, dim]
        vectors = np.concatenate(parts, axis=0)  # [texts + images, dim], unit-norm rows
        tokens = int(embedder.tokenizer.encode(texts)[1].sum()) if texts else 0  # attention mask: real tokens
        return {"object": "list", "model": model.id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i,
                         v in enumerate(vectors)]}

    return run


def classify(data: dict, model: ServedModel, options: ServeOptions):
    """Check the request; returns the call (run in a worker thread) that answers it."""
    check_fields(data, CLASSIFY_FIELDS)
    classifier = _pipeline(model, "zero-shot", "/v1/classify")
    images = _images(data, "images", options, required=True)
    labels = strings(data, "labels")
    templates = strings(data, "templates")
    top_k = field(data, "top_k", "integer")

    def run() -> dict:
        ranked = classifier(images, labels=labels, templates=templates, top_k=top_k)  # per image: [{label, score}]
        return {"object": "list", "model": model.id,
                "data": [{"object": "classification", "index": i, "predictions": p} for i, p in enumerate(ranked)]}

    return run


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
