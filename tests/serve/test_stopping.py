"""Stopping a server with requests in flight (each test its own small server: it is sent signals). One Ctrl-C is a
graceful stop that exits 0, as SIGTERM is; requests still running when the drain deadline passes, or at a second
Ctrl-C, are answered 503 ``shutting_down`` in OpenAI's shape (a stream ends with that error event), with no
traceback in the log; a second Ctrl-C exits 130.

The server's generations are held after their first piece until their request is over (``HELD``), so that one is
surely in flight, and another queued behind it, when the deadline passes or the second Ctrl-C comes."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support.serve import Server, data_uri, metric, wait_for

HANG = 120  # seconds: a request still unanswered by then has hung

HELD = textwrap.dedent("""
    import sys

    import mmedge.serve.queue as queue

    produce = queue._produce

    def held(pipeline, call, emit, stop):
        def pieces(pipeline):
            stream = call(pipeline)
            try:
                for piece in stream:
                    yield piece
                    stop.wait()  # until the request is over
            finally:
                stream.close()
        return produce(pipeline, pieces, emit, stop)

    queue._produce = held
    from mmedge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def user(scene) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(scene)}}]}]


def stop_with_one_streaming_and_one_queued(long_blip2, scenes, drain_seconds: int, stop) -> tuple[Server, list, object]:
    """A server with stream A generating and request B queued behind it, ``stop(server)`` called: the events A got
    after that, B's answer and the server (exited)."""
    running = Server([long_blip2], "--workers", "1", "--threads", "1", "--drain-seconds", str(drain_seconds),
                     launcher=[sys.executable, "-c", HELD])
    http = httpx.Client(base_url=running.url, timeout=HANG)
    stream = {"model": "blip2-long", "stream": True, "max_tokens": 50, "messages": user(scenes[0])}
    try:
        with ThreadPoolExecutor(1) as pool, http.stream("POST", "/v1/chat/completions", json=stream) as a:
            lines = a.iter_lines()  # kept: dropping the iterator would close A's connection here
            assert next(lines).startswith("data: ")  # A is generating (held after its first piece)
            b = pool.submit(http.post, "/v1/chat/completions",
                            json={"model": "blip2-long", "messages": user(scenes[1])})
            wait_for(lambda: metric(http, "mmedge_queue_depth", model="blip2-long") == 1, what="B queued")
            stop(running)
            events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
            answer = b.result(timeout=HANG)
        running.process.wait(timeout=HANG)
    finally:
        http.close()
        running.stop()
    return running, events, answer


def assert_cut_off(events: list, answer: httpx.Response, log: str) -> None:
    """A's stream ended with the shutting_down error event, B was answered 503 in OpenAI's shape, nothing traced."""
    assert events and "error" in events[-1], events[-3:]
    assert events[-1]["error"]["code"] == "shutting_down" and "shutting down" in events[-1]["error"]["message"]
    assert answer.status_code == 503 and answer.headers["content-type"] == "application/json", answer.text
    assert int(answer.headers["retry-after"]) >= 1
    error = answer.json()["error"]
    assert error["code"] == "shutting_down" and "; expected " in error["message"] and "; fix: " in error["message"]
    assert "Traceback" not in log and "CancelledError" not in log and "Internal Server Error" not in log, log


def test_one_ctrl_c_stops_gracefully_and_the_deadline_answers_503(long_blip2, scenes):
    """Ctrl-C once: the requests in flight may finish (here they cannot: A is held, B waits behind it) until the drain
    deadline, then both are answered 503 shutting_down, and the process exits 0 as on SIGTERM (uvicorn re-raised the
    SIGINT it drained on: `mmedge: interrupted`, exit 130; the requests got a plain-text 500 and a traceback)."""
    def then_sigterm(server: Server) -> None:  # a second SIGTERM (an operator's) is said, and the drain goes on
        server.process.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT: finishing" in "".join(server.stderr), what="the Ctrl-C taken")
        server.process.send_signal(signal.SIGTERM)

    running, events, answer = stop_with_one_streaming_and_one_queued(long_blip2, scenes, 1, then_sigterm)
    log = running.text()
    assert running.process.returncode == 0, log
    assert "SIGINT: finishing the requests in flight, then exiting (at most 1 s;" in log  # --drain-seconds 1
    assert "SIGTERM again: still finishing the requests in flight (at most 1 s after the first signal" in log
    assert "--drain-seconds 1 passed; 2 requests still running answered 503 shutting_down" in log, log
    assert "timeout graceful shutdown exceeded" not in log  # uvicorn's own line, said in mmedge's words instead
    assert "mmedge serve: stopped" in log
    assert "interrupted" not in log
    assert_cut_off(events, answer, log)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(long_blip2, scenes):
    """Ctrl-C twice: the requests in flight are cut off at once (the drain deadline, --drain-seconds 60, is far),
    answered 503 shutting_down, and the process exits 130 (a CancelledError traceback was logged for each)."""
    def twice(server: Server) -> None:
        server.process.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT: finishing" in "".join(server.stderr), what="the first Ctrl-C taken")
        server.process.send_signal(signal.SIGINT)

    running, events, answer = stop_with_one_streaming_and_one_queued(long_blip2, scenes, 60, twice)
    log = running.text()
    assert running.process.returncode == 130, log
    assert "SIGINT again: stopping now" in log
    assert "mmedge serve: stopped at a second Ctrl-C; 2 requests still running answered 503 shutting_down" in log
    assert_cut_off(events, answer, log)
