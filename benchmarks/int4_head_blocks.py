"""The INT4 LLM's 8-bit LM head in blocks of 256 weights (the default) against blocks of 32 (the 4-bit layers' block,
the recipe before): decode step, prefill and logits, in one run.

Both graphs are quantized here from the same FP32 decoder (``caption_cpu.py``'s cached FP32 export of the benchmark
BLIP-2, ``mmedge/blip2-vitb-opt125m``: OPT-125m shapes, vocabulary 50272; exported first if missing) with
``mmedge.export.int4.quantize_int4``, everything equal but ``eight_bit_max_block``. Measured on bare ONNX Runtime CPU
sessions set as the pipeline sets them (``threads``, spinning stopped after each call), alternating the two graphs
round by round: a decode step (1 new token after ``--past`` cached ones) and a prefill (``--prompt`` tokens, no
past), medians; and each graph's logits against the FP32 graph's on the artifact's stored decoder validation sample
(a VQA prompt after a real photo's prefix), cosine per position.

    python benchmarks/int4_head_blocks.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_info, markdown_table, package_versions, write_json

OUT = Path(__file__).resolve().parent / "out"


def session(path: Path, threads: int):
    from mmedge.runtimes.ort_session import OrtOptions, session_from_path

    options = OrtOptions(threads=threads, config_entries={"session.force_spinning_stop": "1"})
    return session_from_path(path, options)


def random_feeds(sess, batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Decoder inputs: random embeddings and cache, every slot attended, positions after the past."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence}
    feeds = {}
    for tensor in sess.get_inputs():
        shape = [d if isinstance(d, int) else sizes[d] for d in tensor.shape]
        if tensor.name == "attention_mask":
            feeds[tensor.name] = np.ones(shape, np.int64)  # [batch, total]
        elif tensor.name == "position_ids":
            feeds[tensor.name] = np.tile(np.arange(past, past + sequence), (batch, 1)).astype(np.int64)
        else:
            feeds[tensor.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return feeds


def alternate(sessions: dict, feeds: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call of each session, ``rounds`` rounds of ``calls`` calls, sessions alternating."""
    for sess in sessions.values():
        for _ in range(3):
            sess.run(["logits"], feeds)
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                sess.run(["logits"], feeds)
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in medians.items()}


def logits_cosine(reference: np.ndarray, actual: np.ndarray) -> dict:
    ref, act = reference.reshape(-1, reference.shape[-1]), actual.reshape(-1, actual.shape[-1])  # [positions, vocab]
    cos = np.sum(ref * act, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "argmax_agreement": float(np.mean(ref.argmax(1) == act.argmax(1)))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--past", type=int, default=48, help="cached tokens before the decode step")
    parser.add_argument("--prompt", type=int, default=33, help="prefill tokens (32 queries + BOS)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", default=str(OUT / "int4_head_blocks.json"))
    args = parser.parse_args()

    from caption_cpu import VARIANTS, ensure_exported

    from mmedge.artifact import Artifact
    from mmedge.export.int4 import EIGHT_BIT_MAX_BLOCK, quantize_int4
    from mmedge.validate import load_validation_samples

    fp32 = next(v for v in VARIANTS if v.name == "fp32")
    print(ensure_exported(fp32, args.threads, reexport=False), file=sys.stderr)
    artifact = Artifact.open(fp32.folder)
    source = artifact.component_path("decoder")
    sample = load_validation_samples(artifact)["decoder"]["inputs"]
    results: dict = {"machine": machine_info(), "versions": package_versions(["onnxruntime", "onnx", "numpy"]),
                     "settings": vars(args), "graphs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {}
        for name, largest in (("head blocks of 32 (before)", 32),
                              (f"head blocks of {EIGHT_BIT_MAX_BLOCK} (default)", EIGHT_BIT_MAX_BLOCK)):
            paths[name] = Path(scratch) / f"decoder-{largest}.onnx"
            recipe = quantize_int4(source, paths[name], eight_bit_max_block=largest)
            results["graphs"][name] = {"eight_bit_blocks": recipe["eight_bit_blocks"],
                                       "bytes": paths[name].stat().st_size}
        reference = session(source, args.threads).run(["logits"], sample)[0]
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        for name, sess in sessions.items():
            results["graphs"][name]["logits_vs_fp32"] = logits_cosine(reference, sess.run(["logits"], sample)[0])
        first = next(iter(sessions.values()))
        print("timing decode steps", file=sys.stderr)
        step = alternate(sessions, random_feeds(first, 1, 1, args.past), args.rounds, 30)
        print("timing prefills", file=sys.stderr)
        prefill = alternate(sessions, random_feeds(first, 1, args.prompt, 0), args.rounds, 5)
    before, after = list(sessions)
    for name in sessions:
        results["graphs"][name] |= {"decode_step_ms": step[name], "prefill_ms": prefill[name]}
    results["speedup"] = {"decode_step": step[before] / step[after], "prefill": prefill[before] / prefill[after]}
    rows = [[name, f"{g['bytes'] / 2**20:.1f}", f"{g['decode_step_ms']:.2f}", f"{g['prefill_ms']:.1f}",
             f"{g['logits_vs_fp32']['mean']:.6f} / {g['logits_vs_fp32']['min']:.6f}",
             f"{g['logits_vs_fp32']['argmax_agreement']:.0%}"] for name, g in results["graphs"].items()]
    print(f"INT4 decoder, 8-bit LM head block size — {results['machine'].get('cpu')}, threads {args.threads}")
    print(markdown_table(["graph", "MiB", f"decode step ms (past {args.past})", f"prefill ms ({args.prompt} tok)",
                          "logits cos vs FP32 (mean / min)", "argmax = FP32"], rows))
    print(f"\nblocks of {EIGHT_BIT_MAX_BLOCK} vs 32: decode step {results['speedup']['decode_step']:.3f}x, "
          f"prefill {results['speedup']['prefill']:.3f}x faster")
    print(f"results written to {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
