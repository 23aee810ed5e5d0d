"""The app in this process (Starlette's TestClient, one event loop), where a test can hold a request at a chosen point:
a request's body is parsed off the event loop, so other clients are answered meanwhile; CLIP requests are bounded
like generations (``--workers`` running, ``--max-queue`` waiting, then 503 ``queue_full``, counted in the metrics)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

from mmedge.serve import inputs
from mmedge.serve.app import create_app
from mmedge.serve.models import load_models
from mmedge.serve.options import ServeOptions
from tests.support.serve import data_uri, metric, wait_for

HANG = 60  # seconds: a bounded wait, so that a test of a blocked event loop fails instead of hanging


@pytest.fixture(scope="module")
def app(served_artifacts):
    """CLIP (texts and images) and BLIP-2, one request running and one waiting per model."""
    options = ServeOptions(artifacts=(served_artifacts["clip-tiny"], served_artifacts["blip2-fp32"]), threads=1,
                           workers=1, max_queue=1)
    models = load_models(options)
    try:
        with TestClient(create_app(options, models)) as client:
            yield client, models
    finally:
        for model in models.values():
            model.close()


def requests(scene) -> list[tuple[str, dict]]:
    image = data_uri(scene)
    return [("/v1/chat/completions", {"model": "blip2-fp32", "max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}),
            ("/v1/classify", {"model": "clip-tiny", "images": [image], "labels": ["a cat", "a dog"]}),
            ("/v1/embeddings", {"model": "clip-tiny", "images": [image]})]


@pytest.mark.parametrize("which", range(3), ids=["chat", "classify", "embeddings"])
def test_a_request_is_parsed_off_the_event_loop(app, scenes, monkeypatch, which):
    """A data URI is decoded while /health is asked: parsed on the event loop (as it was), the request held /health
    until it was done (a 26 MB image took ~300 ms, during which every other client waited)."""
    client, _ = app
    path, request = requests(scenes[0])[which]
    decoding, health_answered, seen = threading.Event(), threading.Event(), []
    decode = inputs._data_uri

    def held(url: str, param: str) -> bytes:  # the decoding, held until /health is answered (or HANG passes)
        decoding.set()
        seen.append(health_answered.wait(HANG))
        return decode(url, param)

    monkeypatch.setattr(inputs, "_data_uri", held)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, path, json=request)
        assert decoding.wait(HANG)
        assert client.get("/health").status_code == 200
        health_answered.set()
        assert answer.result(timeout=2 * HANG).status_code == 200
    assert seen == [True]  # /health was answered while the request's image was being decoded


def test_clip_requests_past_workers_and_queue_get_503(app, monkeypatch):
    """--workers 1, --max-queue 1: with one CLIP call running and one waiting, the next is refused 503 queue_full
    with Retry-After, as chat's queue refuses, and counted so in the metrics (CLIP calls ran without a bound: a few
    requests of large images took gigabytes)."""
    client, models = app
    embedder = models["clip-tiny"].clip["embed"]
    running, release = threading.Event(), threading.Event()
    embed = embedder.embed_texts

    def held(texts):  # the first call, held until the third request has been answered (or HANG passes)
        running.set()
        release.wait(HANG)
        return embed(texts)

    monkeypatch.setattr(embedder, "embed_texts", held)
    request = {"model": "clip-tiny", "input": ["a red circle"]}
    refused_before = metric(client, "mmedge_errors_total", endpoint="/v1/embeddings", status="503", code="queue_full")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/embeddings", json=request)
        assert running.wait(HANG)
        second = pool.submit(client.post, "/v1/embeddings", json=request)
        wait_for(lambda: metric(client, "mmedge_queue_depth", model="clip-tiny") == 1, HANG, "the second one queued")
        third = client.post("/v1/embeddings", json=request)
        release.set()
        assert first.result(timeout=HANG).status_code == 200 and second.result(timeout=HANG).status_code == 200
    assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1, third.text
    error = third.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "server_error", error
    assert "model 'clip-tiny' is busy: 1 running, 1 waiting" in error["message"] and "--max-queue" in error["message"]
    assert metric(client, "mmedge_errors_total", endpoint="/v1/embeddings", status="503",
                  code="queue_full") == refused_before + 1
    assert metric(client, "mmedge_queue_depth", model="clip-tiny") == 0
