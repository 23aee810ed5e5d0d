"""Where the demo IDEFICS' INT4 answers part from FP32's, and which INT4 recipe keeps them: one group of layers at a
time, the LM head kept at 8 bits or FP32, symmetric vs asymmetric blocks, block 16 / 32, the embedding table's rows.

Exports the shipped demo IDEFICS (``mmedge/demo/models/idefics``) twice into ``--work``: FP32, and INT8 encoders with
an FP32 LLM (the encoders of `mmedge demo`'s ``idefics-int4``). Each recipe then quantizes the FP32 decoder graph
(``mmedge.export.int4.quantize_int4``: MatMulNBits; nodes left out stay FP32 or go to 8 bits), stores the embedding
table at its precision, on a copy of one of those artifacts, and runs the held-out prompts
(``examples/flamingo_demo.held_out_prompts``: test-split scenes, never trained on, ``--prompts`` per task) greedily
through ``mmedge.load``: the share of answers identical to the FP32 export's, per task and overall.

    flock /work/heavy.lock python benchmarks/int4_sensitivity.py              # 60 prompts per task, every recipe
    flock /work/heavy.lock python benchmarks/int4_sensitivity.py --only head-int8-symmetric --prompts 200

``--only`` takes recipe keys (a recipe's name in lower case, words joined by hyphens: "head int8 (symmetric)" is
``head-int8-symmetric``) or full names; an unknown one is refused with the list of keys.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import mmedge
from _common import markdown_table, write_json
from mmedge.artifact import sha256_file
from mmedge.cli_args import count
from mmedge.export.families.common import embedding_arrays
from mmedge.export.int4 import output_projections, quantize_int4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import flamingo_demo  # noqa: E402

GROUPS = ("self-attention", "mlp", "cross-attention", "head")


def group_of(name: str, heads: list[str]) -> str:
    """The layer group a decoder MatMul belongs to, by its traced name."""
    if name in heads:
        return "head"
    if "decoder_layers." not in name:  # the gated cross-attention blocks are traced without their module path
        return "cross-attention"
    return "self-attention" if "self_attn" in name else "mlp"


def recipes(matmuls: list[str], heads: list[str]) -> dict[str, dict]:
    """name -> {"base": "int8" (INT8 encoders) | "fp32", "table": precision, "int4": settings or None}."""
    def only(*groups):  # these groups at INT4, the rest FP32
        return {"keep": {n: "fp32" for n in matmuls if group_of(n, heads) not in groups and n not in heads},
                "head": "int4" if "head" in groups else "fp32"}

    int4 = {"block_size": 32, "symmetric": True, "head": "int4"}
    out = {"int8 encoders only": {"base": "int8", "table": "fp32", "int4": None},
           "table int4 only": {"base": "fp32", "table": "int4", "int4": None}}
    for group in GROUPS:
        out[f"{group} int4 only"] = {"base": "fp32", "table": "fp32", "int4": {**int4, **only(group)}}
    out |= {
        "all int4, fp32 encoders": {"base": "fp32", "table": "int4", "int4": int4},
        "all int4, symmetric (the old recipe)": {"base": "int8", "table": "int4", "int4": int4},
        "all int4, block 16": {"base": "int8", "table": "int4-16", "int4": {**int4, "block_size": 16}},
        "all int4, asymmetric": {"base": "int8", "table": "int4", "int4": {**int4, "symmetric": False}},
        "all int4, asymmetric, block 16": {"base": "int8", "table": "int4-16",
                                           "int4": {**int4, "symmetric": False, "block_size": 16}},
        "head int8 (symmetric)": {"base": "int8", "table": "int4", "int4": {**int4, "head": "int8"}},
        "head fp32": {"base": "int8", "table": "int4", "int4": {**int4, "head": "fp32"}},
        "head int8, table int8": {"base": "int8", "table": "int8", "int4": {**int4, "head": "int8"}},
        "head int4, table int8": {"base": "int8", "table": "int8", "int4": int4},
        "head int8, table fp32": {"base": "int8", "table": "fp32", "int4": {**int4, "head": "int8"}},
        "head int8, asymmetric (the new default)": {"base": "int8", "table": "int4", "int4": {
            **int4, "head": "int8", "symmetric": False}},
        "head int8, cross-attention int8": {"base": "int8", "table": "int4", "int4": {
            **int4, "head": "int8", "keep": {n: "int8" for n in matmuls if group_of(n, heads) == "cross-attention"}}},
        "head int8, asymmetric, block 16": {"base": "int8", "table": "int4-16", "int4": {
            **int4, "head": "int8", "symmetric": False, "block_size": 16}},
        "head int8, block 16": {"base": "int8", "table": "int4-16", "int4": {**int4, "head": "int8", "block_size": 16}},
        "head fp32, asymmetric": {"base": "int8", "table": "int4", "int4": {**int4, "head": "fp32",
                                                                             "symmetric": False}},
        "head int8, float compute": {"base": "int8", "table": "int4", "int4": {**int4, "head": "int8",
                                                                                "accuracy_level": 0}},
        "head int8, asymmetric, float compute": {"base": "int8", "table": "int4", "int4": {
            **int4, "head": "int8", "symmetric": False, "accuracy_level": 0}},
        "head fp32, float compute": {"base": "int8", "table": "int4", "int4": {**int4, "head": "fp32",
                                                                                "accuracy_level": 0}},
    }
    return out


def recipe_key(name: str) -> str:
    """A recipe's key for ``--only``: its name in lower case, words joined by hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("'", "")).strip("-")


