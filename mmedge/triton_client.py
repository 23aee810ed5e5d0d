"""mmedge's pipelines on a Triton server, called like the local ones (``pip install "mmedge[triton]"``).

    from mmedge.triton_client import connect

    classifier = connect("http://127.0.0.1:8000", "clip-b32")        # the model prefix `mmedge triton` gave it
    classifier("photo.jpg", labels=["cat", "dog"], top_k=2)            # as mmedge.load("clip-b32")(...)
    captioner = connect("grpc://127.0.0.1:8001", "blip2-int4")
    captioner.caption("photo.jpg", num_beams=3)
    for piece in captioner.stream("photo.jpg", prompt="a photo of"):   # tokens as they are generated
        print(piece, end="")

``connect(url, model)`` takes a pipeline model's name (``clip-b32-zero-shot``) or an artifact's prefix
(``clip-b32``: its first pipeline, or the one for ``task=``) and returns ``RemoteClassifier``, ``RemoteEmbedder`` or
``RemoteCaptioner``, whose methods mirror ``ZeroShotClassifier``, ``Embedder`` and ``Captioner`` (IDEFICS'
interleaved prompts too) and give the same results: images are sent as their encoded files (paths as the bytes on
disk; PIL images and arrays losslessly as PNG) and preprocessed on the server by the artifact's own settings.

``http://`` uses tritonclient's HTTP client (streaming through Triton's ``generate_stream`` endpoint, images as
base64), ``grpc://`` its gRPC client (streaming through a gRPC stream of the decoupled ``-stream`` model). Each
thread gets its own client. ``stream`` returns a ``TextStream`` as the local one does (``finish_reason`` and
``tokens`` once exhausted); closing it, or leaving it, closes the request and the server stops generating. A
request that the server refuses raises ``ServerInputError`` with the pipeline's own message; a server that is down
or stops answering raises ``ServerError`` at once or after ``timeout`` seconds (a finite number above 0), never
hangs.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import queue
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mmedge.errors import InputError, ServerError, ServerInputError
from mmedge.generation import StreamEnd, TextStream
from mmedge.pipelines.captioner import check_stream_call, is_prompt_batch, vqa_prompt
from mmedge.triton.config import PARAMETER
from mmedge.triton.protocol import (
    PIPELINES,
    STREAM_SUFFIX,
    TASK_PIPELINES,
    is_server_failure,
    text_tensor,
    texts_of,
)

INSTALL = 'pip install "mmedge[triton]"'
DEFAULT_TIMEOUT = 120.0  # seconds one request may take (a long caption on a slow server)
MAX_TIMEOUT = 86400.0  # a day: far past any request (from about 1e10 s, sockets and gRPC deadlines overflow)
SCHEMES = {"http": 8000, "grpc": 8001}  # scheme -> Triton's default port for it


def _tritonclient(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError as exc:
        raise ServerError(f"the Triton client needs tritonclient[{protocol}] ({exc.name} is not installed)",
                          "tritonclient[http,grpc] installed", INSTALL) from None
    return module


def server_address(url: Any) -> tuple[str, str]:
    """``(protocol, "HOST:PORT")`` of a server URL (``http://HOST:PORT``, the default scheme, or ``grpc://HOST:PORT``;
    an IPv6 host in brackets); InputError naming the URL for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise InputError(f"the server URL is {url!r}", "http://HOST:PORT or grpc://HOST:PORT",
                         "pass e.g. http://127.0.0.1:8000")
    text = url.strip()
    if "://" not in text:
        scheme, _, rest = text.partition(":")
        if scheme.lower() in SCHEMES:  # "http:HOST:PORT": read as host "http", it failed deep in tritonclient
            raise InputError(f"the server URL '{url}' has no '//' after '{scheme}:'", f"{scheme}://HOST:PORT",
                             f"pass {scheme}://{rest.lstrip('/')}")
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:  # an IPv6 address with an unclosed bracket
        raise InputError(f"the server URL '{url}' is malformed ({exc})", "http://HOST:PORT or grpc://HOST:PORT",
                         "write an IPv6 host in brackets, e.g. http://[::1]:8000") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InputError(f"the server URL '{url}' is not one mmedge can use", "http://HOST:PORT or grpc://HOST:PORT",
                         "use http:// (port 8000 by default) or grpc:// (port 8001)")
    default = SCHEMES[scheme]
    expected = (f"{scheme}://HOST:PORT, with nothing after the port (Triton listens for {scheme} on port {default} by "
                "default)")
    user, at, netloc = parts.netloc.rpartition("@")
    if at:
        raise InputError(f"the server URL '{url}' has a user part ('{user}@')",
                         f"{scheme}://HOST:PORT: a Triton server takes no user or password in its URL",
                         f"drop '{user}@': pass {scheme}://{netloc}")
    if netloc.startswith("["):  # [IPv6]:PORT
        host, _, port = netloc.partition("]")
        host, port, colon = host + "]", port[1:], port[:1]
    else:
        host, colon, port = netloc.rpartition(":")
        if not colon:
            host, port = port, ""
    problem = _address_problem(parts, host, colon, port)
    if problem:
        example = host if host and ":" not in host and not any(c.isspace() for c in host) else "127.0.0.1"
        raise InputError(f"the server URL '{url}' has {problem}", expected, f"pass e.g. {scheme}://{example}:{default}")
    return scheme, f"{host}:{int(port)}"


