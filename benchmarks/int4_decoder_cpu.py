"""Three choices in the decoder graph, each A/B in one run on bare ONNX Runtime CPU sessions: the INT4 LLM's 8-bit LM
head block size, the attention as transformers' ops or one fused node per layer, and the prefill's logits at every
prompt position or at the last.

1. **Head blocks:** the 8-bit LM head in blocks of 256 weights (the default) against blocks of 32 (the 4-bit
   layers' block, the recipe before). Both graphs are quantized here from the same FP32 decoder (``caption_cpu.py``'s
   cached FP32 export of the benchmark BLIP-2, ``mmedge/blip2-vitb-opt125m``: OPT-125m shapes, vocabulary 50272;
   exported first if missing) with ``mmedge.export.int4.quantize_int4``, all else equal; each graph's logits are
   compared with the FP32 graph's on the artifact's stored decoder validation sample (a VQA prompt after a real
   photo's prefix), cosine per position.
2. **Attention:** ``caption_cpu.py``'s cached INT4 exports with transformers' attention ops (the default) and with
   ``--fused-attention`` (one ``com.microsoft.MultiHeadAttention`` node per layer), skipped if missing (run
   ``caption_cpu.py`` first).
3. **Prefill logits:** one decoder graph fed ``logits_positions`` for every prompt position (what a prefill computed
   before the input existed) and for the last (what the generation loop asks for): BLIP-2 FP32 and INT4 and
   IDEFICS-mid FP32 (``flamingo_cpu.py``'s export), skipped if missing.

Each pair is timed alternating round by round, sessions set as the pipeline sets them (``threads``, spinning stopped
after each call): decode steps (1 new token after ``--pasts`` cached ones) and prefills (``--prompts`` tokens, no
past), medians.

    python benchmarks/int4_decoder_cpu.py            # ~5 min on 2 cores
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
from mmedge.cli_args import count, non_negative
from mmedge.generation.kv_layout import LOGITS_POSITIONS

OUT = Path(__file__).resolve().parent / "out"


def session(path: Path, threads: int):
    from mmedge.runtimes.ort_session import OrtOptions, session_from_path

    options = OrtOptions(threads=threads, config_entries={"session.force_spinning_stop": "1"})
    return session_from_path(path, options)


def random_feeds(sess, batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Decoder inputs: random embeddings and cache, every slot attended, positions after the past."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence,
             "logits_sequence": 1}
    feeds = {}
    for tensor in sess.get_inputs():
        shape = [d if isinstance(d, int) else sizes[d] for d in tensor.shape]
        if tensor.name == "attention_mask":
            feeds[tensor.name] = np.ones(shape, np.int64)  # [batch, total]
        elif tensor.name == "position_ids":
            feeds[tensor.name] = np.tile(np.arange(past, past + sequence), (batch, 1)).astype(np.int64)
        elif tensor.name == LOGITS_POSITIONS:  # the generation loop's: the last position
            feeds[tensor.name] = np.full((batch, 1), sequence - 1, dtype=np.int64)
        else:
            feeds[tensor.name] = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return feeds


def alternate(sessions: dict, feeds: dict, rounds: int, calls: int, variant_feeds: dict | None = None
              ) -> dict[str, float]:
    """Median ms per call of each session, ``rounds`` rounds of ``calls`` calls, sessions alternating (ABBA);
    ``variant_feeds``: per session name, feeds to use instead of ``feeds``."""
    chosen = {name: (variant_feeds or {}).get(name, feeds) for name in sessions}
    for name, sess in sessions.items():
        for _ in range(3):
            sess.run(["logits"], chosen[name])
    medians: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions.items())
    for round_ in range(rounds):
        for name, sess in order if round_ % 2 == 0 else order[::-1]:  # ABBA: neither graph always goes first
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                sess.run(["logits"], chosen[name])
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1e3)
    return {name: statistics.median(values) for name, values in medians.items()}


def logits_cosine(reference: np.ndarray, actual: np.ndarray) -> dict:
    ref, act = reference.reshape(-1, reference.shape[-1]), actual.reshape(-1, actual.shape[-1])  # [positions, vocab]
    cos = np.sum(ref * act, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "argmax_agreement": float(np.mean(ref.argmax(1) == act.argmax(1)))}


def time_shapes(sessions: dict, args) -> dict[str, dict[str, float]]:
    """{shape: {graph: median ms}} for each decode past and prefill length."""
    first = next(iter(sessions.values()))
    shapes = {f"decode, past {p}": (1, p, 30) for p in args.pasts} | {f"prefill {n}": (n, 0, 5) for n in args.prompts}
    timed = {}
    for label, (sequence, past, calls) in shapes.items():
        print(f"timing {label}", file=sys.stderr)
        timed[label] = alternate(sessions, random_feeds(first, 1, sequence, past), args.rounds, calls)
    return timed


def table(title: str, timed: dict, extra: dict[str, list[str]] | None = None, headers: list[str] = ()) -> str:
    names = list(next(iter(timed.values())))
    rows = [[name, *(extra or {}).get(name, []), *(f"{timed[label][name]:.2f}" for label in timed)] for name in names]
    speed = [f"{timed[label][names[0]] / timed[label][names[1]]:.3f}x" for label in timed]
    rows.append([f"{names[1]} vs {names[0]}", *([""] * len(headers)), *speed])
    return f"### {title}\n\n" + markdown_table(["graph", *headers, *(f"{label} ms" for label in timed)], rows)


def head_blocks(args, source: Path, sample: dict, scratch: Path) -> tuple[dict, str]:
    from mmedge.export.int4 import EIGHT_BIT_MAX_BLOCK, quantize_int4

    graphs, paths = {}, {}
    for name, largest in (("head blocks of 32 (before)", 32),
                          (f"head blocks of {EIGHT_BIT_MAX_BLOCK} (default)", EIGHT_BIT_MAX_BLOCK)):
        paths[name] = scratch / f"decoder-{largest}.onnx"
        recipe = quantize_int4(source, paths[name], eight_bit_max_block=largest)
        graphs[name] = {"eight_bit_blocks": recipe["eight_bit_blocks"], "bytes": paths[name].stat().st_size}
    reference = session(source, args.threads).run(["logits"], sample)[0]  # [1, tokens, vocab]
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    for name, sess in sessions.items():
        graphs[name]["logits_vs_fp32"] = logits_cosine(reference, sess.run(["logits"], sample)[0])
    timed = time_shapes(sessions, args)
    cos = {name: g["logits_vs_fp32"] for name, g in graphs.items()}
    extra = {name: [f"{g['bytes'] / 2**20:.1f}", f"{cos[name]['mean']:.6f} / {cos[name]['min']:.6f}"]
             for name, g in graphs.items()}
    return {"graphs": graphs, "ms": timed}, table("8-bit LM head block size (INT4 decoder)", timed, extra,
                                                 ["MiB", "logits cos vs FP32 (mean / min)"])


def attention(args) -> tuple[dict, str]:
    from caption_cpu import VARIANTS

    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError

    pair = {"transformers' attention ops (default)": "int4", "--fused-attention": "int4-fused-attention"}
    paths = {}
    for name, variant in pair.items():
        try:
            paths[name] = Artifact.open(next(v for v in VARIANTS if v.name == variant).folder).component_path("decoder")
        except MmedgeError as exc:
            return {"skipped": str(exc)}, f"### Attention\n\nskipped: {exc} (run caption_cpu.py first)"
    timed = time_shapes({name: session(path, args.threads) for name, path in paths.items()}, args)
    return {"ms": timed}, table("Decoder attention (INT4 decoder, caption_cpu.py's exports)", timed)


def prefill_logits(args) -> tuple[dict, str]:
    """The prefill with logits at every prompt position (what decoders computed before ``logits_positions``) vs at the
    last one (what the generation loop asks for), same graph and session: BLIP-2 FP32 and INT4 (``caption_cpu.py``'s
    exports, ``--prompts`` tokens, random inputs) and IDEFICS-mid FP32 (``flamingo_cpu.py``'s export, its stored
    validation prompt: two photos, 39 tokens)."""
    from caption_cpu import VARIANTS

    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError
    from mmedge.validate import load_validation_samples

    folders = {f"BLIP-2 {v.name}": v.folder for v in VARIANTS if v.name in ("fp32", "int4")}
    folders["IDEFICS-mid fp32"] = OUT / "idefics-mid-fp32"
    timed, rows = {}, []
    for label, folder in folders.items():
        try:
            artifact = Artifact.open(folder)
        except MmedgeError as exc:
            rows.append([label, f"skipped: {exc.what}", "", "", ""])
            continue
        sess = session(artifact.component_path("decoder"), args.threads)
        if LOGITS_POSITIONS not in {i.name for i in sess.get_inputs()}:
            rows.append([label, "skipped: exported before logits_positions", "", "", ""])
            continue
        if label.startswith("IDEFICS"):
            feeds = dict(load_validation_samples(artifact)["decoder"]["inputs"])
        else:
            feeds = random_feeds(sess, 1, max(args.prompts[0], 2), 0)
        tokens = feeds["inputs_embeds"].shape[1]
        every = feeds | {LOGITS_POSITIONS: np.arange(tokens)[None].repeat(len(feeds["inputs_embeds"]), 0)}
        last = feeds | {LOGITS_POSITIONS: np.full((len(feeds["inputs_embeds"]), 1), tokens - 1, dtype=np.int64)}
        print(f"timing prefill logits, {label}", file=sys.stderr)
        ms = alternate({"every position": sess, "last position": sess}, every, args.rounds, 5,
                       variant_feeds={"last position": last})
        timed[label] = {"tokens": tokens, **ms}
        rows.append([label, str(tokens), f"{ms['every position']:.2f}", f"{ms['last position']:.2f}",
                     f"{ms['every position'] / ms['last position']:.3f}x"])
    text = "### Prefill: logits at every prompt position vs the last (logits_positions)\n\n" + markdown_table(
        ["decoder", "prompt tokens", "every position ms", "last position ms", "speed-up"], rows)
    return timed, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--pasts", type=non_negative, nargs="+", default=[48, 1000],
                        help="cached tokens before a decode step")
    parser.add_argument("--prompts", type=count, nargs="+", default=[33, 300],
                        help="prefill lengths (33: 32 queries + BOS)")
    parser.add_argument("--rounds", type=count, default=10)
    parser.add_argument("--json", default=str(OUT / "int4_decoder_cpu.json"))
    args = parser.parse_args()

    from caption_cpu import VARIANTS, ensure_exported

    from mmedge.artifact import Artifact
    from mmedge.validate import load_validation_samples

    fp32 = next(v for v in VARIANTS if v.name == "fp32")
    print(ensure_exported(fp32, args.threads, reexport=False), file=sys.stderr)
    artifact = Artifact.open(fp32.folder)
    sample = load_validation_samples(artifact)["decoder"]["inputs"]
    results: dict = {"machine": machine_info(), "versions": package_versions(["onnxruntime", "onnx", "numpy"]),
                     "settings": vars(args)}
    with tempfile.TemporaryDirectory() as scratch:
        results["head_blocks"], head_table = head_blocks(args, artifact.component_path("decoder"), sample,
                                                         Path(scratch))
    results["attention"], attention_table = attention(args)
    results["prefill_logits"], prefill_table = prefill_logits(args)
    print(f"INT4 decoder graphs on CPU — {results['machine']['cpu']}, threads {args.threads}, "
          f"load {results['machine']['load_average_1m']}, {results['machine']['date']}\n")
    print(head_table + "\n\n" + attention_table + "\n\n" + prefill_table)
    print(f"\nresults written to {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
