"""The tensors a client exchanges with mmedge's pipeline models on Triton, shared by the server side
(``mmedge.triton.backend``) and the client (``mmedge.triton_client``).

Images travel as their encoded files (BYTES: PNG, JPEG, ... exactly the bytes ``mmedge.load`` would read from the
path), so the server decodes and preprocesses them with the artifact's own settings; text travels as UTF-8 BYTES;
generation settings as one JSON object (the keywords of ``Captioner.caption``), checked by the server as the local
pipeline checks them.

=============  =========================================================  ======================================
pipeline       inputs (optional ones in brackets)                         outputs
=============  =========================================================  ======================================
zero-shot      images, [labels], [templates]                              probs [images, labels], label_names
embed          [images], [texts]                                          image_embeds, text_embeds
caption        [images], [prompt], [question], [items, item_is_image],    text (one per image / prompt; the
               [generation], [encoding]                                   stream model sends pieces of one text,
                                                                          then finish_reason and tokens)
=============  =========================================================  ======================================

**Rows.** The zero-shot model is batched by Triton's dynamic batcher (``ROW_PIPELINES``): a request is one row,
each of its tensors carries a leading axis of 1 (images ``[1, n]``, labels ``[1, k]``; probs come back ``[1, n, k]``,
label_names ``[1, k]``), rows may differ in length (ragged), and the model answers every row of a batch with one
graph call over all their images. The model's ``mmedge`` parameter says ``"rows": true``; the client adds and
drops the axis.

**Errors.** A request the pipeline refuses (mmedge's ``InputError``) is answered with the pipeline's own message
(INVALID_ARG); a failure of the server's own (any other error) has a message starting with one of
``FAILURE_PREFIXES``. A gRPC stream's error carries no status code, so that prefix is how a client tells the two
apart there. ``prompt`` and ``question`` are refused together (``check_prompt_or_question``).

``encoding`` "base64" says the images (and the image items) are base64 text: that is how a JSON-only request sends
them, e.g. HTTP streaming through Triton's ``generate_stream`` endpoint (tritonclient's HTTP client has no streaming).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Iterable, Mapping

import numpy as np

from mmedge.errors import InputError

# name -> (dtype, dims, optional) for inputs; name -> (dtype, dims) for outputs
PIPELINES: dict[str, dict[str, dict[str, tuple]]] = {
    "zero-shot": {
        "inputs": {"images": ("bytes", [-1], False), "labels": ("bytes", [-1], True),
                   "templates": ("bytes", [-1], True)},
        "outputs": {"probs": ("float32", [-1, -1]), "label_names": ("bytes", [-1])},
    },
    "embed": {
        "inputs": {"images": ("bytes", [-1], True), "texts": ("bytes", [-1], True)},
        "outputs": {"image_embeds": ("float32", [-1, -1]), "text_embeds": ("float32", [-1, -1])},
    },
    "caption": {
        # one string each for prompt, question, generation and encoding; declared [-1] so that mmedge, not the
        # server's shape check, answers a request with two (its message names the input)
        "inputs": {"images": ("bytes", [-1], True), "prompt": ("bytes", [-1], True), "question": ("bytes", [-1], True),
                   "items": ("bytes", [-1], True), "item_is_image": ("bool", [-1], True),
                   "generation": ("bytes", [-1], True), "encoding": ("bytes", [-1], True)},
        # the stream model's last response: how the answer ended (``TextStream.finish_reason`` and ``.tokens``)
        "outputs": {"text": ("bytes", [-1]), "finish_reason": ("bytes", [-1]), "tokens": ("int64", [-1])},
    },
}
# the model a task is served by, after the artifact's prefix: "clip-zero-shot", "blip2-caption", "blip2-caption-stream"
TASK_PIPELINES = {"zero-shot": "zero-shot", "embed": "embed", "caption": "caption", "vqa": "caption"}
STREAM_SUFFIX = "-stream"
ROW_PIPELINES = ("zero-shot",)  # batched by Triton: one request is one row (see the module docstring)
# the start of a pipeline model's error message when the server failed (not the request): see the module docstring
SERVER_FAILURE = "mmedge server error: "
FAILURE_PREFIXES = (SERVER_FAILURE, "mmedge internal error: ")
MAX_TEXT_BYTES = 1 << 20  # one text field (prompt, question, label) past 1 MiB is refused before decoding


def text_tensor(texts: Iterable[str]) -> np.ndarray:
    """UTF-8 BYTES tensor ``[n]`` (numpy object array)."""
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def texts_of(name: str, array: Any) -> list[str]:
    """The strings of a BYTES tensor; InputError naming the tensor for non-text data."""
    values = np.asarray(array, dtype=np.object_).reshape(-1)
    out = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            out.append(value)
            continue
        if not isinstance(value, (bytes, bytearray)):
            raise InputError(f"input '{name}'[{index}] is a {type(value).__name__}", "UTF-8 text (a BYTES tensor)",
                             f"send '{name}' as TYPE_STRING / BYTES")
        if len(value) > MAX_TEXT_BYTES:
            raise InputError(f"input '{name}'[{index}] is {len(value):,} bytes long",
                             f"at most {MAX_TEXT_BYTES:,} bytes",
                             "send shorter text")
        try:
            out.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"input '{name}'[{index}] is not UTF-8 text ({exc.reason} at byte {exc.start})",
                             "UTF-8 encoded text", "encode the text as UTF-8") from None
    return out


def blobs_of(name: str, array: Any, base64_text: bool = False) -> list[bytes]:
    """The byte strings of a BYTES tensor (encoded images), decoded from base64 when ``base64_text``."""
    values = np.asarray(array, dtype=np.object_).reshape(-1)
    bad = [i for i, v in enumerate(values) if not isinstance(v, (bytes, bytearray))]
    if bad:
        raise InputError(f"input '{name}'[{bad[0]}] is a {type(values[bad[0]]).__name__}",
                         "encoded image files (PNG, JPEG, ...) as a BYTES tensor", f"send '{name}' as BYTES")
    if not base64_text:
        return [bytes(v) for v in values]
    try:
        return [base64.b64decode(bytes(v), validate=True) for v in values]
    except binascii.Error as exc:
        raise InputError(f"input '{name}' is not base64 text ({exc})", "base64-encoded image files (encoding 'base64')",
                         "encode each image file with base64.b64encode, or drop the 'encoding' input") from None


def one_row(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A row model's inputs without their leading axis of 1; InputError naming the input that holds more rows."""
    out = {}
    for name, value in inputs.items():
        array = np.asarray(value)
        if array.ndim < 1 or array.shape[0] != 1:
            raise InputError(f"input '{name}' holds {array.shape[0] if array.ndim else 0} rows", "one row per request "
                             "(each input shaped [1, n])", "send one request per row; a row holds any number of images")
        out[name] = array[0]
    return out


