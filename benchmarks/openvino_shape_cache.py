"""OpenVINO's per-shape kernel cache on a CPU: memory of a long-lived pipeline over many input shapes, and decode speed,
at each ``shape_cache`` (``CPU_RUNTIME_CACHE_CAPACITY``; OpenVINO's own default is 5000).

Each setting runs in a fresh process (memory figures are per process). Two measurements per setting:
- CLIP text tower (the demo CLIP's, ``mmedge demo``): ``embed_texts`` over CALLS random
  (batch 1-32, length 1-28 words) shapes; RSS growth after the warm-up call;
- IDEFICS-mid FP32 (``flamingo_cpu.py``'s export, when present): a 32-token interleaved answer with two photos,
  median of 3, before and after 60 prompts of random length.

    python benchmarks/openvino_shape_cache.py                 # caps 5000 (OpenVINO's), 256 (mmedge's), 64, 0
    python benchmarks/openvino_shape_cache.py --caps 256 5000 --calls 800

The ratio column is each setting's IDEFICS answer time over OpenVINO's default's (5000) when that setting ran, else
over the first setting's; its header names which. ``--json`` (default ``benchmarks/out/openvino_shape_cache.json``)
keeps the rows, the reference setting and the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info, package_versions, write_json
from mmedge.cli_args import count, non_negative

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
OPENVINO_DEFAULT = 5000  # CPU_RUNTIME_CACHE_CAPACITY when nothing sets it
PHOTOS = sorted((ROOT / "export" / "data" / "images").glob("holdout-*.jpg"))[:2]


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def clip_folder() -> Path:
    """The demo CLIP with its text tower (``mmedge demo`` exports it): small, so the shapes, not the FLOPs, count."""
    from mmedge import demo

    folder = demo.default_cache() / "clip-two-graph"
    if not (folder / "manifest.json").is_file():
        raise SystemExit(f"{folder} is missing: run `mmedge demo` first")
    return folder


def measure(cap: int, calls: int) -> dict:
    """One setting, in this process."""
    import mmedge

    options = {"openvino": {"shape_cache": cap}}
    out: dict = {"cap": cap}
    with mmedge.load(clip_folder(), backend="openvino", task="embed", threads=1, backend_options=options) as embedder:
        embedder.embed_texts(["a"])
        base, rng, shapes = rss_mb(), random.Random(0), set()
        for _ in range(calls):
            batch, words = rng.randint(1, 32), rng.randint(1, 28)
            shapes.add((batch, words))
            embedder.embed_texts([" ".join(["red"] * words)] * batch)
        out.update(clip_shapes=len(shapes), clip_rss_growth_mb=round(rss_mb() - base, 1))
    idefics = OUT / "idefics-mid-fp32"
    if (idefics / "manifest.json").is_file():
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in PHOTOS]
        prompt = [images[0], "An image of a cat.", images[1], "An image of"]
        with mmedge.load(idefics, backend="openvino", threads=2, backend_options=options) as captioner:

            def answer_ms() -> float:
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    captioner.generate(prompt, max_new_tokens=32, min_new_tokens=32)
                    times.append((time.perf_counter() - start) * 1000)
                return round(statistics.median(times), 1)

            captioner.generate(prompt, max_new_tokens=32, min_new_tokens=32)
            out["idefics_answer_ms"] = answer_ms()
            base, rng = rss_mb(), random.Random(0)
            for _ in range(60):
                captioner.generate([images[0], " ".join(["cat"] * rng.randint(1, 40))],
                                   max_new_tokens=rng.randint(1, 24))
            out["idefics_rss_growth_mb"] = round(rss_mb() - base, 1)
            out["idefics_answer_ms_after"] = answer_ms()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", type=non_negative, nargs="+", default=[OPENVINO_DEFAULT, 256, 64, 0],
                        help="shape_cache settings, one process each (0: no cache)")
    parser.add_argument("--calls", type=count, default=1500, help="CLIP text calls of random shape")
    parser.add_argument("--json", type=Path, default=OUT / "openvino_shape_cache.json", help="where the results go")
    parser.add_argument("--one", type=non_negative, help=argparse.SUPPRESS)  # the child: one setting
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.one, args.calls)))
        return 0
    machine = machine_info()
    rows = []
    for cap in args.caps:
        done = subprocess.run([sys.executable, __file__, "--one", str(cap), "--calls", str(args.calls)],
                              capture_output=True, text=True)
        if done.returncode != 0:  # its own message (e.g. "run `mmedge demo` first") or traceback, not a bare exit code
            tail = "\n".join(done.stderr.strip().splitlines()[-15:]) or "(nothing on stderr)"
            print(f"shape_cache {cap}: the measuring process exited {done.returncode}:\n{tail}", file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    reference = next((r for r in rows if r["cap"] == OPENVINO_DEFAULT), rows[0])
    against = (f"x OpenVINO's default ({OPENVINO_DEFAULT})" if reference["cap"] == OPENVINO_DEFAULT
               else f"x shape_cache {reference['cap']} (OpenVINO's default {OPENVINO_DEFAULT} not run)")
    print("\n| shape_cache | CLIP text: shapes, RSS growth MB | IDEFICS 32-token answer ms (after 60 varied) | "
          f"{against} | IDEFICS RSS growth MB |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = (f"{row['idefics_answer_ms'] / reference['idefics_answer_ms']:.2f}x"
                 if "idefics_answer_ms" in row and reference.get("idefics_answer_ms") else "–")
        idefics = (f"{row['idefics_answer_ms']} ({row['idefics_answer_ms_after']})" if "idefics_answer_ms" in row
                   else "–")
        print(f"| {row['cap']} | {row['clip_shapes']}, {row['clip_rss_growth_mb']:+} | {idefics} | {ratio} | "
              f"{row.get('idefics_rss_growth_mb', '–')} |")
    written = write_json(args.json, {"machine": machine, "versions": package_versions(["mmedge", "openvino"]),
                                     "settings": {"caps": args.caps, "calls": args.calls},
                                     "ratio_against_cap": reference["cap"], "rows": rows})
    print(f"\nwritten: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
