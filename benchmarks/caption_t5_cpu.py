"""BLIP-2 with Flan-T5 on CPU: Hugging Face ``model.generate`` (eager PyTorch FP32) against mmedge (ONNX Runtime).

The bundled benchmark-size config ``mmedge/blip2-vitb-flan-t5-base`` (ViT-B/16 vision tower, the real Q-Former with
32 queries, a Flan-T5-base-size encoder-decoder LLM) with random weights (seed 0): HF and every export are the same
model. One real photo and a VQA prompt (``Question: what is in the picture? Answer:``, spelled character by character
by the random-weights tokenizer: 42 prompt tokens after the 32 query rows) with exactly 32 new tokens forced on both
sides (greedy). Measured in one run, each variant in the same process, 2 threads:

- time to first token (preprocessing + prefix + T5 encoder with the cross-attention K/V + the decoder's first step)
  and decode tokens/s over the other 31 tokens; HF's per-token times from a ``transformers`` streamer, mmedge's from
  a thin wrapper around its decoder (the generation loop is mmedge's own ``generate``);
- mmedge FP32, INT8 (prefix INT8, LLM INT8 dynamic) and INT4 (prefix INT8, encoder + decoder INT4 weight-only);
- the LLM's size (encoder + decoder graphs + token-embedding table), and fidelity beside speed: whether FP32 gives
  HF's tokens, each variant's agreement with FP32 and its export-time teacher-forced logits cosine.

    python benchmarks/caption_t5_cpu.py            # ~1 min cached, a few minutes with cold exports (2 cores)
    python benchmarks/caption_t5_cpu.py --quick    # one timed run per variant
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
    error_text,
    export_once,
    fmt_mib,
    machine_info,
    markdown_table,
    package_versions,
    write_json,
)
from mmedge.cli_args import count
from mmedge.metrics import common_prefix

MODEL = "mmedge/blip2-vitb-flan-t5-base"
ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "export" / "data" / "images" / "holdout-chelsea.jpg"
OUT = Path(__file__).resolve().parent / "out"
PROMPT = "Question: what is in the picture? Answer:"
NEW_TOKENS = 32
VARIANTS = {  # name: export options
    "fp32": {},
    "int8": {"precision": "int8", "llm_precision": "int8"},
    # Random-weight LLMs lack a trained model's redundancy: the export's default 0.95 gate on the INT4 LLM's logits
    # cosine is lowered here, and the measured value is reported.
    "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.5}},
}
TARGET_INT4_DECODE = 3.0  # issue 16: INT4 decode tok/s at least 3x HF FP32's


def timing(start: float, times: list[float]) -> dict:
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def measure_hf(photo, runs: int, threads: int) -> dict:
    import torch
    import transformers

    from mmedge.export.loading import load_checkpoint

    torch.set_num_threads(threads)
    loaded = load_checkpoint(MODEL, random_weights=True, seed=0)  # same config and seed as the exports
    model = loaded.model.eval()
    pre = loaded.image_processor  # a bundled config's preprocessing (random-weights models carry no processor)
    image_processor = pre if not isinstance(pre, dict) else transformers.BlipImageProcessorPil(
        size={"height": pre["resize"]["height"], "width": pre["resize"]["width"]}, resample=Image.Resampling.BICUBIC,
        rescale_factor=pre["rescale_factor"], image_mean=pre["mean"], image_std=pre["std"], do_convert_rgb=True)
    processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=loaded.tokenizer,
                                            num_query_tokens=model.config.num_query_tokens)
    results, tokens = [], None
    for _ in range(runs + 1):  # the first run warms up
        streamer, start = StreamerClock(), time.perf_counter()
        inputs = processor(images=[photo], text=[PROMPT], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 num_beams=1, streamer=streamer)
        results.append(timing(start, streamer.times[1:]))  # times[0]: the decoder's start token
        tokens = out[0, 1:].tolist()
    return {**median_of(results[1:]), "tokens": tokens, "attention": model.config._attn_implementation,
            "prompt_tokens": int(inputs["input_ids"].shape[1])}


def llm_bytes(path: Path) -> int:
    """Encoder and decoder graphs (with any external weights) and the token-embedding table."""
    names = ("encoder.onnx", "decoder.onnx", "encoder.onnx.data", "decoder.onnx.data", "embed_tokens.npz")
    return sum((path / name).stat().st_size for name in names if (path / name).is_file())


def measure_mmedge(path: Path, photo, runs: int, threads: int) -> dict:
    import mmedge
    from mmedge.generation import generate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captioner = mmedge.load(path, threads=threads)
    config = captioner._config({"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "num_beams": 1,
                                "do_sample": False})
    clock = TokenClock(captioner.decoder)
    results, tokens = [], None
    for _ in range(runs + 1):
        start = time.perf_counter()
        built = captioner.inputs.for_images(photo, PROMPT)  # prefix, embedded prompt, encoder: cross K/V
        captioner.decoder.set_context(built["prefill"], built["step"])
        tokens = generate(clock, built["embeds"], built["mask"], config, prompt_ids=built["ids"])[0]
        clock.times.append(time.perf_counter())
        results.append(timing(start, clock.times))
    fidelity = captioner.artifact.manifest["components"]["decoder"]["parity"].get("fidelity") or {}
    captioner.close()
    return {**median_of(results[1:]), "tokens": tokens, "llm_bytes": llm_bytes(path),
            "logits_cosine_vs_fp32": fidelity.get("logits_cosine_mean"),
            "greedy_identical_share": fidelity.get("greedy_identical_share")}


def report(results: dict) -> str:
    hf = results["hf"]
    rows = [["HF generate (PyTorch FP32)", f"{hf['ttft_ms']:.0f}", f"{hf['decode_tok_s']:.1f}", "1.00x", "1.00x",
             "", "reference", ""]]
    fp32_tokens = results["mmedge"].get("fp32", {}).get("tokens")
    for name, r in results["mmedge"].items():
        if "error" in r:
            rows.append([f"mmedge {name}", "failed", r["error"].splitlines()[-1][:80], "", "", "", "", ""])
            continue
        same_hf = ("identical" if r["tokens"] == hf["tokens"]
                   else f"{common_prefix(r['tokens'], hf['tokens'])}/{NEW_TOKENS} leading")
        same_fp32 = "" if fp32_tokens is None else f"{common_prefix(r['tokens'], fp32_tokens)}/{NEW_TOKENS} leading"
        cosine = r.get("logits_cosine_vs_fp32")
        rows.append([f"mmedge {name}", f"{r['ttft_ms']:.0f}", f"{r['decode_tok_s']:.1f}",
                     f"{hf['ttft_ms'] / r['ttft_ms']:.2f}x", f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x",
                     fmt_mib(r["llm_bytes"]), same_hf,
                     same_fp32 + (f", export logits cos {cosine:.4f}" if cosine else "")])
    table = markdown_table(["engine", "TTFT ms", "decode tok/s", "TTFT speed-up", "decode speed-up",
                            "LLM size", "tokens vs HF", "vs mmedge FP32"], rows)
    lines = [table]
    int4 = results["mmedge"].get("int4", {})
    if "decode_tok_s" in int4:
        got = int4["decode_tok_s"] / hf["decode_tok_s"]
        lines.append(f"\ntarget: INT4 decode >= {TARGET_INT4_DECODE:.0f}x HF FP32: {got:.2f}x "
                     f"({'met' if got >= TARGET_INT4_DECODE else 'missed'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed run per variant")
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--threads", type=count, default=2)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 5
    photo = Image.open(PHOTO).convert("RGB")
    load_before = os.getloadavg()[0]
    from mmedge.export import export_model

    exports = {}
    for name, options in VARIANTS.items():
        folder = OUT / f"blip2-t5-base-{name}"
        cached = (folder / "manifest.json").is_file() and not args.reexport
        exports[name] = export_once(name, folder, cached, lambda o=options, f=folder: export_model(
            MODEL, f, random_weights=True, seed=0, overwrite=True, progress=False, threads=args.threads, **o))
    results = {"model": MODEL, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "threads": args.threads,
               "machine": machine_info(), "load_average_before": load_before,
               "versions": package_versions(["torch", "transformers", "onnxruntime"]),
               "exports": exports, "hf": measure_hf(photo, runs, args.threads), "mmedge": {}}
    for name in VARIANTS:
        if exports[name]["error"]:
            results["mmedge"][name] = {"error": exports[name]["error"]}
            continue
        try:
            results["mmedge"][name] = measure_mmedge(OUT / f"blip2-t5-base-{name}", photo, runs, args.threads)
        except Exception as exc:  # recorded and reported; the other variants go on
            results["mmedge"][name] = {"error": error_text(exc)}
    results["load_average_after"] = os.getloadavg()[0]
    text = report(results)
    print(text)
    print(f"\nload average before {load_before:.2f}, after {results['load_average_after']:.2f}")
    write_json(OUT / "caption_t5_cpu.json", results | {"report": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
