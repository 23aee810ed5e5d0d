"""A battery of bad requests against the session server: each answer has the right status, OpenAI's error shape and
mmedge's message (what failed; expected ...; fix: ...), and each is followed by a good request that succeeds, so the
process has survived it."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field

import httpx
import pytest
from PIL import Image

from mmedge import demo
from tests.support.serve import data_uri

SCENE = demo.images()[0]
PNG = SCENE.read_bytes()
PYTHON_TERMS = re.compile(r"\w=None|embed_(images|texts)|--labels|labels=\[|NoneType")
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error"}


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def blank_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


def chat(*parts, model="blip2-fp32", **extra) -> dict:
    content = [{"type": "image_url",
                "image_url": {"url": p[4:]}} if p.startswith("url:") else {"type": "text", "text": p}
               for p in parts]
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


IMAGE = "url:" + data_uri(SCENE)


@dataclass
class Bad:
    """A bad request and what it must be answered with."""

    name: str
    status: int
    code: str
    fragments: tuple[str, ...]
    body: object = None  # a JSON value, or bytes sent as they are
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict = field(default_factory=dict)
    param: str | None = "-"  # "-": not checked
    raw: bytes | None = None  # sent as it is, for bodies that json.dumps(body) cannot stand for (JSON null)


CASES = [
    Bad("malformed JSON", 400, "invalid_json", ("not valid JSON",), b'{"model": "blip2-fp32", '),
    Bad("body not UTF-8", 400, "invalid_json", ("not valid JSON",), b'{"model": "\xff\xfe"}'),
    Bad("empty body", 400, "invalid_json", ("body is empty",), b""),
    Bad("body is a list", 422, "invalid_type", ("is a JSON list", "expected a JSON object"), [1, 2]),
    Bad("body is null", 422, "invalid_type", ("the request body is null", "expected a JSON object"), None,
        headers={"Content-Type": "application/json"}, raw=b"null"),
    Bad("no model", 422, "missing_field", ("field 'model' is missing",), {"messages": []}, param="model"),
    Bad("model not a string", 422, "invalid_type", ("field 'model' is 3", "expected a string"), {"model": 3}),
    Bad("unknown model", 404, "model_not_found", ("model 'gpt-4o' is not served here", "clip-fp32"),
        chat(IMAGE, model="gpt-4o"),
        param="model"),
    Bad("no messages", 422, "missing_field", ("field 'messages' is missing",), {"model": "blip2-fp32"},
        param="messages"),
    Bad("empty messages", 400, "invalid_value", ("field 'messages' is empty",),
        {"model": "blip2-fp32", "messages": []}),
    Bad("unknown role", 400, "invalid_value", ("messages[0].role", "one of system, developer, user, assistant"),
        {"model": "blip2-fp32", "messages": [{"role": "robot", "content": "hi"}]}, param="messages[0].role"),
    Bad("audio part", 400, "unsupported_content", ("'input_audio'", "'text' or 'image_url'"),
        {"model": "blip2-fp32",
         "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
    Bad("misspelt field", 422, "unknown_field", ("unknown field 'max_token'",), chat(IMAGE, max_token=5),
        param="max_token"),
    Bad("remote image URL", 400, "unsupported_image_url", ("remote URL", "this server fetches nothing"),
        chat("url:https://example.com/cat.png"), param="messages[0].content[0].image_url.url"),
    Bad("remote image URL in capitals", 400, "unsupported_image_url", ("remote URL",),
        chat("url:HTTPS://example.com/cat.png")),
    Bad("ftp image URL", 400, "unsupported_image_url", ("remote URL",), chat("url:ftp://example.com/cat.png")),
    Bad("file URL on another host", 400, "unsupported_image_url", ("on host 'example.com'", "three slashes"),
        chat("url:file://example.com/cat.png")),
    Bad("file outside the allowed folder", 400, "unsupported_image_url", ("outside the allowed folder",),
        chat("url:file:///etc/hostname")),
    Bad("data URI without base64", 400, "invalid_image", ("not a base64 image data URI",),
        chat("url:data:image/png,abc")),
    Bad("bad base64", 400, "invalid_image", ("invalid base64",), chat("url:data:image/png;base64,@@@@")),
    Bad("not an image", 400, "invalid_image", ("does not decode as an image",),
        chat("url:" + png_uri(b"hello, world"))),
    Bad("truncated image", 400, "invalid_image", ("could not be decoded, it is truncated or corrupt",),
        chat("url:" + png_uri(PNG[: len(PNG) // 2]))),
    Bad("truncated image, streamed", 400, "invalid_image", ("truncated or corrupt",),
        chat("url:" + png_uri(PNG[: len(PNG) // 2]), stream=True)),
    Bad("image over the pixel cap", 400, "image_too_large",
        ("1001x1000 = 1,001,000 pixels", "at most 1,000,000 pixels"),
        chat("url:" + png_uri(blank_png(1001, 1000)))),
    Bad("body over the size cap", 413, "body_too_large", ("at most 1,048,576 bytes",),
        chat("x" * (1 << 20), "url:" + data_uri(SCENE))),
    Bad("two images for BLIP-2", 400, "too_many_images", ("2 images", "one image per request"), chat(IMAGE, IMAGE)),
    Bad("no image for BLIP-2", 400, "missing_image", ("0 images",), chat("what is it?")),
    Bad("too many images", 400, "too_many_images", ("at most 4 images",), chat(*[IMAGE] * 5, model="idefics-tiny")),
    Bad("prompt over the token budget", 400, "prompt_too_long", ("prompt tokens for model 'blip2-fp32'",),
        chat(IMAGE, "what is " * 300)),
    Bad("prompt past the positions", 400, "prompt_too_long",
        ("the prompt takes 133 positions (image tokens included)", "the model's default max_tokens",
         "at most the 64 positions of model 'blip2-fp32'"), chat(IMAGE, "what is " * 60), param="messages"),
    Bad("prompt over the character cap", 400, "prompt_too_long", ("characters",), chat(IMAGE, "why " * 5000)),
    Bad("prompt_mode continue without a text", 400, "invalid_value",
        ("field 'prompt_mode' is 'continue', and the last user message has no text", "writes a caption whatever the "
         "mode", "leave out prompt_mode"), chat(IMAGE, prompt_mode="continue"), param="prompt_mode"),
    Bad("prompt_mode question without a text", 400, "invalid_value", ("field 'prompt_mode' is 'question'",),
        chat(IMAGE, " ", prompt_mode="question"), param="prompt_mode"),
    Bad("message name not a string", 422, "invalid_type", ("field 'messages[0].name' is 5", "expected a string"),
        {"model": "blip2-fp32", "messages": [{"role": "user", "name": 5, "content": chat(IMAGE)["messages"][0][
            "content"]}]}, param="messages[0].name"),
    Bad("max_tokens 0", 400, "invalid_value", ("field 'max_tokens' is 0", "from 1 to 4096"), chat(IMAGE, max_tokens=0),
        param="max_tokens"),
    Bad("max_tokens past the cap", 400, "invalid_value", ("is 100000",), chat(IMAGE, max_tokens=100000)),
    Bad("max_tokens past the positions", 400, "invalid_value",
        ("field 'max_tokens' is 60; with the prompt's 9 positions", "at most 56 for this prompt", "lower max_tokens "
         "to 56"), chat(IMAGE, max_tokens=60), param="max_tokens"),  # 9 + 56 - 1: the last token is never fed back
    Bad("max_completion_tokens past the positions", 400, "invalid_value",
        ("field 'max_completion_tokens' is 57", "at most 56"), chat(IMAGE, max_completion_tokens=57),
        param="max_completion_tokens"),
    Bad("max_tokens past an interleaved model's positions", 400, "invalid_value",
        ("field 'max_tokens' is 4000", "model 'idefics-tiny' has"), chat(IMAGE, "An image of", model="idefics-tiny",
                                                                          max_tokens=4000), param="max_tokens"),
    Bad("no image and no text for an interleaved model", 400, "missing_image", ("no image and no text",),
        {"model": "idefics-tiny", "messages": [{"role": "user", "content": ""}]}, param="messages"),
    Bad("an empty stop string", 400, "invalid_value", ("'stop' holds an empty string",), chat(IMAGE, stop=["a", ""]),
        param="stop[1]"),
    Bad("repetition_penalty 0", 400, "invalid_value", ("'repetition_penalty' is 0", "above 0"),
        chat(IMAGE, repetition_penalty=0), param="repetition_penalty"),
    Bad("min_tokens over max_tokens", 400, "invalid_value", ("'min_tokens' is 10", "at most max_tokens (3)"),
        chat(IMAGE, min_tokens=10, max_tokens=3), param="min_tokens"),
    Bad("beams while sampling", 400, "invalid_value", ("'num_beams' is 2 while the answer samples",
                                                       "send temperature 0 with num_beams"),
        chat(IMAGE, num_beams=2, top_k=5), param="num_beams"),
    Bad("seed past int64", 400, "invalid_value", ("'seed' is 1180591620717411303424", "to 9223372036854775807"),
        chat(IMAGE, seed=2 ** 70), param="seed"),
    Bad("NaN length_penalty", 400, "invalid_value", ("'length_penalty' is nan", "a finite number"),
        raw=json.dumps(chat(IMAGE, num_beams=2, length_penalty=float("nan"))).encode(), param="length_penalty",
        headers={"Content-Type": "application/json"}),
    Bad("user not a string", 422, "invalid_type", ("field 'user' is 5",), chat(IMAGE, user=5), param="user"),
    Bad("image detail the model cannot give", 400, "invalid_value", ("'high'", "fixed, small size"),
        {"model": "blip2-fp32", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": IMAGE[4:], "detail": "high"}}]}]},
        param="messages[0].content[0].image_url.detail"),
    Bad("max_tokens not a number", 422, "invalid_type", ("field 'max_tokens' is \"ten\"",),
        chat(IMAGE, max_tokens="ten")),
    Bad("temperature out of range", 400, "invalid_value", ("field 'temperature' is 5",), chat(IMAGE, temperature=5)),
    Bad("top_k at top_p 0 (greedy, as OpenAI takes it)", 400, "invalid_value", ("'top_k' was given with top_p 0",),
        chat(IMAGE, top_p=0, top_k=5), param="top_k"),
    Bad("top_k at temperature 0", 400, "invalid_value", ("'top_k' was given with temperature 0",),
        chat(IMAGE, temperature=0, top_k=5), param="top_k"),
    Bad("length_penalty with one beam (refused by mmedge)", 400, "invalid_value",
        ("generation setting length_penalty=0.6 would change nothing", "num_beams above 1"),
        chat(IMAGE, length_penalty=0.6), param="length_penalty"),
    Bad("stream_options without streaming", 400, "invalid_value", ("'stream_options' was given without streaming",),
        chat(IMAGE, stream_options={"include_usage": True}), param="stream_options"),
    Bad("max_tokens and max_completion_tokens differ", 400, "invalid_value",
        ("'max_tokens' (3) and 'max_completion_tokens' (5) differ",),
        chat(IMAGE, max_tokens=3, max_completion_tokens=5), param="max_completion_tokens"),
    Bad("prompt_mode for an interleaved model", 400, "invalid_value",
        ("'prompt_mode' was given for model 'idefics-tiny'",),
        chat(IMAGE, "An image of", model="idefics-tiny", prompt_mode="continue"), param="prompt_mode"),
    Bad("octet-stream data URI of text", 400, "invalid_image", ("does not decode as an image",),
        chat("url:data:application/octet-stream;base64," + base64.b64encode(b"hello, world").decode()),
        param="messages[0].content[0].image_url.url"),
    Bad("n = 2", 400, "invalid_value", ("field 'n' is 2",), chat(IMAGE, n=2)),
    Bad("five stop strings", 400, "invalid_value", ("'stop' has 5 strings",), chat(IMAGE, stop=list("abcde"))),
    Bad("too many beams", 400, "invalid_value", ("'num_beams' is 9",), chat(IMAGE, num_beams=9)),
    Bad("Basic instead of Bearer", 401, "invalid_api_key", ("uses the 'Basic' scheme", "Authorization: Bearer KEY"),
        chat(IMAGE), headers={"Authorization": "Basic dGVzdC1rZXktM2Y5YQ=="}),
    Bad("wrong API key", 401, "invalid_api_key", ("the API key is wrong",), chat(IMAGE),
        headers={"Authorization": "Bearer nope"}),
    Bad("no API key", 401, "invalid_api_key", ("the request has no API key",), chat(IMAGE),
        headers={"Authorization": ""}),
    Bad("metrics without a key", 401, "invalid_api_key", ("no API key",), None, "/metrics", "GET",
        headers={"Authorization": ""}),
    Bad("unknown endpoint", 404, "not_found", ("there is no endpoint /v1/completions",), {}, "/v1/completions"),
    Bad("wrong method", 405, "method_not_allowed", ("GET is not allowed on /v1/chat/completions", "expected POST"),
        None, method="GET"),
    Bad("chat with a CLIP model", 400, "invalid_value", ("'clip-fp32' (clip) does not generate text",),
        chat(IMAGE, model="clip-fp32")),
    Bad("classify with a captioner", 400, "invalid_value", ("does not do zero-shot classification",),
        {"model": "blip2-fp32", "images": [data_uri(SCENE)]}, "/v1/classify"),
    Bad("classify without images", 422, "missing_field", ("field 'images' is missing",), {"model": "clip-fp32"},
        "/v1/classify"),
    Bad("classify without labels (none baked in)", 400, "invalid_value", ("no labels were given",),
        {"model": "clip-tiny", "images": [data_uri(SCENE)]}, "/v1/classify", param="labels"),
    Bad("other labels than the baked ones", 400, "invalid_value", ("labels baked into its graph",),
        {"model": "clip-fp32", "images": [data_uri(SCENE)], "labels": ["cat"]}, "/v1/classify", param="labels"),
    Bad("templates for baked labels", 400, "invalid_value", ("field 'templates' was given", "baked into its graph"),
        {"model": "clip-fp32", "images": [data_uri(SCENE)], "templates": ["a {}"]}, "/v1/classify",
        param="templates"),
    Bad("empty labels", 400, "invalid_value", ("field 'labels' is empty",),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": []}, "/v1/classify", param="labels"),
    Bad("labels the tokenizer cannot tell apart", 400, "invalid_value", ("the same tokens",),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat", "dog", "CAT"]}, "/v1/classify",
        param="labels[2]"),
    Bad("duplicate labels", 400, "invalid_value", ("duplicates ('cat')",),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat", "cat"]}, "/v1/classify",
        param="labels[1]"),
    Bad("too many labels", 400, "invalid_value", ("1,001 labels", "at most 1,000", "/v1/embeddings"),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": [f"l{i}" for i in range(1001)]},
        "/v1/classify", param="labels"),
    Bad("template without {}", 400, "invalid_value", ("'templates[1]'", "exactly one '{}'"),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat"], "templates": ["a {}", "a photo"]},
        "/v1/classify", param="templates[1]"),
    Bad("repeated template", 400, "invalid_value", ("duplicates ('a {}')", "each template once"),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat"], "templates": ["a {}", "a {}"]},
        "/v1/classify", param="templates[1]"),
    Bad("top_k 0", 400, "invalid_value", ("field 'top_k' is 0", "a positive integer"),
        {"model": "clip-fp32", "images": [data_uri(SCENE)], "top_k": 0},
        "/v1/classify", param="top_k"),
    Bad("classify an image that does not decode", 400, "invalid_image", ("truncated or corrupt",),
        {"model": "clip-tiny", "images": [data_uri(SCENE), png_uri(PNG[: len(PNG) // 2])], "labels": ["cat"]},
        "/v1/classify", param="images[1]"),
    Bad("embed an image that does not decode", 400, "invalid_image", ("truncated or corrupt",),
        {"model": "clip-tiny", "images": [data_uri(SCENE), png_uri(PNG[: len(PNG) // 2])]}, "/v1/embeddings",
        param="images[1]"),
    Bad("caption an image that does not decode", 400, "invalid_image", ("truncated or corrupt",),
        chat("what is it?", "url:" + png_uri(PNG[: len(PNG) // 2])), param="messages[0].content[1].image_url.url"),
    Bad("label past the text encoder's length", 400, "context_length_exceeded",
        ("field 'labels[1]' is ", "start and end tokens included", "model 'clip-tiny'", "shorten the label"),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat", "word " * 300]}, "/v1/classify",
        param="labels[1]"),
    Bad("label far past the text encoder's length (not tokenized)", 400, "context_length_exceeded",
        ("field 'labels[1]' has 15,014 characters in template", "no text of over 4,928 characters fits"),
        {"model": "clip-tiny", "images": [data_uri(SCENE)], "labels": ["cat", "word " * 3000]}, "/v1/classify",
        param="labels[1]"),
    Bad("embedding input past the text encoder's length", 400, "context_length_exceeded",
        ("field 'input[1]' is ", "tokens long", "at most 77 tokens, start and end tokens included",
         "model 'clip-tiny'"),
        {"model": "clip-tiny", "input": ["a cat", "word " * 300]}, "/v1/embeddings", param="input[1]"),
    Bad("one embedding input past the text encoder's length", 400, "context_length_exceeded",
        ("field 'input' is ", "tokens long", "at most 77 tokens"), {"model": "clip-tiny", "input": "word " * 300},
        "/v1/embeddings", param="input"),
    Bad("embedding input that is blank", 400, "invalid_value", ("field 'input[1]' is blank", "texts with words"),
        {"model": "clip-tiny", "input": ["a cat", " "]}, "/v1/embeddings", param="input[1]"),
    Bad("embedding input holding a special token", 400, "invalid_value",
        ("field 'input[1]' holds the tokenizer's special token '<|endoftext|>'",),
        {"model": "clip-tiny", "input": ["a cat", "a dog<|endoftext|> and more"]}, "/v1/embeddings",
        param="input[1]"),
    Bad("embeddings of a number", 422, "invalid_type", ("field 'input' is 5", "a string or a list of strings"),
        {"model": "clip-tiny", "input": 5}, "/v1/embeddings", param="input"),
    Bad("embeddings of token ids", 422, "invalid_type", ("field 'input[0]' is a JSON list",),
        {"model": "clip-tiny", "input": [[1, 2, 3]]}, "/v1/embeddings", param="input[0]"),
    Bad("embeddings of nothing", 400, "invalid_value", ("has no input",), {"model": "clip-tiny", "input": []},
        "/v1/embeddings"),
    Bad("embeddings in int8", 400, "invalid_value", ("'encoding_format' is 'int8'",),
        {"model": "clip-tiny", "input": "a", "encoding_format": "int8"}, "/v1/embeddings"),
    Bad("text embeddings from baked labels", 400, "invalid_value", ("does not do embeddings",),
        {"model": "clip-fp32", "input": "a red circle"}, "/v1/embeddings"),
]


def send(http: httpx.Client, case: Bad) -> httpx.Response:
    headers = {k: v for k, v in case.headers.items() if v}
    if case.headers.get("Authorization") == "":
        client = httpx.Client(base_url=http.base_url, timeout=60)  # no key at all
    else:
        client = http
    content = case.raw if case.raw is not None else case.body if isinstance(case.body, bytes) else (
        None if case.body is None else json.dumps(case.body).encode())
    try:
        return client.request(case.method, case.path, content=content, headers=headers)
    finally:
        if client is not http:
            client.close()


def check_error(answer: httpx.Response, case: Bad) -> None:
    assert answer.status_code == case.status, answer.text
    assert answer.headers["content-type"] == "application/json", answer.headers
    body = answer.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message", "param", "type"], body
    error = body["error"]
    assert error["type"] == TYPES[case.status] and error["code"] == case.code, error
    message = error["message"]
    assert "; expected " in message and "; fix: " in message and "\n" not in message, message  # mmedge's three parts
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not PYTHON_TERMS.search(message), message  # HTTP's words, not the Python API's
    if case.param != "-":
        assert error["param"] == case.param, error


@pytest.fixture(scope="module")
def good(http):
    """A good request (zero-shot on a scene) and its answer: what each bad request must leave working."""
    request = {"model": "clip-fp32", "images": [data_uri(SCENE)], "top_k": 1}
    answer = http.post("/v1/classify", json=request)
    assert answer.status_code == 200
    return request, answer.json()["data"]


def test_the_battery_is_large_enough():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_request_then_a_good_one(case, http, good, server):
    check_error(send(http, case), case)
    request, expected = good
    answer = http.post("/v1/classify", json=request)
    assert answer.status_code == 200 and answer.json()["data"] == expected
    assert server.process.poll() is None


def test_unauthorized_answers_ask_for_a_bearer_token(server):
    answer = httpx.post(f"{server.url}/v1/classify", json={})
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"


def test_chunked_body_over_the_cap_is_cut_off(http):
    """A body sent in chunks (no Content-Length) is cut off at the cap while it is read."""
    chunks = (b"x" * 65536 for _ in range(20))  # 1.25 MiB
    answer = http.post("/v1/embeddings", content=chunks, headers={"Content-Type": "application/json"})
    check_error(answer, Bad("chunked", 413, "body_too_large", ("at most 1,048,576 bytes",)))


def test_a_file_urls_hash_and_question_mark_are_part_of_the_name():
    """A file URL has no fragment or query to this server: 'shot#1.png' is the file's name (urlsplit read '#1.png'
    as a fragment and the file as 'shot')."""
    from pathlib import Path

    from mmedge.serve.inputs import _file_url_path

    assert _file_url_path("file:///data/shot#1.png", "p") == Path("/data/shot#1.png")
    assert _file_url_path("file://localhost/data/a?b%20c.png", "p") == Path("/data/a?b c.png")
    assert _file_url_path("file:/data/x.png", "p") == Path("/data/x.png")
