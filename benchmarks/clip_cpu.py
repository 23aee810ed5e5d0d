"""CLIP ViT-B/32 on CPU: Hugging Face (eager PyTorch FP32) against mmedge (ONNX Runtime), in one run.

Full-size ViT-B/32 shapes with random weights (offline). The HF model and every mmedge export are
built from the same bundled config and seed, so their outputs are directly comparable. Measured:

- image encoder latency, graph only, batch 1 and 8 (same preprocessed pixels for both sides);
- image embedding end to end (PIL image in, embedding out, preprocessing included);
- zero-shot classification of one photo against 10 labels: HF the way its zero-shot pipeline does it
  (processor + tokenizer + full CLIPModel forward + softmax on every call) against mmedge's
  classifier with cached label embeddings and against the fused graph with the labels baked in;
- artifact sizes, and peak RSS of a device process (mmedge only, no torch) against an HF process;
- fidelity beside speed: export-time parity from each manifest, plus agreement with HF in this run.

Exports are cached under benchmarks/out/ (git-ignored); ``--reexport`` rebuilds them.

    python benchmarks/clip_cpu.py            # full run: ~4 min on 2 cores with cold exports, ~2 min cached
    python benchmarks/clip_cpu.py --quick    # smoke test: tiny iteration counts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from _common import (
    child_summary,
    cpu_ticks,
    error_text,
    export_once,
    first_line,
    fmt_cos,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    fmt_share,
    machine_info,
    markdown_table,
    package_versions,
    ratio,
    run_child,
    steal_share,
    time_call,
    write_json,
)
from mmedge.cli_args import count

MODEL = "openai/clip-vit-base-patch32"
LABELS = ["cat", "dog", "astronaut", "cup of coffee", "rocket", "horse", "car", "tree", "building", "bird"]
TEMPLATE = "a photo of a {}."  # mmedge's default template, so both sides embed the same prompts
# Random-weight exports use a byte-level tokenizer (no hub access), which spells "a photo of a cup of
# coffee." in 23 tokens; the real CLIP BPE needs 10 (start, 7 words and '.', end). HF's per-call text
# encoder cost grows with that length, so HF is also timed with prompts cut to the real length.
REAL_BPE_PROMPT_TOKENS = 10
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "hubble_deep_field",
          "immunohistochemistry", "colorwheel")  # scikit-image's bundled photos; gray ones become RGB
OUT = Path(__file__).resolve().parent / "out"
TARGETS = {  # name: (what is compared, the ratio it must not exceed)
    "zero_shot": ("zero-shot per image, mmedge INT8 fused vs HF (real prompt length)", 0.12),
    "encoder_int8_b1": ("image encoder batch 1, mmedge INT8 vs HF", 0.20),
    "int8_size": ("artifact size, INT8 vs FP32 (whole folder)", 0.27),
    "device_rss": ("peak RSS, device process vs HF process", 0.35),
}
UNJUDGED_WHEN_QUICK = {"zero_shot", "encoder_int8_b1", "device_rss"}  # 2 timed calls / 3 photos: reported, not judged
QUIET_LOAD = 1.2  # a load average above this before the run is reported as a warning (as caption_cpu.py does)
QUANTIZATION_METHODS = {"dynamic": "int8-dynamic", "static": "int8-static-qdq"}


@dataclass(frozen=True)
class Iterations:
    """How many timed calls per measurement (after ``warmup`` untimed ones)."""

    warmup: int
    batch1: int
    batch8: int
    zero_shot: int
    rss_images: int


FULL = Iterations(warmup=3, batch1=40, batch8=10, zero_shot=40, rss_images=20)
QUICK = Iterations(warmup=1, batch1=2, batch8=1, zero_shot=2, rss_images=3)


@dataclass(frozen=True)
class Variant:
    """One mmedge export: precision, INT8 recipe, and whether the labels are baked into one graph."""

    name: str
    precision: str
    quantization: str | None
    fused: bool
    backend: str = "onnxruntime"  # named, so the rows say which engine ran them (auto would mix them)

    @property
    def folder(self) -> Path:  # OpenVINO rows run the same exports as the ONNX Runtime rows
        return OUT / f"clip-b32-{self.name.removesuffix('-openvino')}"

    @property
    def image_component(self) -> str:
        return "zero_shot" if self.fused else "vision"

    @property
    def title(self) -> str:
        recipe = f"INT8 {self.quantization}" if self.quantization else "FP32"
        return f"mmedge {recipe}" + (" fused" if self.fused else "") + (" on OpenVINO" if self.backend == "openvino"
                                                                         else "")


def make_variants(int8_recipe: str, openvino: bool = False) -> list[Variant]:
    """Two-graph exports at every precision, and the fused graph at FP32 and the chosen INT8 recipe; with
    ``openvino`` also the same graphs on OpenVINO and the fused graph at the other INT8 recipe (the targets take the
    fastest INT8 engine)."""
    variants = [
        Variant("fp32", "fp32", None, False),
        Variant("int8-dynamic", "int8", "dynamic", False),
        Variant("int8-static", "int8", "static", False),
        Variant("fused-fp32", "fp32", None, True),
        Variant(f"fused-int8-{int8_recipe}", "int8", int8_recipe, True),
    ]
    if openvino:
        other = "static" if int8_recipe == "dynamic" else "dynamic"
        variants.append(Variant(f"fused-int8-{other}", "int8", other, True))
        variants += [Variant(f"{v.name}-openvino", v.precision, v.quantization, v.fused, "openvino")
                     for v in list(variants)]
    return variants


# --- exports -----------------------------------------------------------------------------------------
def cached_export_matches(variant: Variant) -> bool:
    """Whether ``variant.folder`` holds a readable artifact exported with this variant's settings."""
    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError

    try:
        manifest = Artifact.open(variant.folder).manifest
    except MmedgeError:
        return False
    method = QUANTIZATION_METHODS.get(variant.quantization)
    components_match = all(c["precision"] == variant.precision and (c["quantization"] or {}).get("method") == method
                           for c in manifest["components"].values())
    labels = (manifest.get("zero_shot") or {}).get("labels")
    return (manifest["source"]["model"] == MODEL and manifest["source"]["random_weights"] and components_match
            and labels == (LABELS if variant.fused else None))


