"""``mmedge demo``: the models that ship with mmedge, exported, validated and run on bundled scenes, offline.

``models/clip``, ``models/blip2`` and ``models/idefics`` are small transformers checkpoints (a ``CLIPModel``, a
``Blip2ForConditionalGeneration`` and a Flamingo-style ``IdeficsForVisionText2Text``) trained from scratch on
procedural shape scenes by ``examples/train_demo_models.py``; each folder has its model card (README.md) with the
test-split scores. ``models/blip2_t5`` (BLIP-2 with a Flan-T5-style LLM on the BLIP-2 demo's frozen ViT and
Q-Former) ships beside them for the encoder-decoder path; the demo run below does not export it.
``images/`` holds a few test-split scenes and their ground truth (``truth.json``).

The demo exports each model at FP32 and quantized (CLIP: INT8 fused zero-shot; BLIP-2 and IDEFICS: INT8 encoders
with an INT4 LLM; IDEFICS' fidelity measured on the bundled scenes with its own prompt forms), and the CLIP once
more as two graphs (labels chosen at run time, embeddings), into a cache folder, validates
every artifact, then classifies and captions the bundled scenes and
prints what each precision said, its agreement with FP32, latency and size. A later run finds the artifacts in
the cache (same model files, same options, same mmedge version) and skips the export, so it needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmedge.demo import few_shot
from mmedge.errors import InputError, MmedgeError

DEMO_DIR = Path(__file__).resolve().parent
MODELS_DIR = DEMO_DIR / "models"
IMAGES_DIR = DEMO_DIR / "images"
TRUTH_FILE = IMAGES_DIR / "truth.json"
CACHE_KEY_FILE = "demo-cache-key.txt"  # beside each cached artifact: what it was exported from
TWO_GRAPH_CLIP = "clip-two-graph"  # the demo CLIP with its text graph: what the README's Python snippet loads


@dataclass(frozen=True)
class Variant:
    """One artifact the demo exports: a shipped model at one precision."""

    name: str
    model: str  # "clip", "blip2" or "idefics"
    precision: str  # as shown in the table
    options: dict = field(default_factory=dict)  # ExportOptions fields
    bundled_fidelity: bool = False  # measure quantized fidelity on the bundled scenes (their folder: where installed)

    def export_options(self) -> dict:
        """``options``, with the bundled scenes' folder as ``fidelity`` where asked (not in ``options``: the cache key
        must not depend on where mmedge is installed)."""
        return {**self.options, **({"fidelity": str(IMAGES_DIR)} if self.bundled_fidelity else {})}


def model_path(name: str) -> Path:
    """The folder of a shipped demo checkpoint: ``model_path("clip")`` or ``model_path("blip2")``."""
    path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        raise InputError(f"there is no shipped demo model '{name}'", f"one of {', '.join(shipped_models())}",
                         "pass one of those names; reinstall mmedge if the folder is missing")
    return path


def shipped_models() -> list[str]:
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()) if MODELS_DIR.is_dir() else []


def truth() -> dict:
    """The bundled scenes' ground truth: labels, templates, and per image its caption and questions."""
    return json.loads(TRUTH_FILE.read_text())


def labels() -> list[str]:
    """The demo CLIP's zero-shot label set ("red circle", ..., 24 colour × shape labels)."""
    return list(truth()["labels"])


def templates() -> list[str]:
    """The prompt template the demo CLIP was trained with: ``"a {}"``."""
    return list(truth()["templates"])


def images(count: int | None = None) -> list[Path]:
    """The bundled scene images (PNG, 64×64), first ``count`` of them."""
    paths = [IMAGES_DIR / name for name in truth()["images"]]
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(paths):
            raise InputError(f"image count is {count!r}", f"an integer from 1 to {len(paths)}",
                             f"ask for at most {len(paths)} images (--images N)")
        paths = paths[:count]
    return paths


def idefics_fidelity_prompts() -> list[list[str]]:
    """The demo IDEFICS' prompt forms, with "{image}" where each scene goes: what its quantized LLM is measured on."""
    return [["{image}", "red and blue", "{image}", "green", "{image}"],
            ["{image}", "a red circle", "{image}", "a blue square and a green cross", "{image}"],
            [few_shot.MORE_SHAPES, "{image}", "{image}", few_shot.ANSWER],
            [few_shot.SAME_COLOR.format("circle", "square"), "{image}", "{image}", few_shot.ANSWER]]


