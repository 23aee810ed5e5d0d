"""``mmedge bench``: latency, throughput and memory of artifacts on the chosen backend, and a picture of them.

Each artifact is measured in its own child process (``python -m mmedge.bench``), so one artifact's memory
never counts toward the next: the child loads the pipeline, warms it up, times single-image calls (latency)
and batched calls (throughput), and reports its resident memory. Sizes and fidelity against FP32 come from
the artifact (the manifest's parity, measured at export). ``--plot`` draws latency, size and fidelity of
every artifact side by side (needs matplotlib: ``pip install "mmedge[plot]"``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mmedge.errors import InputError, MmedgeError

GENERIC_LABELS = ("cat", "dog", "car", "tree", "person", "cup of coffee", "rocket", "clock")


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


def time_samples(fn, *, warmup: int = 0, runs: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times; each timed call's wall time in ms."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure(path: str, backend: str = "auto", device: str = "auto", threads: int | None = None, runs: int = 10,
            batch: int = 8, images: list[str] | None = None, labels: list[str] | None = None) -> dict:
    """Benchmark one artifact in this process: latency (batch 1), throughput (batch ``batch``), memory."""
    import mmedge
    from mmedge.artifact import Artifact

    images = images or _default_images()
    rss_before, _ = _rss_bytes()
    start = time.perf_counter()
    pipeline = mmedge.load(path, backend=backend, device=device, threads=threads)
    load_ms = (time.perf_counter() - start) * 1e3
    batch_images = [images[i % len(images)] for i in range(batch)]
    result: dict = {"artifact": str(path), "task": pipeline.task, "load_ms": round(load_ms, 1), "runs": runs, "batch": batch}
    with pipeline:
        if pipeline.task == "caption":
            one, many, unit = (lambda: pipeline.caption(images[0])), (lambda: pipeline.caption(batch_images)), "captions"
            text = pipeline.caption(images[0])
            ids, _ = pipeline.tokenizer.encode([text])
            result["caption"] = text
            result["caption_tokens"] = int(ids.shape[1])  # generated: the caption's tokens (BOS dropped) + EOS
        elif pipeline.task == "embed":
            one, many, unit = (lambda: pipeline.embed_images(images[0])), (lambda: pipeline.embed_images(batch_images)), "images"
        else:
            chosen = None if getattr(pipeline, "fused", False) else list(labels or GENERIC_LABELS)
            one, many, unit = (lambda: pipeline(images[0], labels=chosen)), (lambda: pipeline(batch_images, labels=chosen)), "images"
        one()  # warm-up: sessions allocate on the first run; label banks are built once
        many()
        latency = time_samples(one, runs=runs)
        batched = time_samples(many, runs=max(1, runs // 2))
        plan = {name: f"{c.backend} [{', '.join(c.providers)}]" for name, c in pipeline.plan.components.items()}
    rss_after, peak = _rss_bytes()
    artifact = Artifact.open(path)
    median = statistics.median(latency)
    result.update({
        "backend": plan, "latency_ms": {"median": round(median, 2), "min": round(min(latency), 2), "max": round(max(latency), 2)},
        "throughput": {"per_second": round(batch / (statistics.median(batched) / 1e3), 2), "unit": unit},
        "memory": {"rss_before_load_bytes": rss_before, "rss_after_bytes": rss_after, "peak_rss_bytes": peak},
        "size_bytes": artifact.size_bytes(), "precision": precision_label(artifact), "fidelity": fidelity(artifact),
    })
    if "caption_tokens" in result:
        result["decode_tokens_per_second"] = round(result["caption_tokens"] / (median / 1e3), 1)
    return result


def precision_label(artifact) -> str:
    """"fp32", "int8", or "int8 + int4 decoder" from the components' precisions."""
    precisions = {name: comp["precision"] for name, comp in artifact.components.items()}
    decoder = precisions.pop("decoder", None)
    label = "/".join(sorted(set(precisions.values()))) or "-"
    return label if decoder in (None, *precisions.values()) else f"{label} + {decoder} decoder"


def fidelity(artifact) -> dict:
    """Agreement with FP32 as the export measured it: 1.0 for an FP32 artifact, else the worst component."""
    shares = []
    for comp in artifact.components.values():
        measured = (comp["parity"].get("fidelity") or {})
        for key in ("top1_agreement", "greedy_identical_share"):
            if key in measured:
                shares.append((key, float(measured[key])))
    if all(c["precision"] == "fp32" for c in artifact.components.values()):
        return {"metric": "reference", "value": 1.0}
    if not shares:
        return {"metric": "unmeasured", "value": None}
    key, value = min(shares, key=lambda kv: kv[1])
    return {"metric": key, "value": value}


