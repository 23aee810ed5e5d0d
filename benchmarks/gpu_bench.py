"""The torch backend on a GPU against Hugging Face, measured in one run (driven by ``benchmarks/gpu_check.sh``).

Full mode (a CUDA GPU): the bundled ``Salesforce/blip2-opt-2.7b`` architecture (ViT-g vision tower, Q-Former with 32
queries, OPT-2.7B) with random weights (seed 0) built on the GPU in FP16 (the Q-Former and query tokens stay FP32,
as ``from_pretrained(dtype=float16)`` keeps them), one photo, batch 1, greedy with exactly 64 new tokens forced
(min_new_tokens = max_new_tokens = 64) on every side:

- HF ``generate`` eager (DynamicCache) and with ``cache_implementation="static"`` (which transformers compiles with
  ``torch.compile`` on CUDA; the first call's compile time is reported);
- mmedge's torch backend FP16: the prefix module as a CUDA graph, ``TorchDecoder`` with its static cache and the
  CUDA-graph decode step, driven by mmedge's numpy generation loop;
- the same with the LLM's Linear layers in bitsandbytes INT8 (LLM.int8, eager steps) and NF4 (CUDA graph), each on
  a copy of the FP16 LLM (skipped with the reason when bitsandbytes is absent);

time to first token (pixels on the host → first token on the host: prefix, prefill, first token), decode tokens/s over
the other 63, peak GPU memory allocated, and the LLM's weight bytes; the FP16 logits cosine of each quantized LLM on
the prompt. Then the CLIP ViT-B/32 image tower (random weights), batch 1 and 64: HF eager FP16
(``get_image_features``) vs mmedge's torch runner (FP16, CUDA graph), host arrays in and out, and mmedge with the
pixels already on the GPU and the output left there.

The runtime objects are built around the in-memory model (``TorchRunner`` over the spec's wrapper module,
``TorchDecoder`` over ``model.language_model``) rather than from an exported artifact, so a 2.7B model needs no
15 GB save and reload inside the check's six minutes; loading from artifacts is what the GPU-marked tests cover.

Tiny mode (``--tiny``, any machine, CPU FP32): the tiny test checkpoints (``tests/support/tiny_checkpoints``), 16 new
tokens, batch 1 and 8, HF static cache without compilation: it checks the whole script in a minute or two.

Writes ``benchmarks/out/gpu_check.json`` (``--out``) and, in full mode, appends a section with the card's name to
``benchmarks/RESULTS.md`` (``--results``; ``--no-results`` to skip).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (tiny mode)
from _common import (StreamerClock, TokenClock, markdown_table, package_versions, summary,  # noqa: E402
                     time_samples, write_json)

PHOTO = ROOT / "export" / "data" / "images" / "holdout-chelsea.jpg"
OUT = Path(__file__).resolve().parent / "out" / "gpu_check.json"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BLIP2 = "Salesforce/blip2-opt-2.7b"
CLIP = "openai/clip-vit-base-patch32"
TARGETS = {  # name: (what, direction, limit)
    "decode_vs_hf_static": ("decode tok/s, mmedge torch FP16 vs HF static cache", ">=", 2.2),
    "decode_tok_s": ("decode tok/s, mmedge torch FP16", ">=", 400.0),
    "clip_batch1_ms": ("CLIP ViT-B/32 image tower batch 1, mmedge torch FP16 (host in/out), ms", "<=", 0.5),
}


class Settings:
    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.new_tokens = 16 if tiny else 64
        self.clip_batches = (1, 8) if tiny else (1, 64)
        # (warm-up, timed) runs per variant
        self.hf_eager = (1, 2) if tiny else (1, 3)
        self.hf_static = (1, 2) if tiny else (2, 3)
        self.mmedge = (1, 3) if tiny else (2, 5)
        self.int8 = (1, 2)
        self.nf4 = (1, 2) if tiny else (2, 3)
        self.clip_runs = {1: (3, 10), 8: (2, 5)} if tiny else {1: (10, 100), 64: (3, 20)}


# --- helpers ---------------------------------------------------------------------------------------
class Budget:
    """Seconds left for measuring; a variant that would start past it is recorded as skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def attempt(results: dict, name: str, budget: Budget, fn: Callable[[], dict]) -> None:
    """Run one measurement; an exception or an exhausted budget is recorded, the others go on."""
    if budget.left() <= 0:
        results[name] = {"skipped": "time budget spent"}
        print(f"gpu_bench: {name}: skipped (time budget spent)", file=sys.stderr)
        return
    print(f"gpu_bench: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Skip as exc:
        results[name] = {"skipped": str(exc)}
    except Exception as exc:  # recorded with its traceback; the other variants still run
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                         "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        print(f"gpu_bench: {name} FAILED: {results[name]['error']}", file=sys.stderr)
    results[name]["seconds"] = round(time.perf_counter() - start, 1)


class Skip(Exception):
    """A variant that cannot run here (with the reason)."""


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(torch, device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def weight_bytes(module) -> int:
    """Parameter and buffer bytes, shared tensors once (bitsandbytes keeps quantized weights as uint8/int8 params)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def captions(run: Callable[[], tuple[list[int], float, list[float]]], warmup: int, runs: int, new_tokens: int) -> dict:
    """``run() -> (tokens, start, token times)``: TTFT and decode tok/s over the tokens after the first, medians."""
    for _ in range(warmup):
        run()
    ttft, decode, total, tokens = [], [], [], None
    for _ in range(runs):
        tokens, start, times = run()
        if len(tokens) != new_tokens or len(times) != new_tokens:
            raise RuntimeError(f"expected {new_tokens} new tokens, got {len(tokens)} tokens and {len(times)} times")
        ttft.append((times[0] - start) * 1e3)
        decode.append((new_tokens - 1) / (times[-1] - times[0]))
        total.append((times[-1] - start) * 1e3)
    return {"ttft_ms": summary(ttft), "decode_tok_s": summary(decode), "total_ms": summary(total), "tokens": tokens}


# --- models ------------------------------------------------------------------------------------------
def build_blip2(settings: Settings, device, dtype):
    """(model, pixels [1, 3, H, W] float32, bos id, eos id): random-weight BLIP-2 on ``device``."""
    import torch
    import transformers

    from mmedge.preprocess import ImagePreprocessor

    if settings.tiny:
        from tests.support.tiny_checkpoints import make_tiny_blip2

        from mmedge.export.preprocessing import preprocess_config_from_hf

        with tempfile.TemporaryDirectory(prefix="gpu-bench-blip2-") as tmp:
            folder = make_tiny_blip2(Path(tmp))
            model = transformers.Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
            preprocess = preprocess_config_from_hf(transformers.AutoImageProcessor.from_pretrained(str(folder)))
    else:
        from mmedge.export.loading import _bundled_config

        entry = _bundled_config(BLIP2)
        config = transformers.AutoConfig.for_model(**entry["config"])
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.Blip2ForConditionalGeneration(config)
        model = model.to(dtype)
        for name in getattr(model, "_keep_in_fp32_modules", None) or []:  # as from_pretrained(dtype=float16) keeps them
            part = getattr(model, name)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.float()
            else:
                part.float()
        preprocess = entry["preprocess"]
    model = model.to(device).eval().requires_grad_(False)
    from PIL import Image

    pixels = ImagePreprocessor(preprocess)([Image.open(PHOTO)])  # [1, 3, H, W] float32
    generation = model.generation_config
    eos = generation.eos_token_id if generation.eos_token_id is not None else model.config.text_config.eos_token_id
    bos = generation.bos_token_id if generation.bos_token_id is not None else model.config.text_config.bos_token_id
    return model, pixels, int(bos), int(eos if not isinstance(eos, list) else eos[0])


def hf_caption(model, pixels: np.ndarray, settings: Settings, device, **kwargs) -> tuple[list[int], float, list[float]]:
    import torch

    clock = StreamerClock()
    start = time.perf_counter()
    vision_dtype = next(model.vision_model.parameters()).dtype
    with torch.inference_mode():
        x = torch.from_numpy(pixels).to(device, vision_dtype)
        out = model.generate(pixel_values=x, max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                             do_sample=False, num_beams=1, streamer=clock, **kwargs)
    return out[0, -settings.new_tokens:].tolist(), start, clock.times[-settings.new_tokens:]


class MmedgeBlip2:
    """mmedge's torch backend around the in-memory model: the fused prefix module as a TorchRunner (CUDA graph on a
    GPU), a TorchDecoder over the LLM, the token-embedding table in numpy, mmedge's generation loop."""

    def __init__(self, model, llm, settings: Settings, device, dtype, bos: int, eos: int, quantization: dict | None = None):
        from mmedge.export.specs.blip2 import _FusedPrefix, llm_input_width
        from mmedge.generation import GenerationConfig
        from mmedge.runtimes.torch_backend import TorchRunner
        from mmedge.runtimes.torch_decoder import TorchDecoder

        queries, width = int(model.config.num_query_tokens), llm_input_width(llm)
        size = int(model.config.vision_config.image_size)
        component = {"inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, size, size]}},
                     "outputs": {"prefix_embeds": {"dtype": "float32", "shape": ["batch", queries, width]}}}
        self.prefix = TorchRunner(_FusedPrefix(model).eval(), "prefix", component, device=device, dtype=dtype)
        self.decoder = TorchDecoder(llm, device=device, dtype=dtype, position_offset=0, quantization=quantization,
                                    max_positions=int(getattr(llm.config, "max_position_embeddings", 0) or 0) or None)
        self.table = llm.get_input_embeddings().weight.detach().float().cpu().numpy()  # [vocab, width]
        self.bos = bos
        self.config = GenerationConfig(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                                       num_beams=1, do_sample=False, eos_token_id=eos, bos_token_id=bos)
        self.clock = TokenClock(self.decoder)

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        prefix = self.prefix.infer({"pixel_values": pixels})["prefix_embeds"]  # [1, queries, width]
        return np.concatenate([prefix, self.table[[self.bos]][None]], axis=1)  # [1, queries + 1, width]

    def caption(self, pixels: np.ndarray) -> tuple[list[int], float, list[float]]:
        from mmedge.generation import generate

        start = time.perf_counter()
        embeds = self.inputs(pixels)
        tokens = generate(self.clock, embeds, np.ones(embeds.shape[:2], dtype=np.int64), self.config)[0]
        return tokens, start, [*self.clock.times, time.perf_counter()]

    def first_logits(self, pixels: np.ndarray) -> np.ndarray:
        embeds = self.inputs(pixels)
        return self.decoder.start(embeds, np.ones(embeds.shape[:2], dtype=np.int64))

    def close(self):
        self.prefix.close()
        self.decoder.close()


def quantized_llm(llm, method: str, device, dtype):
    """A copy of the FP16 LLM with its Linear layers (not the head) in bitsandbytes ``method``."""
    from mmedge.runtimes.torch_backend import _output_head_names, import_bitsandbytes, quantize_linear_layers

    try:
        import_bitsandbytes()
    except Exception as exc:
        raise Skip(f"bitsandbytes is not importable here ({exc.what if hasattr(exc, 'what') else exc})") from None
    compiled = {k: v for k, v in vars(llm).items() if k in ("_compiled_call", "_last_compile_config")}
    for key in compiled:  # HF's static-cache run leaves a torch.compile'd __call__ on the model: not copyable
        delattr(llm, key)
    try:
        clone = copy.deepcopy(llm)
    finally:
        for key, value in compiled.items():
            setattr(llm, key, value)
    report = quantize_linear_layers(clone, method, compute_dtype=dtype, device=device, skip=_output_head_names(clone))
    return clone, report


# --- the measurements --------------------------------------------------------------------------------
def measure_blip2(settings: Settings, device, dtype, budget: Budget) -> dict:
    import torch

    from mmedge.metrics import common_prefix, cosine_rows

    reset_peak(torch, device)
    model, pixels, bos, eos = build_blip2(settings, device, dtype)
    resident = peak_mib(torch, device)
    out: dict[str, Any] = {"model": "tiny test BLIP-2 (tests/support)" if settings.tiny else f"{BLIP2} architecture, random weights",
                           "dtype": str(dtype).replace("torch.", ""), "new_tokens": settings.new_tokens, "batch": 1,
                           "llm_weight_mib": round(weight_bytes(model.language_model) / 2**20, 1),
                           "model_weight_mib": round(weight_bytes(model) / 2**20, 1), "resident_after_build_mib": resident}
    variants: dict[str, dict] = {}
    out["variants"] = variants

    def hf(label, warm_runs, **kwargs):
        def run():
            reset_peak(torch, device)
            first = time.perf_counter()
            hf_caption(model, pixels, settings, device, **kwargs)  # the first call (compilation, with a static cache)
            first_s = time.perf_counter() - first
            result = captions(lambda: hf_caption(model, pixels, settings, device, **kwargs), warm_runs[0] - 1 if warm_runs[0] else 0,
                              warm_runs[1], settings.new_tokens)
            return {"title": label, "first_call_s": round(first_s, 2), "peak_allocated_mib": peak_mib(torch, device), **result}
        return run

    attempt(variants, "hf_eager", budget, hf("HF generate eager (DynamicCache)", settings.hf_eager))
    reference_logits: dict[str, np.ndarray] = {}

    def mmedge_variant(label, method, warm_runs):
        def run():
            reset_peak(torch, device)
            llm, report = (model.language_model, None) if method is None else quantized_llm(model.language_model, method, device, dtype)
            runner = MmedgeBlip2(model, llm, settings, device, dtype, bos, eos, report)
            try:
                result = captions(lambda: runner.caption(pixels), *warm_runs, settings.new_tokens)
                logits = runner.first_logits(pixels)
                entry = {"title": label, "peak_allocated_mib": peak_mib(torch, device), **result,
                         "llm_weight_mib": round(weight_bytes(llm) / 2**20, 1), "decode_graph": runner.decoder.graph_status,
                         "prefix_graphs": runner.prefix.graph_report()}
                if method is None:
                    reference_logits["fp16"] = logits
                elif "fp16" in reference_logits:
                    entry["first_logits_cosine_vs_fp16"] = float(cosine_rows(reference_logits["fp16"], logits).min())
                if report:
                    entry["quantization"] = report | {"kept_float": report["kept_float"][:4]}
                return entry
            finally:
                runner.close()
                if method is not None:
                    del llm
        return run

    precision = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}[dtype]
    attempt(variants, "mmedge_fp16", budget, mmedge_variant(f"mmedge torch {precision} (static cache, CUDA graphs)"
                                                            if device.type == "cuda" else f"mmedge torch {precision} (CPU, eager)",
                                                            None, settings.mmedge))
    static_kwargs = {"cache_implementation": "static"}
    if device.type != "cuda":
        static_kwargs["disable_compile"] = True  # transformers compiles static-cache generation on CUDA only
    attempt(variants, "hf_static", budget, hf("HF generate, cache_implementation='static'"
                                             + (" (torch.compile)" if device.type == "cuda" else ""), settings.hf_static,
                                             **static_kwargs))
    attempt(variants, "mmedge_nf4", budget, mmedge_variant("mmedge torch, LLM NF4 (bitsandbytes)", "nf4", settings.nf4))
    attempt(variants, "mmedge_int8", budget, mmedge_variant("mmedge torch, LLM INT8 (bitsandbytes LLM.int8)", "int8", settings.int8))
    hf_tokens = variants.get("hf_eager", {}).get("tokens")
    for entry in variants.values():
        if hf_tokens and entry.get("tokens"):
            entry["common_prefix_with_hf_eager"] = round(common_prefix(hf_tokens, entry["tokens"]) / len(hf_tokens), 3)
    del model
    reset_peak(torch, device)
    return out