def ensure_exported(variant: Variant, threads: int, reexport: bool) -> dict:
    """Export ``variant`` unless a matching artifact is cached. Returns status, seconds and any error."""
    from mmedge.export import export_model

    return export_once(variant.name, variant.folder, not reexport and cached_export_matches(variant),
                       lambda: export_model(
        MODEL, variant.folder, random_weights=True, precision=variant.precision,
        quantization=variant.quantization, task="zero-shot",
        labels=LABELS if variant.fused else None, overwrite=True, threads=threads))


# --- inputs --------------------------------------------------------------------------------------------
def load_photos() -> list[Image.Image]:
    """scikit-image's bundled photos as RGB PIL images, astronaut first."""
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def save_photos(photos: list[Image.Image], count: int) -> list[str]:
    """Write the photos as PNG under benchmarks/out/photos and return ``count`` paths, cycling."""
    folder = OUT / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, photo in zip(PHOTOS, photos):
        path = folder / f"{name}.png"
        if not path.exists():
            photo.save(path)
        paths.append(str(path))
    return [paths[i % len(paths)] for i in range(count)]


# --- the Hugging Face baseline --------------------------------------------------------------------------
class HFClip:
    """transformers.CLIPModel (eager FP32, ``torch.inference_mode``) used the way HF's docs and pipeline do."""

    def __init__(self, threads: int):
        import torch
        import transformers

        from mmedge.export.loading import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        loaded = load_checkpoint(MODEL, random_weights=True)  # same config and seed as the exports
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = transformers.CLIPImageProcessorPil()  # defaults equal the bundled preprocess config

    def pixels(self, images: list[Image.Image]):
        """[batch, 3, 224, 224] float32 tensor from HF's image processor."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def image_features(self, pixels) -> np.ndarray:
        """Projected image embeddings [batch, 512] (not normalized), as ``get_image_features`` returns them."""
        with self.torch.inference_mode():
            return self.model.get_image_features(pixel_values=pixels).pooler_output.numpy()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.image_features(self.pixels(images))

    def prompts(self, labels: list[str], max_tokens: int | None = None):
        """Tokenized prompts, padded to the longest (cut to ``max_tokens`` with the end token kept)."""
        return self.tokenizer([TEMPLATE.format(label) for label in labels], padding=True, return_tensors="pt",
                              truncation=max_tokens is not None, max_length=max_tokens)

    def zero_shot(self, image: Image.Image, labels: list[str], max_tokens: int | None = None) -> np.ndarray:
        """Label probabilities [labels], as ZeroShotImageClassificationPipeline computes them: everything per call."""
        inputs = self.processor(images=[image], return_tensors="pt")
        text = self.prompts(labels, max_tokens)
        with self.torch.inference_mode():
            logits = self.model(**text, **inputs).logits_per_image[0]  # [labels]
            return logits.softmax(dim=-1).numpy()


def top1_margin(probs: np.ndarray) -> float:
    """Gap between the two highest probabilities: how far a label flip is."""
    top2 = np.sort(probs)[-2:]
    return float(top2[1] - top2[0])


def measure_hf(hf: HFClip, photos: list[Image.Image], its: Iterations) -> dict:
    """Latencies of the HF baseline, and its outputs on the astronaut photo for the fidelity columns."""
    pixels1, pixels8 = hf.pixels(photos[:1]), hf.pixels(photos[:8])
    probs = hf.zero_shot(photos[0], LABELS)
    return {
        "title": "HF PyTorch eager FP32",
        "attention": hf.model.config._attn_implementation,
        "encoder_b1": time_call(lambda: hf.image_features(pixels1), warmup=its.warmup, runs=its.batch1).as_dict(),
        "encoder_b8": time_call(lambda: hf.image_features(pixels8), warmup=its.warmup, runs=its.batch8).as_dict(),
        "e2e_b1": time_call(lambda: hf.embed_images(photos[:1]), warmup=its.warmup, runs=its.batch1).as_dict(),
        "e2e_b8": time_call(lambda: hf.embed_images(photos[:8]), warmup=its.warmup, runs=its.batch8).as_dict(),
        "prompt_tokens": int(hf.prompts(LABELS)["input_ids"].shape[1]),
        "zero_shot": time_call(lambda: hf.zero_shot(photos[0], LABELS), warmup=its.warmup,
                               runs=its.zero_shot).as_dict(),
        "zero_shot_real_length": time_call(lambda: hf.zero_shot(photos[0], LABELS, REAL_BPE_PROMPT_TOKENS),
                                           warmup=its.warmup, runs=its.zero_shot).as_dict(),
        "top1_margin": top1_margin(probs),
        "reference": {"embedding": hf.embed_images(photos[:1])[0], "probs": probs,
                      "pixels": pixels1, "pixels8": pixels8},
    }


# --- mmedge ----------------------------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def zero_shot_agreement(probs: np.ndarray, reference: np.ndarray) -> dict:
    """Whether the top-1 label matches HF's on the astronaut photo, and the largest probability gap."""
    return {"same_top1_as_hf": bool(np.argmax(probs) == np.argmax(reference)),
            "max_abs_prob_diff_vs_hf": float(np.abs(probs - reference).max())}


