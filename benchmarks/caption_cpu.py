"""BLIP-2 captioning on CPU: Hugging Face ``model.generate`` (eager PyTorch FP32) against mmedge (ONNX Runtime).

The bundled benchmark-size config ``mmedge/blip2-vitb-opt125m`` (ViT-B/16 vision tower, the real Q-Former
with 32 queries, an OPT-125m-size LLM) with random weights (seed 0): the HF model and every mmedge export
are the same model, so greedy tokens are directly comparable. One real photo is captioned (no prompt)
with exactly 32 new tokens forced on both sides (min_new_tokens = max_new_tokens = 32, greedy).
Measured, in one run:

- time to first token (preprocessing + vision/Q-Former prefix + LLM prefill + first token) and decode
  tokens/s over the other 31 tokens; HF's per-token times come from a ``transformers`` streamer, mmedge's
  from a thin wrapper around its decoder (the generation loop is mmedge's own ``generate``);
- peak RSS of a fresh process that loads the model and captions the photo (the mmedge process never
  imports torch);
- artifact sizes (whole folder, and the LLM: decoder graph + token-embedding table) and the share of the
  machine's copy bandwidth the decode loop uses: tok/s x LLM weight bytes read per token / bandwidth;
- IO binding: decode tok/s of the same decoder graph with ``OrtDecoder(io_binding=True)`` and ``False``;
- fused attention: the INT4 export as it is by default (transformers' attention ops) against the same export with
  ``--fused-attention`` (one ``com.microsoft.MultiHeadAttention`` node per decoder layer);
- fidelity beside speed: the export-time decoder fidelity each manifest records, whether mmedge FP32
  gives HF's 32 tokens, and INT8 / INT4 token agreement with FP32 on the photo.

Exports are cached under benchmarks/out/ (git-ignored); ``--reexport`` rebuilds them.

    python benchmarks/caption_cpu.py            # full run: ~1.5 min cached, ~8 min with cold exports (2 cores)
    python benchmarks/caption_cpu.py --quick    # smoke test: one timed caption per variant
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from _common import (
    StreamerClock,
    TokenClock,
    backends_used,
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
    memory_bandwidth_gbps,
    package_versions,
    prompt_inputs,
    ratio,
    run_child,
    steal_share,
    summary,
    write_json,
)
from mmedge.cli_args import count
from mmedge.metrics import common_prefix

MODEL = "mmedge/blip2-vitb-opt125m"
ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "export" / "data" / "images" / "holdout-chelsea.jpg"
OUT = Path(__file__).resolve().parent / "out"
NEW_TOKENS = 32  # forced on both sides: min_new_tokens = max_new_tokens
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # MatMulNBits: INT8 activations on CPU
QUIET_LOAD = 1.2  # a load average above this before the run is reported as a warning
TARGETS = {  # name: (what is compared, direction, limit)
    "int4_decode": ("decode tok/s, mmedge INT4 vs HF FP32", ">=", 4.0),
    "int4_bandwidth": ("bandwidth use of the decode loop, mmedge INT4", ">=", 0.5),
    "int4_llm_size": ("LLM size (decoder graph + embedding table), INT4 vs FP32", "<=", 0.17),
}


@dataclass(frozen=True)
class Iterations:
    """Timed captions per variant (after ``warmup`` untimed ones) and per IO-binding setting."""

    warmup: int
    runs: int
    io_binding_runs: int


FULL = Iterations(warmup=2, runs=7, io_binding_runs=7)
QUICK = Iterations(warmup=1, runs=1, io_binding_runs=1)


@dataclass(frozen=True)
class Variant:
    """One mmedge export: encoder precision (INT8 = dynamic) and LLM precision."""

    name: str
    precision: str
    llm_precision: str
    backend: str = "onnxruntime"
    openvino_weights: str | None = None  # OpenVINO: NNCF compresses the FP32 decoder's weights at first load
    export: str | None = None  # the export it runs (default: ``name``)
    fused_attention: bool = False  # export --fused-attention

    @property
    def attention_op(self) -> str:
        """The decoder attention this variant's export has (``components.decoder.attention.op``)."""
        return "com.microsoft.MultiHeadAttention" if self.fused_attention else "standard"

    @property
    def folder(self) -> Path:
        return OUT / f"blip2-vitb-opt125m-{self.export or self.name}"

    def load_options(self) -> dict:
        return {"backend": self.backend, **({"backend_options": {"openvino": {"weights": self.openvino_weights}}}
                                            if self.openvino_weights else {})}

    @property
    def title(self) -> str:
        llm = {"fp32": "FP32", "int8": "INT8",
               "int4": f"INT4 (block {INT4_BLOCK_SIZE}, acc. level {INT4_ACCURACY_LEVEL})"}
        encoders = "" if self.precision == self.llm_precision else f", encoders {self.precision.upper()} dynamic"
        if self.fused_attention:
            encoders += ", fused attention"
        if self.backend == "auto":
            return f"mmedge {llm[self.llm_precision]}, backend auto"
        if self.backend == "openvino":
            weights = f", NNCF {self.openvino_weights.upper()} weights" if self.openvino_weights else ""
            return f"mmedge {llm[self.llm_precision]} on OpenVINO{weights}"
        return f"mmedge {llm[self.llm_precision]}{encoders}"


