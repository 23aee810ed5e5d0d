"""Load on loopback: 8 clients x 100 mixed requests answered as serial calls answer them, none lost; with --max-queue 2
some get 503 and none hang; a full queue, a client that leaves (queued or mid-stream) and SIGTERM while requests are in
flight, each observed through /metrics."""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mmedge import demo
from tests.support.blocked_imports import blocking
from tests.support.serve import API_KEY, Server, data_uri, metric, raw_post, wait_for

CLIENTS, REQUESTS = 8, 100
QUEUED_CLIENTS, QUEUED_REQUESTS = 8, 12
HANG = 120  # seconds: a request still unanswered by then has hung


def user(scene, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_uri(scene)}}]
    return [{"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}]


def mixed_requests(scenes) -> list[tuple[str, dict]]:
    """Distinct requests of four kinds: zero-shot, caption, streamed answer, text + image embeddings."""
    truth = demo.truth()["images"]
    out = []
    for scene in scenes:
        out.append(("classify", {"model": "clip-fp32", "images": [data_uri(scene)], "top_k": 3}))
        out.append(("chat", {"model": "blip2-fp32", "messages": user(scene)}))
        question = truth[scene.name]["questions"][0]["question"]
        out.append(("stream", {"model": "blip2-fp32", "messages": user(scene, question)}))
        out.append(("embed",
                    {"model": "clip-tiny", "input": [truth[scene.name]["caption"]], "images": [data_uri(scene)]}))
    return out


class Client:
    """One load client: its own openai client and its own raw HTTP connection."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=HANG)
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=HANG)

    def answer(self, kind: str, request: dict):
        if kind == "classify":
            return [(p["label"], p["score"]) for p in self._post("/v1/classify", request)["data"][0]["predictions"]]
        if kind == "embed":
            return [d["embedding"] for d in self._post("/v1/embeddings", request)["data"]]
        if kind == "chat":
            return self.openai.chat.completions.create(**request).choices[0].message.content
        chunks = self.openai.chat.completions.create(**request, stream=True)
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    def _post(self, path: str, request: dict) -> dict:
        answer = self.http.post(path, json=request)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def close(self):
        self.http.close()
        self.openai.close()


def test_8_clients_100_mixed_requests_answer_as_serial_calls(server, scenes):
    requests = mixed_requests(scenes)
    serial = Client(server.url)
    expected = [serial.answer(kind, request) for kind, request in requests]
    serial.close()

    def run(client_index: int) -> list:
        client = Client(server.url)
        try:
            got = []
            for i in range(REQUESTS):
                which = (client_index * REQUESTS + i) % len(requests)
                got.append((which, client.answer(*requests[which])))
            return got
        finally:
            client.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [f.result(timeout=HANG) for f in [pool.submit(run, c) for c in range(CLIENTS)]]
    answers = [pair for result in results for pair in result]
    assert len(answers) == CLIENTS * REQUESTS  # none lost
    for which, answer in answers:
        assert answer == expected[which], requests[which][0]


@pytest.fixture(scope="module")
def queued_server(served_artifacts, long_blip2):
    """One captioner per artifact and two places in its queue."""
    running = Server([served_artifacts["blip2-fp32"], long_blip2], "--workers", "1", "--max-queue", "2", "--threads",
                     "1")
    yield running
    assert running.stop() == 0, running.text()


@pytest.fixture(scope="module")
def queued_http(queued_server):
    with httpx.Client(base_url=queued_server.url, timeout=HANG) as client:
        yield client


def test_with_max_queue_2_some_get_503_and_none_hang(queued_server, queued_http, local, scenes):
    captions = {scene.name: local("blip2-fp32").caption(str(scene)) for scene in scenes}

    def run(client_index: int) -> list:
        with httpx.Client(base_url=queued_server.url, timeout=HANG) as client:
            out = []
            for i in range(QUEUED_REQUESTS):
                scene = scenes[(client_index + i) % len(scenes)]
                answer = client.post("/v1/chat/completions", json={"model": "blip2-fp32", "messages": user(scene)})
                out.append((scene.name, answer.status_code, answer.headers.get("retry-after"), answer.json()))
            return out

    with ThreadPoolExecutor(QUEUED_CLIENTS) as pool:
        answers = [a for f in [pool.submit(run, c) for c in range(QUEUED_CLIENTS)] for a in f.result(timeout=HANG)]
    assert len(answers) == QUEUED_CLIENTS * QUEUED_REQUESTS and {a[1] for a in answers} == {200, 503}
    for name, status, retry_after, body in answers:
        if status == 200:
            assert body["choices"][0]["message"]["content"] == captions[name]
        else:
            assert int(retry_after) >= 1 and body["error"]["code"] == "queue_full"
            assert "is busy" in body["error"]["message"] and "--max-queue" in body["error"]["message"]
    wait_for(lambda: metric(queued_http, "mmedge_queue_depth", model="blip2-fp32") == 0, what="an empty queue")


def long_stream(scene, tokens: int) -> dict:
    """A caption forced to ``tokens`` tokens from the random long-context BLIP-2: it lasts seconds."""
    return {"model": "blip2-long", "stream": True, "max_tokens": tokens, "min_tokens": tokens, "messages": user(scene)}


def test_full_queue_and_clients_that_leave(queued_server, queued_http, scenes):
    """A generating, B and C queued: D gets 503; C leaves and its place frees; A leaves mid-stream and its generation
    stops, so B runs at once; C never generates."""
    finished = metric(queued_http, "mmedge_generations_total", model="blip2-long", outcome="finished")
    with ThreadPoolExecutor(1) as pool, queued_http.stream("POST", "/v1/chat/completions",
                                                           json=long_stream(scenes[0], 3000)) as a:
        lines = a.iter_lines()  # kept: dropping the iterator would close A's connection here
        assert next(lines).startswith("data: ")  # A's first piece: A is generating
        b = pool.submit(queued_http.post, "/v1/chat/completions",
                        json={"model": "blip2-long", "max_tokens": 2, "messages": user(scenes[1])})
        c = raw_post(queued_server.url, "/v1/chat/completions", {"model": "blip2-long", "messages": user(scenes[2])})
        wait_for(lambda: metric(queued_http, "mmedge_queue_depth", model="blip2-long") == 2, what="B and C queued")
        d = queued_http.post("/v1/chat/completions", json={"model": "blip2-long", "messages": user(scenes[3])})
        assert d.status_code == 503 and int(d.headers["retry-after"]) >= 1 and d.json()["error"]["code"] == "queue_full"
        c.close()
        wait_for(lambda: metric(queued_http, "mmedge_queue_depth", model="blip2-long") == 1, what="C's place freed")
        a.close()  # A leaves mid-stream
        assert b.result(timeout=HANG).status_code == 200
    wait_for(lambda: metric(queued_http, "mmedge_generations_total", model="blip2-long", outcome="cancelled") == 1,
             what="A's generation cancelled")
    # B only
    assert metric(queued_http, "mmedge_generations_total", model="blip2-long", outcome="finished") == finished + 1
    assert metric(queued_http, "mmedge_generations_running", model="blip2-long") == 0


BLOCKED_TORCH = blocking("torch", "transformers") + textwrap.dedent("""
    from mmedge.cli import main
    code = main(sys.argv[1:])
    print("host modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")), flush=True)
    sys.exit(code)
