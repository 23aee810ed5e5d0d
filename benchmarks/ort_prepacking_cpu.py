"""ONNX Runtime weight prepacking on the CPU: memory held after a load against speed, A/B within mmedge.

ONNX Runtime's CPU kernels (MatMul/Gemm, MatMulNBits, ...) copy their constant weights into packed GEMM layouts when
a session is built ("prepacking"); the packed copies are heap memory. ``session.disable_prepacking=1`` skips that:
the kernels read the weights as stored and pack blocks at each call. Whether that keeps the weights off the heap
depends on where they are: a graph's *external data* (``<graph>.onnx.data``, what ``mmedge export`` writes for graphs
over 32 MiB since this benchmark's first run, over 1.8 GB before) is memory-mapped by ONNX Runtime, so unpacked
weights stay file-backed pages the kernel may evict and read again; weights *inside* the .onnx protobuf are copied to
the heap whatever is set. The ``inside .onnx`` and ``external`` rows of one model are the same graphs in the two
layouts, whatever the export under ``--out`` has: they measure that change itself.

Each case runs in a fresh process (clean RSS): ``mmedge.load(artifact, backend="onnxruntime", threads=N,
backend_options={"onnxruntime": {"config_entries": {...}}})``, then the model's own call, ``--warmup`` untimed and
``--runs`` timed (medians): CLIP zero-shot (``probabilities``: the image tower, the label bank cached), BLIP-2 caption
(time to first token and decode tok/s over 32 forced new tokens, as benchmarks/caption_cpu.py measures them),
IDEFICS ``generate`` on the demo's first prompt (whole call). Read from /proc/self/status: VmRSS, RssAnon and RssFile
after the load and after the calls, VmHWM (peak) at the end. Outputs (tokens, answers, probabilities) are compared
with the default case's.

Cases:

- ``default``: the artifact as exported, ONNX Runtime's defaults (prepacking on);
- ``no-prepack``: the same with ``session.disable_prepacking=1``;
- on the benchmark-size models only, three derived copies of the artifact, under ``--out``: ``inside .onnx`` (every
  weight inside each graph file, the reference) and ``external`` (each graph re-saved with its weights in
  ``<graph>.onnx.data``, as the exporter now writes graphs over 32 MiB), each under ``default`` and ``no-prepack``;
  and ``prepacked-file``: each graph as ONNX Runtime optimized it for
  this CPU, saved with ``session.save_external_prepacked_constant_initializers=1`` (the packed weights written to
  the .onnx.data file, memory-mapped at load instead of packed into the heap; the file is CPU-specific, like
  engines/ caches, and the ORT warns that the optimized graph only fits the machine that wrote it).

Artifacts: the demo's cache (``mmedge demo`` exports it to ~/.cache/mmedge/demo on its first run; missing variants
are exported here the demo's way) and the benchmark-size FP32 exports of ``mmedge/blip2-vitb-opt125m`` and
``openai/clip-vit-base-patch32`` (random weights), shared with caption_cpu.py / clip_cpu.py under ``--out`` (exported
here if absent: ~40 s and ~25 s on 2 cores). Files stay in the page cache (a warm disk); each artifact is loaded once
untimed first so that the sha256 record (mmedge.file_checks) is written and loads are not timed hashing.

    python benchmarks/ort_prepacking_cpu.py                 # ~75 s on 2 cores with cached exports
    python benchmarks/ort_prepacking_cpu.py --quick         # smoke test: 1 warm-up, 2 timed calls
    python benchmarks/ort_prepacking_cpu.py --no-mid        # demo artifacts only (tiny graphs: speed, not memory)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

from _common import error_text, export_once, first_line, machine_info, markdown_table, package_versions, write_json
from mmedge.cli_args import count

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHOTO = ROOT / "export" / "data" / "images" / "holdout-chelsea.jpg"
NEW_TOKENS = 32
CLIP_LABELS = ["cat", "dog", "astronaut", "cup of coffee", "rocket", "horse", "car", "tree", "building", "bird"]
DEMO = ["clip-fp32", "clip-int8", "blip2-fp32", "blip2-int4", "idefics-fp32", "idefics-int4"]
MID = {"blip2-vitb-opt125m-fp32": "mmedge/blip2-vitb-opt125m", "clip-b32-fp32": "openai/clip-vit-base-patch32"}
NO_PREPACK = {"session.disable_prepacking": "1"}
PREPACK_SAVE = {"session.save_external_prepacked_constant_initializers": "1"}
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


# --- the measuring child ----------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(value.split()[0]) * 1024
    return out


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)


def child(artifact: str, entries: dict, threads: int, warmup: int, runs: int) -> dict:
    import mmedge
    from mmedge.api import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    options = {"onnxruntime": {"config_entries": entries}} if entries else None
    start = time.perf_counter()
    pipeline = mmedge.load(artifact, backend="onnxruntime", threads=threads, backend_options=options)
    result = {"load_s": time.perf_counter() - start, "after_load": proc_status()}
    family = pipeline.artifact.manifest["family"]
    with pipeline:
        if family == "clip":
            result.update(_clip(pipeline, warmup, runs))
        elif family == "blip2":
            result.update(_blip2(pipeline, warmup, runs))
        elif family == "idefics":
            result.update(_idefics(pipeline, warmup, runs))
        else:
            raise SystemExit(f"no workload for family {family}")
        result["after_calls"] = proc_status()
    return result


def _timed(fn, warmup: int, runs: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        fn()
    samples, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples, out


def _clip(pipeline, warmup: int, runs: int) -> dict:
    from PIL import Image

    photo = Image.open(PHOTO).convert("RGB")
    labels = None if pipeline.fused else CLIP_LABELS  # a fused graph has its labels baked in
    pipeline.probabilities(photo, labels)  # the label bank (text tower) once: later calls run the image tower
    samples, probs = _timed(lambda: pipeline.probabilities(photo, labels), warmup, runs)
    return {"call": "zero-shot (image tower)", "call_ms": median_of(samples), "samples_ms": samples,
            "output": [float(p) for p in probs[0]]}


def _blip2(pipeline, warmup: int, runs: int) -> dict:
    from caption_cpu import Iterations, generation_config, measure_captions, mmedge_caption
    from PIL import Image

    from _common import TokenClock

    if NEW_TOKENS != __import__("caption_cpu").NEW_TOKENS:
        raise SystemExit("caption_cpu.NEW_TOKENS changed")
    photo = Image.open(PHOTO).convert("RGB")
    config = generation_config(pipeline)
    clock = TokenClock(pipeline.decoder)
    timings, tokens = measure_captions(lambda: mmedge_caption(pipeline, clock, photo, config),
                                       Iterations(warmup=warmup, runs=runs, io_binding_runs=0))
    return {"call": f"caption ({NEW_TOKENS} tokens)", "call_ms": timings["total_ms"]["median"],
            "ttft_ms": timings["ttft_ms"]["median"], "decode_tok_s": timings["decode_tok_s"]["median"],
            "step_ms": timings.get("step_ms", {}).get("median"), "output": tokens,
            "text": pipeline.tokenizer.decode(tokens) if hasattr(pipeline, "tokenizer") else None}


def _idefics(pipeline, warmup: int, runs: int) -> dict:
    from mmedge.demo import idefics_prompts, images

    prompt = idefics_prompts(images(1))[0]["prompt"]
    samples, answer = _timed(lambda: pipeline.generate(prompt), warmup, runs)
    return {"call": "generate (demo prompt 1)", "call_ms": median_of(samples), "samples_ms": samples,
            "output": answer}


# --- artifacts ------------------------------------------------------------------------------------------------------
def ensure_demo(cache: Path, export_missing: bool) -> dict[str, Path]:
    """The demo artifacts in ``cache``; missing ones exported the demo's way (``mmedge demo`` does the same)."""
    from mmedge import demo

    found = {}
    by_name = {v.name: v for v in demo.variants()}
    for name in DEMO:
        folder, variant = cache / name, by_name[name]
        if not demo.cached(folder, demo.cache_key(variant)):
            if not export_missing:
                print(f"{folder}: not in the demo cache (run `mmedge demo` once, or drop --no-export)", file=sys.stderr)
                continue
            print(f"exporting demo {name} -> {folder}", file=sys.stderr)
            demo.export_variant(variant, folder, demo.cache_key(variant))
        found[name] = folder
    return found