def measure_encoder(variant: Variant, threads: int, photos, hf_result: dict, its: Iterations) -> dict:
    """Two-graph artifact: vision graph alone on HF's pixels, and ``embed_images`` end to end."""
    import mmedge

    reference = hf_result["reference"]
    pixels1, pixels8 = reference["pixels"].numpy(), reference["pixels8"].numpy()
    with mmedge.load(variant.folder, backend=variant.backend, threads=threads, task="embed") as embedder:
        vision = embedder.runners["vision"]
        return {
            "encoder_b1": time_call(lambda: vision.infer({"pixel_values": pixels1}), warmup=its.warmup,
                                    runs=its.batch1).as_dict(),
            "encoder_b8": time_call(lambda: vision.infer({"pixel_values": pixels8}), warmup=its.warmup,
                                    runs=its.batch8).as_dict(),
            "e2e_b1": time_call(lambda: embedder.embed_images(photos[:1]), warmup=its.warmup,
                                runs=its.batch1).as_dict(),
            "e2e_b8": time_call(lambda: embedder.embed_images(photos[:8]), warmup=its.warmup,
                                runs=its.batch8).as_dict(),
            "cosine_vs_hf": cosine(embedder.embed_images(photos[:1])[0], reference["embedding"]),
        }


def measure_zero_shot(variant: Variant, threads: int, photo: Image.Image, hf_result: dict, its: Iterations) -> dict:
    """Per-image zero-shot latency: warm label-embedding cache (two graphs) or the fused graph alone."""
    import mmedge

    labels = None if variant.fused else LABELS  # a fused artifact has the labels baked in
    with mmedge.load(variant.folder, backend=variant.backend, threads=threads) as classifier:
        timing = time_call(lambda: classifier(photo, labels=labels), warmup=max(its.warmup, 1), runs=its.zero_shot)
        probs = classifier.probabilities(photo, labels)[0]
    return {"zero_shot": timing.as_dict(), **zero_shot_agreement(probs, hf_result["reference"]["probs"])}


