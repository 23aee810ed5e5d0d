"""``mmedge bench``: latency, throughput and memory of artifacts on the chosen backend, and a picture of them.

Each artifact is measured in its own child process, so one artifact's memory never counts toward the next: the
child loads the pipeline (timed), warms it up, times single-image calls (latency) and batched calls (throughput),
each for at least ``MIN_SECONDS`` and ``--runs`` calls so that repeated benchmarks agree, and reports its resident
memory. The child imports the same installed mmedge whatever the working folder (``CHILD``). The precision is the one
the plan runs at (torch's ``dtype`` and LLM ``quantization`` included), the size the bytes of the files the chosen
backends read (``loaded_bytes``), and fidelity against FP32 the manifest's parity, measured at export, where the plan
runs the graphs at the precision it measured (``fidelity``). ``--plot`` draws them
(``mmedge.bench_plot``; needs matplotlib: ``pip install "mmedge[plot]"``). Only results go to stdout.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mmedge import errors
from mmedge.errors import ArtifactNotFoundError, InputError, MmedgeError

GENERIC_LABELS = ("cat", "dog", "car", "tree", "person", "cup of coffee", "rocket", "clock")
WARMUP_SECONDS = 0.5  # untimed calls first: thread pools, allocators and CPU clocks settle
MIN_SECONDS = 1.0  # each timed series lasts at least this long (and --runs calls) ...
SETTLED = 0.05  # ... and until the medians of its first and second half agree within 5% ...
MAX_SECONDS = 5.0  # ... or this long has passed (a busy machine: the result says it did not settle)
MAX_SAMPLES = 10_000
# The child's program: `python -m mmedge.bench` would put the working folder first on sys.path, where the folder
# holding a source checkout (or the checkout itself) has an `mmedge/` folder that shadows the installed package.
CHILD = "import sys; del sys.path[0]; from mmedge.bench import _child; sys.exit(_child(sys.argv[1:]))"


def artifact_name(path: str) -> str:
    """How the table and the plot name an artifact: its folder's name, also when given as `.` or `..`."""
    return Path(path).resolve().name


def _default_images() -> list[str]:
    from mmedge.demo import images

    return [str(p) for p in images()]


def _rss_bytes() -> tuple[int | None, int | None]:
    """(current, peak) resident memory of this process, from /proc (Linux) or getrusage."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        kib = lambda key: int(fields[key].split()[0]) * 1024 if key in fields else None  # noqa: E731
        return kib("VmRSS"), kib("VmHWM")
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, peak if sys.platform == "darwin" else peak * 1024
    except ImportError:  # Windows
        return None, None


def time_samples(fn, *, warmup: int = 0, runs: int, min_seconds: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then at least ``runs`` times and for at least ``min_seconds`` (at most
    ``MAX_SAMPLES`` calls); each timed call's wall time in ms (``clock``: seconds)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    begin = clock()
    while len(samples) < runs or (clock() - begin < min_seconds and len(samples) < MAX_SAMPLES):
        start = clock()
        fn()
        samples.append((clock() - start) * 1e3)
    return samples


def samples_in_turns(calls: dict[str, Callable[[], Any]], runs: int, *, block: int, hand_over: int, warmup: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """``runs`` timed calls (ms) of each of ``calls``, which take turns in blocks of ``block``, the order reversed
    every round, so a drifting machine weighs on all of them alike. Each block opens with ``hand_over`` untimed calls:
    what the one before left behind (threads still spinning, caches holding its data) falls on them, so each is timed
    as it runs on its own. ``warmup``: untimed calls of each first."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    round_ = 0
    while any(len(values) < runs for values in times.values()):
        for name in list(calls) if round_ % 2 == 0 else list(reversed(calls)):
            times[name] += time_samples(calls[name], warmup=hand_over, runs=min(block, runs - len(times[name])),
                                        clock=clock)
        round_ += 1
    return times