VARIANTS = [Variant("fp32", "fp32", "fp32"), Variant("int8", "int8", "int8"), Variant("int4", "int8", "int4"),
            # A/B: the INT4 decoder with one fused attention node per layer (export --fused-attention)
            Variant("int4-fused-attention", "int8", "int4", fused_attention=True)]
# --openvino: the FP32 export on OpenVINO as it is, and with NNCF INT8 / INT4 (group 32) weights made at first load
OPENVINO_VARIANTS = [Variant("fp32-openvino", "fp32", "fp32", "openvino", None, "fp32"),
                     Variant("int8-openvino", "fp32", "fp32", "openvino", "int8", "fp32"),
                     Variant("int4-openvino", "fp32", "fp32", "openvino", "int4", "fp32"),
                     # what auto picks per component: the rule, or mmedge tune's timings where the export has them
                     Variant("fp32-auto", "fp32", "fp32", "auto", None, "fp32")]
BANDWIDTH_READINGS = 7
IO_BINDING_VARIANTS = ("fp32", "int4")


# --- exports -----------------------------------------------------------------------------------------
def cached_export_matches(variant: Variant) -> bool:
    """Whether ``variant.folder`` holds a readable artifact of MODEL exported with this variant's settings."""
    from mmedge.artifact import Artifact
    from mmedge.errors import MmedgeError

    try:
        manifest = Artifact.open(variant.folder).manifest
    except MmedgeError:
        return False
    components = manifest["components"]
    if "decoder" not in components or manifest["source"]["model"] != MODEL or not manifest["source"]["random_weights"]:
        return False
    precisions_match = components["decoder"]["precision"] == variant.llm_precision and all(
        c["precision"] == variant.precision for name, c in components.items() if name != "decoder")
    methods_ok = all((c["quantization"] or {}).get("method") in (None, "int8-dynamic")
                     for name, c in components.items() if name != "decoder")
    embeddings = manifest["blip2"]["embeddings"]
    block_ok = variant.llm_precision != "int4" or embeddings.get("block_size") == INT4_BLOCK_SIZE
    attention_ok = (components["decoder"].get("attention") or {}).get("op", "standard") == variant.attention_op
    return precisions_match and methods_ok and block_ok and attention_ok


def ensure_exported(variant: Variant, threads: int, reexport: bool) -> dict:
    """Export ``variant`` unless a matching artifact is cached. Returns status, seconds and any error."""
    from mmedge.export import export_model

    return export_once(variant.name, variant.folder, not reexport and cached_export_matches(variant),
                       lambda: export_model(
        MODEL, variant.folder, random_weights=True, progress=False, overwrite=True, threads=threads,
        precision=variant.precision, llm_precision=variant.llm_precision,
        **({"int4_block_size": INT4_BLOCK_SIZE, "int4_accuracy_level": INT4_ACCURACY_LEVEL}
           if variant.llm_precision == "int4" else {}),  # INT8 is dynamic by default; INT4 settings only for INT4
        **({"extra": {"fused_attention": True}} if variant.fused_attention else {})))


# --- one timed caption ---------------------------------------------------------------------------------
@dataclass
class Caption:
    """One caption's new tokens and when each was chosen (``times[i]``: token i + 1), from ``start``."""

    tokens: list[int]
    start: float
    times: list[float]
    step_seconds: list[float] | None = None  # mmedge only: time inside each decoder.step

    @property
    def step_ms(self) -> float | None:
        return None if not self.step_seconds else statistics.mean(self.step_seconds) * 1e3

    @property
    def ttft_ms(self) -> float:
        return (self.times[0] - self.start) * 1e3

    @property
    def decode_tok_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    @property
    def total_ms(self) -> float:
        return (self.times[-1] - self.start) * 1e3