# --- the command ---------------------------------------------------------------------------------
def run_children(paths: list[str], args) -> list[dict]:
    """Measure each artifact in a fresh interpreter; a failure raises the child's error line."""
    results = []
    for path in paths:
        if not (Path(path) / "manifest.json").is_file():
            raise InputError(f"'{path}' is not an artifact folder", "a folder with manifest.json (made by mmedge export)",
                             "pass the folder `mmedge export` or `mmedge demo` wrote")
        options = {"backend": args.backend, "device": args.device, "threads": args.threads, "runs": args.runs,
                   "batch": args.batch, "images": args.image or None, "labels": args.labels}
        child = subprocess.run([sys.executable, "-m", "mmedge.bench", path, json.dumps(options)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
            raise MmedgeError(f"benchmarking '{path}' failed ({lines[-1] if lines else 'no output'})",
                              "an artifact that loads and runs on this backend", "run `mmedge validate` on it first")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return results


def format_table(results: list[dict]) -> str:
    header = ("artifact", "precision", "backend", "size", "latency (median)", "throughput", "peak RSS", "fidelity vs FP32")
    rows = []
    for r in results:
        backend = ", ".join(sorted(set(v.split(" ")[0] for v in r["backend"].values())))
        fid = r["fidelity"]
        fid_text = "reference" if fid["metric"] == "reference" else (
            "-" if fid["value"] is None else f"{fid['value']:.3f} {fid['metric'].replace('_', ' ')}")
        peak = r["memory"]["peak_rss_bytes"]
        rows.append((Path(r["artifact"]).name, r["precision"], backend, f"{r['size_bytes'] / 1e6:.2f} MB",
                     f"{r['latency_ms']['median']:.2f} ms", f"{r['throughput']['per_second']:.1f} {r['throughput']['unit']}/s",
                     "-" if peak is None else f"{peak / 2**20:.0f} MiB", fid_text))
    widths = [max(len(str(row[c])) for row in (header, *rows)) for c in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in (header, tuple("-" * w for w in widths), *rows))


def plot(results: list[dict], out: str) -> Path:
    """Bar charts of latency, size and fidelity vs FP32, one bar per artifact, saved as ``out`` (PNG, SVG, PDF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MmedgeError("--plot needs matplotlib, which is not installed", "matplotlib importable",
                          'pip install "mmedge[plot]" (or drop --plot)') from None
    names = [f"{Path(r['artifact']).name}\n{r['precision']}" for r in results]
    panels = [
        ("latency (ms, median, batch 1)", [r["latency_ms"]["median"] for r in results], "{:.1f}"),
        ("size (MB)", [r["size_bytes"] / 1e6 for r in results], "{:.2f}"),
        ("fidelity vs FP32 (share)", [r["fidelity"]["value"] or 0.0 for r in results], "{:.3f}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.6 * len(results) * 1.5, 3.8))
    for axis, (title, values, fmt) in zip(axes, panels):
        bars = axis.bar(range(len(values)), values, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"][:len(values)] * 4)
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(len(values)), names, fontsize=7)
        for bar, value in zip(bars, values):
            axis.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                          va="bottom", fontsize=7)
        if title.startswith("fidelity"):
            axis.set_ylim(0, 1.1)
    fig.suptitle("mmedge bench: " + ", ".join(sorted({str(v) for r in results for v in r["backend"].values()})), fontsize=9)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(args) -> int:
    """``mmedge bench ARTIFACT... [--plot out.png]``."""
    if args.runs < 1 or args.batch < 1:
        raise InputError(f"--runs {args.runs} --batch {args.batch}", "both at least 1", "pass e.g. --runs 10 --batch 8")
    results = run_children(args.artifacts, args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    return 0


def add_parser(sub, runtime_flags) -> None:
    bench = sub.add_parser("bench", help="latency, throughput and memory of artifacts; --plot compares them")
    bench.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="one or more artifact folders (e.g. FP32 and INT8)")
    bench.add_argument("--plot", metavar="OUT.png", help="draw latency, size and fidelity vs FP32 (needs matplotlib)")
    bench.add_argument("--runs", type=int, default=10, help="timed single-image calls per artifact")
    bench.add_argument("--batch", type=int, default=8, help="images per call for throughput")
    bench.add_argument("--image", action="append", help="image to run on (repeatable; default: the bundled demo scenes)")
    bench.add_argument("--labels", nargs="+", help="CLIP with two graphs: labels to classify against")
    runtime_flags(bench)
    bench.set_defaults(func=main)


def _child(argv: list[str]) -> int:
    """``python -m mmedge.bench ARTIFACT OPTIONS_JSON``: one artifact, one JSON line on stdout."""
    from mmedge.errors import MmedgeError as Error

    path, options = argv[0], json.loads(argv[1])
    try:
        print(json.dumps(measure(path, **options)))
    except Error as exc:
        print(f"mmedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