def ensure_mid(out: Path, threads: int, export_missing: bool) -> dict[str, Path]:
    """The benchmark-size FP32 exports (caption_cpu.py's and clip_cpu.py's folder names: shared caches)."""
    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError
    from mmedge.export import export_model

    found = {}
    for name, model in MID.items():
        folder = out / name
        try:
            manifest = Artifact.open(folder).manifest
            cached = (manifest["source"]["model"] == model and manifest["source"]["random_weights"]
                      and all(c["precision"] == "fp32" for c in manifest["components"].values()))
        except MmedgeError:
            cached = False
        if not cached and not export_missing:
            print(f"{folder}: missing (drop --no-export)", file=sys.stderr)
            continue
        extra = {"llm_precision": "fp32"} if "blip2" in model else {}
        status = export_once(name, folder, cached, lambda: export_model(
            model, folder, random_weights=True, progress=False, overwrite=True, threads=threads, precision="fp32",
            **extra))
        if status["error"]:
            continue
        found[name] = folder
    return found


def derive(source: Path, target: Path, kind: str, threads: int) -> Path:
    """A copy of ``source`` whose graphs are re-saved: ``inline`` (every weight inside the .onnx), ``external``
    (weights in <graph>.onnx.data, as ``mmedge export`` now writes graphs over 32 MiB) or
    ``prepacked-file`` (ONNX Runtime's optimized graph with its prepacked weights in <graph>.onnx.data); the other
    files hard-linked, the manifest's file entries (sha256, sizes) rewritten. Reused while the source is unchanged."""
    import onnx
    import onnxruntime as ort

    from mmedge.artifact import sha256_file
    from mmedge.runtimes.onnxruntime import OrtOptions
    from mmedge.runtimes.ort_session import session_options

    stamp_text = f"{kind} {sha256_file(source / 'manifest.json')} onnxruntime {ort.__version__}"
    stamp = target / ".derived-from"
    if stamp.is_file() and stamp.read_text() == stamp_text:
        return target
    print(f"deriving {target.name} ({kind})", file=sys.stderr)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    manifest = json.loads((source / "manifest.json").read_text())
    graphs = {c["file"] for c in manifest["components"].values()}
    graphs |= {c["external_data"]["file"] for c in manifest["components"].values() if c.get("external_data")}
    for item in source.iterdir():
        if item.is_file() and item.name not in graphs and item.name != "manifest.json":
            os.link(item, target / item.name)
    for name, comp in manifest["components"].items():
        src, dst = source / comp["file"], target / comp["file"]
        data = dst.name + ".data"
        if kind == "inline":  # every weight inside the .onnx, as mmedge exported graphs under 1.8 GB before
            onnx.save(onnx.load(str(src)), str(dst))
        elif kind == "external":
            onnx.save(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data, size_threshold=1024)
        else:  # as mmedge builds the session (graph optimization "all"), saving the optimized graph and packed weights
            so = session_options(OrtOptions(threads=threads))
            so.optimized_model_filepath = str(dst)
            for key, value in {**PREPACK_SAVE, "session.optimized_model_external_initializers_file_name": data,
                               "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}.items():
                so.add_session_config_entry(key, value)
            ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        comp["sha256"], comp["size_bytes"] = sha256_file(dst), dst.stat().st_size
        comp.pop("external_data", None)
        if (target / data).is_file():
            comp["external_data"] = {"file": data, "sha256": sha256_file(target / data),
                                     "size_bytes": (target / data).stat().st_size}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    stamp.write_text(stamp_text)
    return target


def graph_bytes(folder: Path) -> int:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sum(e["size_bytes"] for c in manifest["components"].values() for e in (c, c.get("external_data")) if e)


# --- the parent ----------------------------------------------------------------------------------
def run_case(folder: Path, entries: dict, args) -> dict:
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--entries", json.dumps(entries),
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-3000:], "wall_s": wall}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def warm_load(folder: Path, args) -> None:
    """One untimed load: the page cache warm and the sha256 record written (not timed: hashing)."""
    import subprocess

    code = ("import sys, warnings; warnings.simplefilter('ignore'); import mmedge; "
            "mmedge.load(sys.argv[1], backend='onnxruntime', threads=1).close()")
    subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, check=False)


def mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def rate(value, base) -> str:
    return "–" if value is None or not base else f"{value / base:.2f}x"


def same_output(a, b) -> str:
    if a is None or b is None:
        return "–"
    if isinstance(a, list) and a and isinstance(a[0], float):
        diff = max(abs(x - y) for x, y in zip(a, b))
        top = max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
        return f"top-1 {'same' if top else 'DIFFERS'}, max |dp| {diff:.1e}"
    return "identical" if a == b else "DIFFERENT"


def table(rows: list[dict]) -> str:
    lines = []
    base_by = {}
    for r in rows:
        if r["case"] == "default" and r["layout"] in ("as exported", "inside .onnx"):  # the demo's, the mid models'
            base_by[r["artifact"]] = r
    for r in rows:
        b = base_by.get(r["artifact"], {})
        res = r["result"]
        if "error" in res:
            lines.append([r["artifact"], r["layout"], r["case"], "ERROR: " + first_line(res["error"])] + ["–"] * 10)
            continue
        al, ac = res["after_load"], res["after_calls"]
        bres = b.get("result", {})
        lines.append([
            r["artifact"], r["layout"], r["case"], f"{res['load_s']:.2f}", mib(al["VmRSS"]), mib(al["RssAnon"]),
            mib(al["RssFile"]), mib(ac["RssAnon"]), mib(ac["RssFile"]), mib(ac["VmHWM"]),
            rate(ac["RssAnon"], bres.get("after_calls", {}).get("RssAnon")),
            f"{res['call_ms']:.1f}", rate(res["call_ms"], bres.get("call_ms")),
            "–" if "ttft_ms" not in res else f"{res['ttft_ms']:.1f} ({rate(res['ttft_ms'], bres.get('ttft_ms'))})",
            "–" if "decode_tok_s" not in res else
            f"{res['decode_tok_s']:.1f} ({rate(res['decode_tok_s'], bres.get('decode_tok_s'))})",
            same_output(res.get("output"), bres.get("output")) if r is not b else "(reference)"])
    return markdown_table(["artifact", "weights", "case", "load s", "RSS after load MiB", "anon", "file",
                           "anon after calls", "file after calls", "peak (VmHWM)", "anon x default", "call ms",
                           "x default", "TTFT ms (x)", "decode tok/s (x)", "output vs default"], lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-cache", type=Path, default=Path.home() / ".cache" / "mmedge" / "demo")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="benchmark-size exports and derived copies")
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=count, default=7)
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 2 timed calls")
    parser.add_argument("--no-mid", action="store_true", help="the demo artifacts only")
    parser.add_argument("--no-demo", action="store_true", help="the benchmark-size artifacts only")
    parser.add_argument("--no-export", action="store_true", help="measure what is there; export nothing")
    parser.add_argument("--json", type=Path, default=None, help="default: <out>/ort_prepacking_cpu.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--entries", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.entries), args.threads, args.warmup, args.runs)))
        return 0
    if args.quick:
        args.warmup, args.runs = 1, 2
    from mmedge.file_checks import RACY_SECONDS

    started = time.perf_counter()
    load_start = os.getloadavg()
    plan: list[tuple[str, str, str, Path, dict]] = []  # artifact, weights layout, case, folder, entries
    if not args.no_demo:
        for name, folder in ensure_demo(args.demo_cache, not args.no_export).items():
            plan += [(name, "as exported", "default", folder, {}), (name, "as exported", "no-prepack", folder,
                                                                     NO_PREPACK)]
    if not args.no_mid:
        for name, folder in ensure_mid(args.out, args.threads, not args.no_export).items():
            inline = derive(folder, args.out / f"{name}-inline", "inline", args.threads)
            external = derive(folder, args.out / f"{name}-external", "external", args.threads)
            packed = derive(folder, args.out / f"{name}-prepacked-file", "prepacked-file", args.threads)
            plan += [(name, "inside .onnx", "default", inline, {}),
                     (name, "inside .onnx", "no-prepack", inline, NO_PREPACK),
                     (name, "external .onnx.data", "default", external, {}),
                     (name, "external .onnx.data", "no-prepack", external, NO_PREPACK),
                     (name, "prepacked .onnx.data", "default", packed, {})]
    time.sleep(RACY_SECONDS)  # files written moments ago are not recorded by the sha256 record
    for folder in dict.fromkeys(p[3] for p in plan):
        warm_load(folder, args)
    rows = []
    for name, layout, case, folder, entries in plan:
        print(f"measuring {name}, {layout}, {case}", file=sys.stderr, flush=True)
        try:
            result = run_case(folder, entries, args)
        except Exception as exc:  # a timeout: recorded, the others go on
            result = {"error": error_text(exc)}
        rows.append({"artifact": name, "layout": layout, "case": case, "folder": str(folder),
                     "graph_bytes": graph_bytes(folder), "config_entries": entries, "result": result})
    load_end = os.getloadavg()
    report = {"machine": machine_info(), "versions": package_versions(["onnxruntime", "onnx", "numpy"]),
              "threads": args.threads, "warmup": args.warmup, "runs": args.runs,
              "load_average_start": load_start, "load_average_end": load_end,
              "wall_s": round(time.perf_counter() - started, 1), "rows": rows}
    path = write_json(args.json or args.out / "ort_prepacking_cpu.json", report)
    print(f"\n{report['machine']['cpu']}, {os.cpu_count()} cores, threads={args.threads}, warm-up {args.warmup}, "
          f"median of {args.runs}; load average (1/5/15 min) at start {' '.join(f'{x:.2f}' for x in load_start)}, "
          f"at end {' '.join(f'{x:.2f}' for x in load_end)}; {report['wall_s']} s; MiB from /proc/self/status\n")
    print(table(rows))
    print(f"\nfull output in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