def measure_captions(caption: Callable[[], Caption], its: Iterations) -> tuple[dict, list[int]]:
    """``warmup`` untimed captions, then ``runs`` timed ones: TTFT, decode tok/s and total, medians."""
    for _ in range(its.warmup):
        caption()
    runs = [caption() for _ in range(its.runs)]
    tokens = runs[-1].tokens
    if any(r.tokens != tokens for r in runs):
        raise RuntimeError("greedy decoding gave different tokens on repeated runs")
    if len(tokens) != NEW_TOKENS or any(len(r.times) != NEW_TOKENS for r in runs):
        raise RuntimeError(f"expected {NEW_TOKENS} new tokens, got {len(tokens)}")
    timings = {"ttft_ms": summary([r.ttft_ms for r in runs]), "decode_tok_s": summary([r.decode_tok_s for r in runs]),
               "total_ms": summary([r.total_ms for r in runs])}
    if runs[0].step_ms is not None:  # per token: time in decoder.step, and the rest of the loop (logits, argmax)
        timings["step_ms"] = summary([r.step_ms for r in runs])
        timings["loop_ms"] = summary([1e3 / r.decode_tok_s - r.step_ms for r in runs])
    return timings, tokens


# --- the Hugging Face baseline ---------------------------------------------------------------------------
class HFBlip2:
    """``Blip2ForConditionalGeneration`` (eager FP32, ``torch.inference_mode``) with HF's BLIP image processor."""

    def __init__(self, threads: int):
        import torch
        import transformers

        from mmedge.export.loading import load_checkpoint

        torch.set_num_threads(threads)
        self.torch = torch
        loaded = load_checkpoint(MODEL, random_weights=True)  # same config and seed as the exports
        self.model = loaded.model
        pre = loaded.image_processor  # the bundled config's preprocessing (random-weights models carry no processor)
        self.processor = transformers.BlipImageProcessorPil(
            size={"height": pre["resize"]["height"], "width": pre["resize"]["width"]},
            resample=Image.Resampling.BICUBIC, rescale_factor=pre["rescale_factor"], image_mean=pre["mean"],
            image_std=pre["std"], do_convert_rgb=True)

    @property
    def attention(self) -> str:
        return self.model.config._attn_implementation

    def llm_weight_bytes(self) -> int:
        """Bytes of the LLM's parameters, tied ones once (what one decode step reads)."""
        seen, total = set(), 0
        for p in self.model.language_model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        return total

    def caption(self, image: Image.Image, new_tokens: int = NEW_TOKENS) -> Caption:
        clock = StreamerClock()
        start = time.perf_counter()
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"]  # [1, 3, 224, 224]
        with self.torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1, streamer=clock)
        return Caption(out[0, -new_tokens:].tolist(), start, clock.times[-new_tokens:])


def measure_hf(threads: int, photo: Image.Image, its: Iterations) -> dict:
    print("measuring HF PyTorch", file=sys.stderr)
    hf = HFBlip2(threads)
    timings, tokens = measure_captions(lambda: hf.caption(photo), its)
    return {"title": "HF PyTorch eager FP32", "attention": hf.attention, "llm_weight_bytes": hf.llm_weight_bytes(),
            **timings, "tokens": tokens}


# --- mmedge --------------------------------------------------------------------------------------------------
def generation_config(captioner):
    """The artifact's generation settings with exactly NEW_TOKENS new tokens, greedy."""
    from mmedge.generation import GenerationConfig

    return GenerationConfig.from_dict(captioner.artifact.manifest["generation"]).replace(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)


def mmedge_caption(captioner, clock: TokenClock, image, config, *, inputs=None) -> Caption:
    """What ``Captioner.caption`` does (preprocess, prefix, prompt embedding, generate), keeping token ids and times.

    With ``inputs`` (``prompt_inputs``' result) the prefix is not recomputed: a decode-only run.
    """
    from mmedge.generation import generate

    start = time.perf_counter()
    embeds, mask, ids = inputs if inputs is not None else prompt_inputs(captioner, image)
    tokens = generate(clock, embeds, mask, config, prompt_ids=ids)[0]
    clock.times.append(time.perf_counter())
    return Caption(tokens, start, clock.times, clock.step_seconds)


def decoder_graph_bytes(artifact) -> int:
    """The decoder graph and its external weight file, if any."""
    component = artifact.component("decoder")
    total = artifact.resolve_file(component["file"], "components.decoder.file").stat().st_size
    if component.get("external_data"):
        total += artifact.resolve_file(component["external_data"]["file"], "external_data").stat().st_size
    return total


