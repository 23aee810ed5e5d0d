"""CLIP zero-shot served by Triton vs the same pipeline in-process, on this CPU, over loopback.

The artifact is CLIP ViT-B/32 at full size, INT8 dynamic, with random weights (``clip_cpu.py``'s export into
benchmarks/out, made once, 36 s: timings only), or with ``--demo`` the shipped demo CLIP at FP32 (0.37 M
parameters: its in-process call takes about 1 ms, so it shows the served path's fixed cost per request). Labels are
chosen at run time: the server keeps their embeddings in its label cache, as the local pipeline does. The server is
the real ``tritonserver`` of the nvidia-pytriton wheel (tests/support/triton_server.py) serving ``mmedge triton
--platform python``: the zero-shot pipeline model is batched by Triton's dynamic batcher and runs the vision graph
for each batch through mmedge's ONNX Runtime runner in its own process (``--zero-shot-graphs inline``, the python
platform's default; ``bls`` calls the vision model instead, one more Python-backend hop). The in-process pipeline
runs ONNX Runtime with ``--threads`` (2) intra-op threads, each served graph with ``--server-threads`` (2; 1 with
``--demo``, whose tiny tower costs more server CPU per request with a second thread than it saves), and each request
is one encoded PNG scene and the 24 demo labels:

- latency at 1 client: per-request p50 / p90 served (HTTP and gRPC, ``mmedge.triton_client``) and in-process
  (``mmedge.load(...).probabilities``), and the served overhead (target: p50 overhead <= 2 ms); the four paths take
  turns in blocks of 10 requests, so drift of the machine does not land on one of them;
- throughput at 1, 4 and 8 clients (threads, each with its own client, for ``--seconds``): requests/s served and of
  one in-process pipeline shared by as many threads (target: served >= 1.0x in-process at 8 clients). The four
  paths take turns here too, ``--rounds`` (5) blocks each per client count, the order reversed every other round;
  a path's ratio is the median of its rounds' ratios to the in-process block of the same round.

The in-process side is measured twice: as ``mmedge.load`` runs by default (ONNX Runtime's intra-op threads spin
within a call and after it) and with spinning off (they sleep between one op's parallel sections and the next).
The served graphs spin within a call and stop when it returns. Ratios are against the default.

    python benchmarks/triton_cpu.py           # about 5 minutes; JSON in benchmarks/out/triton_cpu.json
    python benchmarks/triton_cpu.py --demo    # the demo CLIP, about 4 minutes
    python benchmarks/triton_cpu.py --artifact ART --json benchmarks/out/triton_cpu_art.json   # any CLIP artifact

CPU time per request (this process's: the clients, or the in-process pipeline; and the server's processes) shows
where a served request's cost goes on a machine whose cores the clients share with the server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mmedge  # noqa: E402
from _common import cpu_ticks, machine_info, markdown_table, package_versions, steal_share, write_json  # noqa: E402
from mmedge import demo  # noqa: E402
from mmedge.bench import samples_in_turns  # noqa: E402
from mmedge.cli_args import count, non_negative  # noqa: E402
from mmedge.triton import Options, write_repository  # noqa: E402
from mmedge.triton_client import connect  # noqa: E402
from tests.support.triton_server import TritonServer, server_env  # noqa: E402

CLIENTS = (1, 4, 8)


def export_clip(folder: Path) -> Path:
    """The demo CLIP at FP32 (reused when already exported)."""
    if (folder / "manifest.json").is_file():
        return folder
    from mmedge.export import export_model

    return export_model(str(demo.model_path("clip")), folder, progress=False)


def export_full_size(threads: int) -> Path:
    """CLIP ViT-B/32, INT8 dynamic, random weights: ``clip_cpu.py``'s export (reused when current)."""
    from clip_cpu import Variant, ensure_exported

    status = ensure_exported(Variant("int8-dynamic", "int8", "dynamic", False), threads, reexport=False)
    if status["error"]:
        raise SystemExit(f"the CLIP ViT-B/32 export failed:\n{status['error']}")
    return Path(status["path"])


def throughput(make_call, clients: int, seconds: float, server_pid: int | None = None) -> dict:
    """Requests per second of ``clients`` threads, each calling its own ``make_call()`` for ``seconds``, and the CPU
    milliseconds each request cost this process (the clients, or the in-process pipeline) and the server."""
    calls = [make_call() for _ in range(clients)]
    for call in calls:
        call()  # each client's connection and the server's label cache are warm
    counts = [0] * clients
    stop = threading.Event()
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        barrier.wait()
        while not stop.is_set():
            calls[i]()
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start, own, served = time.perf_counter(), time.process_time(), cpu_by_process(server_pid)
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    done, wall = sum(counts), time.perf_counter() - start
    parts = {name: (seconds - served.get(name, 0.0)) * 1e3 / done for name,
             seconds in cpu_by_process(server_pid).items()}
    return {"rps": done / wall, "cpu_ms_here": (time.process_time() - own) * 1e3 / done,
            "cpu_ms_server": sum(parts.values()),
            "cpu_ms_server_by_process": {k: v for k, v in parts.items() if v >= 0.005}}