def artifact_facts(variant: Variant) -> dict:
    """Sizes and the export-time fidelity the manifest records for the image component."""
    from mmedge.artifact import Artifact

    artifact = Artifact.open(variant.folder)
    component = artifact.component(variant.image_component)
    parity = component["parity"]
    fidelity = parity.get("fidelity", {})
    return {
        "folder_bytes": artifact.size_bytes(),
        "image_graph_bytes": artifact.resolve_file(component["file"], "file").stat().st_size,
        "parity_cosine_vs_torch": min(out["cosine"] for out in parity["outputs"].values()),
        "int8_embedding_cosine_mean": fidelity.get("embedding_cosine_mean"),
        "int8_top1_agreement": fidelity.get("top1_agreement"),
    }


def measure_variant(variant: Variant, threads: int, photos, hf_result: dict, its: Iterations) -> dict:
    """Everything measured for one export; an mmedge failure is recorded as the traceback, not raised."""
    print(f"measuring {variant.title}", file=sys.stderr)
    result: dict = {"title": variant.title, "fused": variant.fused}
    try:
        result.update(artifact_facts(variant))
        if not variant.fused:
            result.update(measure_encoder(variant, threads, photos, hf_result, its))
        result.update(measure_zero_shot(variant, threads, photos[0], hf_result, its))
    except Exception as exc:  # the runtime path is under active change: record, report, go on
        result["error"] = error_text(exc)
        print(f"{variant.title} FAILED:\n{result['error']}", file=sys.stderr)
    return result


# --- peak RSS: one child process per side -----------------------------------------------------------------
def device_child(artifact: str, images: list[str], threads: int) -> None:
    """Device side: import mmedge only, load the fused INT8 artifact, classify each image; print top-1 labels."""
    import mmedge
    from mmedge.api import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    with mmedge.load(artifact, threads=threads) as classifier:
        top1 = [classifier(path, top_k=1)[0]["label"] for path in images]
    print(json.dumps({"top1": top1, "torch_imported": "torch" in sys.modules}))