def variants() -> list[Variant]:
    zero_shot = {"labels": labels(), "templates": templates()}
    in_domain = {"extra": {"fidelity_prompts": idefics_fidelity_prompts()}}
    int4 = {"int4_head": "int8"}  # the INT4 export's default, named: a cache of the 4-bit-head recipe is not reused
    return [
        Variant("clip-fp32", "clip", "fp32", dict(zero_shot)),
        Variant("clip-int8", "clip", "int8", dict(zero_shot, precision="int8", quantization="dynamic")),
        Variant(TWO_GRAPH_CLIP, "clip", "fp32, 2 graphs", {}),  # vision + text: labels at run time, task="embed"
        Variant("blip2-fp32", "blip2", "fp32", {}),
        Variant("blip2-int4", "blip2", "int8 + int4 LLM", {"precision": "int8", "llm_precision": "int4", **int4}),
        Variant("idefics-fp32", "idefics", "fp32", {}),
        Variant("idefics-int4", "idefics", "int8 + int4 LLM", {"precision": "int8", "llm_precision": "int4", **int4,
                                                                **in_domain}, bundled_fidelity=True),
    ]


def default_cache() -> Path:
    """``$MMEDGE_CACHE/demo`` if set, else ``$XDG_CACHE_HOME/mmedge/demo``, else ``~/.cache/mmedge/demo``."""
    from mmedge.device_key import user_cache

    return user_cache() / "demo"


def cache_key(variant: Variant) -> str:
    """sha256 over the mmedge version, the exporter's recipe revision (a new default recipe exports again), the
    export options and every file of the shipped model."""
    import mmedge
    from mmedge import manifest

    digest = hashlib.sha256(json.dumps({"mmedge": mmedge.__version__, "recipes": manifest.RECIPE_REVISION,
                                        "model": variant.model, "options": variant.options,
                                        "bundled_fidelity": variant.bundled_fidelity}, sort_keys=True).encode())
    folder = model_path(variant.model)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cached(folder: Path, key: str) -> bool:
    """Whether ``folder`` holds a complete, intact artifact exported from the same model files with the same options
    (a damaged file is exported again, not reported on every later run)."""
    return not_cached(folder, key) is None


def not_cached(folder: Path, key: str) -> str | None:
    """Why ``folder`` is not reused (None: it is): not exported yet, exported by another mmedge or from other model
    files or options (its key differs), or damaged (the first file that fails its check, which the run says)."""
    from mmedge.artifact import Artifact

    stamp = _stamp(folder)
    if not stamp.is_file():
        return "not exported yet"
    if stamp.read_text().strip() != key:
        return "exported by another mmedge version, recipe or model files"
    try:
        Artifact.open(folder).check_every_file()
    except MmedgeError as exc:
        return f"{DAMAGED}: {exc.what}"
    return None


DAMAGED = "the cached copy is damaged"  # not_cached's reason that the run says (the others are routine)


EXPORTING = "exporting"  # the stamp's text while its export runs: the folder is the demo's, and not (yet) cached


def _stamp(folder: Path) -> Path:
    """The cache key the demo writes beside each artifact it exported: also what marks the folder as the demo's."""
    return folder.parent / f"{folder.name}.{CACHE_KEY_FILE}"


def check_cache(cache: Path, chosen: list[Variant]) -> None:
    """The cache is a folder (or not yet made), and each variant's place in it is free or the demo's own: a folder of
    the same name without the demo's stamp (a user's export named ``blip2-int4``, say) is never replaced."""
    if cache.exists() and not cache.is_dir():
        raise MmedgeError(f"the demo cache '{cache}' is a file", "a folder for the demo's artifacts (made if missing)",
                          "pass another --cache folder, or set MMEDGE_CACHE")
    for variant in chosen:
        folder = cache / variant.name
        if (folder.exists() or folder.is_symlink()) and not _stamp(folder).is_file():
            raise MmedgeError(f"the demo cache '{cache}' holds '{variant.name}', which the demo did not export (no "
                              f"{_stamp(folder).name} beside it)", "a cache folder where the demo's artifact names are "
                              "free or the demo's own", f"move '{folder}' out of the cache folder, or pass another "
                              "--cache folder")


def export_variant(variant: Variant, folder: Path, key: str) -> bool:
    """Export ``variant`` into ``folder`` and stamp it with ``key``; True (nothing done) where another demo run, which
    held the variant's lock while this one waited for it, has exported it meanwhile. The lock (``.<stamp>.lock``
    beside the stamp) is held from the check to the stamp's key: a run never removes a folder another is writing or
    has just finished."""
    from mmedge.export import require_export_tools
    from mmedge.locks import locked

    require_export_tools("`mmedge demo` must export the shipped models first, which",
                         " (once; later runs reuse the exported artifacts)")  # before the lock file is made
    with locked(_stamp(folder)):
        if cached(folder, key):  # another run exported it while this one waited
            return True
        _export_locked(variant, folder, key)
    return False


