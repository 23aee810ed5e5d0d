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
  split graphs (``--split-image-graphs``: three calls), FP32 with the image graph's long-inner MatMuls kept
  whole (``--no-split-matmuls``; auto runs it on ONNX Runtime, as the ``fp32-onnxruntime`` row), FP32 with the
  decoder recomputing the cross K/V
  from the visual tokens at every step (what transformers does), INT8 (dynamic, LLM INT8) and INT4
  (encoders INT8, LLM INT4 weight-only);
- fidelity beside speed: whether FP32 gives HF's tokens, and each quantized variant's agreement with FP32;
- backends: every variant runs under ``auto``. With OpenVINO installed the FP32 export is first timed by ``mmedge
  tune`` (ONNX Runtime vs OpenVINO per graph, here), so its ``auto`` row follows this CPU's measurement, and the
  ``fp32-onnxruntime`` row runs the same export with every graph on ONNX Runtime (what ``auto`` picks on these
  CPUs without a measurement). ``--no-tune`` skips the tuning (a record from an earlier run is removed).

    python benchmarks/flamingo_cpu.py            # ~6 min with cold exports on 2 cores, ~1.5 min cached
    python benchmarks/flamingo_cpu.py --quick    # one timed run per variant
    python benchmarks/flamingo_cpu.py --no-tune  # auto without mmedge tune's measurement
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
from mmedge.cli_args import count
from mmedge.metrics import common_prefix

MODEL = "mmedge/idefics-mid"
ROOT = Path(__file__).resolve().parent.parent
PHOTOS = [ROOT / "export" / "data" / "images" / name for name in ("holdout-chelsea.jpg", "holdout-clock.jpg")]
OUT = Path(__file__).resolve().parent / "out"
NEW_TOKENS = 32
VARIANTS = {  # name: export options
    "fp32": {},
    "fp32-split-graphs": {"extra": {"fused_image_context": False}},
    "fp32-whole-matmuls": {"split_matmuls": False},  # the image graph's long-inner MatMuls kept whole
    "fp32-recompute-kv": {"extra": {"cached_cross_kv": False}},
    "int8": {"precision": "int8", "llm_precision": "int8"},
    # Random-weight LLMs lack a trained model's redundancy: INT4 logits cosine is ~0.93 here, under the
    # export's default 0.95 gate; the benchmark lowers it and reports the measured value.
    "int4": {"precision": "int8", "llm_precision": "int4", "extra": {"min_logits_cosine": 0.9}},
}


# rows that run another variant's export with other load options: name -> (export, mmedge.load options)
SAME_EXPORT = {"fp32-onnxruntime": ("fp32", {"backend": "onnxruntime"})}
TUNED = "fp32"  # the export mmedge tune times


def tune_fp32(folder: Path, threads: int, enabled: bool) -> dict | None:
    """``mmedge tune`` on the FP32 export (its record steers ``auto``), or, when disabled or OpenVINO is absent,
    the removal of a record an earlier run left, so ``auto`` follows the rule. Returns the record."""
    from mmedge.artifact import Artifact
    from mmedge.device import importable
    from mmedge.runtimes.openvino.tune import tune
    from mmedge.tuning import timings_path

    if not (enabled and importable("openvino")):
        timings_path(Artifact.open(folder)).unlink(missing_ok=True)
        return None
    return tune(folder, threads=threads, progress=False)


def photos_and_fp32_export(threads: int) -> tuple[list, Path] | None:
    """The benchmark's photos and the default FP32 export of ``MODEL`` in ``OUT`` (made once, remade when the
    exporter's recipes changed); None, with the error printed, when exporting failed."""
    from mmedge.export import export_model

    folder = OUT / "idefics-mid-fp32"
    export = export_once("fp32", folder, (folder / "manifest.json").is_file(), lambda: export_model(
        MODEL, folder, random_weights=True, seed=0, overwrite=True, progress=False, threads=threads))
    if export["error"]:
        print(f"export failed: {export['error']}")
        return None
    return [Image.open(p).convert("RGB") for p in PHOTOS], folder