def hf_child(images: list[str], threads: int) -> None:
    """HF side: import torch + transformers, build CLIPModel, classify each image the pipeline way."""
    hf = HFClip(threads)
    top1 = [LABELS[int(np.argmax(hf.zero_shot(Image.open(path).convert("RGB"), LABELS)))] for path in images]
    print(json.dumps({"top1": top1, "torch_imported": True}))


def measure_rss(fused_int8: Variant, image_paths: list[str], threads: int) -> dict:
    """Run the device child and the HF child, one after the other, each in a fresh interpreter."""
    script = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)]
    print(f"peak RSS: device process ({len(image_paths)} images)", file=sys.stderr)
    device = child_summary(run_child(script + ["--child", "device", "--artifact", str(fused_int8.folder),
                                               "--images", *image_paths], timeout_s=300))
    print(f"peak RSS: HF process ({len(image_paths)} images)", file=sys.stderr)
    hf = child_summary(run_child(script + ["--child", "hf", "--images", *image_paths], timeout_s=300))
    if "top1" in device and "top1" in hf:
        device["top1_agreement_with_hf"] = float(np.mean([a == b for a, b in zip(device["top1"], hf["top1"])]))
    return {"artifact": fused_int8.name, "images": len(image_paths), "device": device, "hf": hf,
            "ratio": None if "error" in device or "error" in hf
            else ratio(device["peak_rss_bytes"], hf["peak_rss_bytes"])}


def skipped_rss(fused_int8: Variant, reason: str) -> dict:
    """The peak-RSS result when the device artifact is unavailable."""
    empty = {"peak_rss_bytes": None, "wall_s": None}
    return {"artifact": fused_int8.name, "images": 0, "device": {**empty, "error": reason}, "hf": empty, "ratio": None}


# --- targets and tables ---------------------------------------------------------------------------------------
def median(result: dict, key: str) -> float | None:
    return result[key]["median_ms"] if key in result else None


def check_targets(hf: dict, engines: dict[str, dict], rss: dict, int8_recipe: str, quick: bool = False) -> dict:
    """The four targets: measured ratio, limit, PASS / MISS (or n/a when a measurement is missing). With ``quick``
    the timed and peak-RSS targets read "n/a (quick)": 2 timed calls (3 photos) are a smoke test, not a verdict; the
    artifact size, which no iteration count changes, is still judged."""
    int8, fused_int8 = fastest(engines, "int8-", "encoder_b1"), fastest(engines, "fused-int8-", "zero_shot")
    measured = {
        "zero_shot": ratio(median(fused_int8, "zero_shot"), median(hf, "zero_shot_real_length")),
        "encoder_int8_b1": ratio(median(int8, "encoder_b1"), median(hf, "encoder_b1")),
        "int8_size": ratio(int8.get("folder_bytes"), engines["fp32"].get("folder_bytes")),
        "device_rss": rss["ratio"],
    }
    by = {"zero_shot": fused_int8.get("title"), "encoder_int8_b1": int8.get("title")}

    def verdict(name: str, limit: float) -> str:
        if measured[name] is None:
            return "n/a"
        if quick and name in UNJUDGED_WHEN_QUICK:
            return "n/a (quick)"
        return "PASS" if measured[name] <= limit else "MISS"

    return {name: {"what": what + (f" (fastest: {by[name]})" if by.get(name) else ""), "ratio": measured[name],
                   "limit": limit, "result": verdict(name, limit)}
            for name, (what, limit) in TARGETS.items()}


def fastest(engines: dict[str, dict], prefix: str, key: str) -> dict:
    """The engine whose name starts with ``prefix`` (any recipe, any backend) with the lowest median ``key``."""
    timed = [r for name, r in engines.items() if name.startswith(prefix) and median(r, key) is not None]
    return min(timed, key=lambda r: median(r, key)) if timed else {}