def chosen_recipes(parser: argparse.ArgumentParser, only: list[str] | None) -> set[str] | None:
    """The recipe names ``--only`` picks (None: all of them); an unknown key or name is a usage error listing the
    keys. The names do not depend on the graph, so they are known before any export."""
    if only is None:
        return None
    keys = {recipe_key(name): name for name in recipes([], [])}
    names = keys | {name: name for name in keys.values()}
    unknown = [given for given in only if given not in names]
    if unknown:
        parser.error(f"--only: no recipe {', '.join(map(repr, unknown))}; the recipes: {', '.join(keys)}")
    return {names[given] for given in only}


def build(work: Path, name: str, base: Path, fp32_decoder: Path, table: np.ndarray, recipe: dict) -> Path:
    """A copy of ``base`` with the recipe's decoder graph and embedding table, its manifest entries updated."""
    out = work / "recipes" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("'", "")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    manifest = json.loads((out / "manifest.json").read_text())
    decoder = manifest["components"]["decoder"]
    if recipe["int4"] is not None:
        decoder["quantization"] = quantize_int4(fp32_decoder, out / "decoder.onnx", **recipe["int4"])
        decoder["precision"] = "int4"
    decoder.update(sha256=sha256_file(out / "decoder.onnx"), size_bytes=(out / "decoder.onnx").stat().st_size)
    precision, _, block = recipe["table"].partition("-")
    storage, arrays = embedding_arrays(table, precision, int(block or 32))
    np.savez(out / "embed_tokens.npz", **arrays)
    entry = manifest["idefics"]["embeddings"]
    entry.pop("block_size", None)
    described = {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in arrays.items()}
    entry.update(storage=storage, arrays=described, sha256=sha256_file(out / "embed_tokens.npz"),
                 size_bytes=(out / "embed_tokens.npz").stat().st_size,
                 **({"block_size": int(block or 32)} if storage == "int4-block" else {}))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def answers(folder: Path, prompts: list[dict], threads: int) -> tuple[list[str], np.ndarray]:
    """Greedy answers, and the logits of each answer's first token ``[prompts, vocab]`` (the prefill's last row)."""
    first = []
    with mmedge.load(folder, threads=threads) as model:
        start = model.decoder.start

        def recorded(*args, **kwargs):
            logits = start(*args, **kwargs)  # [batch, vocab]
            first.append(np.array(logits[0], dtype=np.float64))
            return logits

        model.decoder.start = recorded
        return [model.generate(p["prompt"]) for p in prompts], np.stack(first)