def prompt(photos):
    return [photos[0], "An image of a cat.", photos[1], "An image of"]


def timing(start: float, times: list[float]) -> dict:
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


class HFSubject:
    """transformers' ``generate`` on the same random-weight model, its processor doing the preprocessing."""

    def __init__(self, photos, threads: int):
        import torch
        from transformers import IdeficsImageProcessor, IdeficsProcessor

        from mmedge.export.loading import load_checkpoint

        torch.set_num_threads(threads)
        loaded = load_checkpoint(MODEL, random_weights=True, seed=0)
        self.model = loaded.model.eval()
        self.processor = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=224),
                                          tokenizer=loaded.tokenizer)
        self.photos = photos

    def run(self) -> tuple[dict, list[int]]:
        import torch

        streamer, start = StreamerClock(), time.perf_counter()
        inputs = self.processor(text=[prompt(self.photos)], return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, streamer=streamer)
        return timing(start, streamer.times[1:]), out[0, inputs["input_ids"].shape[1]:].tolist()  # times[0]: prompt

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        self.model = None


class MmedgeSubject:
    """An mmedge captioner of one export (``load_options`` as ``mmedge.load`` takes them), timed token by token."""

    def __init__(self, path: Path, photos, threads: int, load_options: dict | None = None):
        import mmedge
        from mmedge.generation import GenerationConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.captioner = mmedge.load(path, threads=threads, **(load_options or {}))
        self.config = GenerationConfig.from_dict(self.captioner.artifact.manifest["generation"]).replace(
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
        self.clock = TokenClock(self.captioner.decoder)
        self.photos = photos
        self.prompt_tokens = 0

    def run(self) -> tuple[dict, list[int]]:
        from mmedge.generation import generate

        start = time.perf_counter()
        built = self.captioner.inputs.build([prompt(self.photos)])
        image_ms = (time.perf_counter() - start) * 1e3  # preprocessing + image graph(s) + embedding lookup
        self.captioner.decoder.set_context(built["prefill"], built["step"])
        tokens = generate(self.clock, built["embeds"], built["mask"], self.config, prompt_ids=built["ids"])[0]
        self.clock.times.append(time.perf_counter())
        self.prompt_tokens = int(built["ids"].shape[1])
        return timing(start, self.clock.times) | {"image_context_ms": image_ms}, tokens

    def info(self) -> dict:
        manifest = self.captioner.artifact.manifest
        fidelity = manifest["components"]["decoder"]["parity"].get("fidelity") or {}
        return {"logits_cosine_vs_fp32": fidelity.get("logits_cosine_mean"), "prompt_tokens": self.prompt_tokens,
                "graphs": list(manifest["components"]), "backends": backends_used(self.captioner)}

    def close(self) -> None:
        self.captioner.close()


def measure_in_turns(subjects: dict, runs: int) -> dict:
    """Every subject runs once per round, the order reversed every other round (a drifting machine favours none),
    after a warm-up round; each subject's medians, its last tokens, and ``failed`` where a run raised."""
    times: dict[str, list[dict]] = {name: [] for name in subjects}
    tokens: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    for round_ in range(runs + 1):
        order = list(subjects) if round_ % 2 == 0 else list(reversed(subjects))
        for name in order:
            if name in failed:
                continue
            try:
                timed, tokens[name] = subjects[name].run()
            except Exception as exc:  # recorded and reported; the other subjects go on
                failed[name] = error_text(exc)
                continue
            if round_:  # round 0 warms up
                times[name].append(timed)
    return {name: {"error": failed[name]} if name in failed else
            {**median_of(times[name]), "tokens": tokens[name], **subjects[name].info()} for name in subjects}


def report(results: dict) -> str:
    hf = results["hf"]
    rows = [["HF generate (PyTorch FP32)", f"{hf['ttft_ms']:.0f}", "", f"{hf['decode_tok_s']:.1f}", "1.00x",
             "1.00", "1.00x", "reference", ""]]
    fp32_tokens = results["mmedge"].get("fp32", {}).get("tokens")
    for name, r in results["mmedge"].items():
        if "error" in r:
            rows.append([f"mmedge {name}", "failed", r["error"].splitlines()[-1][:80], "", "", "", "", "", ""])
            continue
        same_hf = ("identical" if r["tokens"] == hf["tokens"]
                   else f"{common_prefix(r['tokens'], hf['tokens'])}/{NEW_TOKENS} leading")
        same_fp32 = "" if fp32_tokens is None else f"{common_prefix(r['tokens'], fp32_tokens)}/{NEW_TOKENS} leading"
        cosine = r.get("logits_cosine_vs_fp32")
        rows.append([f"mmedge {name}", f"{r['ttft_ms']:.0f}",
                     f"{r['image_context_ms']:.0f} + {r['ttft_ms'] - r['image_context_ms']:.0f}",
                     f"{r['decode_tok_s']:.1f}",
                     f"{hf['ttft_ms'] / r['ttft_ms']:.2f}x", f"{r['ttft_ms'] / hf['ttft_ms']:.2f}",
                     f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x",
                     same_hf, same_fp32 + (f", logits cos {cosine:.4f}" if cosine else "")])
    table = markdown_table(["engine", "TTFT ms", "of which image context + prefill", "decode tok/s", "TTFT speed-up",
                            "TTFT / HF's", "decode speed-up", "tokens vs HF", "vs mmedge FP32"], rows)
    lines = [table, "", "backends: " + "; ".join(f"{name}: {r['backends']}" for name, r in results["mmedge"].items()
                                             if "backends" in r)]
    tuned = results.get("tune")
    if tuned:
        lines.append("mmedge tune on the FP32 export: " + "; ".join(
            f"{name} ONNX Runtime {c['onnxruntime_ms']:.1f} ms, OpenVINO {c['openvino_ms']:.1f} ms"
            for name, c in tuned["components"].items()))
    cached, recompute = results["mmedge"].get("fp32-onnxruntime"), results["mmedge"].get("fp32-recompute-kv")
    if cached and recompute and "error" not in cached and "error" not in recompute:
        lines.append(f"\ncached cross-attention K/V: decode {cached['decode_tok_s'] / recompute['decode_tok_s']:.2f}x "
                     f"the recomputing decoder, TTFT {recompute['ttft_ms'] / cached['ttft_ms']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed run per variant")
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--threads", type=count, default=2)
    parser.add_argument("--runs", type=count, default=None,
                        help="timed runs per variant (median), after a warm-up (default 3)")
    parser.add_argument("--no-tune", action="store_true", help="auto without mmedge tune's measurement")
    args = parser.parse_args(argv)
    if args.quick and args.runs is not None:
        parser.error("--runs does nothing with --quick (one timed run per variant): give one or the other")
    runs = 1 if args.quick else args.runs or 3
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
               "exports": exports, "mmedge": {}}
    if not exports[TUNED]["error"]:
        results["tune"] = tune_fp32(OUT / f"idefics-mid-{TUNED}", args.threads, not args.no_tune)
    rows = {name: (name, {}) for name in VARIANTS}
    rows = {TUNED: rows.pop(TUNED), **SAME_EXPORT, **rows}  # the tuned row and its all-ONNX-Runtime twin together
    subjects: dict = {"hf": HFSubject(photos, args.threads)}
    for name, (export, load_options) in rows.items():
        if exports[export]["error"]:
            results["mmedge"][name] = {"error": exports[export]["error"]}
            continue
        try:
            subjects[name] = MmedgeSubject(OUT / f"idefics-mid-{export}", photos, args.threads, load_options)
        except Exception as exc:  # recorded and reported; the other variants go on
            results["mmedge"][name] = {"error": error_text(exc)}
    try:
        measured = measure_in_turns(subjects, runs)
    finally:
        for subject in subjects.values():
            subject.close()
    results["hf"] = measured.pop("hf")
    results["mmedge"] = {name: measured.get(name) or results["mmedge"][name] for name in rows}
    text = report(results)
    print(text)
    write_json(OUT / "flamingo_cpu.json", results | {"report": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