def throughput_in_turns(paths: dict[str, tuple[Callable[[], Callable[[], Any]], int | None]], rounds: int,
                        seconds: float) -> dict[str, dict[int, dict]]:
    """``throughput`` of every path at each of ``CLIENTS``, the paths taking turns: ``rounds`` blocks each, the order
    reversed every other round, so the machine's slow and fast spells fall on all of them (a path measured minutes
    after another read 0.90x in one run and 1.1x in the next). ``paths``: name -> (``make_call``, the server's pid or
    None). Per path and client count: the medians of the rounds' figures (the server's CPU split by process is the
    median round's), each round's requests/s, and ``x_first``, the median over rounds of the path's requests/s over
    the first path's in the same round."""
    rounds_of: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in CLIENTS} for name in paths}
    for clients in CLIENTS:
        for round_ in range(rounds):
            for name in list(paths) if round_ % 2 == 0 else list(reversed(paths)):
                make_call, pid = paths[name]
                rounds_of[name][clients].append(throughput(make_call, clients, seconds, pid))
    first = next(iter(paths))
    out: dict[str, dict[int, dict]] = {}
    for name, by_clients in rounds_of.items():
        out[name] = {}
        for clients, blocks in by_clients.items():
            ratios = [b["rps"] / a["rps"] for b, a in zip(blocks, rounds_of[first][clients])]
            middle = sorted(blocks, key=lambda b: b["cpu_ms_server"])[len(blocks) // 2]  # its split by process
            out[name][clients] = {
                "rps": statistics.median(b["rps"] for b in blocks),
                "x_first": statistics.median(ratios),
                "cpu_ms_here": statistics.median(b["cpu_ms_here"] for b in blocks),
                "cpu_ms_server": middle["cpu_ms_server"],
                "cpu_ms_server_by_process": middle["cpu_ms_server_by_process"],
                "rounds_rps": [round(b["rps"], 2) for b in blocks],
                "rounds_x_first": [round(ratio, 3) for ratio in ratios]}
    return out


def cpu_by_process(pid: int | None) -> dict[str, float]:
    """User + system CPU seconds of tritonserver and of each of its Python-backend stubs (named by their model
    instance, e.g. ``clip-zero-shot_0_0``)."""
    import psutil

    if not pid:
        return {}
    out: dict[str, float] = {}
    try:
        server = psutil.Process(pid)
        for member in [server, *server.children(recursive=True)]:
            times = member.cpu_times()
            command = member.cmdline()  # a stub's: ... MODEL_INSTANCE_NAME DEFAULT
            name = "tritonserver" if member.pid == pid else (command[-2] if len(command) >= 2 else f"pid {member.pid}")
            out[name] = out.get(name, 0.0) + times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def positive_seconds(text: str) -> float:
    """A duration above zero, in seconds (argparse type: anything else is a usage error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value:g} is not a duration: expected seconds above 0")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=2,
                        help="ONNX Runtime intra-op threads of the in-process pipeline")
    parser.add_argument("--server-threads", type=count, default=None,
                        help="ONNX Runtime intra-op threads per served graph (default 2; 1 with --demo: the "
                             "server's parallelism is then its processes and batches)")
    parser.add_argument("--runs", type=count, default=300, help="timed requests per latency measurement")
    parser.add_argument("--seconds", type=positive_seconds, default=4.0, help="duration of each throughput block")
    parser.add_argument("--rounds", type=count, default=5, help="throughput blocks per path and client count, in turns")
    parser.add_argument("--queue-delay-us", type=non_negative, default=0, help="the dynamic batchers' delay")
    parser.add_argument("--zero-shot-graphs", default="auto", choices=["auto", "inline", "bls"],
                        help="where the zero-shot pipeline runs its graphs (mmedge triton --zero-shot-graphs)")
    parser.add_argument("--spin", action="store_true", help="served graphs' threads spin (mmedge triton --spin)")
    parser.add_argument("--pipeline-instances", type=count, default=1, help="processes per pipeline model")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--artifact", type=Path, default=None,
                       help="a CLIP artifact with two graphs (default: CLIP ViT-B/32 INT8 dynamic, random weights)")
    which.add_argument("--demo", action="store_true", help="the shipped demo CLIP at FP32, exported into --work")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "triton-cpu")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "triton_cpu.json")
    args = parser.parse_args(argv)
    if args.server_threads is None:
        args.server_threads = 1 if args.demo else 2

    artifact = args.artifact or (export_clip(args.work / "clip") if args.demo else export_full_size(args.threads))
    prefix = artifact.name
    labels = demo.labels()
    images = [path.read_bytes() for path in demo.images()]  # the encoded PNGs, as a client sends them
    local = mmedge.load(artifact, threads=args.threads)
    # the served components' ONNX Runtime setting (threads sleep, not spin, between calls), in-process too: on a
    # machine shared with other work, spinning threads cost the default in-process pipeline much more
    quiet = mmedge.load(artifact, threads=args.threads,
                        backend_options={"onnxruntime": {"config_entries": {"session.intra_op.allow_spinning": "0"}}})
    env = server_env()
    report = {"machine": machine_info(), "artifact": str(artifact),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "software": package_versions(["onnxruntime", "numpy",
                                            "tritonclient"]) | {"tritonserver": "2.51 (nvidia-pytriton 0.7.0)"}}
    with tempfile.TemporaryDirectory(prefix="mmedge-triton-bench-") as tmp:
        write_repository([artifact], Path(tmp) / "repo", Options(platform="python", threads=args.server_threads,
                                                                 queue_delay_us=args.queue_delay_us, workers=16,
                                                                 zero_shot_graphs=args.zero_shot_graphs,
                                                                 pipeline_instances=args.pipeline_instances,
                                                                 spin=args.spin))
        with TritonServer(Path(tmp) / "repo", env, Path(tmp) / "server.log") as server:
            urls = {"http": f"http://{server.http_url}", "grpc": f"grpc://{server.grpc_url}"}
            remote = {p: connect(url, prefix, task="zero-shot") for p, url in urls.items()}
            expected = local.probabilities(images, labels)
            for protocol, classifier in remote.items():  # the figures below are of correct answers
                assert np.abs(classifier.probabilities(images, labels) - expected).max() <= 1e-6, protocol
            ticks = cpu_ticks()
            counter = iter(range(10**9))

            def one_local():
                local.probabilities(images[next(counter) % len(images)], labels)

            def one_quiet():
                quiet.probabilities(images[next(counter) % len(images)], labels)

            def one_remote(classifier):
                return lambda: classifier.probabilities(images[next(counter) % len(images)], labels)

            # in turns, blocks of 10 opened by two untimed calls: this VM's in-process p50 moved between 19.5 and
            # 27.5 ms in runs minutes apart, and each path's threads wake after the others ran
            lat = samples_in_turns({"in-process": one_local, "in-process, no spinning": one_quiet,
                                    **{protocol: one_remote(c) for protocol, c in remote.items()}}, args.runs,
                                   block=10, hand_over=2, warmup=20)
            report["latency_ms"] = {k: {"p50": percentile(v, 50), "p90": percentile(v, 90), "mean": statistics.mean(v)}
                                    for k, v in lat.items()}
            paths = {"in-process": (lambda: one_local, None), "in-process, no spinning": (lambda: one_quiet, None),
                     **{protocol: (lambda url=url: one_remote(connect(url, prefix, task="zero-shot")),
                                   server.process.pid) for protocol, url in urls.items()}}
            report["throughput_rps"] = throughput_in_turns(paths, args.rounds, args.seconds)
            for model in (f"{prefix}-zero-shot", f"{prefix}__vision"):  # requests per execution
                stats = remote["grpc"].connection.statistics(model)
                report.setdefault("batches", {})[model] = {b["batch_size"]: int(b["compute_infer"]["count"])
                                                          for b in stats.get("batch_stats", [])}
            report["steal_share"] = round(steal_share(ticks, cpu_ticks()), 4)
            report["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    write_json(args.json, report)
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    lat, rates = report["latency_ms"], report["throughput_rps"]
    base = lat["in-process"]["p50"]
    print(f"machine: {report['machine']['cpu']}, {report['machine']['logical_cores']} cores, "
          f"{report['machine']['date']}, "
          f"load before {report['machine']['load_average_1m']}, after {report['load_average_1m_after']}, steal "
          f"{report['steal_share']:.1%}")
    print(markdown_table(["path", "p50 ms", "p90 ms", "p50 overhead ms"],
                         [[k, f"{v['p50']:.2f}", f"{v['p90']:.2f}", "–"
                           if k.startswith("in-process") else f"{v['p50'] - base:.2f}"]
                          for k, v in lat.items()]))
    print()
    print(markdown_table(["path", *(f"{n} client{'s' * (n > 1)} req/s" for n in CLIENTS),
                          *(f"x in-process at {n}" for n in CLIENTS),
                          "CPU ms/request at 8: clients or in-process", "server"],
                         [[k, *(f"{v[n]['rps']:.0f}" for n in CLIENTS),
                           *(f"{v[n]['x_first']:.2f}x" for n in CLIENTS),
                           f"{v[8]['cpu_ms_here']:.2f}", "–"
                           if k.startswith("in-process") else f"{v[8]['cpu_ms_server']:.2f}"]
                          for k, v in rates.items()]))
    print("\nx in-process at 8 clients, round by round: " + "; ".join(
        f"{k} {', '.join(f'{x:.2f}' for x in v[8]['rounds_x_first'])}" for k, v in rates.items() if k != "in-process"))
    for path, by_process in ((k, v[8].get("cpu_ms_server_by_process")) for k, v in rates.items()):
        if by_process:
            print(f"\n{path}: server CPU ms/request at 8 clients by process: "
                  + ", ".join(f"{name} {ms:.2f}" for name, ms in sorted(by_process.items(), key=lambda kv: -kv[1])))
    for model, batches in report["batches"].items():
        print(f"\n{model} executions by requests per batch: {batches or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
