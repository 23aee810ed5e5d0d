"""`mmedge serve` on CPU: latency and throughput of calls served over loopback HTTP against the same calls in-process.

The shipped demo CLIP (fused zero-shot, 24 labels baked in) and BLIP-2 (FP32), exported into `mmedge demo`'s cache
when not there yet, are served by a real `mmedge serve` process on a free loopback port. For each call:

- zero-shot of one bundled scene: ``POST /v1/classify`` (the PNG as a data URI) against ``classifier(png_bytes)``;
- a caption: ``POST /v1/chat/completions`` against ``captioner.caption(png_bytes)``; streamed: time to the first piece;
- ``GET /health``: the HTTP round trip alone (uvicorn + Starlette + the client), no model.

Latency: p50 / p95 of ``--runs`` sequential calls on one keep-alive connection after warm-up, each served call followed
by the same call in-process (so both see the same load on a shared machine); overhead = served p50 - in-process p50
(target: at most 2 ms for the zero-shot call). The client is the standard library's ``http.client`` (what curl does:
one request, one answer); the zero-shot call is also timed through httpx, whose own cost shows beside it. The first
streamed piece is read with httpx. CPU time per call (client and server processes, every thread) is reported too: it
moves little when other work shares the machine. Throughput: ``--clients`` threads, each with its own connection,
against as many threads calling the pipeline in-process.

    python benchmarks/serve_cpu.py                 # ~1 min on 2 cores once the demo artifacts are cached
    python benchmarks/serve_cpu.py --quick         # smoke test (written to benchmarks/out/serve_cpu-quick.json)
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import psutil

import mmedge
from mmedge import demo
from mmedge.cli_args import count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, markdown_table, package_versions, write_json  # noqa: E402
from tests.support.serve import Server  # noqa: E402  (starts `mmedge serve --port 0` and waits for it)

OUT = Path(__file__).resolve().parent / "out" / "serve_cpu.json"  # a full run's figures (RESULTS.md)
QUICK_OUT = OUT.with_name("serve_cpu-quick.json")  # --quick's: a smoke test, not figures
TARGET_OVERHEAD_MS = 2.0


def demo_artifacts(cache: Path) -> dict[str, Path]:
    """The demo's clip-fp32 and blip2-fp32, from its cache (exported now if missing: needs mmedge[export])."""
    chosen = {}
    for variant in demo.variants():
        if variant.name in ("clip-fp32", "blip2-fp32"):
            folder, key = cache / variant.name, demo.cache_key(variant)
            if not demo.cached(folder, key):
                cache.mkdir(parents=True, exist_ok=True)
                demo.export_variant(variant, folder, key)
            chosen[variant.name] = folder
    return chosen


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"p50_ms": statistics.median(ordered), "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "runs": len(ordered)}


def paired_latency(served, local, warmup: int, runs: int) -> tuple[dict, dict]:
    """Served and in-process calls timed alternately, so that both see the same load on a shared machine."""
    for _ in range(warmup):
        served(), local()
    samples: tuple[list, list] = ([], [])
    for _ in range(runs):
        for call, kept in ((served, samples[0]), (local, samples[1])):
            start = time.perf_counter()
            call()
            kept.append((time.perf_counter() - start) * 1e3)
    return percentiles(samples[0]), percentiles(samples[1])


def cpu_ms_per_call(call, runs: int, *pids: int) -> float:
    """CPU time (user + system, every thread) of this process and ``pids`` per call: unlike wall time, barely moved
    by other work on a shared machine."""
    processes = [psutil.Process()] + [psutil.Process(pid) for pid in pids]

    def total() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in processes)

    before = total()
    for _ in range(runs):
        call()
    return (total() - before) * 1e3 / runs


