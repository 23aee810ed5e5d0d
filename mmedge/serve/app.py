"""The ASGI app (Starlette): routes, the API-key check, metrics, and every error answered in OpenAI's shape.

With ``--api-key`` every endpoint but ``/health`` needs ``Authorization: Bearer KEY``; the web page (``/`` and
``/static/``) is static and holds no model data, so a browser can open it and the page sends the key it is given with
each API call.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mmedge.errors import ImageError, MmedgeError
from mmedge.serve import chat, clip
from mmedge.serve.errors import ApiError, from_mmedge, internal
from mmedge.serve.inputs import parse_json, read_body, undecodable
from mmedge.serve.metrics import Metrics, MetricsMiddleware
from mmedge.serve.models import ServedModel, find_model, model_named
from mmedge.serve.options import ServeOptions

log = logging.getLogger("mmedge.serve")
STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = ("/health", "/", "/favicon.ico")
ENDPOINTS = ("GET /, /health, /metrics, /v1/models, /v1/models/{id}; "
             "POST /v1/chat/completions, /v1/embeddings, /v1/classify")
PING_SECONDS = 15  # SSE comment lines keep a long stream's connection alive through proxies


@dataclass
class Serving:
    options: ServeOptions
    models: dict[str, ServedModel]
    metrics: Metrics
    cut_off: int = 0  # requests the server cut off as it stopped (past --drain-seconds, or a second Ctrl-C)


# --- endpoints -----------------------------------------------------------------------------------
async def page(request):
    return FileResponse(STATIC / "index.html")


async def health(request):
    return JSONResponse({"status": "ok", "models": list(request.app.state.serving.models)})


async def metrics(request):
    body, content_type = request.app.state.serving.metrics.render()
    return Response(body, media_type=content_type)


async def list_models(request):
    return JSONResponse({"object": "list", "data": [m.card for m in request.app.state.serving.models.values()]})


async def retrieve_model(request):
    """OpenAI's ``GET /v1/models/{model}``: the entry /v1/models lists for it."""
    model = model_named(request.app.state.serving.models, request.path_params["model_id"])
    request.state.model = model.id
    return JSONResponse(model.card)


async def _model_request(request, parse):
    """The body, read (413 past --max-body-mb), then parsed and checked by ``parse(data, model, options)`` in a worker
    thread, where its JSON, data URIs and prompts are decoded: for a body of large images that takes hundreds of ms,
    which on the event loop stalled every other client (``/health`` and streams included)."""
    serving = request.app.state.serving
    body = await read_body(request, serving.options.max_body_bytes)

    def parsed():
        data = parse_json(body)
        model = find_model(serving.models, data)
        request.state.model = model.id  # for the metrics, also when ``parse`` refuses the request
        return model, parse(data, model, serving.options)

    model, parsed_request = await run_in_threadpool(parsed)
    return serving, model, parsed_request


async def embeddings(request):
    _, model, call = await _model_request(request, clip.embeddings)
    # a client gone while its call waits frees its place at once, as a chat request's does
    return JSONResponse(await _unless_disconnected(request, model.calls.run(call)))


async def classify(request):
    _, model, call = await _model_request(request, clip.classify)
    return JSONResponse(await _unless_disconnected(request, model.calls.run(call)))


async def chat_completions(request):
    started = time.perf_counter()
    serving, model, job = await _model_request(request, chat.parse_chat)
    pieces = model.queue.stream(job.start)
    try:
        if job.stream:  # a refused input fails while waiting for the first piece, before any header is sent
            first = await _unless_disconnected(request, _first(pieces))
            serving.metrics.ttft.labels(model.id).observe(time.perf_counter() - started)
            return EventSourceResponse(_chunks(job, first, pieces, serving.metrics), ping=PING_SECONDS)
        text = await _unless_disconnected(request, _joined(pieces))
    except ImageError as exc:  # the captioner does not say which image: the answer names its field
        raise from_mmedge(exc, await run_in_threadpool(undecodable, job.images)) from exc
    body = job.completion(text)
    serving.metrics.tokens.labels(model.id).inc(body["usage"]["completion_tokens"])
    return JSONResponse(body)


async def _first(pieces) -> str:
    return await anext(pieces, "")


async def _joined(pieces) -> str:
    return "".join([piece async for piece in pieces])