def is_base64(inputs: Mapping[str, Any]) -> bool:
    """Whether the request's ``encoding`` input says "base64" (no input: raw bytes)."""
    if "encoding" not in inputs:
        return False
    encoding = one_text("encoding", inputs["encoding"])
    if encoding not in ("base64", "raw"):
        raise InputError(f"input 'encoding' is {encoding!r}", "'base64' or 'raw'",
                         "send encoding 'base64' with base64 images")
    return encoding == "base64"


def one_text(name: str, array: Any) -> str:
    """The one string of a text input."""
    values = texts_of(name, array)
    if len(values) != 1:
        raise InputError(f"input '{name}' holds {len(values)} strings", "exactly one", f"send '{name}' shaped [1]")
    return values[0]


def generation_of(array: Any) -> dict:
    """The generation settings sent as one JSON object (keywords of ``Captioner.caption``)."""
    text = one_text("generation", array)
    try:
        settings = json.loads(text)
    except ValueError as exc:
        raise InputError(f"input 'generation' is not JSON ({exc})", 'one JSON object, e.g. {"num_beams": 3}',
                         "send the generation settings with json.dumps") from None
    if not isinstance(settings, dict):
        raise InputError(f"input 'generation' is a JSON {type(settings).__name__}",
                         'one JSON object, e.g. {"num_beams": 3}',
                         "send the generation settings as an object")
    return settings


def is_server_failure(message: str) -> bool:
    """Whether a pipeline model's error ``message`` is a failure of the server (not a refused request)."""
    return message.startswith(FAILURE_PREFIXES)


def check_prompt_or_question(prompt: Any, question: Any) -> None:
    """Refuse a prompt and a question together (a question makes the prompt), as ``mmedge run`` refuses
    ``--prompt`` with ``--question``."""
    if prompt is not None and question is not None:
        raise InputError("both a prompt and a question were given", "a prompt or a question (the question makes "
                         "the prompt, e.g. 'Question: ... Answer:')", "pass only one of them")