def lookup_tables(graph: Path) -> tuple[int, int]:
    """(bytes, bytes of one row) summed over the graph's initializers that are only read through Gather (OPT's
    position table): a token reads one row of each, not the whole table. Read from the graph's metadata only."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(graph), load_external_data=False)
    sizes = {t.name: (list(t.dims), np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize)
             for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in sizes}
    other_uses = {i for n in model.graph.node if n.op_type != "Gather" for i in n.input}
    total = row = 0
    for name in gathered - other_uses:
        dims, itemsize = sizes[name]
        if len(dims) == 2:
            total += dims[0] * dims[1] * itemsize
            row += dims[1] * itemsize
    return total, row


def bandwidth_readings(count: int) -> list[float]:
    """``count`` copy-bandwidth readings (each best of 5 copies of 256 MiB), spread over a few seconds."""
    readings = []
    for _ in range(count):
        readings.append(round(memory_bandwidth_gbps(), 1))
        time.sleep(0.2)
    return readings


def openvino_weight_bytes(artifact, weights: str, facts: dict) -> dict:
    """An NNCF-compressed decoder's sizes, estimated from its compiled model in engines/ (the blob holds the
    compressed weights): bytes read per token = blob less the lookup tables, plus one row of each and of the
    embedding table (the lookup tables counted at FP32: an upper bound of what the blob holds for them)."""
    records = [json.loads(p.read_text()) for p in (artifact.root / "engines").glob("decoder-openvino-*.record")]
    blob = next((r["blob_bytes"] for r in records if r["key"]["precision"] == f"fp32+nncf-{weights}"), None)
    if blob is None:
        return {}
    vocab = artifact.manifest["blip2"]["embeddings"]["shape"][0]
    table_row = facts["embedding_table_bytes"] // vocab
    position_row = facts["llm_bytes_read_per_token"] - facts["decoder_graph_bytes"] + facts["lookup_table_bytes"] \
        - table_row
    return {"openvino_blob_bytes": blob, "llm_bytes": blob + facts["embedding_table_bytes"],
            # the export's fidelity is the FP32 graph's, not the compressed weights': not shown for them
            "export_decoder_fidelity": {}, "export_decoder_parity_logits_cosine_vs_torch": None,
            "llm_bytes_read_per_token": max(blob - facts["lookup_table_bytes"], 0) + position_row + table_row}


def artifact_facts(artifact) -> dict:
    """Sizes, and the fidelity each manifest records (decoder vs FP32 decoder, prefix vs FP32 prefix)."""
    manifest = artifact.manifest
    embeddings = manifest["blip2"]["embeddings"]
    table_bytes = artifact.resolve_file(embeddings["file"], "blip2.embeddings.file").stat().st_size
    graph_bytes = decoder_graph_bytes(artifact)
    tables = lookup_tables(artifact.component_path("decoder"))
    vocab, width = embeddings["shape"]
    decoder = artifact.component("decoder")
    fidelity = decoder["parity"].get("fidelity") or {}
    prefix_fidelity = {name: c["parity"]["fidelity"]["embedding_cosine_mean"]
                       for name, c in artifact.components.items() if name != "decoder" and c["parity"].get("fidelity")}
    return {
        "folder_bytes": artifact.size_bytes(),
        "decoder_graph_bytes": graph_bytes,
        "embedding_table_bytes": table_bytes,
        "embedding_storage": embeddings["storage"],
        "llm_bytes": graph_bytes + table_bytes,
        # what a token really reads: the graph's weights, but one row of each lookup table (the position table)
        # and one row of the embedding table
        "llm_bytes_read_per_token": graph_bytes - tables[0] + tables[1] + table_bytes // vocab,
        "lookup_table_bytes": tables[0],
        "quantization": {name: c.get("quantization") for name, c in artifact.components.items()},
        "export_decoder_fidelity": fidelity,
        "export_prefix_cosine_vs_fp32": prefix_fidelity,
        "export_decoder_parity_logits_cosine_vs_torch": decoder["parity"]["outputs"]["logits"]["cosine"],
        "tied_embeddings": embeddings.get("tied_to_lm_head"),
        "_width": width,
    }


def open_decoder(captioner, threads: int, io_binding: bool):
    """A fresh OrtDecoder over the artifact's decoder graph and embedding table, with the IO-binding flag."""
    from mmedge.runtimes.onnxruntime import OrtOptions
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    settings = captioner.artifact.manifest["blip2"]["decoder"]
    return OrtDecoder(captioner.artifact.component_path("decoder"), captioner.embeddings, settings["kv_cache"],
                      options=OrtOptions(threads=threads), io_binding=io_binding,
                      position_offset=settings.get("position_offset", 0), max_positions=settings.get("max_positions"))


