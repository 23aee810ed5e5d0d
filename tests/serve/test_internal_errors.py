"""A bug in mmedge (an exception no handler expects) is answered 500 in OpenAI's shape, counted in the metrics with its
code, and logged once; the app goes on serving."""

from __future__ import annotations

import logging

from starlette.testclient import TestClient

from mmedge.serve import clip
from mmedge.serve.app import create_app
from mmedge.serve.models import load_models
from mmedge.serve.options import ServeOptions


def test_an_unexpected_exception_is_answered_counted_and_logged_once(served_artifacts, monkeypatch, caplog):
    options = ServeOptions(artifacts=(served_artifacts["clip-tiny"],), threads=1)
    models = load_models(options)
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(clip, "classify", broken)
        with TestClient(create_app(options, models)) as client, caplog.at_level(logging.ERROR):
            answer = client.post("/v1/classify", json={"model": "clip-tiny", "images": [], "labels": ["a"]})
            assert answer.status_code == 500, answer.text
            error = answer.json()["error"]
            assert error["code"] == "internal_error" and "RuntimeError: a bug" in error["message"], error
            metrics = client.get("/metrics").text
            assert client.get("/health").status_code == 200
        counted = [line for line in metrics.splitlines() if line.startswith("mmedge_errors_total{")]
        assert counted == ['mmedge_errors_total{code="internal_error",endpoint="/v1/classify",status="500"} 1.0'], \
            counted
        logged = [record for record in caplog.records if "a bug" in str(record.exc_info and record.exc_info[1])]
        assert len(logged) == 1, [record.getMessage() for record in caplog.records]
    finally:
        for model in models.values():
            model.close()
