"""Decode speed of the ONNX Runtime KV-cached decoder two ways, in one run: ``OrtDecoder`` (its own IO binding, one
``IOBinding`` reused) against ``RunnerDecoder`` over an IO-bound ``OnnxRuntimeRunner`` (a fresh binding per call,
the runner's feed checks, outputs kept as ``OrtDeviceArray``). Issue 13 asks whether ``OrtDecoder`` can go: only if
``RunnerDecoder`` decodes as fast.

Same artifact, same prompt, 32 new tokens forced (greedy); the two decoders alternate, median decode tok/s over the
last 31 tokens. Uses the caption benchmark's cached exports (``benchmarks/out/blip2-vitb-opt125m-*``; run
``caption_cpu.py`` once first).

    python benchmarks/decoder_cpu.py --reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

from PIL import Image

from _common import TokenClock, prompt_inputs
from mmedge.cli_args import count

OUT = Path(__file__).resolve().parent / "out"
NEW_TOKENS = 32


def decoders(captioner, threads: int) -> dict:
    from mmedge.runtimes.kv_decoder import artifact_decoder
    from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner, OrtOptions
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder
    from mmedge.runtimes.runner_decoder import RunnerDecoder

    artifact, table = captioner.artifact, captioner.embeddings
    layout, options = artifact_decoder(artifact.manifest)
    path = artifact.component_path("decoder")
    runner = OnnxRuntimeRunner(path, "decoder", artifact.component("decoder"),
                               OrtOptions(threads=threads, io_binding=True, keep_on_device=True))
    return {"OrtDecoder (io_binding)": OrtDecoder(path, table, layout, options=OrtOptions(threads=threads), **options),
            "RunnerDecoder (IO-bound runner)": RunnerDecoder.for_artifact(runner, artifact.manifest, table)}


def decode_rate(clock: TokenClock, captioner, inputs, config) -> tuple[float, list[int]]:
    from mmedge.generation import generate

    ids = generate(clock, inputs[0], inputs[1], config)
    end = time.perf_counter()
    times = clock.times + [end]
    return (len(times) - 1) / (times[-1] - times[0]), ids[0]


def main(argv: list[str] | None = None) -> int:
    from caption_cpu import VARIANTS

    import mmedge
    from mmedge.generation import GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=count, default=5)
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--variants", nargs="+", default=["fp32", "int4"], choices=[v.name for v in VARIANTS],
                        help="caption_cpu.py's exports to decode (default: fp32 int4)")
    args = parser.parse_args(argv)
    missing = [OUT / f"blip2-vitb-opt125m-{variant}" for variant in args.variants
               if not (OUT / f"blip2-vitb-opt125m-{variant}" / "manifest.json").is_file()]
    if missing:  # before the table's header, not after it
        print(f"missing {', '.join(map(str, missing))}: run benchmarks/caption_cpu.py first", file=sys.stderr)
        return 1
    photo = Path(__file__).resolve().parent.parent / "export" / "data" / "images" / "holdout-chelsea.jpg"
    print(f"load average {os.getloadavg()[0]:.2f}; threads={args.threads}; {args.reps} interleaved reps; "
          f"{NEW_TOKENS} tokens forced, greedy")
    print("| artifact | decoder | decode tok/s (median) | min | max | same tokens |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        path = OUT / f"blip2-vitb-opt125m-{variant}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captioner = mmedge.load(path, backend="onnxruntime", threads=args.threads)
        config = GenerationConfig.from_dict(captioner.artifact.manifest["generation"]).replace(
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
        inputs = prompt_inputs(captioner, Image.open(photo).convert("RGB"))
        clocks = {name: TokenClock(d) for name, d in decoders(captioner, args.threads).items()}
        rates: dict[str, list[float]] = {name: [] for name in clocks}
        tokens: dict[str, list[int]] = {}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, clock in clocks.items():
                rate, ids = decode_rate(clock, captioner, inputs, config)
                tokens[name] = ids
                if rep:
                    rates[name].append(rate)
        same = len({tuple(t) for t in tokens.values()}) == 1
        for name, values in rates.items():
            print(f"| {variant} | {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} | "
                  f"{'yes' if same else 'no'} |")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