def measure_clip(settings: Settings, device, dtype, budget: Budget) -> dict:
    import torch
    import transformers

    from mmedge.export.specs.clip import _ImageEmbeds
    from mmedge.metrics import cosine_rows
    from mmedge.runtimes.torch_backend import TorchRunner

    if settings.tiny:
        from tests.support.tiny_checkpoints import make_tiny_clip

        with tempfile.TemporaryDirectory(prefix="gpu-bench-clip-") as tmp:
            model = transformers.CLIPModel.from_pretrained(str(make_tiny_clip(Path(tmp))), dtype=dtype)
    else:
        from mmedge.export.loading import _bundled_config

        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.CLIPModel(transformers.AutoConfig.for_model(**_bundled_config(CLIP)["config"]))
    model = model.to(device, dtype).eval().requires_grad_(False)
    size, dim = int(model.config.vision_config.image_size), int(model.config.projection_dim)
    component = {"inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, size, size]}},
                 "outputs": {"image_embeds": {"dtype": "float32", "shape": ["batch", dim]}}}
    host = TorchRunner(_ImageEmbeds(model).eval(), "vision", component, device=device, dtype=dtype)
    resident = TorchRunner(_ImageEmbeds(model).eval(), "vision", component, device=device, dtype=dtype, keep_on_device=True)

    def hf_host(pixels):
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=torch.from_numpy(pixels).to(device, dtype))
            out = getattr(out, "pooler_output", out)
            return out.float().cpu().numpy()

    def hf_device(x):
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=x)
        sync(torch, device)
        return getattr(out, "pooler_output", out)

    def device_call(x):
        out = resident.infer({"pixel_values": x})["image_embeds"]
        sync(torch, device)
        return out

    def timed(fn, warmup, runs) -> dict:
        return summary(time_samples(fn, warmup=warmup, runs=runs))

    results: dict[str, Any] = {"model": "tiny test CLIP (tests/support)" if settings.tiny else f"{CLIP} image tower, random weights",
                               "dtype": str(dtype).replace("torch.", "")}
    rng = np.random.default_rng(0)
    for batch in settings.clip_batches:
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        on_device = torch.from_numpy(pixels).to(device, dtype)
        warmup, runs = settings.clip_runs[batch]
        row: dict[str, dict] = {}

        def measure(name, fn):
            attempt(row, name, budget, lambda: {"ms": timed(fn, warmup, runs)})

        measure("hf_eager", lambda: hf_host(pixels))
        measure("mmedge", lambda: host.infer({"pixel_values": pixels}))
        measure("hf_eager_device", lambda: hf_device(on_device))
        measure("mmedge_device", lambda: device_call(on_device))
        if "ms" in row.get("mmedge", {}):
            cos = cosine_rows(hf_host(pixels), host.infer({"pixel_values": pixels})["image_embeds"])
            row["mmedge"]["cosine_vs_hf_eager"] = float(cos.min())
        results[f"batch_{batch}"] = row
    results["graphs"] = host.graph_report()
    host.close()
    resident.close()
    del model
    reset_peak(torch, device)
    return results