def _export_locked(variant: Variant, folder: Path, key: str) -> None:
    import transformers

    from mmedge.export import ExportOptions, export_model

    transformers.utils.logging.disable_progress_bar()  # the demo prints one line per export instead
    stamp = _stamp(folder)
    if stamp.is_file():  # the demo's own export, stale or damaged (its manifest lost, say): replaced whatever is left
        shutil.rmtree(folder, ignore_errors=True)
    # claimed before the export starts, with no key yet: a run killed between the export's end and the key's write
    # leaves a folder the next run knows as the demo's own and exports again (it had been refused as a user's)
    stamp.write_text(EXPORTING + "\n")
    export_model(str(model_path(variant.model)), folder,
                 ExportOptions(**variant.export_options(), overwrite=True, progress=False))
    stamp.write_text(key + "\n")


def describe(variant: Variant) -> str:
    if variant.name == TWO_GRAPH_CLIP:
        return "CLIP vision and text graphs: labels at run time, embeddings, FP32"
    if variant.model == "clip":
        return f"CLIP fused zero-shot, {len(variant.options['labels'])} labels baked in, {variant.precision.upper()}"
    label = "BLIP-2" if variant.model == "blip2" else "IDEFICS (fused image graph)"
    return f"{label} FP32" if variant.precision == "fp32" else f"{label}, INT8 encoders + INT4 LLM"


# --- running ------------------------------------------------------------------------------------
def run_demo(cache: str | os.PathLike | None = None, count: int | None = None, threads: int | None = None,
             progress: bool = True, backend: str = "auto") -> dict:
    """Export (or reuse), validate and run every variant on the bundled scenes on ``backend``; returns the report."""
    from mmedge.progress import Progress
    from mmedge.validate import raise_on_failure, validate_artifact

    cache = Path(cache).expanduser() if cache else default_cache()
    chosen = variants()
    check_cache(cache, chosen)  # before any export: a refusal leaves every folder as it was
    paths = images(count)
    truths = [truth()["images"][p.name] for p in paths]
    steps = Progress(len(chosen) + 2, enabled=progress)
    report = {"cache": str(cache), "images": [p.name for p in paths], "truth": truths, "artifacts": {}}
    for variant in chosen:
        folder, key = cache / variant.name, cache_key(variant)
        why = not_cached(folder, key)
        reuse = why is None
        verb = "reusing cached" if reuse else "exporting"
        damaged = f"; {why}" if why and why.startswith(DAMAGED) else ""
        start = time.perf_counter()
        with steps.step(f"{verb} {variant.name} ({describe(variant)}{damaged})"):
            if not reuse:
                cache.mkdir(parents=True, exist_ok=True)
                reuse = export_variant(variant, folder, key)  # True: another run exported it meanwhile
        report["artifacts"][variant.name] = {"path": str(folder), "model": variant.model,
                                             "precision": variant.precision,
                                             "reused": reuse, "export_seconds": 0.0 if reuse
                                             else round(time.perf_counter() - start, 1)}
    with steps.step(f"validating {len(chosen)} artifacts against their PyTorch references"):
        for variant in chosen:
            validation = validate_artifact(cache / variant.name, backend=backend, threads=threads)
            raise_on_failure(validation)
            report["artifacts"][variant.name]["validation_min_cosine"] = min(
                m["cosine"] for entry in validation.values() for m in entry["outputs"].values())
    with steps.step(f"classifying and captioning {len(paths)} images with {len(chosen)} artifacts"):
        for variant in chosen:
            report["artifacts"][variant.name].update(_run_variant(cache / variant.name, variant, paths, truths,
                                                                  threads, backend))
    _agreement(report, chosen)
    return report