def export_bases(work: Path) -> dict[str, Path]:
    from mmedge import demo
    from mmedge.export import ExportOptions, export_model

    variant = next(v for v in demo.variants() if v.name == "idefics-int4")
    # the demo variant's encoder settings without its LLM ones: the int4_* keys, and extra.fidelity_prompts (the LLM's
    # fidelity prompts, which the exporter refuses as idle once the LLM stays FP32)
    encoders = {k: v for k, v in variant.export_options().items() if not k.startswith("int4_") and k != "extra"}
    extra = {k: v for k, v in (variant.export_options().get("extra") or {}).items() if k != "fidelity_prompts"}
    if extra:
        encoders["extra"] = extra
    bases = {"fp32": ({}, work / "fp32"), "int8": ({**encoders, "llm_precision": "fp32"}, work / "int8-encoders")}
    for options, folder in bases.values():
        if not (folder / "manifest.json").is_file():
            export_model(str(demo.model_path("idefics")), folder, ExportOptions(**options, progress=False))
    return {name: folder for name, (_, folder) in bases.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=count, default=60, help="held-out prompts per task (the test's 60)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/int4-sensitivity"))
    parser.add_argument("--only", nargs="+", default=None,
                        help="recipe keys (e.g. head-int8-symmetric) or names to run (default: all)")
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "int4_sensitivity.json")
    args = parser.parse_args(argv)
    selected = chosen_recipes(parser, args.only)
    bases = export_bases(args.work)
    fp32_decoder = bases["fp32"] / "decoder.onnx"
    graph = onnx.load(str(fp32_decoder)).graph
    heads = output_projections(graph)
    matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and any(t.name == n.input[1]
                                                                           for t in graph.initializer)]
    print(f"decoder MatMuls with weights: {len(matmuls)}; head: {heads}")
    print({g: sum(group_of(n, heads) == g for n in matmuls) for g in GROUPS})
    with np.load(bases["fp32"] / "embed_tokens.npz") as data:
        table = data["weight"]  # [vocab + additional, hidden] float32
    prompts = flamingo_demo.held_out_prompts(args.prompts)
    reference, reference_logits = answers(bases["fp32"], prompts, args.threads)
    results = {"prompts_per_task": args.prompts, "fp32_scores": flamingo_demo.scores(reference, prompts),
               "recipes": {}}
    rows = []
    for name, recipe in recipes(matmuls, heads).items():
        if selected is not None and name not in selected:
            continue
        start = time.perf_counter()
        folder = build(args.work, name, bases[recipe["base"]], fp32_decoder, table, recipe)
        got, logits = answers(folder, prompts, args.threads)
        error = float(np.abs(logits - reference_logits).mean())  # first answer token, mean |logit - FP32 logit|
        same = [a == b for a, b in zip(reference, got)]
        by_task = {t: float(np.mean([s for s, p in zip(same, prompts) if p["task"] == t])) for t in flamingo_demo.TASKS}
        size = (folder / "decoder.onnx").stat().st_size + (folder / "embed_tokens.npz").stat().st_size
        results["recipes"][name] = {"recipe": {k: v for k, v in recipe.items() if k != "int4"} | {
            "int4": None if recipe["int4"] is None else {k: v for k, v in recipe["int4"].items() if k != "keep"}},
            "identical": float(np.mean(same)), "by_task": by_task, "llm_bytes": size, "first_token_logit_error": error,
            "scores": flamingo_demo.scores(got, prompts)}
        rows.append([name, f"{np.mean(same):.1%}", *(f"{by_task[t]:.0%}" for t in flamingo_demo.TASKS),
                     f"{error:.4f}", f"{size / 1e3:.0f} kB"])
        print(f"{name}: {np.mean(same):.1%} identical ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(markdown_table(["recipe", "answers identical to FP32", *flamingo_demo.TASKS,
                          "first-token mean abs logit error", "decoder + table"], rows))
    print(f"\nwritten: {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
