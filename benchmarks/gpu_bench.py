"""The torch backend on a GPU against Hugging Face, measured in one run (driven by ``benchmarks/gpu_check.sh``).

Full mode (a CUDA GPU), in this order, the JSON rewritten after every variant (an outer time-out loses nothing):

1. the card's device-to-device copy bandwidth (bytes read + written per second), which decode speed is judged by;
2. the CLIP ViT-B/32 image tower (random weights), batch 1 and 64: HF eager FP16 (``get_image_features``) vs
   mmedge's torch runner (FP16, compiled, CUDA graph), host arrays in and out, and both with the pixels already on
   the GPU and the output left there;
3. BLIP-2 (``benchmarks/gpu_blip2.py``): the bundled ``Salesforce/blip2-opt-2.7b`` architecture (ViT-g, Q-Former with
   32 queries, OPT-2.7B) with random weights (seed 0) built on the GPU in FP16 (the Q-Former and query tokens FP32,
   as ``from_pretrained(dtype=float16)`` keeps them), one photo, batch 1, greedy with exactly 64 new tokens forced:
   HF ``generate`` eager, with its static cache compiled (transformers compiles it on CUDA; compile counters and the
   first call's time recorded) and not compiled; mmedge torch FP16 (compiled step + CUDA graph, greedy on the GPU),
   the same without compilation, and with the LLM in bitsandbytes NF4 and INT8 (skipped with the reason when
   bitsandbytes is absent): TTFT, decode tok/s, peak GPU memory, logits cosine vs HF, bandwidth use
   (tok/s × LLM weight bytes / copy bandwidth), and a profile of one decode step.

The runtime objects are built around the in-memory model (``TorchRunner`` over the spec's wrapper module,
``TorchDecoder`` over ``model.language_model``) rather than from an exported artifact, so a 2.7B model needs no
15 GB save and reload inside the check's minutes; loading from artifacts is what the GPU-marked tests cover.

Tiny mode (``--tiny``, any machine, CPU FP32): the tiny test checkpoints (``tests/support/tiny_checkpoints``), 16 new
tokens, batch 1 and 8, HF static cache without compilation: it checks the whole script in a minute or two.

Writes ``benchmarks/out/gpu_check.json`` (``--out``) and, in full mode, appends a section with the card's name to
``benchmarks/RESULTS.md`` (``--results``; ``--no-results`` to skip).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (tiny mode)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, gpu_parts, gpu_blip2 as plain modules
from gpu_blip2 import measure_blip2  # noqa: E402
from gpu_parts import Budget, attempt, copy_bandwidth, reset_peak, sync  # noqa: E402

from _common import markdown_table, package_versions, summary, time_samples, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "gpu_check.json"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CLIP = "openai/clip-vit-base-patch32"
TARGETS = {  # name: (what, direction, limit)
    "decode_vs_hf_static": ("decode tok/s, mmedge torch FP16 vs HF static cache (compiled)", ">=", 2.2),
    "bandwidth_use": ("bandwidth use of mmedge torch FP16 decode (tok/s x LLM weight bytes / copy bandwidth)", ">=",
                      0.6),
    "clip_batch1_ms": ("CLIP ViT-B/32 image tower batch 1, mmedge torch FP16 (host in/out), ms", "<=", 0.5),
}


class Settings:
    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.new_tokens = 16 if tiny else 64
        self.clip_batches = (1, 8) if tiny else (1, 64)
        # (warm-up, timed) runs per variant; the first call (compilation, capture) is timed on its own
        self.hf_eager = (1, 2) if tiny else (1, 3)
        self.hf_static = (1, 2) if tiny else (2, 3)
        self.mmedge = (1, 3) if tiny else (2, 5)
        self.int8 = (1, 2)
        self.nf4 = (1, 2) if tiny else (2, 3)
        self.clip_runs = {1: (3, 10), 8: (2, 5)} if tiny else {1: (10, 200), 64: (3, 20)}


def measure_clip(settings: Settings, device, dtype, budget: Budget, save) -> dict:
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
    cuda = device.type == "cuda"
    component = {"inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, size, size]}},
                 "outputs": {"image_embeds": {"dtype": "float32", "shape": ["batch", dim]}}}
    host = TorchRunner(_ImageEmbeds(model).eval(), "vision", component, device=device, dtype=dtype)
    resident = TorchRunner(_ImageEmbeds(model).eval(), "vision", component, device=device, dtype=dtype,
                           keep_on_device=True)

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

    results: dict[str, Any] = {"model": "tiny test CLIP (tests/support)" if settings.tiny
                               else f"{CLIP} image tower, random weights",
                               "dtype": str(dtype).replace("torch.", "")}
    rng = np.random.default_rng(0)
    for batch in settings.clip_batches:
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        on_device = torch.from_numpy(pixels).to(device, dtype)
        warmup, runs = settings.clip_runs[batch]
        row: dict[str, dict] = {}
        results[f"batch_{batch}"] = row

        def measure(name, fn, first=None):
            def timed():
                entry = {}
                if first is not None:  # the first call of a shape: compilation and capture
                    began = time.perf_counter()
                    first()
                    entry["first_call_s"] = round(time.perf_counter() - began, 2)
                return {**entry, "ms": summary(time_samples(fn, warmup=warmup, runs=runs))}
            attempt(row, name, budget, timed, save)

        measure("hf_eager", lambda: hf_host(pixels))
        measure("mmedge", lambda: host.infer({"pixel_values": pixels}),
                first=lambda: host.infer({"pixel_values": pixels}))
        measure("hf_eager_device", lambda: hf_device(on_device))
        measure("mmedge_device", lambda: device_call(on_device), first=lambda: device_call(on_device))
        if "ms" in row.get("mmedge", {}):
            cos = cosine_rows(hf_host(pixels), host.infer({"pixel_values": pixels})["image_embeds"])
            row["mmedge"]["cosine_vs_hf_eager"] = float(cos.min())
            if cuda:  # the compiled tower's kernels (run uncaptured) and the captured graph's replay time
                attempt(row, "mmedge_profile", budget, lambda: clip_profile(torch, host, on_device), save)
    results["graphs"] = host.graph_report()
    host.close()
    resident.close()
    model = None  # the closures above are done with it: free the weights
    reset_peak(torch, device)
    return results


def clip_profile(torch, runner, pixels) -> dict:
    """Kernels of one compiled call of the tower on ``pixels`` (on the GPU) and the replay time of its CUDA graph."""
    from gpu_parts import graph_replay_us, kernel_profile

    out = kernel_profile(torch, lambda: runner._fn(pixels))
    key = next((k for k in runner._graphs.graphs if k[0][0] == tuple(pixels.shape)), None)
    if key is not None:
        out["graph_replay_us"] = round(graph_replay_us(torch, runner._graphs.graphs[key][1]), 1)
    return out


# --- report ------------------------------------------------------------------------------------------
def evaluate_targets(data: dict) -> dict:
    variants = data.get("blip2", {}).get("variants", {})
    tok = lambda name: variants.get(name, {}).get("decode_tok_s", {}).get("median")  # noqa: E731
    clip_ms = data.get("clip", {}).get("batch_1", {}).get("mmedge", {}).get("ms", {}).get("median")
    ratio = (tok("mmedge_fp16") / tok("hf_static")) if tok("mmedge_fp16") and tok("hf_static") else None
    values = {"decode_vs_hf_static": ratio,
              "bandwidth_use": variants.get("mmedge_fp16", {}).get("bandwidth_use"), "clip_batch1_ms": clip_ms}
    out = {}
    for name, (what, direction, limit) in TARGETS.items():
        value = values[name]
        met = None if value is None or data["mode"] != "full" else (value >= limit if direction == ">="
                                                                    else value <= limit)
        out[name] = {"what": what, "target": f"{direction} {limit}", "value": value, "met": met}
    return out


def _profile_text(profile: dict) -> str:
    top = "; ".join(f"{k['name']} ×{k['calls']} {k['us']} µs" for k in profile.get("top", [])[:5])
    return (f"{profile.get('kernels')} kernels, {profile.get('kernel_us')} µs of kernel time (uncaptured), "
            "captured replay "
            f"{profile.get('graph_replay_us')} µs; top: {top}")


def _variant_row(name: str, entry: dict) -> list:
    if "error" in entry or "skipped" in entry:
        return [name, entry.get("error") or f"skipped: {entry['skipped']}", None, None, None, None, None, None]
    cosine = entry.get("first_logits_cosine_vs_hf")
    return [entry["title"], f"{entry['ttft_ms']['median']:.1f}", f"{entry['decode_tok_s']['median']:.1f}",
            entry.get("bandwidth_use"), entry.get("first_call_s"), entry.get("peak_allocated_mib"),
            entry.get("llm_weight_mib"),
            None if cosine is None else f"{cosine:.5f}"]


def markdown(data: dict) -> str:
    device, blip2 = data["device"], data.get("blip2", {})
    bandwidth = data.get("bandwidth", {}).get("bytes_per_s")
    lines = [f"## torch backend on {device['name']} "
             f"(`benchmarks/gpu_check.sh`{' --tiny' if data['mode'] == 'tiny' else ''})", "",
             f"- **Date:** {data['date']}; mode {data['mode']}; torch {device['torch']}, CUDA {device['cuda']}, "
             "transformers "
             f"{device['transformers']}, bitsandbytes {device['bitsandbytes']}; GPU tests: {data.get('gpu_tests')}.",
             f"- **Copy bandwidth:** {bandwidth / 1e12:.2f} TB/s (read + written)." if bandwidth
             else "- **Copy bandwidth:** not measured.",
             f"- **BLIP-2:** {blip2.get('model')}, {blip2.get('dtype')} (Q-Former "
             f"{blip2.get('qformer_dtype')}), batch 1, "
             f"{blip2.get('new_tokens')} new tokens forced, greedy; LLM weights {blip2.get('llm_weight_mib')} MiB.", ""]
    rows = [_variant_row(name, entry) for name, entry in blip2.get("variants", {}).items()]
    lines += [markdown_table(["engine", "TTFT ms", "decode tok/s", "bandwidth use", "first call s", "peak GPU MiB",
                              "LLM weights MiB", "logits cos vs HF"], rows), ""]
    for name, entry in blip2.get("variants", {}).items():
        profile = entry.get("step_profile")
        if profile:
            lines.append(f"- `{name}` decode step: {_profile_text(profile)}")
        if entry.get("steps_ahead"):
            lines.append(f"- `{name}` steps launched ahead and taken / run again: {entry['steps_ahead']}")
        if entry.get("compile_counters"):
            lines.append(f"- `{name}` torch.compile counters: {entry['compile_counters']}")
    rows = []
    for key, row in data.get("clip", {}).items():
        if not key.startswith("batch_"):
            continue
        for name, entry in row.items():
            if name == "mmedge_profile":
                continue
            value = entry.get("ms", {}).get("median")
            rows.append([key.replace("batch_", ""), name, f"{value:.3f}" if value is not None
                         else entry.get("error") or entry.get("skipped"),
                         entry.get("first_call_s")])
    lines += ["", f"CLIP: {data.get('clip', {}).get('model')} ({data.get('clip', {}).get('dtype')}); ms, median", "",
              markdown_table(["batch", "engine", "ms", "first call s"], rows), ""]
    for key, row in data.get("clip", {}).items():
        if key.startswith("batch_") and "kernels" in row.get("mmedge_profile", {}):
            lines.append(f"- CLIP {key.replace('_', ' ')}, mmedge compiled tower: "
                         f"{_profile_text(row['mmedge_profile'])}")
    lines.append("")
    rows = [[t["what"], t["target"], None if t["value"] is None else f"{t['value']:.3f}",
             {True: "met", False: "missed", None: "not evaluated"}[t["met"]]] for t in data["targets"].values()]
    lines += [markdown_table(["target", "bound", "measured", "verdict"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "device": {"name": name, "torch": versions["torch"], "cuda": torch.version.cuda,
                   "transformers": versions["transformers"],
                   "bitsandbytes": versions["bitsandbytes"],
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
                   "memory_mib": round(torch.cuda.get_device_properties(device).total_memory / 2**20) if cuda
                   else None},
        "gpu_tests": args.tests,
    }
    start = time.perf_counter()

    def save() -> None:
        data["targets"] = evaluate_targets(data)
        data["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(args.out, data)

    if cuda:
        data["bandwidth"] = copy_bandwidth(torch, device)
    bandwidth = data.get("bandwidth", {}).get("bytes_per_s")
    attempt(data, "clip", budget, lambda: measure_clip(settings, device, dtype, budget, save), save)
    attempt(data, "blip2", budget, lambda: measure_blip2(settings, device, dtype, budget, save, bandwidth), save)
    save()
    text = markdown(data)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    if data["mode"] == "full" and not args.no_results:
        with open(args.results, "a") as handle:
            handle.write("\n" + text)
    failed = [section for section in ("clip", "blip2") if "error" in data.get(section, {})]
    print(f"gpu_bench: wrote {args.out} in {data['elapsed_s']} s" + (f"; FAILED: {failed}" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