def _run_variant(folder: Path, variant: Variant, paths: list[Path], truths: list[dict], threads: int | None,
                 backend: str = "auto") -> dict:
    import mmedge
    from mmedge.artifact import Artifact

    outputs, times = [], []
    with mmedge.load(folder, backend=backend, threads=threads) as pipeline:
        ran_on = sorted({comp_plan.backend for comp_plan in pipeline.plan.components.values()})
        if variant.model == "clip":
            choice = {} if pipeline.fused else {"labels": labels(), "templates": templates()}  # two graphs: at run time
            pipeline(str(paths[0]), **choice)  # warm-up: first-run allocations (and the label bank) are not latency
            for path in paths:
                start = time.perf_counter()
                top = pipeline(str(path), top_k=3, **choice)
                times.append(time.perf_counter() - start)
                outputs.append({"top": [{"label": p["label"], "score": round(p["score"], 4)} for p in top]})
        elif variant.model == "idefics":
            return {**_run_idefics(pipeline, folder, paths, truths), "backends": ran_on}
        else:
            pipeline.caption(str(paths[0]), max_new_tokens=4)
            for i, (path, truth_) in enumerate(zip(paths, truths)):
                start = time.perf_counter()
                caption = pipeline.caption(str(path))
                times.append(time.perf_counter() - start)
                asked = truth_["questions"]  # colour of each shape, shape of each colour, the count: one each in turn
                question = asked[i % len(asked)]["question"]
                outputs.append({"caption": caption, "question": question, "answer": pipeline.ask(str(path), question)})
    artifact = Artifact.open(folder)
    correct = [_correct(variant.model, out, t) for out, t in zip(outputs, truths)]
    return {"outputs": outputs, "correct": sum(correct), "latency_ms": round(statistics.median(times) * 1e3, 2),
            "size_bytes": artifact.size_bytes(), "export_fidelity": _export_fidelity(artifact), "backends": ran_on}


def idefics_prompts(paths: list[Path]) -> list[dict]:
    """The demo's interleaved prompts for the first ``len(paths)`` bundled scenes (``few_shot.demo_prompts``; the
    few-shot examples come from all bundled scenes); each with ``"image"``: the scene it is about."""
    pool = [(IMAGES_DIR / name, entry["present_labels"]) for name, entry in truth()["images"].items()]
    prompts = few_shot.demo_prompts(pool, len(paths))
    for i, prompt in enumerate(prompts):
        prompt["image"] = i // 2
    return prompts


def _run_idefics(pipeline, folder: Path, paths: list[Path], truths: list[dict]) -> dict:
    from mmedge.artifact import Artifact

    prompts = idefics_prompts(paths)
    pipeline.generate(prompts[0]["prompt"], max_new_tokens=2)  # warm-up
    outputs, times = [[] for _ in paths], []
    for p in prompts:
        start = time.perf_counter()
        answer = pipeline.generate(p["prompt"])
        times.append(time.perf_counter() - start)
        question = p["prompt"][0] if isinstance(p["prompt"][0], str) else "few-shot"
        outputs[p["image"]].append({"task": p["task"], "question": question, "answer": answer, "truth": p["answer"]})
    artifact = Artifact.open(folder)
    return {"outputs": outputs, "correct": sum(o["answer"] == o["truth"] for row in outputs for o in row),
            "total": len(prompts), "latency_ms": round(statistics.median(times) * 1e3, 2),
            "size_bytes": artifact.size_bytes(), "export_fidelity": _export_fidelity(artifact)}


def _correct(model: str, output: dict, truth_: dict) -> bool:
    if model == "clip":
        return output["top"][0]["label"] in truth_["present_labels"]
    return output["caption"] == truth_["caption"]


def _export_fidelity(artifact) -> dict:
    """What the export measured for quantized components against FP32 (from the manifest)."""
    measured = {}
    for name, comp in artifact.components.items():
        fidelity = comp["parity"].get("fidelity") or {}
        for key in ("top1_agreement", "greedy_identical_share"):
            if key in fidelity:
                measured[f"{name}.{key}"] = fidelity[key]
    return measured


def _agreement(report: dict, chosen: list[Variant]) -> None:
    """Each quantized variant against the FP32 variant of the same model, on the demo images."""
    by_model = {v.model: v.name for v in chosen if v.precision == "fp32"}
    for variant in chosen:
        entry = report["artifacts"][variant.name]
        reference = report["artifacts"][by_model[variant.model]]["outputs"]
        if variant.model == "idefics":  # every answer, not per image
            entry["agrees_with_fp32"] = sum(a["answer"] == b["answer"] for row, ref in zip(entry["outputs"], reference)
                                            for a, b in zip(row, ref))
            continue
        key = (lambda o: o["top"][0]["label"]) if variant.model == "clip" else (lambda o: o["caption"])
        entry["agrees_with_fp32"] = sum(key(a) == key(b) for a, b in zip(entry["outputs"], reference))


# --- printing -----------------------------------------------------------------------------------
def _home_short(path: str) -> str:
    """``path`` with the home folder written ``~`` (as the README and --help name the default cache)."""
    home = Path.home()
    try:
        return str(Path("~") / Path(path).relative_to(home)) if home != Path("/") else path
    except ValueError:
        return path


