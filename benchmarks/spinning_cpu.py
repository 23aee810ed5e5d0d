"""Graphs that take turns on a CPU: ONNX Runtime's threads spinning after each call vs stopping (mmedge's default).

A captioning or interleaved pipeline runs its image graph, then its decoder, step after step. ONNX Runtime's intra-op
threads spin after a call by default, waiting for the next call of the same session, on the cores the next graph
needs. mmedge stops them when a call returns (``session.force_spinning_stop``, ``runtimes/plugins/onnxruntime.py``).
This script times both on the artifacts of ``caption_cpu.py`` (BLIP-2, OPT-125m shapes: FP32, INT8, INT8 + INT4 LLM)
and ``flamingo_cpu.py`` (IDEFICS-mid: FP32, INT8, INT4), alternating the two settings ``--rounds`` times: time to
first token (one photo, or the two-image interleaved prompt) and decode tok/s, 32 new tokens, median of 3 captions
after one warm-up per load.

    python benchmarks/spinning_cpu.py      # exports what caption_cpu.py / flamingo_cpu.py have not (a few minutes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import caption_cpu
import flamingo_cpu
import skimage.data
from PIL import Image

from _common import TokenClock, machine_info, markdown_table, package_versions, write_json
from mmedge.cli_args import count

CAPTIONS = caption_cpu.Iterations(warmup=1, runs=3, io_binding_runs=0)  # per load, as flamingo_cpu's 1 + 3
SETTINGS = {"spin after calls (ONNX Runtime's default)": {"session.force_spinning_stop": "0"},
            "stop after calls (mmedge's default)": None}


def load_options(entries: dict | None) -> dict:
    """``mmedge.load`` options: ONNX Runtime for every graph, with ``entries`` added to its session entries."""
    return {"backend": "onnxruntime", **({"backend_options": {"onnxruntime": {"config_entries": entries}}}
                                         if entries else {})}


def blip2_timings(folder: Path, entries: dict | None, photo, threads: int) -> dict:
    import mmedge

    with mmedge.load(folder, threads=threads, **load_options(entries)) as captioner:
        config, clock = caption_cpu.generation_config(captioner), TokenClock(captioner.decoder)
        timings, _ = caption_cpu.measure_captions(lambda: caption_cpu.mmedge_caption(captioner, clock, photo, config),
                                                  CAPTIONS)
    return {"ttft_ms": timings["ttft_ms"]["median"], "decode_tok_s": timings["decode_tok_s"]["median"]}


def idefics_timings(folder: Path, entries: dict | None, photos, threads: int) -> dict:
    subject = flamingo_cpu.MmedgeSubject(folder, photos, threads, load_options(entries))
    try:
        measured = flamingo_cpu.measure_in_turns({"mmedge": subject}, 3)["mmedge"]
    finally:
        subject.close()
    if "error" in measured:
        raise RuntimeError(measured["error"])
    return {"ttft_ms": measured["ttft_ms"], "decode_tok_s": measured["decode_tok_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--rounds", type=count, default=2, help="times each setting is measured, alternating")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # random-weight artifacts
    from mmedge.export import export_model

    photo = Image.fromarray(skimage.data.astronaut())
    photos = [Image.open(p).convert("RGB") for p in flamingo_cpu.PHOTOS]
    cases = []
    for variant in caption_cpu.VARIANTS:
        export = caption_cpu.ensure_exported(variant, args.threads, False)
        if not export["error"]:
            cases.append((f"BLIP-2 {variant.name}",
                          lambda e, v=variant: blip2_timings(v.folder, e, photo, args.threads)))
    for name in ("fp32", "int8", "int4"):
        folder = flamingo_cpu.OUT / f"idefics-mid-{name}"
        if not (folder / "manifest.json").is_file():
            export_model(flamingo_cpu.MODEL, folder, random_weights=True, seed=0, overwrite=True, progress=False,
                         threads=args.threads, **flamingo_cpu.VARIANTS[name])
        cases.append((f"IDEFICS-mid {name}", lambda e, f=folder: idefics_timings(f, e, photos, args.threads)))
    runs: dict[str, dict[str, list[dict]]] = {case: {setting: [] for setting in SETTINGS} for case, _ in cases}
    for round_ in range(args.rounds):
        for setting, entries in SETTINGS.items():
            for case, measure in cases:
                print(f"round {round_ + 1}: {case}, {setting}", file=sys.stderr)
                runs[case][setting].append(measure(entries))
    rows = []
    for case, by_setting in runs.items():
        spin, stop = (by_setting[s] for s in SETTINGS)
        ttft = [statistics.median(r["ttft_ms"] for r in runs_) for runs_ in (spin, stop)]
        tok_s = [statistics.median(r["decode_tok_s"] for r in runs_) for runs_ in (spin, stop)]
        rows.append([case, f"{ttft[0]:.1f}", f"{ttft[1]:.1f}", f"{ttft[1] / ttft[0]:.2f}x", f"{tok_s[0]:.1f}",
                     f"{tok_s[1]:.1f}", f"{tok_s[1] / tok_s[0]:.2f}x"])
    print(markdown_table(["pipeline", "TTFT ms, spin", "TTFT ms, stop", "stop / spin", "decode tok/s, spin",
                          "decode tok/s, stop", "stop / spin"], rows))
    write_json(caption_cpu.OUT / "spinning_cpu.json", {"machine": machine_info(), "threads": args.threads,
                                                       "versions": package_versions(["onnxruntime"]), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