""")


def test_sigterm_finishes_requests_in_flight_then_exits(long_blip2, scenes):
    """On a device without torch: SIGTERM while one stream runs and one request waits; both finish, then exit 0."""
    running = Server([long_blip2], "--workers", "1", "--threads", "1", launcher=[sys.executable, "-c", BLOCKED_TORCH])
    http = httpx.Client(base_url=running.url, timeout=HANG)
    request = {**long_stream(scenes[0], 600), "stream_options": {"include_usage": True}}
    try:
        with ThreadPoolExecutor(1) as pool, http.stream("POST", "/v1/chat/completions", json=request) as a:
            lines = a.iter_lines()  # kept: dropping the iterator would close A's connection here
            assert next(lines).startswith("data: ")
            b = pool.submit(http.post, "/v1/chat/completions",
                            json={"model": "blip2-long", "max_tokens": 3, "messages": user(scenes[1])})
            wait_for(lambda: metric(http, "mmedge_queue_depth", model="blip2-long") == 1, what="B queued")
            running.process.send_signal(signal.SIGTERM)
            after = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert len(after) > 10  # A went on streaming after SIGTERM
        assert after[-2]["choices"][0]["finish_reason"] == "length" and after[-1]["usage"]["completion_tokens"] > 0
        assert b.result(timeout=HANG).status_code == 200
        assert running.process.wait(timeout=HANG) == 0
    finally:
        http.close()
        running.stop()
    assert "SIGTERM: finishing the requests in flight" in running.text() and "mmedge serve: stopped" in running.text()
    assert "host modules: []" in running.text()  # the device side served without torch
    with pytest.raises(OSError):
        socket.create_connection((httpx.URL(running.url).host, httpx.URL(running.url).port), timeout=5)
