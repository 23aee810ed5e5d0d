"""IDEFICS (Flamingo-style) on CPU: Hugging Face ``model.generate`` (eager PyTorch FP32) against mmedge.

The bundled benchmark-size config ``mmedge/idefics-mid`` (ViT-B/32 tower, Perceiver Resampler with 64
latents, a 12-layer 768-wide Llama with gated cross-attention every 4 layers; 257 M parameters) with
random weights (seed 0), so HF and every export are the same model. One interleaved two-image few-shot
prompt, ``[photo1, "An image of a cat.", photo2, "An image of"]``, with exactly 32 new tokens forced on
both sides (greedy). Measured in one run, each variant in the same process, 2 threads:

- time to first token (preprocessing + vision + resampler + cross K/V + prefill) and decode tokens/s, and
  for mmedge where the first token's time goes: the prompt's image context (preprocessing + the image
  graph(s)) and the rest (embedding lookup + decoder prefill + choosing the token);
- mmedge FP32 with the fused image graph (vision → resampler → cross K/V, one call; the default) vs the
  split graphs (``--split-image-graphs``: three calls), FP32 with the decoder recomputing the cross K/V
  from the visual tokens at every step (what transformers does), INT8 (dynamic, LLM INT8) and INT4
  (encoders INT8, LLM INT4 weight-only);
- fidelity beside speed: whether FP32 gives HF's tokens, and each quantized variant's agreement with FP32.

    python benchmarks/flamingo_cpu.py            # ~6 min with cold exports on 2 cores, ~1.5 min cached
    python benchmarks/flamingo_cpu.py --quick    # one timed run per variant
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

from _common import (
    StreamerClock,
    TokenClock,
    backends_used,
    error_text,
    export_once,
    machine_info,
    markdown_table,
    package_versions,
    write_json,
)
from mmedge.metrics import common_prefix

MODEL = "mmedge/idefics-mid"
ROOT = Path(__file__).resolve().parent.parent
PHOTOS = [ROOT / "export" / "data" / "images" / name for name in ("holdout-chelsea.jpg", "holdout-clock.jpg")]
OUT = Path(__file__).resolve().parent / "out"
NEW_TOKENS = 32
VARIANTS = {  # name: export options
    "fp32": {},
    "fp32-split-graphs": {"extra": {"fused_image_context": False}},
    "fp32-recompute-kv": {"extra": {"cached_cross_kv": False}},
    "int8": {"precision": "int8", "llm_precision": "int8"},
    # Random-weight LLMs lack a trained model's redundancy: INT4 logits cosine is ~0.93 here, under the
    # export's default 0.95 gate; the benchmark lowers it and reports the measured value.
    "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.9}},
}


def prompt(photos):
    return [photos[0], "An image of a cat.", photos[1], "An image of"]


def timing(start: float, times: list[float]) -> dict:
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure_hf(photos, runs: int, threads: int) -> dict:
    import torch
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    from mmedge.export.loading import load_checkpoint

    torch.set_num_threads(threads)
    loaded = load_checkpoint(MODEL, random_weights=True, seed=0)
    model = loaded.model.eval()
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=224), tokenizer=loaded.tokenizer)

    results, tokens = [], None
    for _ in range(runs + 1):  # the first run warms up
        streamer, start = StreamerClock(), time.perf_counter()
        inputs = processor(text=[prompt(photos)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 streamer=streamer)
        results.append(timing(start, streamer.times[1:]))  # times[0]: the prompt
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return {**median_of(results[1:]), "tokens": tokens}


def measure_mmedge(path: Path, photos, runs: int, threads: int, load_options: dict | None = None) -> dict:
    import mmedge
    from mmedge.generation import GenerationConfig, generate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captioner = mmedge.load(path, threads=threads, **(load_options or {}))
    backends = backends_used(captioner)
    config = GenerationConfig.from_dict(captioner.artifact.manifest["generation"]).replace(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
    clock = TokenClock(captioner.decoder)
    results, tokens = [], None
    for _ in range(runs + 1):
        start = time.perf_counter()
        built = captioner.inputs.build([prompt(photos)])
        image_ms = (time.perf_counter() - start) * 1e3  # preprocessing + image graph(s) + embedding lookup
        captioner.decoder.set_context(built["prefill"], built["step"])
        tokens = generate(clock, built["embeds"], built["mask"], config, prompt_ids=built["ids"])[0]
        clock.times.append(time.perf_counter())
        results.append(timing(start, clock.times) | {"image_context_ms": image_ms})
    fidelity = captioner.artifact.manifest["components"]["decoder"]["parity"].get("fidelity") or {}
    captioner.close()
    return {**median_of(results[1:]), "tokens": tokens, "logits_cosine_vs_fp32": fidelity.get("logits_cosine_mean"),
            "prompt_tokens": int(built["ids"].shape[1]), "graphs": list(captioner.artifact.manifest["components"]),
            "backends": backends}


def report(results: dict) -> str:
    hf = results["hf"]
    rows = [["HF generate (PyTorch FP32)", f"{hf['ttft_ms']:.0f}", "", f"{hf['decode_tok_s']:.1f}", "1.00x",
             "1.00x", "reference", ""]]
    fp32_tokens = results["mmedge"].get("fp32", {}).get("tokens")
    for name, r in results["mmedge"].items():
        if "error" in r:
            rows.append([f"mmedge {name}", "failed", r["error"].splitlines()[-1][:80], "", "", "", "", ""])
            continue
        same_hf = ("identical" if r["tokens"] == hf["tokens"]
                   else f"{common_prefix(r['tokens'], hf['tokens'])}/{NEW_TOKENS} leading")
        same_fp32 = "" if fp32_tokens is None else f"{common_prefix(r['tokens'], fp32_tokens)}/{NEW_TOKENS} leading"
        cosine = r.get("logits_cosine_vs_fp32")
        rows.append([f"mmedge {name}", f"{r['ttft_ms']:.0f}",
                     f"{r['image_context_ms']:.0f} + {r['ttft_ms'] - r['image_context_ms']:.0f}",
                     f"{r['decode_tok_s']:.1f}",
                     f"{hf['ttft_ms'] / r['ttft_ms']:.2f}x", f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x",
                     same_hf, same_fp32 + (f", logits cos {cosine:.4f}" if cosine else "")])
    table = markdown_table(["engine", "TTFT ms", "of which image context + prefill", "decode tok/s", "TTFT speed-up",
                            "decode speed-up", "tokens vs HF", "vs mmedge FP32"], rows)
    lines = [table, "", "backends: " + "; ".join(f"{name}: {r['backends']}" for name, r in results["mmedge"].items()
                                             if "backends" in r)]
    cached, recompute = results["mmedge"].get("fp32"), results["mmedge"].get("fp32-recompute-kv")
    if cached and recompute and "error" not in cached and "error" not in recompute:
        lines.append(f"\ncached cross-attention K/V: decode {cached['decode_tok_s'] / recompute['decode_tok_s']:.2f}x "
                     f"the recomputing decoder, TTFT {recompute['ttft_ms'] / cached['ttft_ms']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed run per variant")
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 3
    photos = [Image.open(p).convert("RGB") for p in PHOTOS]
    load_before = os.getloadavg()[0]
    from mmedge.export import export_model

    exports = {}
    for name, options in VARIANTS.items():
        folder = OUT / f"idefics-mid-{name}"
        cached = (folder / "manifest.json").is_file() and not args.reexport
        exports[name] = export_once(name, folder, cached, lambda o=options, f=folder: export_model(
            MODEL, f, random_weights=True, seed=0, overwrite=True, progress=False, threads=args.threads, **o))
    results = {"model": MODEL, "new_tokens": NEW_TOKENS, "threads": args.threads, "machine": machine_info(),
               "load_average_before": load_before,
               "versions": package_versions(["torch", "transformers", "onnxruntime"]),
               "exports": exports, "hf": measure_hf(photos, runs, args.threads), "mmedge": {}}
    for name in VARIANTS:
        if exports[name]["error"]:
            results["mmedge"][name] = {"error": exports[name]["error"]}
            continue
        try:
            results["mmedge"][name] = measure_mmedge(OUT / f"idefics-mid-{name}", photos, runs, args.threads)
        except Exception as exc:  # recorded and reported; the other variants go on
            results["mmedge"][name] = {"error": error_text(exc)}
    text = report(results)
    print(text)
    write_json(OUT / "flamingo_cpu.json", results | {"report": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