def latency_cells(result: dict, hf: dict, key: str) -> list:
    value = median(result, key)
    return [fmt_ms(value), fmt_ratio(ratio(value, median(hf, key)))]


def fidelity_cells(result: dict) -> list:
    return [fmt_cos(result.get("parity_cosine_vs_torch")), fmt_cos(result.get("int8_embedding_cosine_mean")),
            fmt_share(result.get("int8_top1_agreement"))]


FIDELITY_HEADERS = ["export parity cos vs torch", "INT8 emb. cos vs FP32", "INT8 top-1 agree"]


def encoder_table(hf: dict, engines: dict[str, dict]) -> str:
    rows = [[hf["title"], *latency_cells(hf, hf, "encoder_b1"), *latency_cells(hf, hf, "encoder_b8"), fmt_cos(1.0),
             None, None, None]]
    rows += [[r["title"], *latency_cells(r, hf, "encoder_b1"), *latency_cells(r, hf, "encoder_b8"),
              fmt_cos(r.get("cosine_vs_hf")), *fidelity_cells(r)] for r in engines.values() if not r["fused"]]
    return markdown_table(["engine", "batch 1 ms", "x HF", "batch 8 ms", "x HF", "cos vs HF (photo)",
                           *FIDELITY_HEADERS],
                          rows)


def end_to_end_table(hf: dict, engines: dict[str, dict]) -> str:
    rows = [[r["title"], *latency_cells(r, hf, "e2e_b1"), *latency_cells(r, hf, "e2e_b8")]
            for r in [hf, *engines.values()] if not r.get("fused")]
    return markdown_table(["engine", "1 image ms", "x HF", "8 images ms", "x HF"], rows)


def zero_shot_table(hf: dict, engines: dict[str, dict]) -> str:
    def vs_real_length(result: dict) -> str | None:
        return fmt_ratio(ratio(median(result, "zero_shot"), median(hf, "zero_shot_real_length")))

    rows = [[f"{hf['title']}, pipeline way ({hf['prompt_tokens']}-token prompts)", *latency_cells(hf, hf, "zero_shot"),
             vs_real_length(hf), "yes", "0", None, None, None],
            [f"{hf['title']}, pipeline way ({REAL_BPE_PROMPT_TOKENS}-token prompts, real BPE length)",
             fmt_ms(median(hf, "zero_shot_real_length")), None, "1.00x", None, None, None, None, None]]
    for r in engines.values():
        same = r.get("same_top1_as_hf")
        gap = r.get("max_abs_prob_diff_vs_hf")
        rows.append([r["title"] + ("" if r["fused"] else " (cached labels)"), *latency_cells(r, hf, "zero_shot"),
                     vs_real_length(r), None if same is None else ("yes" if same else "no"),
                     None if gap is None else f"{gap:.4f}", *fidelity_cells(r)])
    return markdown_table(["engine", "ms per image", "x HF", "x HF (real prompt length)", "same top-1 as HF",
                           "max abs dp vs HF", *FIDELITY_HEADERS], rows)


def size_table(engines: dict[str, dict]) -> str:
    rows = []
    for r in engines.values():
        base = engines["fused-fp32" if r["fused"] else "fp32"]
        rows.append([r["title"], fmt_mib(r.get("folder_bytes")),
                     fmt_ratio(ratio(r.get("folder_bytes"), base.get("folder_bytes"))),
                     fmt_mib(r.get("image_graph_bytes")),
                     fmt_ratio(ratio(r.get("image_graph_bytes"), base.get("image_graph_bytes")))])
    return markdown_table(["artifact", "folder MiB", "x FP32", "image graph MiB", "x FP32"], rows)