def throughput(make_call, clients: int, per_client: int) -> float:
    """Calls per second with ``clients`` threads, each running ``make_call()``'s call ``per_client`` times."""
    calls = [make_call() for _ in range(clients)]
    for call in calls:
        call()  # warm each connection
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(lambda c=c: [c() for _ in range(per_client)]) for c in calls]:
            future.result()
    return clients * per_client / (time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``json`` resolved: a quick run never writes over the full run's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=demo.default_cache(),
                        help="the demo cache (default: mmedge demo's)")
    parser.add_argument("--runs", type=count, default=None,
                        help="sequential calls per latency figure (default 400; a quarter of them for captions)")
    parser.add_argument("--clients", type=count, default=4, help="concurrent clients for throughput")
    parser.add_argument("--threads", type=count, default=None,
                        help="CPU threads per graph, served and in-process (default: all)")
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke test, not figures")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default benchmarks/out/serve_cpu.json; with --quick "
                             "benchmarks/out/serve_cpu-quick.json)")
    args = parser.parse_args(argv)
    if args.quick and args.runs is not None:
        parser.error("--runs does nothing with --quick (20 calls per latency figure): give one or the other")
    args.json = args.json or (QUICK_OUT if args.quick else OUT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs, warmup = (20, 3) if args.quick else (args.runs or 400, 30)
    caption_runs = max(runs // 4, 1)  # captions take longer: a quarter as many, at least one
    per_client = 10 if args.quick else 100
    artifacts = demo_artifacts(args.cache)
    scene = demo.images()[1]
    png = scene.read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    classify = {"model": "clip-fp32", "images": [uri], "top_k": 5}
    caption = {"model": "blip2-fp32",
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}]}]}
    info = {"machine": machine_info(),
            "software": package_versions(["onnxruntime", "starlette", "uvicorn", "sse-starlette",
                                                                     "httpx", "numpy"]),
            "command": " ".join(["python", "benchmarks/serve_cpu.py", *sys.argv[1:]]), "scene": scene.name,
            "runs": runs}
    threads = ["--threads", str(args.threads)] if args.threads else []
    server = Server(list(artifacts.values()), *threads)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client, \
                mmedge.load(artifacts["clip-fp32"], threads=args.threads) as classifier, \
                mmedge.load(artifacts["blip2-fp32"], threads=args.threads) as captioner:
            raw = Raw(server.url)
            zero_shot, chat = (lambda: raw.post("/v1/classify",
                                                classify)), (lambda: raw.post("/v1/chat/completions", caption))
            local_zero_shot, local_caption = (lambda: classifier(png, top_k=5)), (lambda: captioner.caption(png))
            served, local = {}, {}
            served["zero-shot"], local["zero-shot"] = paired_latency(zero_shot, local_zero_shot, warmup, runs)
            served["zero-shot, httpx"], _ = paired_latency(
                lambda: client.post("/v1/classify", json=classify).raise_for_status(), local_zero_shot, warmup, runs)
            served["caption"], local["caption"] = paired_latency(chat, local_caption, warmup, caption_runs)
            served["first piece"], local["first piece"] = paired_latency(
                lambda: first_piece(client, caption), lambda: first_local_piece(captioner, png), warmup, caption_runs)
            served["health"], _ = paired_latency(lambda: raw.get("/health"), lambda: None, warmup, runs)
            pid = server.process.pid
            cpu = {"served zero-shot": cpu_ms_per_call(zero_shot, runs, pid),
                   "in-process zero-shot": cpu_ms_per_call(local_zero_shot, runs),
                   "served caption": cpu_ms_per_call(chat, caption_runs, pid),
                   "in-process caption": cpu_ms_per_call(local_caption, caption_runs)}
            same = (zero_shot()["data"][0]["predictions"] == local_zero_shot(),
                    chat()["choices"][0]["message"]["content"] == local_caption())
            served_rps = {"zero-shot": throughput(lambda: partial(Raw(server.url).post, "/v1/classify", classify),
                                                  args.clients, per_client),
                          "caption": throughput(lambda: partial(Raw(server.url).post, "/v1/chat/completions", caption),
                                                args.clients, per_client // 4)}
            local_rps = {"zero-shot": throughput(lambda: local_zero_shot, args.clients, per_client),
                         "caption": throughput(lambda: local_caption, args.clients, per_client // 4)}
    finally:
        server.stop()
    report = {**info, "served": served, "in_process": local, "cpu_ms_per_call": cpu, "served_rps": served_rps,
              "in_process_rps": local_rps,
              "same_answers": {"zero-shot": same[0], "caption": same[1]},
              "zero_shot_overhead_p50_ms": served["zero-shot"]["p50_ms"] - local["zero-shot"]["p50_ms"]}
    write_json(args.json, report)
    print(format_report(report))
    return 0


class Raw:
    """A lean keep-alive HTTP client (the standard library's http.client): the request as curl would send it."""

    def __init__(self, url: str):
        address = httpx.URL(url)
        self.connection = http.client.HTTPConnection(address.host, address.port, timeout=60)

    def post(self, path: str, body: dict) -> dict:
        self.connection.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return self._answer()

    def get(self, path: str) -> dict:
        self.connection.request("GET", path)
        return self._answer()

    def _answer(self) -> dict:
        answer = self.connection.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {body[:200]!r}")
        return json.loads(body)


def first_piece(client: httpx.Client, body: dict) -> None:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                return


def first_local_piece(captioner, png: bytes) -> None:
    pieces = captioner.stream(png)
    next(pieces)
    pieces.close()  # releases the captioner for the next call


def format_report(r: dict) -> str:
    rows = []
    for name in ("zero-shot", "zero-shot, httpx", "caption", "first piece"):
        s, p = r["served"][name], r["in_process"][name.split(",")[0]]
        rps = (f"{r['served_rps'][name]:.0f}",
               f"{r['in_process_rps'][name]:.0f}") if name in r["served_rps"] else ("-", "-")
        rows.append((name, f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{p['p50_ms']:.2f}", f"{p['p95_ms']:.2f}",
                     f"{s['p50_ms'] - p['p50_ms']:+.2f}", *rps))
    h = r["served"]["health"]
    rows.append(("GET /health (no model)", f"{h['p50_ms']:.2f}", f"{h['p95_ms']:.2f}", "-", "-", "-", "-", "-"))
    table = markdown_table(("call", "served p50 ms", "served p95 ms", "in-process p50 ms", "in-process p95 ms",
                            "overhead p50 ms", "served req/s", "in-process calls/s"), rows)
    m = r["machine"]
    cpu = r["cpu_ms_per_call"]
    cpu_line = ("CPU time per call (client + server, all threads): zero-shot served "
                f"{cpu['served zero-shot']:.2f} ms vs "
                f"in-process {cpu['in-process zero-shot']:.2f} ms; caption served {cpu['served caption']:.2f} ms vs "
                f"in-process {cpu['in-process caption']:.2f} ms")
    verdict = "met" if r["zero_shot_overhead_p50_ms"] <= TARGET_OVERHEAD_MS else "NOT met"
    return (f"{m['cpu']}, {m['logical_cores']} cores, load {m['load_average_1m']} at start, {m['date']}\n{table}\n"
            f"zero-shot overhead p50 {r['zero_shot_overhead_p50_ms']:.2f} ms (target <= {TARGET_OVERHEAD_MS} ms: "
            f"{verdict}); "
            f"served answers equal in-process: {json.dumps(r['same_answers'])}\n{cpu_line}")


if __name__ == "__main__":
    sys.exit(main())