# --- report ------------------------------------------------------------------------------------------
def evaluate_targets(data: dict) -> dict:
    variants = data.get("blip2", {}).get("variants", {})
    tok = lambda name: variants.get(name, {}).get("decode_tok_s", {}).get("median")  # noqa: E731
    clip_ms = data.get("clip", {}).get("batch_1", {}).get("mmedge", {}).get("ms", {}).get("median")
    values = {"decode_vs_hf_static": (tok("mmedge_fp16") / tok("hf_static")) if tok("mmedge_fp16") and tok("hf_static") else None,
              "decode_tok_s": tok("mmedge_fp16"), "clip_batch1_ms": clip_ms}
    out = {}
    for name, (what, direction, limit) in TARGETS.items():
        value = values[name]
        met = None if value is None or data["mode"] != "full" else (value >= limit if direction == ">=" else value <= limit)
        out[name] = {"what": what, "target": f"{direction} {limit}", "value": value, "met": met}
    return out


def markdown(data: dict) -> str:
    device = data["device"]
    lines = [f"## torch backend on {device['name']} (`benchmarks/gpu_check.sh`{' --tiny' if data['mode'] == 'tiny' else ''})", "",
             f"- **Date:** {data['date']}; mode {data['mode']}; torch {device['torch']}, CUDA {device['cuda']}, transformers "
             f"{device['transformers']}, bitsandbytes {device['bitsandbytes']}.",
             f"- **BLIP-2:** {data['blip2'].get('model')}, {data['blip2'].get('dtype')}, batch 1, "
             f"{data['blip2'].get('new_tokens')} new tokens forced, greedy; LLM weights {data['blip2'].get('llm_weight_mib')} MiB.", ""]
    rows = []
    for name, entry in data["blip2"].get("variants", {}).items():
        if "error" in entry or "skipped" in entry:
            rows.append([name, entry.get("error") or f"skipped: {entry['skipped']}", None, None, None, None])
            continue
        rows.append([entry["title"], f"{entry['ttft_ms']['median']:.1f}", f"{entry['decode_tok_s']['median']:.1f}",
                     entry.get("peak_allocated_mib"), entry.get("llm_weight_mib"),
                     entry.get("first_logits_cosine_vs_fp16") and f"{entry['first_logits_cosine_vs_fp16']:.5f}"])
    lines += [markdown_table(["engine", "TTFT ms", "decode tok/s", "peak GPU MiB", "LLM weights MiB", "logits cos vs FP16"], rows), ""]
    rows = []
    for key, row in data["clip"].items():
        if not key.startswith("batch_"):
            continue
        for name, entry in row.items():
            value = entry.get("ms", {}).get("median")
            rows.append([key.replace("batch_", ""), name, f"{value:.3f}" if value is not None else entry.get("error") or entry.get("skipped")])
    lines += [f"CLIP: {data['clip'].get('model')} ({data['clip'].get('dtype')}); ms, median", "",
              markdown_table(["batch", "engine", "ms"], rows), ""]
    rows = [[t["what"], t["target"], None if t["value"] is None else f"{t['value']:.3f}",
             {True: "met", False: "missed", None: "not evaluated"}[t["met"]]] for t in data["targets"].values()]
    lines += [markdown_table(["target", "bound", "measured", "verdict"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny test models on this machine's CPU (a quick check)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--results", type=Path, default=RESULTS, help="full mode: append a section here")
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop starting new measurements after this")
    parser.add_argument("--tests", default=None, help="the GPU tests' outcome line, recorded in the JSON")
    args = parser.parse_args(argv)
    import torch

    budget = Budget(args.budget_s)
    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; run with --tiny for the CPU check", file=sys.stderr)
        return 3
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)  # tiny models: more threads only add synchronization on a shared CPU
    settings = Settings(args.tiny)
    name = torch.cuda.get_device_name(device) if cuda else "CPU (tiny mode)"
    versions = package_versions(["torch", "transformers", "bitsandbytes", "onnxruntime", "numpy"])
    data: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": {"name": name, "torch": versions["torch"], "cuda": torch.version.cuda, "transformers": versions["transformers"],
                   "bitsandbytes": versions["bitsandbytes"],
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
                   "memory_mib": round(torch.cuda.get_device_properties(device).total_memory / 2**20) if cuda else None},
        "gpu_tests": args.tests,
    }
    start = time.perf_counter()
    sections: dict[str, dict] = {}
    attempt(sections, "blip2", budget, lambda: measure_blip2(settings, device, dtype, budget))
    attempt(sections, "clip", budget, lambda: measure_clip(settings, device, dtype, budget))
    data.update(sections)
    data["targets"] = evaluate_targets(data)
    data["elapsed_s"] = round(time.perf_counter() - start, 1)
    path = write_json(args.out, data)
    text = markdown(data)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    if data["mode"] == "full" and not args.no_results:
        with open(args.results, "a") as handle:
            handle.write("\n" + text)
    failed = [name for name, entry in sections.items() if "error" in entry]
    print(f"gpu_bench: wrote {path} in {data['elapsed_s']} s" + (f"; FAILED: {failed}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