def rss_table(rss: dict) -> str:
    device, hf = rss["device"], rss["hf"]
    rows = [[f"device: mmedge only, {rss['artifact']}", fmt_mib(device["peak_rss_bytes"]), fmt_ratio(rss["ratio"]),
             device["wall_s"], fmt_share(device.get("top1_agreement_with_hf")), device.get("torch_imported")],
            ["HF: torch + transformers CLIPModel", fmt_mib(hf["peak_rss_bytes"]),
             fmt_ratio(ratio(hf["peak_rss_bytes"], hf["peak_rss_bytes"])), hf["wall_s"], None, True]]
    return markdown_table(["process", "peak RSS MiB", "x HF", "wall s", "top-1 agree with HF", "torch imported"], rows)


def target_table(targets: dict) -> str:
    rows = [[t["what"], fmt_ratio(t["ratio"]), f"<= {t['limit']:.2f}x", t["result"]] for t in targets.values()]
    return markdown_table(["target", "measured", "limit", "result"], rows)


def ratio_lines(hf: dict, engines: dict[str, dict], rss: dict) -> list[str]:
    """One line per ratio against HF, e.g. 'zero-shot per image: mmedge INT8 dynamic fused 0.09x HF'."""
    measures = [("image encoder batch 1", "encoder_b1"), ("image encoder batch 8", "encoder_b8"),
                ("image embedding end to end, 1 image", "e2e_b1"), ("image embedding end to end, 8 images", "e2e_b8"),
                ("zero-shot per image", "zero_shot")]
    lines = [f"{label}: {r['title']} {fmt_ratio(ratio(median(r, key), median(hf, key)))} HF"
             for label, key in measures for r in engines.values() if key in r]
    real_length = median(hf, "zero_shot_real_length")
    lines += [f"zero-shot per image: {r['title']} {fmt_ratio(ratio(median(r, 'zero_shot'), real_length))} "
              "HF at real prompt length" for r in engines.values() if "zero_shot" in r]
    if rss["ratio"] is not None:
        lines.append(f"peak RSS: device process {fmt_ratio(rss['ratio'])} HF process")
    return lines