def settled_samples(fn, runs: int) -> tuple[list[float], bool]:
    """Timed calls of ``fn`` (ms): at least ``runs`` and ``MIN_SECONDS``, then more until the medians of the first and
    second half agree within ``SETTLED``, for at most ``MAX_SECONDS``; and whether they settled."""
    begin = time.perf_counter()
    samples = time_samples(fn, runs=runs, min_seconds=MIN_SECONDS)
    while (not (settled := _halves_agree(samples)) and time.perf_counter() - begin < MAX_SECONDS
           and len(samples) < MAX_SAMPLES):
        samples += time_samples(fn, runs=max(1, len(samples) // 4))
    return samples, settled


def _halves_agree(samples: list[float]) -> bool:
    half = len(samples) // 2
    if half < 2:
        return False
    first, second = statistics.median(samples[:half]), statistics.median(samples[half:])
    return abs(first - second) <= SETTLED * statistics.median(samples)


def measure(path: str, backend: str = "auto", device: str = "auto", threads: int | None = None, runs: int = 10,
            batch: int = 8, images: list[str] | None = None, labels: list[str] | None = None,
            backend_options: dict | None = None) -> dict:
    """Benchmark one artifact in this process: latency (batch 1), throughput (batch ``batch``), memory;
    ``backend_options`` as ``mmedge.load`` takes them (recorded in the result)."""
    import mmedge
    from mmedge.artifact import Artifact

    images = images or _default_images()
    rss_before, _ = _rss_bytes()
    start = time.perf_counter()
    pipeline = mmedge.load(path, backend=backend, device=device, threads=threads, backend_options=backend_options)
    load_ms = (time.perf_counter() - start) * 1e3
    batch_images = [images[i % len(images)] for i in range(batch)]
    result: dict = {"artifact": str(path), "task": pipeline.task, "load_ms": round(load_ms, 1), "runs": runs,
                    "batch": batch, "backend_options": backend_options or {}}
    with pipeline:
        if pipeline.task == "caption":
            one, many, unit = ((lambda: pipeline.caption(images[0])), (lambda: pipeline.caption(batch_images)),
                               "captions")
            text = pipeline.caption(images[0])
            ids, _ = pipeline.tokenizer.encode([text])
            result["caption"] = text
            result["caption_tokens"] = int(ids.shape[1])  # generated: the caption's tokens (BOS dropped) + EOS
        elif pipeline.task == "embed":
            one, many, unit = ((lambda: pipeline.embed_images(images[0])),
                               (lambda: pipeline.embed_images(batch_images)), "images")
        else:
            chosen = None if getattr(pipeline, "fused", False) else list(labels or GENERIC_LABELS)
            if chosen is not None and labels:
                result["labels"] = chosen
            one, many, unit = ((lambda: pipeline(images[0], labels=chosen)),
                               (lambda: pipeline(batch_images, labels=chosen)), "images")
        many()  # warm-up: sessions allocate on the first run; label banks are built once
        time_samples(one, runs=2, min_seconds=WARMUP_SECONDS)
        latency, latency_settled = settled_samples(one, runs)
        batched, batched_settled = settled_samples(many, max(1, runs // 2))
        chosen = pipeline.plan
    plan = {name: f"{c.backend} [{', '.join(c.providers)}]" if c.providers else c.backend
            for name, c in chosen.components.items()}
    precisions = {name: c.precision for name, c in chosen.components.items()}
    rss_after, peak = _rss_bytes()
    artifact = Artifact.open(path)
    median = statistics.median(latency)
    result.update({
        "backend": plan,
        "latency_ms": {"median": round(median, 2), "min": round(min(latency), 2), "max": round(max(latency), 2),
                                        "calls": len(latency)},
        "throughput": {"per_second": round(batch / (statistics.median(batched) / 1e3), 2), "unit": unit,
                       "calls": len(batched)},
        "settled": latency_settled and batched_settled,
        "memory": {"rss_before_load_bytes": rss_before, "rss_after_bytes": rss_after, "peak_rss_bytes": peak},
        "size_bytes": loaded_bytes(artifact, chosen, backend_options), "precision": precision_label(precisions),
        "fidelity": fidelity(artifact, precisions),
    })
    if "caption_tokens" in result:  # end to end: the caption's tokens over the whole call (vision, prefill, decode)
        result["caption_tokens_per_second"] = round(result["caption_tokens"] / (median / 1e3), 1)
    return result


def precision_label(precisions: dict[str, str]) -> str:
    """"fp32", "int8", "bf16", or "int8 + int4 decoder" from the precision each component runs at (the plan's)."""
    precisions = dict(precisions)
    decoder = precisions.pop("decoder", None)
    label = "/".join(sorted(set(precisions.values()))) or "-"
    return label if decoder in (None, *precisions.values()) else f"{label} + {decoder} decoder"


def fidelity(artifact, precisions: dict[str, str] | None = None) -> dict:
    """Agreement with FP32 as the export measured it: 1.0 where every component runs at FP32, else the worst
    component; "unmeasured" where the plan runs a component at a precision its graph was not measured at (torch at
    BF16, an FP32 graph at FP16). ``precisions``: the plan's, per component (default: the graphs')."""
    runs_at = {name: (precisions or {}).get(name) or comp["precision"] for name, comp in artifact.components.items()}
    if all(p == "fp32" for p in runs_at.values()):
        return {"metric": "reference", "value": 1.0}
    if any(runs_at[name].split(" ")[0] != comp["precision"] for name, comp in artifact.components.items()):
        return {"metric": "unmeasured", "value": None}
    shares = []
    for comp in artifact.components.values():
        measured = (comp["parity"].get("fidelity") or {})
        for key in ("top1_agreement", "greedy_identical_share"):
            if key in measured:
                shares.append((key, float(measured[key])))
    if not shares:
        return {"metric": "unmeasured", "value": None}
    key, value = min(shares, key=lambda kv: kv[1])
    return {"metric": key, "value": value}


def loaded_bytes(artifact, chosen, backend_options: dict | None = None) -> int:
    """Bytes of the files the plan ``chosen`` has its backends read: each component's graph (and external data) where
    a graph backend runs it (OpenVINO's exported IR instead where its ``weights`` setting names one), the PyTorch
    weights where torch runs any (``pytorch/``, or the ``checkpoint`` folder's config and safetensors with the
    artifact's reference tensors), the tokenizer and the embedding table; not the validation samples, not engines/."""
    from mmedge.memory import component_files

    options = backend_options or {}
    paths = component_files(artifact, chosen, options)
    paths.update(artifact.resolve_file(file, field) for field, file in artifact.named_files()
                 if not field.startswith(("components.", "validation.")))
    pytorch = artifact.manifest.get("pytorch") or {}
    if any(planned.backend == "torch" for planned in chosen.components.values()):
        checkpoint = (options.get("torch") or {}).get("checkpoint")
        if checkpoint:
            folder = Path(checkpoint).expanduser()
            paths.update((folder / "config.json", *folder.glob("*.safetensors")))
            if pytorch.get("reference_tensors"):
                paths.add(artifact.root / pytorch["folder"] / pytorch["reference_tensors"])
        elif pytorch:
            paths.update(artifact.root / pytorch["folder"] / file for file in pytorch["files"])
    return sum(path.stat().st_size for path in paths if path.is_file())


# --- the command ---------------------------------------------------------------------------------
def check_artifacts(paths: list[str], labels: list[str] | None) -> list[str]:
    """Every path is an artifact; the ones ``--labels`` goes to (two-graph zero-shot: labels chosen at run time), as
    ``--backend-option`` goes to the artifacts that use it. ``--labels`` that no artifact takes is refused."""
    from mmedge.artifact import Artifact

    takers, others = [], []
    for path in paths:
        if not (Path(path) / "manifest.json").is_file():
            raise ArtifactNotFoundError(f"'{path}' is not an artifact folder",
                             "a folder with manifest.json (made by mmedge export)",
                             "pass the folder `mmedge export` or `mmedge demo` wrote")
        manifest = Artifact.open(path).manifest
        if manifest["tasks"][0] == "zero-shot" and "zero_shot" not in manifest["components"]:
            takers.append(path)
        else:
            others.append(f"'{path}' ({manifest['family']} {manifest['tasks'][0]}"
                          + (", labels baked in" if "zero_shot" in manifest["components"] else "") + ")")
    if labels and not takers:
        raise InputError(f"--labels would change nothing for any artifact given: {', '.join(others)}",
                         "a zero-shot artifact with two graphs (labels chosen at run time) among the ARTIFACTs",
                         "drop --labels")
    return takers if labels else []


def run_children(paths: list[str], args, labelled: list[str] | None = None) -> list[dict]:
    """Measure each artifact in a fresh interpreter; a failure raises what the child said, with its cause.
    ``labelled``: the artifacts ``--labels`` goes to (``check_artifacts``; default: any that is given them)."""
    import mmedge
    from mmedge.backend_option_args import CliBackendOptions

    results = []
    # each artifact gets the --backend-option settings its plan uses; one no artifact uses is refused before any run
    settings = CliBackendOptions.from_args(args).per_artifact({path: path for path in paths}, args.backend,
                                                              args.device, args.threads)
    for path in paths:
        options = {"backend": args.backend, "device": args.device, "threads": args.threads, "runs": args.runs,
                   "batch": args.batch, "images": args.image or None,
                   "labels": args.labels if labelled is None or path in labelled else None,
                   "backend_options": settings.get(path)}
        child = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(options)], capture_output=True, text=True)
        if child.returncode != 0:
            if error := _child_error(path, child.stdout):
                raise error
            if os.environ.get("MMEDGE_DEBUG"):
                sys.stderr.write(child.stderr)
            if child.returncode == -signal.SIGKILL:  # what the kernel's OOM killer sends
                from mmedge.device import FREE_MEMORY

                raise errors.InsufficientMemoryError(
                    f"the process benchmarking '{path}' was killed (SIGKILL), most likely by the kernel's "
                    "out-of-memory killer", "the memory the artifact needs, free", FREE_MEMORY)
            lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {child.returncode}, no output"
            raise MmedgeError(f"the process benchmarking '{path}' failed before it could measure ({last})",
                              f"a Python ({sys.executable}) that imports the mmedge running here "
                              f"({Path(mmedge.__file__).parent})",
                              "check that `python -c \"import mmedge.bench\"` works here; rerun with MMEDGE_DEBUG=1 "
                              "for the child's traceback, and report it if mmedge is installed")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if not result["settled"]:
            print(f"mmedge: warning: the timings of '{path}' kept changing for {MAX_SECONDS:g} s (the "
                  "machine is busy?): "
                  "compare them with care", file=sys.stderr)
        results.append(result)
    return results


def _child_error(path: str, stdout: str) -> MmedgeError | None:
    """The mmedge error the child measuring ``path`` reported (``_child``), raised here as its own class (so with its
    exit code) and its own what, expected and fix, naming the artifact; None when it reported none."""
    try:
        said = json.loads(stdout.strip().splitlines()[-1])["error"]
        names, what, expected, fix = list(said["classes"]), str(said["what"]), said["expected"], said["fix"]
    except (IndexError, KeyError, TypeError, ValueError):
        return None
    kind = next((found for name in names if isinstance(found := getattr(errors, str(name), None), type)
                 and issubclass(found, MmedgeError)), MmedgeError)
    failed = "refused its input" if issubclass(kind, InputError) else "failed"  # an image that does not decode
    error = kind.__new__(kind)  # not kind(...): a few classes (ParityError) take other arguments
    MmedgeError.__init__(error, f"benchmarking '{path}' {failed}: {what}", expected, fix)
    return error  # its class (so its exit code) and its message: what the CLI reads of it


def format_table(results: list[dict]) -> str:
    header = ("artifact", "precision", "backend", "size", "load", "latency (median)", "throughput", "peak RSS",
              "fidelity vs FP32")
    rows = []
    for r in results:
        backend = ", ".join(sorted(set(v.split(" ")[0] for v in r["backend"].values())))
        settings = [f"{name}.{key}={value}" for name, chosen in (r.get("backend_options") or {}).items()
                    for key, value in chosen.items()]
        backend += f" ({', '.join(settings)})" if settings else ""
        fid = r["fidelity"]
        fid_text = "reference" if fid["metric"] == "reference" else (
            fid["metric"] if fid["value"] is None else f"{fid['value']:.3f} {fid['metric'].replace('_', ' ')}")
        peak = r["memory"]["peak_rss_bytes"]
        rows.append((artifact_name(r["artifact"]), r["precision"], backend, f"{r['size_bytes'] / 1e6:.2f} MB",
                     f"{r['load_ms']:.0f} ms", f"{r['latency_ms']['median']:.2f} ms",
                     f"{r['throughput']['per_second']:.1f} {r['throughput']['unit']}/s",
                     "-" if peak is None else f"{peak / 2**20:.0f} MiB", fid_text))
    widths = [max(len(str(row[c])) for row in (header, *rows)) for c in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in (header, tuple("-" * w for w in widths), *rows))


def main(args) -> int:
    """``mmedge bench ARTIFACT... [--plot out.png]``: results on stdout (a table, or JSON), messages on stderr."""
    if args.runs < 1 or args.batch < 1:
        raise InputError(f"--runs {args.runs} --batch {args.batch}", "both at least 1", "pass e.g. --runs 10 --batch 8")
    labelled = check_artifacts(args.artifacts, args.labels)
    from mmedge.images import checked_image_path

    for image in args.image or []:
        checked_image_path(image)  # before minutes of measuring, as `mmedge run` checks its images
    if args.plot:  # before minutes of measuring, not after
        from mmedge.bench_plot import check_plot_path, require_matplotlib

        check_plot_path(args.plot)
        require_matplotlib()
    results = run_children(args.artifacts, args, labelled)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    if args.plot:
        from mmedge.bench_plot import plot

        print(f"wrote {plot(results, args.plot)}", file=sys.stderr)
    return 0


def add_parser(sub, runtime_flags) -> None:
    from mmedge.cli_args import text

    bench = sub.add_parser("bench", help="latency, throughput and memory of artifacts; --plot compares them")
    bench.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                       help="one or more artifact folders (e.g. FP32 and INT8)")
    bench.add_argument("--plot", type=text, metavar="OUT.png",
                       help="draw latency, throughput, peak memory, size and fidelity vs FP32 "
                            "(PNG, SVG or PDF; needs matplotlib)")
    bench.add_argument("--runs", type=int, default=10,
                       help="timed single-image calls per artifact, at least (timing lasts at least "
                       f"{MIN_SECONDS:g} s)")
    bench.add_argument("--batch", type=int, default=8, help="images per call for throughput")
    bench.add_argument("--image", action="append", type=text,
                       help="image to run on (repeatable; default: the bundled demo scenes)")
    bench.add_argument("--labels", nargs="+", action="extend", type=text,
                       help="CLIP with two graphs: labels to classify against (given to the "
                            "artifacts that take them)")
    runtime_flags(bench)
    bench.set_defaults(func=main)


def _child(argv: list[str]) -> int:
    """``python -c CHILD ARTIFACT OPTIONS_JSON``: one artifact, one JSON line on stdout: its results, or the mmedge
    error it met (its class and those above it, what, expected, fix) for the parent to raise (``_child_error``)."""
    from mmedge.errors import MmedgeError as Error

    path, options = argv[0], json.loads(argv[1])
    try:
        print(json.dumps(measure(path, **options)))
    except Error as exc:
        print(f"mmedge: error: {exc}", file=sys.stderr)
        print(json.dumps({"error": {"classes": [kind.__name__ for kind in type(exc).__mro__], "what": exc.what,
                                    "expected": exc.expected, "fix": exc.fix}}))
        return exc.exit_code
    except Exception as exc:  # a bug, or a broken installation: the parent reports this line as the cause
        if os.environ.get("MMEDGE_DEBUG"):
            raise
        package = sys.modules.get("mmedge")
        where = getattr(package, "__file__", None) or list(getattr(package, "__path__", []))
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
              f"(this process imported mmedge from {where})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