def format_report(report: dict) -> str:
    artifacts, truths = report["artifacts"], report["truth"]
    reused = sum(a["reused"] for a in artifacts.values())
    cache = _home_short(report["cache"])
    lines = [f"mmedge demo: the shipped CLIP, BLIP-2 and IDEFICS demo models, exported to {cache}",
             f"({reused} of {len(artifacts)} artifacts reused from the cache; "
             f"{len(artifacts) - reused} exported now), all validated against PyTorch", ""]
    clips = [n for n, a in artifacts.items() if a["model"] == "clip"]
    blips = [n for n, a in artifacts.items() if a["model"] == "blip2"]
    flamingos = [n for n, a in artifacts.items() if a["model"] == "idefics"]
    for i, (image, truth_) in enumerate(zip(report["images"], truths)):
        lines.append(f"{image}   truth: {truth_['caption']}")
        for name in clips:
            top = artifacts[name]["outputs"][i]["top"]
            text = ", ".join(f"{p['label']} {p['score']:.2f}" for p in top)
            lines.append(f"  zero-shot {artifacts[name]['precision']:<16} {text}")
        for name in blips:
            out = artifacts[name]["outputs"][i]
            mark = "ok" if out["caption"] == truth_["caption"] else "differs"
            lines.append(f"  caption   {artifacts[name]['precision']:<16} {out['caption']}  ({mark})")
        if blips:
            question = artifacts[blips[0]]["outputs"][i]["question"]
            answers = "   ".join(f"{artifacts[n]['precision']}: {artifacts[n]['outputs'][i]['answer']}" for n in blips)
            lines.append(f"  question  {question}   {answers}")
        for k, asked in enumerate(artifacts[flamingos[0]]["outputs"][i] if flamingos else []):
            answers = "   ".join(f"{artifacts[n]['precision']}: {artifacts[n]['outputs'][i][k]['answer']}"
                                 for n in flamingos)
            what = asked["task"] if asked["question"] == "few-shot" else asked["question"]
            lines.append(f"  IDEFICS   {what} (truth: {asked['truth']})   {answers}")
        lines.append("")
    count = len(truths)
    header = ("artifact", "precision", "ran on", "size", "latency/image", "right on these images", "same as FP32",
              "export-time vs FP32")
    rows = []
    for name, a in artifacts.items():
        task = {"clip": "top-1 present", "blip2": "caption exact", "idefics": "answers exact"}[a["model"]]
        total = a.get("total", count)  # IDEFICS: two prompts per image
        same = "-" if a["precision"] == "fp32" else f"{a['agrees_with_fp32']}/{total}"
        fidelity = ", ".join(f"{k.split('.')[-1].replace('_', ' ')} {v:.3f}" for k,
                             v in a["export_fidelity"].items()) or "-"
        rows.append((name, a["precision"], " + ".join(a["backends"]), f"{a['size_bytes'] / 1e6:.2f} MB",
                     f"{a['latency_ms']:.1f} ms",
                     f"{a['correct']}/{total} {task}", same, fidelity))
    widths = [max(len(str(r[c])) for r in (header, *rows)) for c in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    lines.append("")
    lines.append("ran on: the backends mmedge chose here (--backend to choose); size: every file the artifact carries "
                 "(mmedge bench counts the files a run loads); latency: median per image on this "
                 "machine (BLIP-2: a greedy caption; IDEFICS: a greedy answer to "
                 "an interleaved prompt); export-time figures: the quantized graphs' agreement with FP32 that the "
                 "export measured (the manifest's fidelity, which names its images). Run again: the artifacts come "
                 "from the cache.")
    return "\n".join(lines)


def main(args) -> int:
    """The CLI command (see ``mmedge demo --help``)."""
    report = run_demo(args.cache, args.images, args.threads, progress=not args.quiet, backend=args.backend)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        sys.stdout.flush()
    return 0


def add_parser(sub) -> None:
    from mmedge.cli_args import count, text, threads
    from mmedge.runtimes.registry import backend_names

    demo = sub.add_parser("demo", help="export, validate and run the shipped demo models on bundled scenes (offline)")
    demo.add_argument("--cache", type=text, metavar="DIR",
                      help="where the exported artifacts go and are reused from (default: "
                           "$MMEDGE_CACHE/demo, else $XDG_CACHE_HOME/mmedge/demo, else "
                           "~/.cache/mmedge/demo)")
    demo.add_argument("--images", type=count, metavar="N", help="use the first N bundled scenes (default: all)")
    demo.add_argument("--threads", type=threads, default=None, help="CPU threads per graph")
    demo.add_argument("--backend", default="auto", choices=backend_names())
    demo.add_argument("--json", action="store_true", help="the full report as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress lines")
    demo.set_defaults(func=main)