def _address_problem(parts: urllib.parse.SplitResult, host: str, colon: str, port: str) -> str | None:
    """What a server URL has that it should not, or lacks (None: nothing)."""
    if parts.path.strip("/") or parts.query or parts.fragment:
        return "a path"
    if ":" in host and not host.startswith("["):
        return "more than one ':' in its address (an IPv6 host goes in brackets)"
    if not host:
        return "no host"
    if any(c.isspace() for c in host):
        return "a space in its host"
    if not colon:
        return "no port"
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"no usable port ({port!r})"
    return None


def checked_timeout(timeout: Any) -> float:
    """``timeout`` in seconds as a float: a finite number above 0 (a client never waits without a limit)."""
    number = isinstance(timeout, (int, float, np.integer, np.floating)) and not isinstance(timeout, (bool, np.bool_))
    if not number or not 0 < timeout <= MAX_TIMEOUT:  # NaN fails the comparison too
        raise InputError(f"timeout={timeout!r} is not a usable timeout", f"a number of seconds above 0, at most "
                         f"{MAX_TIMEOUT:g} (how long one request may take before the client gives up; a client never "
                         "waits without a limit)",
                         f"pass e.g. timeout={DEFAULT_TIMEOUT:g} (the default)")
    return float(timeout)


class Connection:
    """One Triton server: ``infer`` and ``stream`` a model with numpy inputs, read its config and statistics.
    ``url``: ``http://HOST:PORT`` (default scheme) or ``grpc://HOST:PORT``; ``timeout``: seconds one request may take
    (a finite number above 0)."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        self.protocol, self.address = server_address(url)
        self.url, self.timeout = url, checked_timeout(timeout)
        self._module = _tritonclient(self.protocol)
        self._local = threading.local()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.address)
            else:
                client = self._module.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                            network_timeout=self.timeout)
            self._local.client = client
        return client

    # --- requests ------------------------------------------------------------------------------------
    def infer(self, model: str, inputs: dict[str, np.ndarray],
              outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """One request; every output the model returned (or only ``outputs``), by name."""
        client = self._client()
        tensors = [self._input(name, value) for name, value in inputs.items()]
        wanted = [self._module.InferRequestedOutput(name) for name in outputs] if outputs else None
        with self._errors(model):
            if self.protocol == "grpc":
                result = client.infer(model, tensors, outputs=wanted, client_timeout=self.timeout)
                names = [o.name for o in result.get_response().outputs]
            else:
                result = client.infer(model, tensors, outputs=wanted, timeout=int(self.timeout * 1e6))
                names = [o["name"] for o in result.get_response()["outputs"]]
        return {name: result.as_numpy(name) for name in names}

    def stream(self, model: str, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The responses of a decoupled model to one request, as they arrive."""
        if self.protocol == "grpc":
            yield from self._grpc_stream(model, inputs)
        else:
            yield from self._http_stream(model, inputs)

    def _grpc_stream(self, model: str, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        client = self._client()
        if getattr(self._local, "streaming", False):  # tritonclient's gRPC client holds one stream at a time
            raise InputError("a second stream was started in a thread whose gRPC stream is still open",
                             "one open stream per thread and connection", "iterate the first stream to its end or "
                             "close() it first, or connect() again for the second")
        answers: queue.Queue = queue.Queue()
        with self._errors(model):
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
        self._local.streaming = True
        try:
            try:
                with self._errors(model):
                    client.async_stream_infer(model, [self._input(n, v) for n, v in inputs.items()],
                                              enable_empty_final_response=True)
            except ServerError as exc:
                # a stream that broke (the server went away) refuses the request with "the stream is no longer in
                # valid state"; why it broke went to the callback
                try:
                    _, error = answers.get(timeout=1.0)
                except queue.Empty:
                    raise exc from None
                raise self._stream_error(model, error) from None
            while True:
                try:
                    result, error = answers.get(timeout=self.timeout)
                except queue.Empty:
                    raise self._timeout(model) from None
                if error is not None:
                    raise self._stream_error(model, error)
                response = result.get_response()
                outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
                if outputs:
                    yield outputs
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            self._local.streaming = False
            client.stop_stream(cancel_requests=True)  # a stream left before its end: the server stops generating

    def _http_stream(self, model: str, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Triton's ``generate_stream`` (server-sent events): JSON inputs, so BYTES go as text, images as base64."""
        body = {name: _json_value(value) for name, value in inputs.items()}
        request = urllib.request.Request(f"http://{self.address}/v2/models/{model}/generate_stream",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            detail = _json_error(exc.read().decode(errors="replace"))
            raise self._refused(model, "500" if is_server_failure(detail) else str(exc.code), detail) from None
        except urllib.error.URLError as exc:
            raise self._lost(exc.reason if isinstance(exc.reason, BaseException) else exc) from None
        except (OSError, TimeoutError) as exc:  # RemoteDisconnected (an HTTPException too) included
            raise self._lost(exc) from None
        except http.client.HTTPException as exc:  # no HTTP/1 status line: not Triton's HTTP port
            raise self._not_http(exc) from None
        with response:  # closed when the stream is left before its end: the server sees it and stops generating
            try:
                for line in response:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise self._refused(model, "500" if is_server_failure(event["error"]) else "400",
                                            event["error"])
                    outputs = _event_outputs(event)
                    if outputs:
                        yield outputs
            except (OSError, TimeoutError, http.client.HTTPException) as exc:  # IncompleteRead: it went away
                raise self._lost(exc) from None

    # --- server ------------------------------------------------------------------------------------
    def _grpc_options(self) -> dict:
        """A gRPC call's keywords: JSON answers, and the connection's timeout (a gRPC call has none of its own)."""
        return {"as_json": True, "client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def model_config(self, model: str) -> dict:
        with self._errors(model):
            config = self._client().get_model_config(model, **self._grpc_options())
        return config.get("config", config)

    def statistics(self, model: str) -> dict:
        """Triton's statistics of one model (``model_stats[0]``: ``inference_stats``, ``batch_stats``)."""
        with self._errors(model):
            stats = self._client().get_inference_statistics(model, **self._grpc_options())
        return stats["model_stats"][0]

    def models(self) -> list[str]:
        """The names of the models the server has."""
        with self._errors("(repository index)"):
            index = self._client().get_model_repository_index(**self._grpc_options())
        return [m["name"] for m in (index.get("models", []) if isinstance(index, dict) else index)]

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    # --- helpers -----------------------------------------------------------------------------------
    def _input(self, name: str, value: np.ndarray):
        from tritonclient.utils import np_to_triton_dtype

        array = np.asarray(value)
        tensor = self._module.InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_
                                         else np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        return tensor

    def _errors(self, model: str) -> "_ErrorMapper":
        return _ErrorMapper(self, model)

    def _server_error(self, model: str, exc) -> ServerError:
        """What tritonclient raised for a request: no answer in time, no server to answer (gRPC UNAVAILABLE or
        CANCELLED, HTTP 503), or the server's answer (a refused request, a missing model, a model that failed)."""
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if "DEADLINE_EXCEEDED" in status:
            return self._no_answer(status)
        if any(code in status for code in ("UNAVAILABLE", "CANCELLED")) or status == "503":
            return ServerError(f"the Triton server at {self.url} did not answer ({status}: {message})",
                               "a running server", "check that the server is up, then retry", status=status)
        return self._refused(model, status, message)

    def _stream_error(self, model: str, exc) -> ServerError:
        """The error a gRPC stream's callback got: a broken stream has a status code, a model's answer has none
        (its message says whether the server failed: ``protocol.FAILURE_PREFIXES``, else the request was refused)."""
        if exc.status():
            return self._server_error(model, exc)
        message = exc.message() or str(exc)
        if is_server_failure(message) or "unknown model" in message or "is not found" in message:
            return self._refused(model, "", message)
        return self._refused(model, "INVALID_ARG", message)

    def _refused(self, model: str, status: str, message: str) -> ServerError:
        message = message.rstrip(".")
        # the statistics endpoints answer a missing model with INVALID_ARG: "requested model 'x' is not available"
        missing = "NOT_FOUND" in status or status == "404" or message.startswith("requested model '")
        if not missing and ("INVALID_ARG" in status or status == "400"):
            return ServerInputError(message, status=status)  # the pipeline's own message: what, expected, fix
        if missing or "unknown model" in message or "is not found" in message:
            return ServerError(f"the server at {self.url} has no model '{model}' ({message})",
                               "a model `mmedge triton` wrote into the server's repository",
                               "check the name (GET /v2/models/NAME/ready) or the server's repository", status=status)
        detail = f"{status}: {message}" if status else message
        return ServerError(f"the server at {self.url} failed model '{model}' ({detail})", None,
                           "see the server's log", status=status)

    def _unreachable(self, exc: BaseException) -> ServerError:
        return ServerError(f"cannot reach the Triton server at {self.url} ({type(exc).__name__}: {str(exc)[:200]})",
                           "a server listening at that address", "start the server or fix the URL, then retry")

    def _lost(self, exc: BaseException) -> ServerError:
        """A transport that failed: no answer in time (a timeout), or no server to answer."""
        return self._no_answer() if isinstance(exc, TimeoutError) else self._unreachable(exc)

    def _no_answer(self, status: str = "") -> ServerError:
        return ServerError(f"the Triton server at {self.url} did not answer within {self.timeout:g} s",
                           "a running server that answers", "check that the server is up (or pass a larger "
                           "timeout=), then retry", status=status or None)

    def _not_http(self, exc: BaseException) -> ServerError:
        return ServerError(f"the address {self.address} did not answer as an HTTP Triton endpoint "
                           f"({type(exc).__name__}: {str(exc)[:200]})", "Triton's HTTP port (8000 by default)",
                           f"check the port; if it is the gRPC one, use grpc://{self.address}")

    def _timeout(self, model: str) -> ServerError:
        return ServerError(f"model '{model}' on {self.url} sent nothing for {self.timeout:g} s",
                           f"an answer within {self.timeout:g} s", "check the server, or pass a larger timeout=")


class _ErrorMapper:
    """Maps what tritonclient raises inside its block to mmedge's ServerError (a class of its own, not one built per
    request)."""

    __slots__ = ("connection", "model")

    def __init__(self, connection: Connection, model: str):
        self.connection, self.model = connection, model

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (ServerError, InputError)):
            return False
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            raise self.connection._server_error(self.model, exc) from None
        if isinstance(exc, TimeoutError) or (type(exc).__name__ == "Timeout"
                                             and type(exc).__module__.startswith("gevent")):
            raise self.connection._no_answer() from None
        if isinstance(exc, OSError) or type(exc).__module__.startswith(("gevent", "geventhttpclient", "grpc")):
            raise self.connection._unreachable(exc) from None  # HTTPConnectionClosed (geventhttpclient.response) too
        if isinstance(exc, http.client.HTTPException):
            # geventhttpclient's HTTPParseError (module _parser): an answer that is not HTTP/1 (the gRPC port, say)
            raise self.connection._not_http(exc) from None
        return False


def _json_value(value: np.ndarray) -> Any:
    array = np.asarray(value)
    items = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    return items if array.ndim else items[0]


def _event_outputs(event: dict) -> dict[str, np.ndarray]:
    """The outputs of a caption pipeline's response that ``generate_stream`` sent as one JSON event, as arrays."""
    outputs = {}
    for name, (dtype, _) in PIPELINES["caption"]["outputs"].items():
        if name in event:
            values = event[name] if isinstance(event[name], list) else [event[name]]
            outputs[name] = (np.array([v.encode() for v in values], dtype=np.object_) if dtype == "bytes"
                             else np.array(values, dtype=dtype))
    return outputs


def _json_error(text: str) -> str:
    """The message of an error body: JSON ``{"error": ...}``, or a server-sent event carrying it (``data: {...}``, as
    ``generate_stream`` answers); else the text as it is."""
    for candidate in (text, *(line[5:] for line in text.splitlines() if line.startswith("data:"))):
        try:
            body = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return body["error"]
    return text.strip()


# --- images ----------------------------------------------------------------------------------------
def encode_image(image: Any) -> bytes:
    """The bytes the server decodes: a path's file as it is on disk, bytes as they are, anything else (PIL
    image, array) as ``mmedge.images.load_image`` makes it, saved losslessly as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    from mmedge.images import checked_image_path, load_image

    if isinstance(image, (str, os.PathLike)):
        return Path(checked_image_path(image)).read_bytes()  # refused as locally: missing, a folder, empty, a URL

    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_tensor(images: Sequence[Any]) -> np.ndarray:
    return np.array([encode_image(i) for i in images], dtype=np.object_)


def _as_list(images: Any) -> tuple[list, bool]:
    single = not isinstance(images, (list, tuple))
    return ([images] if single else list(images)), single


# --- remote pipelines ----------------------------------------------------------------------------------
class RemotePipeline:
    """A pipeline model on a server. ``settings``: what ``mmedge triton`` recorded in its config."""

    task = ""

    def __init__(self, connection: Connection, model: str, settings: dict):
        self.connection, self.model, self.settings = connection, model, settings

    def _infer(self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self.connection.infer(self.model, inputs, outputs)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RemoteClassifier(RemotePipeline):
    """``ZeroShotClassifier`` on a server: ``classifier(images, labels, templates, top_k)``, ``probabilities``."""

    task = "zero-shot"

    def probabilities(self, images, labels: Sequence[str] | None = None,
                      templates: Sequence[str] | None = None) -> np.ndarray:
        return self._request(images, labels, templates)[0]

    def __call__(self, images, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 top_k: int | None = None):
        from mmedge.pipelines.zero_shot import ZeroShotClassifier

        batch, single = _as_list(images)
        probs, names = self._request(batch, labels, templates)
        k = len(names) if top_k is None else ZeroShotClassifier._check_top_k(top_k, len(names))
        results = [[{"label": names[i],
                     "score": float(row[i])} for i in np.argsort(-row, kind="stable")[:k]] for row in probs]
        return results[0] if single else results

    classify = __call__

    def _request(self, images, labels, templates) -> tuple[np.ndarray, list[str]]:
        from mmedge.pipelines.zero_shot import check_labels, check_templates

        batch, _ = _as_list(images)
        inputs = {"images": _image_tensor(batch)}
        if labels is not None:
            labels = check_labels(labels)
            inputs["labels"] = text_tensor(labels)
        if templates is not None:
            inputs["templates"] = text_tensor(check_templates(templates))
        if not self.settings.get("rows"):  # a repository of an earlier mmedge: one request, tensors as they are
            out = self._infer(inputs)
            return out["probs"], texts_of("label_names", out["label_names"])
        # a request is one row: each tensor with a leading axis of 1; labels sent are the labels answered, so only
        # the probabilities come back
        out = self._infer({n: v[np.newaxis] for n, v in inputs.items()}, ["probs"] if labels is not None else None)
        return out["probs"][0], (labels if labels is not None else texts_of("label_names", out["label_names"][0]))


class RemoteEmbedder(RemotePipeline):
    """``Embedder`` on a server: ``embed_images``, ``embed_texts`` (unit-norm rows)."""

    task = "embed"

    def embed_images(self, images) -> np.ndarray:
        return self._infer({"images": _image_tensor(_as_list(images)[0])})["image_embeds"]

    def embed_texts(self, texts) -> np.ndarray:
        from mmedge.pipelines.embedder import text_batch

        return self._infer({"texts": text_tensor(text_batch(texts))})["text_embeds"]

    def similarity(self, images, texts) -> np.ndarray:
        """Cosine similarity [images, texts], as ``Embedder.similarity``."""
        return self.embed_images(images) @ self.embed_texts(texts).T


class RemoteCaptioner(RemotePipeline):
    """``Captioner`` on a server: ``caption``, ``ask``, ``stream``, ``generate`` (interleaved prompts, IDEFICS).
    ``stream`` uses the decoupled ``-stream`` model."""

    task = "caption"

    @property
    def interleaved(self) -> bool:
        """Whether the served family takes interleaved prompts (``generate``), as ``Captioner.interleaved``."""
        from mmedge.families import FAMILIES

        row = FAMILIES.get(self.settings.get("family", ""))
        return bool(row and row.interleaved)

    @property
    def vqa_template(self) -> str:
        return self.settings.get("vqa_template") or "Question: {} Answer:"

    def caption(self, images, prompt: str | None = None, **generation: Any):
        settings = self._generation(generation)  # bad settings are refused before any image is read, as locally
        batch, single = _as_list(images)
        inputs = {"images": _image_tensor(batch), **settings}
        if prompt is not None:
            inputs["prompt"] = self._text("prompt", prompt)
        texts = texts_of("text", self._infer(inputs)["text"])
        return texts[0] if single else texts

    __call__ = caption

    def ask(self, image, question: str, **generation: Any):
        vqa_prompt(self.vqa_template, question)  # the question judged as locally (a string, not empty)
        settings = self._generation(generation)
        batch, single = _as_list(image)
        inputs = {"images": _image_tensor(batch), "question": text_tensor([question]), **settings}
        texts = texts_of("text", self._infer(inputs)["text"])
        return texts[0] if single else texts

    def generate(self, prompt: list, **generation: Any):
        """Continue an interleaved prompt (images and strings), or each of a list of such prompts."""
        batched = is_prompt_batch(prompt)
        settings = self._generation(generation)
        texts = [texts_of("text", self._infer({**_items(p), **settings})["text"])[0]
                 for p in (prompt if batched else [prompt])]
        return texts if batched else texts[0]

    def stream(self, image, prompt: str | None = None, *, question: str | None = None,
               **generation: Any) -> TextStream:
        """The text of one image (+ ``prompt``), of one image's answer to ``question``, or of one interleaved prompt
        list, in pieces as tokens arrive, as ``Captioner.stream``: a ``TextStream`` whose ``tokens`` and
        ``finish_reason`` say how the answer ended once it is exhausted (None from a repository of an earlier mmedge,
        whose stream model does not send them). What the local call refuses at the call is refused here; the image is
        read and sent when the first piece is asked for. Closing the stream (or leaving it) stops the server's
        generation."""
        check_stream_call(image, prompt, question, self.interleaved)
        if question is not None:
            vqa_prompt(self.vqa_template, question)  # judged at the call, as locally
        settings = self._generation(generation)
        return TextStream(lambda end: self._pieces(image, prompt, question, settings, end))

    def _pieces(self, image, prompt: str | None, question: str | None, settings: dict[str, np.ndarray],
                end: StreamEnd) -> Iterator[str]:
        if isinstance(image, (list, tuple)):
            inputs = _items(image)
        else:
            inputs = {"images": _image_tensor([image])}
            if prompt is not None:
                inputs["prompt"] = self._text("prompt", prompt)
            if question is not None:
                inputs["question"] = text_tensor([question])
        inputs.update(settings)
        if self.connection.protocol == "http":  # JSON: images as base64 text
            inputs = _base64_images(inputs)
        # closed with this generator: a stream left before its end closes its request, and the server stops
        with contextlib.closing(self.connection.stream(self.model + STREAM_SUFFIX, inputs)) as responses:
            for outputs in responses:
                if "text" in outputs:
                    yield from texts_of("text", outputs["text"])
                if "finish_reason" in outputs and "tokens" in outputs:  # the last response: how the answer ended
                    end.finished(int(np.asarray(outputs["tokens"]).reshape(-1)[0]),
                                 texts_of("finish_reason", outputs["finish_reason"])[0])

    @staticmethod
    def _text(name: str, value: Any) -> np.ndarray:
        if not isinstance(value, str):
            raise InputError(f"{name} is a {type(value).__name__}", "a string", f"pass {name}='...'")
        return text_tensor([value])

    def _generation(self, settings: dict) -> dict[str, np.ndarray]:
        """The settings as given, None values too (the server's captioner reads None as not given, and refuses a
        misspelt name whatever its value, as the local one does), judged here first as far as the artifact's
        defaults (recorded in the model's config) allow; the server judges them again with the artifact's limits
        (positions, vocabulary). Numpy scalars go as Python's own numbers."""
        from mmedge.generation import GenerationConfig

        GenerationConfig().replace(**settings)  # a misspelt name, even as None
        defaults = self.settings.get("generation")
        if defaults is not None:  # a repository of an earlier mmedge does not record them: the server judges alone
            given = {k: v for k, v in settings.items() if v is not None}
            combined = {**defaults, **given}
            if "stop_strings" in combined and combined["stop_strings"] is None:
                del combined["stop_strings"]
            GenerationConfig.from_dict(combined).refuse_idle(settings)  # from_dict validates them
        if not settings:
            return {}
        return {"generation": text_tensor([json.dumps(settings, default=_plain)])}


def _plain(value: Any) -> Any:
    """A numpy scalar as Python's own value, for ``json.dumps`` (the local captioner takes them)."""
    if isinstance(value, np.generic):
        return value.item()
    raise InputError(f"a generation setting is a {type(value).__name__}", "numbers, booleans, strings, lists of "
                     "them or None", "pass the setting as a Python value")


def _items(prompt: Sequence[Any]) -> dict[str, np.ndarray]:
    """An interleaved prompt as ``items`` and ``item_is_image``: strings are text, anything else an image (None and
    numbers are refused, as the local pipeline refuses them)."""
    for index, item in enumerate(prompt):
        if item is None or isinstance(item, (int, float, bool)):
            raise InputError(f"prompt item {index} is {item!r}",
                             "an image (path as pathlib.Path, PIL image, array) or a string",
                             "remove the item or wrap a file path in pathlib.Path")
    flags = [not isinstance(item, str) for item in prompt]
    values = [encode_image(item) if image else item.encode("utf-8") for item, image in zip(prompt, flags)]
    return {"items": np.array(values, dtype=np.object_), "item_is_image": np.array(flags, dtype=np.bool_)}


def _base64_images(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(inputs, encoding=text_tensor(["base64"]))
    if "images" in out:
        out["images"] = np.array([base64.b64encode(b) for b in out["images"]], dtype=np.object_)
    if "items" in out:
        out["items"] = np.array([base64.b64encode(v) if image else v for v,
                                 image in zip(out["items"], out["item_is_image"])],
                                dtype=np.object_)
    return out


REMOTE = {"zero-shot": RemoteClassifier, "embed": RemoteEmbedder, "caption": RemoteCaptioner}


def connect(url: str, model: str, *, task: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> RemotePipeline:
    """The pipeline ``model`` on the Triton server at ``url`` (see the module docstring): a pipeline model's name, or
    an artifact's prefix (its first pipeline, or the one for ``task``). A name that is both (a repository of an mmedge
    that did not refuse such names) is refused, saying how to reach each."""
    connection = Connection(url, timeout)
    if task is not None and task not in TASK_PIPELINES:
        raise InputError(f"task '{task}' is unknown", f"one of {', '.join(TASK_PIPELINES)}",
                         "pass one of those, or no task")
    names = connection.models()
    kinds = [TASK_PIPELINES[task]] if task else list(PIPELINES)
    found = _pipelines(connection, [name for name in [model, *(f"{model}-{kind}" for kind in kinds)] if name in names])
    _refuse_two_meanings(url, model, found)
    for name, (config, settings) in found.items():
        if (config.get("model_transaction_policy") or {}).get("decoupled"):
            base = f"{settings['artifact']}-{settings['kind']}"
            raise InputError(f"'{name}' is the streaming model of pipeline '{base}', not a pipeline to connect to",
                             "a pipeline model's name or its artifact's prefix",
                             f"connect to '{base}' (its stream() uses '{name}')")
        if task is not None and settings["kind"] != kinds[0]:
            tasks = [t for t, kind in TASK_PIPELINES.items() if kind == settings["kind"]]
            raise InputError(f"pipeline '{name}' on the server at {url} does not serve task '{task}'",
                             f"task {' or '.join(repr(t) for t in tasks)} for it, or a {kinds[0]} pipeline for "
                             f"'{task}'", f"drop the task, or pass a {kinds[0]} pipeline's name or artifact prefix")
        return REMOTE[settings["kind"]](connection, name, settings)
    pipelines = sorted(n for n in names if "__" not in n and not n.endswith(STREAM_SUFFIX)
                       and (task is None or n.endswith(f"-{kinds[0]}")))
    raise ServerError(f"the server at {url} has no mmedge pipeline '{model}'" + (f" for task '{task}'" if task else ""),
                      f"one of {', '.join(pipelines[:12]) or '(none)'}",
                      "pass a pipeline's name or its artifact's prefix")


def _pipelines(connection: Connection, names: list[str]) -> dict[str, tuple[dict, dict]]:
    """Each of the models ``names`` that is an mmedge pipeline: its config and settings, in the order given."""
    found = {}
    for name in names:
        config = connection.model_config(name)
        settings = _pipeline_settings(config)
        if settings is not None:
            found[name] = (config, settings)
    return found


def _refuse_two_meanings(url: str, model: str, found: dict[str, tuple[dict, dict]]) -> None:
    """InputError where ``model`` is both a pipeline's name and another artifact's prefix (``found``: the pipelines
    it could mean, the one named ``model`` first): a repository of an mmedge that did not refuse such names."""
    if model not in found or len(found) == 1:
        return
    settings = found[model][1]
    task = next(task for task, kind in TASK_PIPELINES.items() if kind == settings["kind"])
    others = [name for name in found if name != model]
    raise InputError(f"'{model}' means two things on the server at {url}: the {settings['kind']} pipeline of the "
                     f"artifact '{settings['artifact']}', and the prefix of the artifact '{model}' (its "
                     f"{', '.join(others)})", "a name that means one pipeline (this repository was written by an "
                     "mmedge that let one artifact's prefix be another's model name)",
                     f"connect to '{settings['artifact']}' with task='{task}' for the first, or to "
                     f"'{others[0]}' for the other; better, write the repository again with `mmedge triton`, serving "
                     f"the artifact '{model}' under another folder name")


def _pipeline_settings(config: dict) -> dict | None:
    """What `mmedge triton` recorded in a model's config, when it is a pipeline model."""
    entry = (config.get("parameters") or {}).get(PARAMETER)
    if not entry:
        return None
    settings = json.loads(entry["string_value"])
    return settings if settings.get("kind") in REMOTE else None


__all__ = ["Connection", "RemoteCaptioner", "RemoteClassifier", "RemoteEmbedder", "RemotePipeline", "connect",
           "encode_image"]