def report(results: dict) -> str:
    """The human-readable report: machine, settings, every table, the ratio lines and the targets."""
    hf, engines, rss = results["hf"], results["engines"], results["rss"]
    m, s = results["machine"], results["settings"]
    failures = [f"- {name}: {first_line(e['error'])}" for name, e in results["exports"].items() if e["error"]]
    failures += [f"- {name} (measuring): {first_line(r['error'])}" for name, r in engines.items()
                 if "error" in r and not results["exports"][name]["error"]]
    failures += [f"- peak RSS {side} child: {first_line(rss[side]['error'])}"
                 for side in ("device", "hf") if "error" in rss[side]]
    load_note = "" if m["load_average_1m"] < QUIET_LOAD else f" (WARNING: above {QUIET_LOAD}, timings may be disturbed)"
    quick_note = (" (QUICK run: timed and peak-RSS targets are not judged from so few calls; run without --quick)"
                  if s["quick"] else "")
    parts = [
        f"CLIP ViT-B/32 on CPU — {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, "
        f"copy bandwidth {m['copy_bandwidth_gbps']} GB/s — {m['date']}",
        f"load average before the run {m['load_average_1m']}{load_note}; "
        f"CPU steal during measurements {results['cpu_steal_share']:.1%}",
        f"threads={s['threads']} (torch.set_num_threads, mmedge threads=), {'QUICK' if s['quick'] else 'full'} run, "
        f"median of {s['iterations']['batch1']} (batch 1 / zero-shot: {s['iterations']['zero_shot']}) or "
        f"{s['iterations']['batch8']} (batch 8) timed calls after {s['iterations']['warmup']} warm-up; "
        f"random weights (seed 0), HF attention '{hf['attention']}'",
        "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "\n## Image encoder, graph only (same preprocessed pixels; ms, median)\n\n" + encoder_table(hf, engines),
        "\n## Image embedding end to end (PIL image in, embedding out)\n\n" + end_to_end_table(hf, engines),
        f"\n## Zero-shot, one photo, {len(LABELS)} labels (HF top-1 margin on it: {hf['top1_margin']:.4f})\n\n"
        + zero_shot_table(hf, engines),
        "\n## Artifact size\n\n" + size_table(engines),
        f"\n## Peak RSS, {rss['images']} photos classified one by one, fresh process each\n\n" + rss_table(rss),
        "\n## Ratios vs HF\n\n" + "\n".join(ratio_lines(hf, engines, rss)),
        f"\n## Targets{quick_note}\n\n" + target_table(results["targets"]),
    ]
    if failures:
        parts.append("\n## Failures (tracebacks in the JSON file)\n\n" + "\n".join(failures))
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts, for a smoke test")
    parser.add_argument("--threads", type=count, default=2,
                        help="CPU threads for torch and for each ONNX Runtime graph")
    parser.add_argument("--json", type=Path, default=OUT / "clip_cpu.json", help="where to write all results")
    parser.add_argument("--int8", choices=sorted(QUANTIZATION_METHODS), default="dynamic",
                        help="INT8 recipe of the fused graph, the device process and the targets (default: dynamic, "
                             "which ONNX Runtime CPU runs with integer kernels; static QDQ is measured beside it)")
    parser.add_argument("--openvino", action="store_true",
                        help="also run every graph on OpenVINO (needs mmedge[openvino]); the targets take the fastest")
    parser.add_argument("--reexport", action="store_true", help="export again even when a matching artifact is cached")
    parser.add_argument("--child", choices=["device", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--images", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Export (or reuse) every variant, measure HF and mmedge, and return all results."""
    from mmedge.api import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    its = QUICK if args.quick else FULL
    variants = make_variants(args.int8, args.openvino)
    machine = machine_info()
    if machine["load_average_1m"] >= QUIET_LOAD:
        print(f"WARNING: load average {machine['load_average_1m']} >= {QUIET_LOAD}: timings may be disturbed",
              file=sys.stderr)
    exports = {v.name: ensure_exported(v, args.threads, args.reexport) for v in variants}
    photos = load_photos()
    ticks = cpu_ticks()
    print("measuring HF PyTorch", file=sys.stderr)
    hf = measure_hf(HFClip(args.threads), photos, its)
    engines = {v.name: (measure_variant(v, args.threads, photos, hf, its) if not exports[v.name]["error"]
                        else {"title": v.title, "fused": v.fused, "error": exports[v.name]["error"]}) for v in variants}
    fused_int8 = next(v for v in variants if v.name == f"fused-int8-{args.int8}")
    image_paths = save_photos(photos, its.rss_images)
    rss = (measure_rss(fused_int8, image_paths, args.threads) if "error" not in engines[fused_int8.name]
           else skipped_rss(fused_int8, "not run: the fused INT8 artifact is unavailable"))
    del hf["reference"]  # arrays, not results
    return {
        "machine": machine,
        "cpu_steal_share": steal_share(ticks, cpu_ticks()),
        "versions": package_versions(["mmedge", "torch", "transformers", "onnxruntime", "numpy"]
                                     + (["openvino"] if args.openvino else [])),
        "settings": {"model": MODEL, "threads": args.threads, "quick": args.quick, "int8_recipe": args.int8,
                     "labels": LABELS, "template": TEMPLATE, "iterations": asdict(its),
                     "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "exports": exports, "hf": hf, "engines": engines, "rss": rss,
        "targets": check_targets(hf, engines, rss, args.int8, quick=args.quick),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "device":
        device_child(args.artifact, args.images, args.threads)
        return 0
    if args.child == "hf":
        hf_child(args.images, args.threads)
        return 0
    start = time.perf_counter()
    results = run_benchmark(args)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    print(report(results))
    print(f"\nwall time {results['wall_s']} s; results written to {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
