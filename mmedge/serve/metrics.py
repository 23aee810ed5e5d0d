"""Prometheus metrics (``GET /metrics``, text format by ``prometheus_client``), in a registry of the app's own."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmedge.serve.queue import GenerationQueue

PREFIXES = (("/static/", "/static"), ("/v1/models/", "/v1/models/{id}"))  # one label for every id
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/classify")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmedge_requests", "HTTP requests answered", ["endpoint", "model", "status"],
                                registry=r)
        self.errors = Counter("mmedge_errors", "error answers", ["endpoint", "status", "code"], registry=r)
        self.latency = Histogram("mmedge_request_seconds", "time from request to the end of the answer",
                                 ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mmedge_time_to_first_token_seconds", "time from a chat request to its first text",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("mmedge_generated_tokens", "tokens of generated answers", ["model"], registry=r)
        self.queue_depth = Gauge("mmedge_queue_depth", "requests waiting for their turn (a captioner, or a CLIP call)",
                                 ["model"], registry=r)
        self.running = Gauge("mmedge_generations_running", "generations in progress", ["model"], registry=r)
        self.generations = Counter("mmedge_generations", "generations by how they ended: finished, cancelled (the "
                                   "client went away) or failed", ["model", "outcome"], registry=r)

    def watch_queue(self, queue) -> None:
        """A model's queue: its depth; for a GenerationQueue, its generations too."""
        self.queue_depth.labels(queue.model_id).set_function(lambda: queue.waiting)
        if isinstance(queue, GenerationQueue):
            self.running.labels(queue.model_id).set_function(lambda: queue.running)
            queue.on_done = lambda outcome: self.generations.labels(queue.model_id, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts each answer and times it to its last byte (streams included). Handlers name the
    model in ``request.state.model`` and error answers their code in ``request.state.error_code``."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})  # the dict request.state writes into, made here so that it is shared

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else next(
                (label for prefix, label in PREFIXES if path.startswith(prefix)), "other")
            model = state.get("model", "")
            self.metrics.requests.labels(endpoint, model, str(status[0])).inc()
            self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)
            if status[0] >= 400:
                self.metrics.errors.labels(endpoint, str(status[0]), state.get("error_code", "")).inc()