def measure_io_binding(captioner, threads: int, photo, its: Iterations) -> dict:
    """Decode tok/s of two fresh decoders (io_binding True / False) on the same prompt, runs interleaved."""
    config = generation_config(captioner)
    inputs = prompt_inputs(captioner, photo)
    clocks = {flag: TokenClock(open_decoder(captioner, threads, flag)) for flag in (True, False)}
    samples: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {}
    try:
        for run in range(its.warmup + its.io_binding_runs):
            for flag, clock in clocks.items():
                caption = mmedge_caption(captioner, clock, None, config, inputs=inputs)
                tokens[flag] = caption.tokens
                if run >= its.warmup:
                    samples[flag].append(caption.decode_tok_s)
    finally:
        for clock in clocks.values():
            clock.decoder.close()
    on, off = summary(samples[True]), summary(samples[False])
    return {"io_binding_true_tok_s": on, "io_binding_false_tok_s": off,
            "speedup": on["median"] / off["median"], "same_tokens": tokens[True] == tokens[False]}


def measure_variant(variant: Variant, threads: int, photo, its: Iterations) -> dict:
    """Everything measured in this process for one export; a failure is recorded as its traceback."""
    import mmedge

    print(f"measuring {variant.title}", file=sys.stderr)
    result: dict[str, Any] = {"title": variant.title}
    try:
        with mmedge.load(variant.folder, threads=threads, **variant.load_options()) as captioner:
            result.update(artifact_facts(captioner.artifact))
            result["backends"] = backends_used(captioner)
            if variant.openvino_weights:
                result.update(openvino_weight_bytes(captioner.artifact, variant.openvino_weights, result))
            result["io_binding_default"] = getattr(captioner.decoder, "io_binding", None)
            config = generation_config(captioner)
            clock = TokenClock(captioner.decoder)
            timings, tokens = measure_captions(lambda: mmedge_caption(captioner, clock, photo, config), its)
            result.update(timings)
            result["tokens"] = tokens
            if variant.name in IO_BINDING_VARIANTS:
                print(f"measuring IO binding on / off, {variant.title}", file=sys.stderr)
                result["io_binding"] = measure_io_binding(captioner, threads, photo, its)
    except Exception as exc:  # the runtime path is under active change: record, report, go on
        result["error"] = error_text(exc)
        print(f"{variant.title} FAILED:\n{result['error']}", file=sys.stderr)
    return result


# --- peak RSS: one fresh process per engine --------------------------------------------------------------------
def mmedge_child(artifact: str, threads: int, load_options: dict | None = None) -> None:
    """Device side: import mmedge only, load the artifact, caption the photo file; print what happened."""
    import mmedge
    from mmedge.api import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    with mmedge.load(artifact, threads=threads, **(load_options or {})) as captioner:
        text = captioner.caption(str(PHOTO), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    print(json.dumps({"caption_chars": len(text), "torch_imported": "torch" in sys.modules}))


def hf_child(threads: int) -> None:
    """HF side: torch + transformers, build the model, caption the photo file."""
    hf = HFBlip2(threads)
    tokens = hf.caption(Image.open(PHOTO).convert("RGB")).tokens
    print(json.dumps({"tokens": tokens, "torch_imported": True}))


def measure_rss(engines: dict[str, dict], threads: int, variants: list[Variant]) -> dict:
    """Peak RSS of a fresh process per engine: HF, then each mmedge artifact that was measured."""
    script = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads)]
    print("peak RSS: HF process", file=sys.stderr)
    rss = {"hf": child_summary(rss_on_failure=False, child=run_child(script + ["--child", "hf"], timeout_s=300))}
    for variant in variants:
        if "error" in engines[variant.name]:
            rss[variant.name] = {"peak_rss_bytes": None, "error": "not run: the artifact is unavailable"}
            continue
        print(f"peak RSS: mmedge process, {variant.name}", file=sys.stderr)
        rss[variant.name] = child_summary(rss_on_failure=False, child=run_child(
            script + ["--child", "mmedge", "--artifact", str(variant.folder), "--load-options",
                      json.dumps(variant.load_options())], timeout_s=300))
    return rss


# --- derived figures, targets and tables --------------------------------------------------------------------------
def median(result: dict, key: str) -> float | None:
    return result[key]["median"] if key in result else None


def derive(hf: dict, engines: dict[str, dict], rss: dict, bandwidth_gbps: float) -> None:
    """Bandwidth use, token agreement and RSS, added to each engine's result."""
    hf["bandwidth_use"] = _bandwidth_use(median(hf, "decode_tok_s"), hf.get("llm_weight_bytes"), bandwidth_gbps)
    hf["peak_rss_bytes"] = rss["hf"]["peak_rss_bytes"]
    fp32_tokens = engines["fp32"].get("tokens")
    for name, r in engines.items():
        r["peak_rss_bytes"] = rss[name]["peak_rss_bytes"]
        r["child_torch_imported"] = rss[name].get("torch_imported")
        if "tokens" not in r:
            continue
        r["bandwidth_use"] = _bandwidth_use(median(r, "decode_tok_s"), r["llm_bytes_read_per_token"], bandwidth_gbps)
        r["tokens_equal_hf"] = r["tokens"] == hf.get("tokens")
        if fp32_tokens is not None:
            r["tokens_equal_fp32"] = r["tokens"] == fp32_tokens
            r["common_prefix_with_fp32"] = common_prefix(r["tokens"], fp32_tokens)
            r["positions_equal_fp32"] = sum(a == b for a, b in zip(r["tokens"], fp32_tokens)) / NEW_TOKENS


