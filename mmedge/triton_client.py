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
thread gets its own client. A request that the server refuses raises ``ServerInputError`` with the pipeline's own
message; a server that is down or stops answering raises ``ServerError`` at once or after ``timeout`` seconds,
never hangs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mmedge.errors import ImageError, InputError, ServerError, ServerInputError
from mmedge.pipelines.captioner import refuse_prompt_batch
from mmedge.triton.config import PARAMETER
from mmedge.triton.protocol import (
    PIPELINES,
    STREAM_SUFFIX,
    TASK_PIPELINES,
    check_prompt_or_question,
    is_server_failure,
    text_tensor,
    texts_of,
)

INSTALL = 'pip install "mmedge[triton]"'
DEFAULT_TIMEOUT = 120.0  # seconds one request may take (a long caption on a slow server)


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


class Connection:
    """One Triton server: ``infer`` and ``stream`` a model with numpy inputs, read its config and statistics.
    ``url``: ``http://HOST:PORT`` (default scheme) or ``grpc://HOST:PORT``."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        if not isinstance(url, str) or not url.strip():
            raise InputError(f"the server URL is {url!r}", "http://HOST:PORT or grpc://HOST:PORT", "pass e.g. http://127.0.0.1:8000")
        scheme, _, address = url.strip().rpartition("://")
        scheme = scheme.lower() or "http"
        if scheme not in ("http", "grpc") or not address:
            raise InputError(f"the server URL '{url}' is not one mmedge can use", "http://HOST:PORT or grpc://HOST:PORT",
                             "use http:// (port 8000 by default) or grpc:// (port 8001)")
        address = address.rstrip("/")
        host, colon, port = address.rpartition(":")
        if "/" in address or not colon or not port.isdigit() or not host or not 0 < int(port) < 65536:
            default = 8001 if scheme == "grpc" else 8000
            raise InputError(f"the server URL '{url}' has " + ("a path" if "/" in address else "no port" if not colon
                                                                 else f"no usable port ({port!r})"),
                             f"{scheme}://HOST:PORT, with nothing after the port (Triton listens for {scheme} on "
                             f"port {default} by default)", f"pass e.g. {scheme}://{host or address}:{default}")
        self.url, self.protocol, self.address, self.timeout = url, scheme, address, timeout
        self._module = _tritonclient(scheme)
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
        answers: queue.Queue = queue.Queue()
        with self._errors(model):
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
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
            client.stop_stream(cancel_requests=True)

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
        with response:
            try:
                for line in response:
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise self._refused(model, "500" if is_server_failure(event["error"]) else "400",
                                            event["error"])
                    yield {k: np.array([v.encode() if isinstance(v, str) else v], dtype=np.object_)
                           for k, v in event.items() if k in ("text",)}
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
        status = str(exc.status() or "")
        message = exc.message() or str(exc)
        if "DEADLINE_EXCEEDED" in status:
            return self._no_answer(status)
        if any(code in status for code in ("UNAVAILABLE", "CANCELLED")) or status.startswith("5"):
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
        if "INVALID_ARG" in status or status == "400":
            return ServerInputError(message, status=status)  # the pipeline's own message: what, expected, fix
        if "NOT_FOUND" in status or status == "404" or "unknown model" in message or "is not found" in message:
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
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file '{path}' does not exist" if not path.exists() else f"'{path}' is not a file",
                             "the path of an image file", "check the path")
        return path.read_bytes()
    from mmedge.images import load_image

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
        batch, single = _as_list(images)
        inputs = {"images": _image_tensor(batch), **self._generation(generation)}
        if prompt is not None:
            inputs["prompt"] = self._text("prompt", prompt)
        texts = texts_of("text", self._infer(inputs)["text"])
        return texts[0] if single else texts

    __call__ = caption

    def ask(self, image, question: str, **generation: Any):
        batch, single = _as_list(image)
        inputs = {"images": _image_tensor(batch), "question": self._text("question", question),
                  **self._generation(generation)}
        texts = texts_of("text", self._infer(inputs)["text"])
        return texts[0] if single else texts

    def generate(self, prompt: list, **generation: Any):
        """Continue an interleaved prompt (images and strings), or each of a list of such prompts."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InputError("generate() needs an interleaved prompt", "a non-empty list of images and strings",
                             "pass e.g. [image, 'An image of two cats.', image2, 'An image of']")
        batched = all(isinstance(p, (list, tuple)) for p in prompt)
        texts = [texts_of("text", self._infer({**_items(p), **self._generation(generation)})["text"])[0]
                 for p in (prompt if batched else [prompt])]
        return texts if batched else texts[0]

    def stream(self, image, prompt: str | None = None, question: str | None = None, **generation: Any) -> Iterator[str]:
        """The text of one image (+ ``prompt`` or ``question``, not both), or of one interleaved prompt list, in
        pieces."""
        check_prompt_or_question(prompt, question)
        refuse_prompt_batch(image)
        if isinstance(image, (list, tuple)):
            inputs = _items(image)
        else:
            inputs = {"images": _image_tensor([image])}
            if prompt is not None:
                inputs["prompt"] = self._text("prompt", prompt)
            if question is not None:
                inputs["question"] = self._text("question", question)
        inputs.update(self._generation(generation))
        if self.connection.protocol == "http":  # JSON: images as base64 text
            inputs = _base64_images(inputs)
        for outputs in self.connection.stream(self.model + STREAM_SUFFIX, inputs):
            for piece in texts_of("text", outputs["text"]):
                yield piece

    @staticmethod
    def _text(name: str, value: Any) -> np.ndarray:
        if not isinstance(value, str):
            raise InputError(f"{name} is a {type(value).__name__}", "a string", f"pass {name}='...'")
        return text_tensor([value])

    @staticmethod
    def _generation(settings: dict) -> dict[str, np.ndarray]:
        """The settings as given, None values too: the server's captioner reads None as not given, and refuses a
        misspelt name whatever its value, as the local one does."""
        return {"generation": text_tensor([json.dumps(settings)])} if settings else {}


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
    """The pipeline ``model`` on the Triton server at ``url`` (see the module docstring)."""
    connection = Connection(url, timeout)
    if task is not None and task not in TASK_PIPELINES:
        raise InputError(f"task '{task}' is unknown", f"one of {', '.join(TASK_PIPELINES)}",
                         "pass one of those, or no task")
    names = connection.models()
    candidates = [model] if task is None else []
    kinds = [TASK_PIPELINES[task]] if task else list(PIPELINES)
    candidates += [f"{model}-{kind}" for kind in kinds]
    for name in candidates:
        if name in names:
            settings = _pipeline_settings(connection, name)
            if settings is not None and (task is None or settings["kind"] == TASK_PIPELINES[task]):
                return REMOTE[settings["kind"]](connection, name, settings)
    pipelines = sorted(n for n in names if "__" not in n and not n.endswith(STREAM_SUFFIX))
    raise ServerError(f"the server at {url} has no mmedge pipeline '{model}'" + (f" for task '{task}'" if task else ""),
                      f"one of {', '.join(pipelines[:12]) or '(none)'}",
                      "pass a pipeline's name or its artifact's prefix")


def _pipeline_settings(connection: Connection, name: str) -> dict | None:
    parameters = connection.model_config(name).get("parameters") or {}
    entry = parameters.get(PARAMETER)
    if not entry:
        return None
    settings = json.loads(entry["string_value"])
    return settings if settings.get("kind") in REMOTE else None


__all__ = ["Connection", "RemoteCaptioner", "RemoteClassifier", "RemoteEmbedder", "RemotePipeline", "connect",
           "encode_image"]
