"""Soak: 10,000 zero-shot classifications and 1,000 captions in one device process; RSS must not grow.

One fresh process (it never imports torch) loads a CLIP classifier and a BLIP-2 captioner once and then
interleaves their calls, as an unattended device would: every call classifies one of the 16 bundled photos
(decoded from its JPEG file each time) against one of 20 label sets (4 common ones; on every 10th call one
of 16 rare ones, so the classifier's 16-bank label cache evicts now and then), and every 10th call also
captions a photo, rotating greedy
(20 tokens), beam search (3 beams), seeded sampling, VQA and streaming. Every 100th call also sends a bad
input (a truncated JPEG, then an empty label list) and expects its typed error, so error paths soak too.

RSS (``/proc/self/statm``) is sampled every 5% of the calls. Warm-up is the first 5% (500 classifications
and 50 captions), and at least long enough for every kind of request to have run once: each caption mode (5
captions), and the bad inputs (the 100th call) when the run has them; the target is RSS growth <= 5% from the end of
warm-up to the end of the run. A run too short for such a warm-up in its first half is reported, not judged.

    python benchmarks/soak.py                  # "small" models: CLIP ViT-B/32 INT8 + BLIP-2 ViT-B/OPT-125m INT8
    python benchmarks/soak.py --models tiny    # the test suite's tiny random models (about a minute)
    python benchmarks/soak.py --classify 1000 --captions 100   # a shorter soak

Models are random-weight exports of bundled configs (offline), cached under benchmarks/out/: the soak
reuses clip_cpu.py's and caption_cpu.py's INT8 exports when present and matching, else exports its own.
Results: printed, and written to benchmarks/out/soak.json (soak-tiny.json for --models tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

from _common import child_summary, export_once, fmt_mib, machine_info, package_versions, run_child, write_json
from mmedge.cli_args import count, non_negative

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
PHOTOS = sorted((ROOT / "export" / "data" / "images").glob("*.jpg"))
TARGET_GROWTH = 0.05
WORDS = ("cat dog car rocket astronaut coffee clock coins horse brick grass gravel galaxy retina camera text "
         "bicycle tree house boat plane bird fish flower mountain river city road chair table cup phone book").split()
LABEL_SETS = [WORDS[i:i + 5 + i % 6] for i in range(20)]  # 20 sets of 5-10 labels
SMALL = {  # name: (bundled config, export options, folders to reuse if they hold a matching export)
    "clip": ("openai/clip-vit-base-patch32", {"precision": "int8", "quantization": "dynamic", "task": "zero-shot"},
             ["clip-b32-int8-dynamic", "soak-clip-b32-int8"]),
    "blip2": ("mmedge/blip2-vitb-opt125m", {"precision": "int8", "quantization": "dynamic", "llm_precision": "int8"},
              ["blip2-vitb-opt125m-int8", "soak-blip2-vitb-opt125m-int8"]),
}


# --- artifacts (parent process) -----------------------------------------------------------------------
def matches(folder: Path, model: str) -> bool:
    """Whether ``folder`` holds a readable, fully INT8-dynamic, random-weight export of ``model``."""
    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError

    try:
        manifest = Artifact.open(folder).manifest
    except MmedgeError:
        return False
    return (manifest["source"]["model"] == model and manifest["source"]["random_weights"]
            and all(c["precision"] == "int8" and (c["quantization"] or {}).get("method") == "int8-dynamic"
                    for c in manifest["components"].values()))


def small_artifacts(threads: int, reexport: bool) -> tuple[dict[str, Path], dict]:
    from mmedge.export import export_model

    folders, exports = {}, {}
    for name, (model, options, candidates) in SMALL.items():
        cached = None if reexport else next((OUT / c for c in candidates if matches(OUT / c, model)), None)
        folder = cached or OUT / candidates[-1]
        exports[name] = export_once(name, folder, cached is not None, lambda: export_model(
            model, folder, random_weights=True, progress=False, overwrite=True, threads=threads, **options))
        folders[name] = folder
    return folders, exports


def tiny_artifacts(reexport: bool) -> tuple[dict[str, Path], dict]:
    sys.path.insert(0, str(ROOT))
    from mmedge.export import export_model
    from tests.support.tiny_checkpoints import make_tiny_blip2, make_tiny_clip

    folders, exports = {}, {}
    for name, make in (("clip", make_tiny_clip), ("blip2", make_tiny_blip2)):
        folder = OUT / f"soak-tiny-{name}"
        cached = not reexport and (folder / "manifest.json").is_file()
        exports[name] = export_once(name, folder, cached, lambda: export_model(
            str(make(OUT / f"soak-tiny-{name}-checkpoint")), folder, progress=False, overwrite=True))
        folders[name] = folder
    return folders, exports


# --- the soak (child process: device side only) ---------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def label_set(call: int) -> list[str]:
    """Four common label sets; every 10th call one of 16 rare ones, so the 16-bank cache sometimes evicts."""
    return LABEL_SETS[call % 4] if call % 10 else LABEL_SETS[4 + (call // 10) % 16]


def caption_once(captioner, photo: Path, index: int) -> str:
    mode = index % 5
    if mode == 0:
        return captioner.caption(photo, max_new_tokens=20)
    if mode == 1:
        return captioner.caption(photo, max_new_tokens=20, num_beams=3)
    if mode == 2:
        return captioner.caption(photo, max_new_tokens=20, do_sample=True, top_p=0.9, seed=index)
    if mode == 3:
        return captioner.ask(photo, "what is in the picture?", max_new_tokens=10)
    return "".join(captioner.stream(photo, max_new_tokens=20))


def caption_every(classify: int, captions: int) -> int:
    """A caption after every this many classifications: ``captions`` spread over ``classify``; with no captions,
    never (an interval past the last classification)."""
    return max(classify // captions, 1) if captions else classify + 1


CAPTION_MODES = 5  # caption_once's modes: greedy, beam search, sampling, VQA, streaming
BAD_INPUTS_EVERY = 100  # every this many classifications, the bad inputs


def warmup_calls(classify: int, captions: int) -> tuple[int, int]:
    """(classifications of warm-up, classifications every request kind needs to have run once).

    Warm-up is 5% of the calls, or more: until each caption mode (as many as there are captions, up to 5) and the
    bad inputs (when the run reaches them) have run, so none of them first allocates after the baseline. It is at
    most half the run; when that is shorter than every kind needs, the run is too short to judge."""
    every = caption_every(classify, captions)
    needed = max(classify // 20, 1, min(captions, CAPTION_MODES) * every if captions else 0,
                 BAD_INPUTS_EVERY if classify >= BAD_INPUTS_EVERY else 0)
    return max(min(needed, classify // 2), 1), needed


def soak(clip: str, blip2: str, classify: int, captions: int, threads: int) -> dict:
    import mmedge
    from mmedge.api import RandomWeightsWarning
    from mmedge.errors import ImageError, InputError

    warnings.simplefilter("ignore", RandomWeightsWarning)
    rss_start = rss_bytes()
    classifier = mmedge.load(clip, threads=threads)
    captioner = mmedge.load(blip2, threads=threads)
    truncated = PHOTOS[0].read_bytes()[:2000]
    every = caption_every(classify, captions)
    (warm_classify, warm_needed), sample_every = warmup_calls(classify, captions), max(classify // 20, 1)
    classify_ms, caption_ms, samples, refused = [], [], [], 0
    rss_loaded = rss_bytes()
    rss_warm, warm_captions = None, 0
    done_captions = 0
    start = time.perf_counter()
    for i in range(classify):
        t = time.perf_counter()
        result = classifier(PHOTOS[i % len(PHOTOS)], labels=label_set(i), top_k=3)
        classify_ms.append((time.perf_counter() - t) * 1e3)
        assert len(result) == 3
        if (i + 1) % every == 0 and done_captions < captions:
            t = time.perf_counter()
            text = caption_once(captioner, PHOTOS[(i * 7) % len(PHOTOS)], done_captions)
            caption_ms.append((time.perf_counter() - t) * 1e3)
            assert isinstance(text, str)
            done_captions += 1
        if i % BAD_INPUTS_EVERY == BAD_INPUTS_EVERY - 1:
            for bad in (lambda: classifier(truncated, labels=["cat"]), lambda: classifier(PHOTOS[0], labels=[])):
                try:
                    bad()
                except (ImageError, InputError):
                    refused += 1
        if i + 1 == warm_classify:
            rss_warm, warm_captions = rss_bytes(), done_captions
        if (i + 1) % sample_every == 0:
            samples.append({"classifications": i + 1, "captions": done_captions, "rss_bytes": rss_bytes()})
    wall = time.perf_counter() - start
    rss_end = rss_bytes()
    after_warm = [s["rss_bytes"] for s in samples if s["classifications"] > warm_classify]
    return {
        "classifications": classify, "captions": done_captions, "bad_inputs_refused": refused,
        "warmup": {"classifications": warm_classify, "captions": warm_captions,
                   "covers_every_request_kind": warm_classify >= warm_needed, "classifications_needed": warm_needed},
        "rss_start_bytes": rss_start, "rss_loaded_bytes": rss_loaded, "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end, "rss_max_after_warmup_bytes": max(after_warm or [rss_end]),
        "growth_after_warmup": (rss_end - rss_warm) / rss_warm,
        "classify_ms_median": statistics.median(classify_ms),
        "caption_ms_median": statistics.median(caption_ms or [0.0]),
        "soak_wall_s": round(wall, 1), "samples": samples,
        "torch_imported": any(m.split(".")[0] == "torch" for m in sys.modules),
    }


# --- report ---------------------------------------------------------------------------------------------
def report(results: dict) -> str:
    if "error" in results["soak"] or results["soak"].get("growth_after_warmup") is None:
        return f"soak FAILED:\n{results['soak'].get('error', results['soak'])}"
    s = results["soak"]
    growth = s["growth_after_warmup"]
    verdict = "PASS" if growth <= TARGET_GROWTH else "MISS"
    if not judged(s):
        verdict = (f"n/a (too short to judge: a warm-up covering every request kind takes "
                   f"{s['warmup']['classifications_needed']} classifications, more than half of "
                   f"{s['classifications']}; run --classify {2 * s['warmup']['classifications_needed']} or more)")
    lines = [
        f"soak: {s['classifications']:,} classifications + {s['captions']:,} captions in one process "
        f"({s['soak_wall_s']} s; {s['bad_inputs_refused']} bad inputs refused with typed errors; torch imported: "
        f"{s['torch_imported']})",
        f"models: {results['settings']['models']} ({', '.join(results['settings']['artifacts'].values())})",
        f"RSS MiB: start {fmt_mib(s['rss_start_bytes'])}, loaded {fmt_mib(s['rss_loaded_bytes'])}, after warm-up "
        f"({s['warmup']['classifications']} + {s['warmup']['captions']} calls) {fmt_mib(s['rss_after_warmup_bytes'])}, "
        f"end {fmt_mib(s['rss_end_bytes'])}, max after warm-up {fmt_mib(s['rss_max_after_warmup_bytes'])}, "
        f"peak {fmt_mib(s.get('peak_rss_bytes'))}",
        f"RSS growth after warm-up: {growth:+.2%} (target <= {TARGET_GROWTH:.0%}): {verdict}",
        f"median ms: classify {s['classify_ms_median']:.1f}, caption {s['caption_ms_median']:.1f}",
        "RSS MiB by calls: " + ", ".join(f"{x['classifications']}/{x['captions']}: {fmt_mib(x['rss_bytes'])}"
                                         for x in s["samples"]),
    ]
    return "\n".join(lines)


def judged(soak_result: dict) -> bool:
    """Whether the run's warm-up covered every request kind (results from before that field count as covered)."""
    return soak_result.get("warmup", {}).get("covers_every_request_kind", True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=["small", "tiny"], default="small")
    parser.add_argument("--classify", type=count, default=10_000, help="zero-shot classifications")
    parser.add_argument("--captions", type=non_negative, default=1_000,
                        help="captions, interleaved with the classifications (0: none)")
    parser.add_argument("--threads", type=count, default=2, help="CPU threads per ONNX Runtime graph")
    parser.add_argument("--json", type=Path,
                        help="where to write the results (default benchmarks/out/soak[-tiny].json)")
    parser.add_argument("--reexport", action="store_true", help="export again even when a matching artifact is cached")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--blip2", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.captions > args.classify:
        parser.error(f"--captions {args.captions} exceeds --classify {args.classify}: one caption per classification "
                     "at most")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(soak(args.clip, args.blip2, args.classify, args.captions, args.threads)))
        return 0
    machine = machine_info()
    folders, exports = (tiny_artifacts(args.reexport) if args.models == "tiny"
                        else small_artifacts(args.threads, args.reexport))
    failed = {k: v["error"] for k, v in exports.items() if v["error"]}
    if failed:
        print(f"export failed: {failed}", file=sys.stderr)
        return 1
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--child", "--clip", str(folders["clip"]),
                       "--blip2", str(folders["blip2"]), "--classify", str(args.classify), "--captions",
                       str(args.captions), "--threads", str(args.threads)], timeout_s=4 * 3600)
    results = {
        "machine": machine,
        "versions": package_versions(["mmedge", "onnxruntime", "numpy", "pillow", "tokenizers"]),
        "settings": {"models": args.models,
                     "artifacts": {k: str(v.relative_to(ROOT)) if v.is_relative_to(ROOT) else str(v)
                                                         for k, v in folders.items()},
                     "classify": args.classify, "captions": args.captions, "threads": args.threads,
                     "target_growth": TARGET_GROWTH, "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "exports": exports,
        "soak": child_summary(child),
    }
    print(report(results))
    path = write_json(args.json or OUT / ("soak-tiny.json" if args.models == "tiny" else "soak.json"), results)
    print(f"results written to {path}")
    soak_result = results["soak"]
    if "growth_after_warmup" in soak_result and not judged(soak_result):
        return 0  # reported, not judged
    return 0 if soak_result.get("growth_after_warmup", 1.0) <= TARGET_GROWTH else 1


if __name__ == "__main__":
    sys.exit(main())