def _bandwidth_use(tok_s: float | None, bytes_per_token: int | None, bandwidth_gbps: float) -> float | None:
    """Weight bytes read per second by the decode loop, as a share of the measured copy bandwidth."""
    if tok_s is None or not bytes_per_token or not bandwidth_gbps:
        return None
    return tok_s * bytes_per_token / (bandwidth_gbps * 1e9)


JUDGED_INT4 = "int4"  # the targets judge the default INT4 export only


def check_targets(hf: dict, engines: dict[str, dict]) -> dict:
    """The targets, judged on the default INT4 export (``int4``: what ``mmedge export --llm-precision int4`` makes).
    The opt-in variants (``int4-fused-attention``, OpenVINO's NNCF weights) are reported in the tables, not judged."""
    fp32 = engines["fp32"]
    int4 = engines[JUDGED_INT4]
    measured = {
        "int4_decode": ratio(median(int4, "decode_tok_s"), median(hf, "decode_tok_s")),
        "int4_bandwidth": int4.get("bandwidth_use"),
        "int4_llm_size": ratio(int4.get("llm_bytes"), fp32.get("llm_bytes")),
    }
    targets = {}
    for name, (what, direction, limit) in TARGETS.items():
        value = measured[name]
        ok = None if value is None else (value >= limit if direction == ">=" else value <= limit)
        judged = f"{int4.get('title', 'mmedge INT4')} (the default INT4 export)"
        targets[name] = {"what": what.replace("mmedge INT4", judged),
                         "measured": value, "direction": direction, "limit": limit,
                         "result": "n/a" if ok is None else ("PASS" if ok else "MISS")}
    return targets