async def _unless_disconnected(request, awaitable):
    """``await awaitable``, cancelled if the client goes away first: a request waiting in the queue, or generating
    without streaming, gives up its place; a stream's own disconnect watch is sse-starlette's."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientDisconnect()
    finally:
        gone.cancel()
        work.cancel()  # a no-op once done; otherwise the request gives up its place in the queue, or its generation


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _chunks(job: chat.ChatJob, first: str, pieces, metrics: Metrics):
    """OpenAI's chunks: the role, each piece as it comes, the finish reason, usage if asked, then [DONE]. A failure
    after the first piece is sent as an error event (OpenAI's clients raise it)."""
    try:
        yield job.chunk({"role": "assistant", "content": ""})
        if first:
            yield job.chunk({"content": first})
        async for piece in pieces:
            yield job.chunk({"content": piece})
    except MmedgeError as exc:
        yield json.dumps(from_mmedge(exc).body())
        return
    except Exception as exc:  # noqa: BLE001 - answered, and logged with its traceback
        log.exception("mmedge serve: a stream failed")
        yield json.dumps(internal(exc).body())
        return
    finally:
        await pieces.aclose()  # a client that went away: its generation stops and frees the captioner
    usage, finish = job.usage()
    metrics.tokens.labels(job.model.id).inc(usage["completion_tokens"])
    yield job.chunk({}, finish)
    if job.include_usage:
        yield job.chunk({}, usage=usage)
    yield "[DONE]"


# --- errors --------------------------------------------------------------------------------------
def _answer(request, error: ApiError) -> JSONResponse:
    request.state.error_code = error.code
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def api_error(request, exc: MmedgeError):
    return _answer(request, from_mmedge(exc))


async def http_error(request, exc: HTTPException):
    path = request.url.path[:100]
    if exc.status_code == 404:
        error = ApiError(404, f"there is no endpoint {path}", ENDPOINTS, "check the URL", code="not_found")
    elif exc.status_code == 405:
        error = ApiError(405, f"{request.method} is not allowed on {path}",
                         f"{(exc.headers or {}).get('Allow', 'another method')}",
                         "use the method the endpoint takes", code="method_not_allowed", headers=exc.headers)
    else:
        error = ApiError(exc.status_code, f"{request.method} {path} failed: {exc.detail}", None, None,
                         code="http_error")
    return _answer(request, error)


async def client_gone(request, exc: ClientDisconnect):
    request.state.error_code = "client_disconnected"
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the metrics count it


class InternalErrorMiddleware:
    """Pure ASGI middleware: what escapes the app is answered here, inside the metrics middleware so that it counts
    the answer with its code.

    - A bug in mmedge: 500 in OpenAI's shape, logged once. (Starlette runs an ``Exception`` handler in its outermost
      ServerErrorMiddleware, outside every added middleware, and re-raises: the metrics saw no code, and the traceback
      was logged twice.) A failure after the answer started is the stream's own to report (``_chunks``).
    - The server cutting a request off: uvicorn cancels the requests still running (waiting in a queue, generating,
      streaming) when its drain deadline passes or at a second Ctrl-C, and answered each with a plain-text 500 and a
      CancelledError traceback in the log. Here one not answered yet gets 503 ``shutting_down``, and a stream an error
      event that ends it (as ``_chunks`` reports a failure); the cancellation stops here, as the request is over.
    """

    def __init__(self, app, drain_seconds: float, serving: Serving):
        self.app, self.drain_seconds, self.serving = app, drain_seconds, serving

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = []  # the answer's content type, once its headers are sent

        async def sending(message):
            if message["type"] == "http.response.start":
                started.append(Headers(raw=message.get("headers", [])).get("content-type", ""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            self.serving.cut_off += 1  # on the event loop's thread: no lock needed
            error = ApiError(503, "the server is shutting down and cut this request off before its answer was complete",
                             f"a request answered within {self.drain_seconds:g} s of the server being told to stop "
                             "(SIGTERM or Ctrl-C), and before a second Ctrl-C",
                             "send the request again: another instance, or this one once restarted, will answer it",
                             code="shutting_down",
                             headers={"Retry-After": "1"})
            scope.setdefault("state", {})["error_code"] = error.code
            if not started:
                await JSONResponse(error.body(), status_code=error.status, headers=error.headers)(scope, receive, send)
            elif started[0].startswith("text/event-stream"):
                event = f"data: {json.dumps(error.body())}\r\n\r\n".encode()  # sse-starlette's framing
                await send({"type": "http.response.body", "body": event, "more_body": False})
            # else a JSON answer cut between its headers and its body (a client too slow to take them): uvicorn
            # closes the connection, which is all that is left to say
        except Exception as exc:  # noqa: BLE001 - answered, and logged with its traceback
            if started:
                raise
            log.error("mmedge serve: internal error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            error = internal(exc)
            scope.setdefault("state", {})["error_code"] = error.code
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


class ApiKeyMiddleware:
    """Pure ASGI middleware: with a key, every request but ``OPEN_PATHS`` and ``/static/`` needs ``Bearer KEY``."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if self.key is None or scope["type"] != "http" or path in OPEN_PATHS or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        if scheme and scheme.lower() != "bearer":
            what = f"the Authorization header uses the '{scheme[:20]}' scheme"
        else:
            what = "the API key is wrong" if token else "the request has no API key"
        error = ApiError(401, what, "an 'Authorization: Bearer KEY' header with the key the server was started with",
                         "send the server's --api-key as a bearer token", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        scope.setdefault("state", {})["error_code"] = error.code
        await JSONResponse(error.body(), status_code=401, headers=error.headers)(scope, receive, send)


def create_app(options: ServeOptions, models: dict[str, ServedModel]) -> Starlette:
    metrics_ = Metrics()
    for model in models.values():
        metrics_.watch_queue(model.queue or model.calls)
    routes = [Route("/", page), Route("/health", health), Route("/metrics", metrics), Route("/v1/models", list_models),
              Route("/v1/models/{model_id}", retrieve_model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/v1/classify", classify, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, exception_handlers={MmedgeError: api_error, HTTPException: http_error,
                                                       ClientDisconnect: client_gone})
    app.state.serving = Serving(options, models, metrics_)
    app.add_middleware(InternalErrorMiddleware, drain_seconds=options.drain_seconds, serving=app.state.serving)
    app.add_middleware(ApiKeyMiddleware, key=options.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics_)  # added last: outermost, so it also counts the 401s
    return app