def fmt_rate(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def speed_table(hf: dict, engines: dict[str, dict]) -> str:
    rows = []
    for r in [hf, *engines.values()]:
        ttft, tok_s, total = median(r, "ttft_ms"), median(r, "decode_tok_s"), median(r, "total_ms")
        rows.append([r["title"], fmt_ms(ttft), fmt_ratio(ratio(ttft, median(hf, "ttft_ms"))), fmt_rate(tok_s),
                     fmt_ratio(ratio(tok_s, median(hf, "decode_tok_s"))), fmt_ms(total),
                     fmt_ratio(ratio(total, median(hf, "total_ms"))), fmt_ms(median(r, "step_ms")),
                     fmt_ms(median(r, "loop_ms")), fmt_mib(r.get("peak_rss_bytes")),
                     fmt_ratio(ratio(r.get("peak_rss_bytes"), hf.get("peak_rss_bytes")))])
    return markdown_table(["engine", "TTFT ms", "x HF", "decode tok/s", "x HF", f"caption ms ({NEW_TOKENS} tok)",
                           "x HF",
                           "decoder.step ms/token", "rest of loop ms/token", "peak RSS MiB", "x HF"], rows)


def size_table(hf: dict, engines: dict[str, dict], bandwidth_gbps: float) -> str:
    fp32 = engines["fp32"]
    rows = [[hf["title"] + " (parameters)", None, None, fmt_mib(hf.get("llm_weight_bytes")), None, None,
             fmt_mib(hf.get("llm_weight_bytes")), fmt_rate(median(hf, "decode_tok_s")),
             fmt_share(hf.get("bandwidth_use"))]]
    for r in engines.values():
        rows.append([r["title"], fmt_mib(r.get("folder_bytes")),
                     fmt_ratio(ratio(r.get("folder_bytes"), fp32.get("folder_bytes"))),
                     fmt_mib(r.get("llm_bytes")), fmt_ratio(ratio(r.get("llm_bytes"), fp32.get("llm_bytes"))),
                     r.get("embedding_storage"), fmt_mib(r.get("llm_bytes_read_per_token")),
                     fmt_rate(median(r, "decode_tok_s")), fmt_share(r.get("bandwidth_use"))])
    return markdown_table(["engine", "folder MiB", "x FP32", "LLM MiB (decoder + table)", "x FP32", "table storage",
                           "bytes read / token MiB", "decode tok/s", f"bandwidth use (of {bandwidth_gbps} GB/s)"], rows)


def fidelity_table(hf: dict, engines: dict[str, dict]) -> str:
    def yes_no(value):
        return None if value is None else ("yes" if value else "no")

    rows = [[hf["title"], None, None, None, None, "yes", None, None]]
    for r in engines.values():
        f = r.get("export_decoder_fidelity") or {}
        prefix = r.get("export_prefix_cosine_vs_fp32") or {}
        prefix_cos = min(prefix.values()) if prefix else None
        logits = (None if "logits_cosine_mean" not in f
                  else f"{f['logits_cosine_mean']:.5f} / {f['logits_cosine_min']:.5f}")
        identical = None if "greedy_identical_share" not in f else (
            f"{f['greedy_identical_share']:.0%} of {f.get('sequences')} ({f.get('max_new_tokens')} tok); "
            f"prefix {f['greedy_common_prefix_share']:.0%}")
        agree = None if "common_prefix_with_fp32" not in r else (
            f"{r['common_prefix_with_fp32']}/{NEW_TOKENS} ({fmt_share(r['positions_equal_fp32'])} of positions)")
        rows.append([r["title"], fmt_cos(prefix_cos), logits, identical,
                     fmt_cos(r.get("export_decoder_parity_logits_cosine_vs_torch")), yes_no(r.get("tokens_equal_hf")),
                     yes_no(r.get("tokens_equal_fp32")), agree])
    return markdown_table(["engine", "export: prefix cos vs FP32", "export: logits cos vs FP32 (mean / min)",
                           "export: greedy token-identical to FP32", "export: decoder logits cos vs torch FP32",
                           f"photo: {NEW_TOKENS} tokens = HF", "photo: = mmedge FP32",
                           "photo: leading tokens equal to FP32"], rows)


def io_binding_table(engines: dict[str, dict]) -> str:
    rows = []
    for name in IO_BINDING_VARIANTS:
        r = engines.get(name, {})
        io = r.get("io_binding")
        if not io:
            continue
        rows.append([r["title"], fmt_rate(io["io_binding_true_tok_s"]["median"]),
                     fmt_rate(io["io_binding_false_tok_s"]["median"]), fmt_ratio(io["speedup"]),
                     "yes" if io["same_tokens"] else "no"])
    return markdown_table(["decoder", "io_binding=True tok/s", "io_binding=False tok/s", "True / False", "same tokens"],
                          rows)


def target_table(targets: dict) -> str:
    rows = [[t["what"], None if t["measured"] is None
             else f"{t['measured']:.2f}" + ("x" if "bandwidth" not in t["what"] else ""),
             f"{t['direction']} {t['limit']:.2f}", t["result"]] for t in targets.values()]
    return markdown_table(["target", "measured", "limit", "result"], rows)


def ratio_lines(hf: dict, engines: dict[str, dict]) -> list[str]:
    lines = []
    for r in engines.values():
        if "error" in r:
            continue
        lines.append(f"{r['title']}: TTFT {fmt_ratio(ratio(median(r, 'ttft_ms'), median(hf, 'ttft_ms')))} HF, "
                     f"decode tok/s {fmt_ratio(ratio(median(r, 'decode_tok_s'), median(hf, 'decode_tok_s')))} HF, "
                     f"caption {fmt_ratio(ratio(median(r, 'total_ms'), median(hf, 'total_ms')))} HF, "
                     f"peak RSS {fmt_ratio(ratio(r.get('peak_rss_bytes'), hf.get('peak_rss_bytes')))} HF "
                     f"(backends: {r.get('backends')})")
    return lines


def report(results: dict) -> str:
    hf, engines = results["hf"], results["engines"]
    m, s = results["machine"], results["settings"]
    bandwidth = m["copy_bandwidth_gbps"]
    failures = [f"- export {name}: {first_line(e['error'])}" for name, e in results["exports"].items() if e["error"]]
    failures += [f"- {name} (measuring): {first_line(r['error'])}" for name, r in engines.items()
                 if "error" in r and not results["exports"][name]["error"]]
    failures += [f"- HF (measuring): {first_line(hf['error'])}"] if "error" in hf else []
    failures += [f"- peak RSS {name} child: {first_line(c['error'])}" for name, c in results["rss"].items()
                 if "error" in c and not c["error"].startswith("not run")]
    load_note = "" if m["load_average_1m"] < QUIET_LOAD else f" (WARNING: above {QUIET_LOAD}, timings may be disturbed)"
    its = s["iterations"]
    parts = [
        f"BLIP-2 captioning on CPU — {m['cpu']}, {m['logical_cores']} logical cores, {m['memory_gib']} GiB, "
        f"copy bandwidth {bandwidth} GB/s (median of {m.get('copy_bandwidth_readings_gbps')}) — {m['date']}",
        f"load average before the run {m['load_average_1m']}{load_note}; "
        f"CPU steal during measurements {results['cpu_steal_share']:.1%}",
        f"threads={s['threads']} (torch.set_num_threads, mmedge threads=), {'QUICK' if s['quick'] else 'full'} run, "
        f"median of {its['runs']} timed captions after {its['warmup']} warm-up "
        f"(IO binding: {its['io_binding_runs']} per setting, interleaved); {NEW_TOKENS} new tokens forced "
        f"(min_new_tokens = max_new_tokens), greedy, no prompt, photo {PHOTO.name}; random weights (seed 0), "
        f"HF attention '{hf.get('attention')}'",
        "versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "\n## Speed and memory (TTFT = preprocess + prefix + prefill + first token; decode = the other "
        f"{NEW_TOKENS - 1} tokens)\n\n" + speed_table(hf, engines),
        "\n## Size and bandwidth use (tok/s x bytes read per token / copy bandwidth)\n\n"
        + size_table(hf, engines, bandwidth),
        "\n## Fidelity\n\n" + fidelity_table(hf, engines),
        "\n## IO binding (same decoder graph and prompt; decode tok/s, median)\n\n" + io_binding_table(engines),
        "\n## Ratios vs HF\n\n" + "\n".join(ratio_lines(hf, engines)),
        "\n## Targets (the default INT4 export; opt-in variants are reported above, not judged)\n\n"
        + target_table(results["targets"]),
    ]
    if failures:
        parts.append("\n## Failures (tracebacks in the JSON file)\n\n" + "\n".join(failures))
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed caption per variant, for a smoke test")
    parser.add_argument("--threads", type=count, default=2,
                        help="CPU threads for torch and for each ONNX Runtime graph")
    parser.add_argument("--json", type=Path, default=OUT / "caption_cpu.json", help="where to write all results")
    parser.add_argument("--reexport", action="store_true", help="export again even when a matching artifact is cached")
    parser.add_argument("--child", choices=["mmedge", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--load-options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--openvino", action="store_true",
                        help="also decode on OpenVINO: the FP32 export as it is and with NNCF INT8 / INT4 weights")
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    from mmedge.api import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)
    its = QUICK if args.quick else FULL
    machine = machine_info()
    if machine["load_average_1m"] >= QUIET_LOAD:
        print(f"WARNING: load average {machine['load_average_1m']} >= {QUIET_LOAD}: timings may be disturbed",
              file=sys.stderr)
    variants = VARIANTS + (OPENVINO_VARIANTS if args.openvino else [])
    exports = {v.name: ensure_exported(v, args.threads, args.reexport) for v in variants}
    photo = Image.open(PHOTO).convert("RGB")
    ticks = cpu_ticks()
    try:
        hf = measure_hf(args.threads, photo, its)
    except Exception as exc:
        hf = {"title": "HF PyTorch eager FP32", "error": error_text(exc)}
        print(f"HF FAILED:\n{hf['error']}", file=sys.stderr)
    engines = {v.name: (measure_variant(v, args.threads, photo, its) if not exports[v.name]["error"]
                        else {"title": v.title, "error": exports[v.name]["error"]}) for v in variants}
    steal = steal_share(ticks, cpu_ticks())
    rss = measure_rss(engines, args.threads, variants)
    machine["copy_bandwidth_readings_gbps"] = bandwidth_readings(BANDWIDTH_READINGS)
    machine["copy_bandwidth_gbps"] = round(statistics.median(machine["copy_bandwidth_readings_gbps"]), 1)
    derive(hf, engines, rss, machine["copy_bandwidth_gbps"])
    for r in engines.values():
        r.pop("_width", None)
    return {
        "machine": machine,
        "cpu_steal_share": steal,
        "versions": package_versions(["mmedge", "torch", "transformers", "onnxruntime", "numpy"]),
        "settings": {"model": MODEL, "photo": PHOTO.name, "new_tokens": NEW_TOKENS, "threads": args.threads,
                     "quick": args.quick, "int4_block_size": INT4_BLOCK_SIZE,
                     "int4_accuracy_level": INT4_ACCURACY_LEVEL,
                     "iterations": asdict(its), "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "exports": exports, "hf": hf, "engines": engines, "rss": rss,
        "targets": check_targets(hf, engines),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "mmedge":
        mmedge_child(args.artifact, args.threads, json.loads(args.load_options))
        return 0
    if args.child == "hf":
        hf_child(args.threads)
        return 0
    start = time.perf_counter()
    results = run_benchmark(args)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    print(report(results))
    print(f"\nwall time {results['wall_s']} s; results written to {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
