"""The shipped demo models, `mmedge demo`, `mmedge bench` and the examples.

One demo run (2 images, the session's ``demo_run`` in conftest.py) exports the four demo artifacts into a cache; the
score tests measure
the shipped models through those artifacts on a seeded slice of the test split the model cards were
measured on (``examples/scenes.py``), so CI checks the claims without retraining anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge import demo
from mmedge.artifact import Artifact
from mmedge.cli import main
from mmedge.images import load_image
from tests.support.blocked_imports import hiding

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import flamingo_demo  # noqa: E402
import scenes  # noqa: E402

# Floors the issue sets; the model cards state the full-test-split scores, the tests re-measure on a slice.
ZERO_SHOT_FLOOR, CAPTION_FLOOR, VQA_FLOOR = 0.90, 0.70, 0.90
INT8_AGREEMENT_FLOOR, INT4_IDENTITY_FLOOR = 0.99, 0.90
SLICE = 240  # test scenes per measurement: the first half of the split the cards report on
MAX_SHIPPED_BYTES = 15_000_000
# IDEFICS: the aim per task on held-out prompts, its weight and training budgets, and the default INT4 gate.
# A task the shipped model stays below the aim on is held to its model card's score less a margin for the smaller
# slice (the card says which tasks stay below, and what was tried).
IDEFICS_TASK_AIM, IDEFICS_SLICE_MARGIN, IDEFICS_PROMPTS = 0.85, 0.15, 60  # per task, through the FP32 export
IDEFICS_MAX_WEIGHT_BYTES, IDEFICS_MAX_TRAIN_SECONDS, DEFAULT_LOGITS_GATE = 5_000_000, 600, 0.95
# The INT4 LLM of the shipped IDEFICS, with the INT4 export's default recipe (LM head at 8 bits, a zero point per
# block), gives the FP32 answer on 92.3% of these held-out prompts (91.6% over 200 per task;
# benchmarks/demo_fidelity.py --idefics-prompts 200): the 90% (INT4_IDENTITY_FLOOR), just below the measured
# figure. With the head at 4 bits it was 75% on the first shipped model (benchmarks/int4_sensitivity.py).


def artifact(demo_run, name: str) -> Path:
    return demo_run[0] / name


@pytest.fixture(scope="module")
def test_scenes():
    """(scenes, pixels-ready PIL images) of the first SLICE test scenes, all shape counts; and one-shape scenes."""
    mixed = scenes.split("test", SLICE)
    single = scenes.split("test", SLICE, (1,))
    return {"mixed": (mixed, [s.render() for s in mixed]), "single": (single, [s.render() for s in single])}


# --- the shipped models -------------------------------------------------------------------------
def test_shipped_models_are_real_checkpoints_and_small():
    total, training_seconds = 0, 0.0
    for name in ("clip", "blip2"):
        folder = demo.model_path(name)
        for required in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"):
            assert (folder / required).is_file(), f"{name}/{required}"
        facts = json.loads((folder / "training.json").read_text())
        assert facts["training"]["cpu_threads"] <= 2
        training_seconds += facts["training"]["train_seconds"]
        total += sum(p.stat().st_size for p in folder.iterdir())
    card = (demo.model_path("blip2") / "README.md").read_text()
    # the card states what was measured
    assert f"Training both demo models took {training_seconds / 60:.1f} min" in card
    assert total + sum(p.stat().st_size for p in demo.IMAGES_DIR.iterdir()) <= MAX_SHIPPED_BYTES


def test_model_cards_state_the_measured_scores():
    clip = json.loads((demo.model_path("clip") / "training.json").read_text())["test_split"]
    blip2 = json.loads((demo.model_path("blip2") / "training.json").read_text())["test_split"]
    assert clip["zero_shot_top1"] >= ZERO_SHOT_FLOOR
    assert blip2["caption_exact"] >= CAPTION_FLOOR and blip2["vqa_color_shape"] >= VQA_FLOOR
    card = (demo.model_path("clip") / "README.md").read_text()
    assert f"{clip['zero_shot_top1']:.1%}" in card
    card = (demo.model_path("blip2") / "README.md").read_text()
    assert f"{blip2['caption_exact']:.1%}" in card and f"{blip2['vqa_color_shape']:.1%}" in card


def test_bundled_images_are_test_split_scenes():
    truth = demo.truth()
    expected = scenes.split("test", len(truth["images"]))
    for (name, entry), scene in zip(truth["images"].items(), expected):
        assert entry["caption"] == scene.caption
        assert np.array_equal(np.asarray(scene.render()), np.asarray(load_image(demo.IMAGES_DIR / name)))
    assert truth["labels"] == scenes.labels()


def test_clip_zero_shot_fp32_and_int8_agreement(demo_run, test_scenes):
    chosen, images = test_scenes["single"]
    probs = {}
    for name in ("clip-fp32", "clip-int8"):
        with mmedge.load(artifact(demo_run, name)) as classifier:
            probs[name] = classifier.probabilities(images)  # [images, labels]
            labels = classifier.baked_labels
    top1 = {name: p.argmax(-1) for name, p in probs.items()}
    accuracy = np.mean([labels[k] == s.label for k, s in zip(top1["clip-fp32"], chosen)])
    assert accuracy >= ZERO_SHOT_FLOOR
    assert np.mean(top1["clip-fp32"] == top1["clip-int8"]) >= INT8_AGREEMENT_FLOOR


def _answers(captioner, images, chosen):
    """Greedy answers to every question of every scene, batched per question text; (kind, right) pairs."""
    results = []
    for question, rows in scenes.questions_by_text(chosen).items():
        got = captioner.caption([images[i] for i, _ in rows], captioner.vqa_template.replace("{}", question))
        kind = "count" if scenes.question_kind(question) == "count" else "color_shape"
        results += [(kind, g == want) for g, (_, want) in zip(got, rows)]
    return results


def test_blip2_captions_answers_fp32_and_int4_identity(demo_run, test_scenes):
    chosen, images = test_scenes["mixed"]
    captions = {}
    for name in ("blip2-fp32", "blip2-int4"):
        with mmedge.load(artifact(demo_run, name)) as captioner:
            captions[name] = captioner.caption(images)
            if name == "blip2-fp32":
                answers = _answers(captioner, images, chosen)
    assert np.mean([c == s.caption for c, s in zip(captions["blip2-fp32"], chosen)]) >= CAPTION_FLOOR
    assert np.mean([ok for kind, ok in answers if kind == "color_shape"]) >= VQA_FLOOR
    assert np.mean([a == b for a, b in zip(captions["blip2-fp32"], captions["blip2-int4"])]) >= INT4_IDENTITY_FLOOR


# --- the demo IDEFICS (Flamingo) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def idefics_prompts():
    return flamingo_demo.held_out_prompts(IDEFICS_PROMPTS)


def test_shipped_idefics_is_small_trained_on_two_cores_and_its_card_states_its_scores():
    folder = demo.model_path("idefics")
    for required in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"):
        assert (folder / required).is_file(), required
    assert (folder / "model.safetensors").stat().st_size <= IDEFICS_MAX_WEIGHT_BYTES
    facts = json.loads((folder / "training.json").read_text())
    assert facts["training"]["cpu_threads"] <= 2 and facts["training"]["train_seconds"] <= IDEFICS_MAX_TRAIN_SECONDS
    card = (folder / "README.md").read_text()
    assert set(facts["test_split"]["exact_by_task"]) == set(flamingo_demo.TASKS)
    any_order = facts["test_split"]["items_any_order_by_task"]
    for task, score in facts["test_split"]["exact_by_task"].items():
        assert f"| {task} | {score:.1%} | {any_order[task]:.1%} |" in card
        assert any_order[task] >= score  # an exact answer also names the right items


def test_idefics_answers_count_exactly_and_as_items_in_any_order():
    prompts = [{"task": "few-shot caption", "answer": "a red circle and a blue square"},
               {"task": "few-shot caption", "answer": "a red circle and a blue square"},
               {"task": "few-shot caption", "answer": "a red circle and a blue square"},
               {"task": "few-shot shapes", "answer": "circle, cross and square"},
               {"task": "same color", "answer": "yes"}]
    answers = ["a red circle and a blue square", "a blue square and a red circle", "a blue circle and a red square",
               "square, circle and cross", "no"]
    assert flamingo_demo.scores(answers, prompts) == {"few-shot caption": 1 / 3, "few-shot shapes": 0.0,
                                                      "same color": 0.0}
    assert flamingo_demo.scores(answers, prompts, flamingo_demo.same_items) == {
        "few-shot caption": 2 / 3, "few-shot shapes": 1.0, "same color": 0.0}


@pytest.fixture(scope="module")
def idefics_fp32_answers(demo_run, idefics_prompts):
    return _generate_all(artifact(demo_run, "idefics-fp32"), idefics_prompts)


def _generate_all(folder: Path, prompts: list[dict]) -> list[str]:
    with mmedge.load(folder) as model:
        assert set(model.runners) == {"image_context"}  # the fused image graph, then the decoder
        return [model.generate(p["prompt"]) for p in prompts]


def test_idefics_scores_through_the_exported_graphs_and_int4_identity(demo_run, idefics_prompts, idefics_fp32_answers):
    """Held-out test-split prompts of every task (the first of those the card was measured on) through the FP32 export
    (fused image graph + decoder): the very answers of transformers' generate, exact answers per task; the export
    with an INT4 LLM (the default recipe: 8-bit LM head, asymmetric blocks) gives the FP32 answer on >= 90% of them
    (measured 92.3%)."""
    import transformers

    folder = demo.model_path("idefics")
    reference = flamingo_demo.hf_answers(transformers.IdeficsForVisionText2Text.from_pretrained(folder).eval(),
                                         transformers.IdeficsProcessor.from_pretrained(folder),
                                         [p["prompt"] for p in idefics_prompts])
    assert idefics_fp32_answers == reference
    answers = {"idefics-fp32": idefics_fp32_answers,
               "idefics-int4": _generate_all(artifact(demo_run, "idefics-int4"), idefics_prompts)}
    measured = flamingo_demo.scores(answers["idefics-fp32"], idefics_prompts)
    card = json.loads((demo.model_path("idefics") / "training.json").read_text())["test_split"]["exact_by_task"]
    assert set(measured) == set(flamingo_demo.TASKS)
    for task, score in measured.items():
        assert score >= min(IDEFICS_TASK_AIM, card[task] - IDEFICS_SLICE_MARGIN), (task, measured, card)
    same = np.mean([a == b for a, b in zip(answers["idefics-fp32"], answers["idefics-int4"])])
    assert same >= INT4_IDENTITY_FLOOR, same
    recipe = Artifact.open(artifact(demo_run, "idefics-int4")).manifest["components"]["decoder"]["quantization"]
    assert recipe["head"]["precision"] == "int8" and not recipe["symmetric"]  # the recipe that was measured


def _assert_in_domain_fidelity_at_the_default_gate(folder: Path, precision: str) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "min_logits_cosine" not in json.dumps(manifest)  # the gate was not lowered
    fidelity = manifest["components"]["decoder"]["parity"]["fidelity"]
    assert fidelity["precision"] == precision and manifest["components"]["decoder"]["precision"] == precision
    # the export's gate (its default): logits cosine on the bundled scenes in the model's own prompt forms; the
    # greedy share is recorded beside it (16 tokens of continuation, where a near-tie may flip one)
    assert fidelity["logits_cosine_mean"] >= DEFAULT_LOGITS_GATE and 0.0 <= fidelity["greedy_identical_share"] <= 1
    assert fidelity["sequences"] == len(demo.images()) * len(demo.idefics_fidelity_prompts())
    assert fidelity["prompts"] == [" ".join(p) for p in demo.idefics_fidelity_prompts()]
    assert fidelity["held_out_images"] == len(demo.images())  # the bundled test-split scenes
    assert manifest["components"]["image_context"]["parity"]["fidelity"]["embedding_cosine_mean"] >= 0.98


def test_idefics_int4_fidelity_in_domain_at_the_default_gate(demo_run):
    _assert_in_domain_fidelity_at_the_default_gate(artifact(demo_run, "idefics-int4"), "int4")


def test_idefics_int8_fidelity_in_domain_at_the_default_gate(tmp_path, idefics_prompts, idefics_fp32_answers):
    """The demo's export with an INT8 LLM: the same in-domain gate, and the FP32 answer on >= 90% of the held-out
    prompts."""
    from mmedge.export import ExportOptions, export_model

    variant = next(v for v in demo.variants() if v.name == "idefics-int4")
    kept = {k: v for k, v in variant.export_options().items() if not k.startswith("int4_")}  # INT4-only settings
    options = {**kept, "llm_precision": "int8"}
    out = export_model(str(demo.model_path("idefics")), tmp_path / "int8", ExportOptions(**options, progress=False))
    _assert_in_domain_fidelity_at_the_default_gate(out, "int8")
    int8 = _generate_all(out, idefics_prompts)
    assert np.mean([a == b for a, b in zip(idefics_fp32_answers, int8)]) >= INT4_IDENTITY_FLOOR


def test_shipped_blip2_exports_with_checkpoint_generation_settings(demo_run):
    manifest = json.loads((artifact(demo_run, "blip2-int4") / "manifest.json").read_text())
    tokenizer_json = json.loads((demo.model_path("blip2") / "tokenizer.json").read_text())
    newline = tokenizer_json["model"]["vocab"]["Ċ"]
    assert manifest["generation"]["eos_token_id"] == newline and manifest["generation"]["bos_token_id"] == 2
    assert manifest["components"]["decoder"]["precision"] == "int4"


# --- mmedge demo ----------------------------------------------------------------------------------
def test_demo_runs_end_to_end(demo_run):
    cache, out, err = demo_run
    truth = demo.truth()
    first = next(iter(truth["images"]))
    assert first in out and truth["images"][first]["caption"] in out
    for name in ("clip-fp32", "clip-int8", "clip-two-graph", "blip2-fp32", "blip2-int4", "idefics-fp32",
                 "idefics-int4"):
        assert (cache / name / "manifest.json").is_file()
        assert name in out
        assert f"exporting {name}" in err
    assert "0 of 7 artifacts reused" in out
    assert f"IDEFICS   few-shot caption (truth: {truth['images'][first]['caption']})" in out
    assert "answers exact" in out
    assert Artifact.open(cache / "clip-two-graph").manifest["tasks"] == ["zero-shot", "embed"]  # labels at run time
    assert "latency/image" in out and "same as FP32" in out and " MB" in out
    assert "ran on" in out and any(line.startswith("clip-fp32 ") and " onnxruntime" in line
                                   for line in out.splitlines()), out  # which backend ran each artifact


def test_second_demo_run_reuses_the_cache(demo_run):
    cache = demo_run[0]
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.onnx")}
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "demo", "--cache", str(cache), "--images", "1",
                             "--json"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert all(a["reused"] for a in report["artifacts"].values())
    assert "reusing cached clip-int8" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.onnx")} == before


def test_demo_reexports_a_changed_cache_entry(demo_run, tmp_path):
    """A cache entry whose key does not match (other model files or options) is not reused."""
    variant = demo.variants()[0]
    key = demo.cache_key(variant)
    assert demo.cached(artifact(demo_run, variant.name), key)
    assert not demo.cached(artifact(demo_run, variant.name), "0" * 64)
    assert not demo.cached(tmp_path / "missing", key)


def test_demo_replaces_its_own_damaged_cache_entry(demo_run, tmp_path):
    """A cached artifact with a damaged file failed every later demo run on its sha256; one whose manifest was lost
    was refused as "not an mmedge artifact" by the demo's own export. Both are the demo's (its key file beside them)
    and are exported again."""
    variant = next(v for v in demo.variants() if v.name == "clip-fp32")
    key, folder = demo.cache_key(variant), tmp_path / "clip-fp32"
    shutil.copytree(artifact(demo_run, variant.name), folder)
    (tmp_path / f"clip-fp32.{demo.CACHE_KEY_FILE}").write_text(key + "\n")
    assert demo.cached(folder, key)
    graph = next(folder.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-16])
    why = demo.not_cached(folder, key)  # what the run's progress line says beside "exporting clip-fp32"
    assert why.startswith("the cached copy is damaged: ") and graph.name in why, why
    assert demo.not_cached(folder, "0" * 64) == "exported by another mmedge version, recipe or model files"
    (folder / "manifest.json").unlink()
    demo.export_variant(variant, folder, key)
    assert demo.cached(folder, key) and Artifact.open(folder).manifest["family"] == "clip"


def test_an_export_cut_before_its_key_is_the_demos_own(demo_run, tmp_path, monkeypatch):
    """A run killed between an export's end and its key's write left a folder the next run refused as a user's:
    the folder is claimed (stamped 'exporting') before the export starts, so the next run exports it again."""
    import mmedge.export

    variant = next(v for v in demo.variants() if v.name == "clip-fp32")
    key, folder = demo.cache_key(variant), tmp_path / "clip-fp32"
    real_export = mmedge.export.export_model

    def export_then_killed(*args, **kwargs):
        real_export(*args, **kwargs)
        raise KeyboardInterrupt  # the process ends here, before the key is written

    monkeypatch.setattr(mmedge.export, "export_model", export_then_killed)
    with pytest.raises(KeyboardInterrupt):
        demo.export_variant(variant, folder, key)
    monkeypatch.undo()
    assert (folder / "manifest.json").is_file() and not demo.cached(folder, key)
    demo.check_cache(tmp_path, [variant])  # the demo's own: not refused
    demo.export_variant(variant, folder, key)
    assert demo.cached(folder, key)


def test_demo_never_replaces_a_folder_it_did_not_export(demo_run, tmp_path, capsys):
    """A user's own artifact named like a demo variant (the README's quickstart writes blip2-int4) in the --cache
    folder is refused, before any export, and left as it was; so is a cache path that is a file."""
    mine = tmp_path / "clip-fp32"
    shutil.copytree(artifact(demo_run, "clip-two-graph"), mine)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in mine.iterdir())
    assert main(["demo", "--cache", str(tmp_path), "--images", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds 'clip-fp32', which the demo did not export" in err and "move" in err, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in mine.iterdir()) == before
    assert not list(tmp_path.glob("*.demo-cache-key.txt"))  # nothing exported before the refusal
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--cache", str(afile), "--images", "1", "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_new_export_recipe_changes_every_cache_key(monkeypatch):
    """A cache exported with an older default recipe (e.g. the INT4 head's 32-weight blocks) is exported again."""
    before = [demo.cache_key(v) for v in demo.variants()]
    import mmedge.manifest

    monkeypatch.setattr(mmedge.manifest, "RECIPE_REVISION", mmedge.manifest.RECIPE_REVISION + ".next")
    assert all(a != b for a, b in zip(before, [demo.cache_key(v) for v in demo.variants()]))


WITHOUT_THE_EXPORTER = hiding("torch", "transformers", "onnx", "safetensors") + r"""
import sys
from pathlib import Path
from mmedge.cli import main
from mmedge.demo import model_path
from mmedge.errors import MmedgeError
from mmedge.export import export_model
cache, out = Path(sys.argv[1]), Path(sys.argv[2])
try:
    export_model(str(model_path("clip")), out)
except MmedgeError as error:
    print("API:", error)
print("demo exit", main(["demo", "--cache", str(cache), "--images", "1", "--quiet"]))
print("export exit", main(["export", str(model_path("clip")), str(out)]))
"""


def test_demo_and_export_without_the_exporter_name_the_install_command(tmp_path):
    """A device install (no torch, transformers, onnx): `mmedge demo` with nothing cached, `mmedge export` and
    ``export_model`` name the install command before any work, and leave nothing behind (they ended in 'internal
    error: ModuleNotFoundError', the demo with a lock file in a new cache folder)."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", WITHOUT_THE_EXPORTER, str(cache), str(out)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[1:] == ["demo exit 2", "export exit 2"], done.stdout + done.stderr
    assert lines[0].startswith("API: mmedge.export needs the host-side tools, and torch, transformers, onnx, "
                               "safetensors are not installed"), lines[0]
    assert done.stderr.count('fix: pip install "mmedge[export]"') == 2 and "internal error" not in done.stderr
    assert "`mmedge demo` must export the shipped models first, which needs the host-side tools" in done.stderr
    assert "`mmedge export` needs the host-side tools" in done.stderr
    assert not out.exists() and not [p for p in cache.rglob("*") if p.is_file()], list(cache.rglob("*"))


def test_demo_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path))
    assert demo.default_cache() == tmp_path / "demo"
    monkeypatch.delenv("MMEDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache() == tmp_path / "xdg" / "mmedge" / "demo"


def test_demo_rejects_a_bad_image_count(tmp_path, capsys):
    assert main(["demo", "--cache", str(tmp_path), "--images", "99"]) == 2
    assert "at most" in capsys.readouterr().err


# --- mmedge bench -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_json(demo_run, tmp_path_factory):
    """`mmedge bench --json --plot` over three demo artifacts (an FP32 reference, each fidelity metric), once:
    (results, stdout, stderr, plot path)."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the 'plot' extra)")
    plot = tmp_path_factory.mktemp("bench") / "precisions.png"
    paths = [str(artifact(demo_run, n)) for n in ("clip-fp32", "clip-int8", "blip2-int4")]
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "bench", *paths, "--runs", "3", "--batch", "2",
                             "--json",
                             "--plot", str(plot)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stdout, result.stderr, plot


def test_bench_reports_load_latency_throughput_memory(bench_json):
    results = bench_json[0]
    for r in results:
        assert r["load_ms"] > 0 and r["latency_ms"]["median"] > 0 and r["throughput"]["per_second"] > 0
        assert r["latency_ms"]["calls"] >= 3 and isinstance(r["settled"], bool)
        assert r["memory"]["peak_rss_bytes"] > 10 * 2**20
    clip_fp32, clip_int8, blip2_int4 = results
    assert clip_fp32["fidelity"]["metric"] == "reference"
    assert clip_int8["precision"] == "int8" and clip_int8["fidelity"]["metric"] == "top1_agreement"
    assert 0.0 <= clip_int8["fidelity"]["value"] <= 1.0  # measured at export, on held-out photos
    assert clip_int8["size_bytes"] < clip_fp32["size_bytes"]
    assert blip2_int4["fidelity"]["metric"] == "greedy_identical_share" and blip2_int4["task"] == "caption"


def test_bench_with_json_and_plot_keeps_stdout_json(bench_json):
    _, out, err, plot = bench_json
    json.loads(out)  # nothing but the JSON
    assert f"wrote {plot}" in err and "wrote" not in out


def test_bench_table_has_a_load_column(bench_json):
    from mmedge.bench import format_table

    table = format_table(bench_json[0]).splitlines()
    assert table[0].split()[:5] == ["artifact", "precision", "backend", "size", "load"]
    assert "int8 + int4 decoder" in table[-1] and "captions/s" in table[-1] and " ms " in table[-1]


def test_bench_plot_names_each_measure_on_its_own_axis(bench_json):
    """Fidelity axes are named, CLIP's top-1 agreement and BLIP-2's greedy identity apart, FP32 a reference line;
    throughput and peak memory are drawn too."""
    from mmedge.bench_plot import figure

    results, _, _, plot = bench_json
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    axes = {axis.get_title(): axis for axis in figure(results).axes if axis.get_visible()}
    titles = " | ".join(axes)
    for words in ("latency", "throughput", "peak resident memory", "size", "zero-shot top-1 agreement with FP32",
                  "greedy captions identical to FP32"):
        assert words in titles, (words, titles)
    top1 = next(a for t, a in axes.items() if "top-1" in t)
    greedy = next(a for t, a in axes.items() if "greedy" in t)
    assert [t.get_text() for t in top1.get_xticklabels()] == ["clip-int8\nint8"]  # FP32 is the line, not a bar
    assert [t.get_text() for t in greedy.get_xticklabels()] == ["blip2-int4\nint8 + int4 decoder"]
    for axis in (top1, greedy):
        assert [line.get_label() for line in axis.lines] == ["FP32 (reference)"] and axis.lines[0].get_ydata()[0] == 1.0


def test_bench_plot_without_matplotlib_fails_before_measuring(demo_run, monkeypatch, capsys):
    import mmedge.bench as bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(bench, "run_children", lambda *a: pytest.fail("measured before checking for matplotlib"))
    assert main(["bench", str(artifact(demo_run, "clip-int8")), "--plot", "x.png"]) == 2
    assert 'pip install "mmedge[plot]"' in capsys.readouterr().err


def test_bench_runs_from_the_folder_holding_a_checkout(demo_run, tmp_path, monkeypatch, capsys):
    """A folder with an `mmedge/` folder in it (a clone's parent, or a clone) does not shadow the installed mmedge in
    the measuring process."""
    (tmp_path / "mmedge").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", str(artifact(demo_run, "clip-int8")), "--runs", "1", "--batch", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["precision"] == "int8"


def test_bench_names_the_real_cause_when_its_process_cannot_measure(demo_run, tmp_path, monkeypatch, capsys):
    """A measuring process that imports another mmedge (here a shadowing package on PYTHONPATH) fails with what went
    wrong and where its mmedge came from; the artifact is not blamed."""
    (tmp_path / "shadow" / "mmedge").mkdir(parents=True)
    (tmp_path / "shadow" / "mmedge" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    assert main(["bench", str(artifact(demo_run, "clip-int8")), "--runs", "1", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "failed before it could measure" in err and "has no attribute 'load'" in err
    assert str(tmp_path / "shadow" / "mmedge") in err and "mmedge validate" not in err


def test_bench_refuses_labels_it_would_not_use(demo_run, capsys):
    assert main(["bench", str(artifact(demo_run, "clip-int8")), "--labels", "cat", "dog"]) == 2
    assert "--labels would change nothing" in capsys.readouterr().err


def test_bench_refuses_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 3  # exit 3, as run, validate, tune and triton say a missing artifact
    assert "not an artifact folder" in capsys.readouterr().err


def test_bench_checks_its_inputs_before_measuring(demo_run, tmp_path, monkeypatch, capsys):
    """A plot format it cannot write and an image path that names no file fail at once (the plot's used to fail with
    an internal error after every measurement); an image that does not decode is named as the input at fault, not
    the artifact ("run `mmedge validate` on it")."""
    import mmedge.bench as bench

    clip = str(artifact(demo_run, "clip-int8"))
    measure = bench.run_children
    monkeypatch.setattr(bench, "run_children", lambda *a: pytest.fail("measured before checking its inputs"))
    assert main(["bench", clip, "--plot", str(tmp_path / "plot.txt")]) == 2
    assert "--plot" in capsys.readouterr().err and not (tmp_path / "plot.txt").exists()
    assert main(["bench", clip, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png' does not exist" in capsys.readouterr().err
    monkeypatch.setattr(bench, "run_children", measure)
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["bench", clip, "--image", str(tmp_path / "notes.png"), "--runs", "1", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "refused its input" in err and "notes.png" in err and "mmedge validate" not in err


def test_bench_exits_with_the_error_its_process_met(demo_run, monkeypatch, capsys):
    """A backend that is not installed exits 4 as `mmedge run` does, with the measuring process's own message naming
    the artifact (it used to exit 2 with "fix: run `mmedge validate` on it first", which fails the same way)."""
    import contextlib
    import io
    from types import SimpleNamespace

    import mmedge.bench as bench
    from mmedge.errors import BackendUnavailableError

    def not_installed(*args, **kwargs):
        raise BackendUnavailableError("backend 'tensorrt' needs the Python package 'tensorrt', which is not installed",
                                      "'tensorrt' importable", 'pip install "mmedge[tensorrt]"')

    def child_here(argv, **kwargs):  # the measuring process, run in this one
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = bench._child(argv[3:])
        return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())

    monkeypatch.setattr(bench, "measure", not_installed)
    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=child_here))
    clip = str(artifact(demo_run, "clip-int8"))
    assert main(["bench", clip, "--backend", "tensorrt", "--runs", "1", "--batch", "1"]) == 4
    err = capsys.readouterr().err
    assert f"benchmarking '{clip}' failed: backend 'tensorrt' needs the Python package 'tensorrt'" in err
    assert 'fix: pip install "mmedge[tensorrt]"' in err and "mmedge validate" not in err


def test_bench_of_a_corrupt_artifact_says_the_artifact_is_corrupt(demo_run, tmp_path, capsys):
    """A graph whose sha256 differs from the manifest's fails as `mmedge run` says it (IntegrityError), not as an
    input the user gave ("refused its input")."""
    from mmedge.errors import IntegrityError

    corrupt = tmp_path / "clip-fp32"
    shutil.copytree(artifact(demo_run, "clip-fp32"), corrupt)
    graph = corrupt / next(iter(Artifact.open(corrupt).components.values()))["file"]
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    assert main(["bench", str(corrupt), "--runs", "1", "--batch", "1"]) == IntegrityError.exit_code
    err = capsys.readouterr().err
    assert f"benchmarking '{corrupt}' failed: artifact file" in err and "sha256" in err
    assert "refused its input" not in err and "mmedge validate" not in err


def test_bench_refuses_a_plot_path_it_cannot_write_before_measuring(demo_run, tmp_path, monkeypatch, capsys):
    """A --plot path that is a folder, or under a file, or in a folder this user cannot write, fails at once, exit 2
    (a folder used to fail with "Is a directory", exit 1, after every measurement). A missing folder is made."""
    import os

    import mmedge.bench as bench

    clip = str(artifact(demo_run, "clip-int8"))
    monkeypatch.setattr(bench, "run_children", lambda *a: pytest.fail("measured before checking --plot"))
    (tmp_path / "d.png").mkdir()
    (tmp_path / "notes.txt").write_text("")
    for plot, what in ((tmp_path / "d.png", "is a folder"), (tmp_path / "notes.txt" / "p.png", "is not a folder")):
        assert main(["bench", clip, "--plot", str(plot)]) == 2
        assert f"--plot '{plot}' " in (err := capsys.readouterr().err) and what in err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a folder this user cannot write (tests run as root)
    assert main(["bench", clip, "--plot", str(tmp_path / "p.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "notes.txt"]


def test_bench_plot_makes_its_missing_folder(bench_json, tmp_path):
    """`--plot results/bench.png` made results/ before the plot path was checked up front; it still does."""
    from mmedge.bench_plot import check_plot_path, plot

    out = tmp_path / "results" / "run-1" / "bench.png"
    check_plot_path(str(out))
    assert plot(bench_json[0], str(out)) == out and out.read_bytes().startswith(b"\x89PNG")


def test_bench_plot_is_written_whole_or_not_at_all(bench_json, tmp_path, monkeypatch):
    """A plot whose writing fails (a full disk) leaves the earlier plot as it was, and nothing half-written."""
    import matplotlib.figure

    from mmedge.bench_plot import plot
    from mmedge.errors import MmedgeError

    def disk_full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n half a plot")
        raise OSError(28, "No space left on device")

    out = tmp_path / "bench.png"
    out.write_bytes(b"the earlier plot")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full)
    with pytest.raises(MmedgeError, match="No space left on device"):
        plot(bench_json[0], str(out))
    assert out.read_bytes() == b"the earlier plot" and [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_bench_names_an_artifact_given_as_dot_by_its_folder(bench_json, demo_run, monkeypatch):
    """`mmedge bench .` in an artifact's folder names it by the folder's name in the table and the plot (the table's
    artifact column used to be empty)."""
    from mmedge.bench import format_table
    from mmedge.bench_plot import figure

    monkeypatch.chdir(artifact(demo_run, "clip-int8"))
    here = [{**bench_json[0][1], "artifact": "."}]
    assert format_table(here).splitlines()[-1].startswith("clip-int8 ")
    assert {t.get_text() for axis in figure(here).axes if axis.get_visible()
            for t in axis.get_xticklabels()} == {"clip-int8\nint8"}


# --- examples ---------------------------------------------------------------------------------------
def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_examples_are_short():
    for name in ("zero_shot.py", "caption.py", "export_for_device.py", "few_shot.py"):
        assert len((ROOT / "examples" / name).read_text().splitlines()) <= 75, name


def test_example_zero_shot_on_the_shipped_model(tmp_path):
    out = run_example("zero_shot.py", "--out", str(tmp_path / "zs"))
    truth = demo.truth()["images"]
    lines = [line for line in out.splitlines() if line.startswith("scene-")]
    assert len(lines) == len(truth)
    top1 = {line.split(":")[0]: line.split(": ")[1].split(",")[0].rsplit(" ", 1)[0] for line in lines}
    assert sum(top1[name] in entry["present_labels"] for name, entry in truth.items()) >= len(truth) - 1


def test_example_zero_shot_on_a_checkpoint_path(tiny_clip_dir, tmp_path):
    out = run_example("zero_shot.py", "--model", str(tiny_clip_dir), "--labels", "cat", "dog", "--template",
                      "a photo of a {}.", "--precision", "fp32", "--out", str(tmp_path / "zs"),
                      *map(str, demo.images(1)))
    assert out.splitlines()[-1].startswith("scene-00.png: ") and "cat" in out and "dog" in out


def test_example_caption_streams(demo_run):
    out = run_example("caption.py", "--out", str(artifact(demo_run, "blip2-int4")))
    truth = demo.truth()["images"]
    lines = [line for line in out.splitlines() if line.startswith("scene-")]
    assert len(lines) == len(truth)
    assert sum(line.split(": ", 1)[1] == truth[line.split(":")[0]]["caption"] for line in lines) >= len(lines) // 2
    out = run_example("caption.py", "--out", str(artifact(demo_run, "blip2-int4")), "--question",
                      "how many shapes are there?", str(demo.images(1)[0]))
    assert out.splitlines()[-1] == f"scene-00.png: {truth['scene-00.png']['questions'][-1]['answer']}"


def test_example_few_shot_streams_interleaved_prompts(demo_run):
    """examples/few_shot.py on the demo's INT4 artifact: a few-shot answer per bundled scene in the examples' style,
    and comparisons across two scenes."""
    truth = demo.truth()["images"]
    out = run_example("few_shot.py", "--out", str(artifact(demo_run, "idefics-int4")), "--style", "shapes")
    lines = [line for line in out.splitlines() if line.startswith("scene-")]
    assert len(lines) == len(truth)
    for line in lines:  # answered in the examples' style: shape names only, listed as the captions list them
        words = line.split(": ", 1)[1].replace(",", "").split()
        assert words and set(words) <= {*scenes.SHAPES, "and"}, line
    out = run_example("few_shot.py", "--out", str(artifact(demo_run, "idefics-int4")), "--compare")
    answers = [line.split(": ", 2)[-1] for line in out.splitlines() if line.startswith("scene-")]
    assert len(answers) == len(truth) and set(answers) <= {"image 1", "image 2", "yes", "no"}
    assert "which image has more shapes?" in out and "the same color as the" in out  # both kinds the model learnt
    assert "exported" not in out  # the demo's artifact was reused: same model, same precisions


def test_run_says_when_the_answer_is_empty(demo_run, capsys):
    """The demo IDEFICS ends its answer at once on a prompt unlike the ones it learnt (as transformers' generate does,
    by a margin of 3-6 logits): `mmedge run` prints the empty answer and says on stderr why the line is blank."""
    scene = str(demo.images(1)[0])
    for streamed in ([], ["--stream"]):
        assert main(["run", str(artifact(demo_run, "idefics-fp32")), "--interleaved", scene, "Describe it:",
                     *streamed]) == 0
        out, err = capsys.readouterr()
        assert out == "\n" and "note: the answer is empty: the model ended it before any text" in err, streamed
    merged = subprocess.run([sys.executable, "-m", "mmedge.cli", "run", str(artifact(demo_run, "idefics-fp32")),
                             "--interleaved", scene, "Describe it:"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=120)
    assert merged.returncode == 0 and merged.stdout.startswith("\nmmedge: note: the answer is empty")  # line, then note
    assert main(["run", str(artifact(demo_run, "idefics-fp32")), "--interleaved", scene, "Describe it:", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["text"] == "" and not err  # machine-readable output says it itself
    assert main(["run", str(artifact(demo_run, "blip2-fp32")), scene, "--stream"]) == 0
    out, err = capsys.readouterr()  # a caption streamed: one line, no note
    assert out.startswith(f"{scene}: ") and out.count("\n") == 1 and out[len(scene) + 2:].strip() and not err


def test_example_caption_exports_a_checkpoint_path(tiny_blip2_dir, tmp_path):
    out = run_example("caption.py", "--model", str(tiny_blip2_dir), "--out", str(tmp_path / "cap"),
                      "--llm-precision", "fp32", "--max-new-tokens", "4", str(demo.images(1)[0]))
    assert "exported" in out and out.splitlines()[-1].startswith("scene-00.png: ")


def test_example_export_for_device(tmp_path):
    out = run_example("export_for_device.py", "--device-dir", str(tmp_path / "orin"), *map(str, demo.images(2)))
    assert (tmp_path / "orin" / "artifact" / "manifest.json").is_file()
    assert "copied" in out and "ok" in out  # `mmedge validate` on the device side
    run_line = out.splitlines()[-2]  # `mmedge run` on the device: one line per image
    assert "scene-00.png" in run_line and demo.truth()["images"]["scene-00.png"]["present_labels"][0] in run_line


def run_refused(name: str, *args: str) -> str:
    """An example that must refuse: exit 2, one `error: ...` line and no traceback; returns that line."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, (name, args, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, args, result.stderr)
    return result.stderr


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_examples_refuse_a_family_they_are_not_for_before_writing(demo_run, tmp_path):
    """zero_shot.py with a BLIP-2 or IDEFICS checkpoint, caption.py with a CLIP or IDEFICS one: refused up front,
    naming the example to use, and the --out folder (here an earlier CLIP artifact) is left as it was. caption.py
    used to blame an --llm-precision the user never passed; zero_shot.py exported BLIP-2 over the CLIP artifact."""
    from mmedge.artifact import export_needed

    out = tmp_path / "zs"
    shutil.copytree(artifact(demo_run, "clip-int8"), out)
    before = files_of(out)
    clip_source = Artifact.open(out).manifest["source"]["model"]
    assert export_needed(out, clip_source, "int8", "int4") is None  # caption.py would reuse it: its manifest decides
    cases = [("zero_shot.py", "blip2", "BLIP-2", "examples/caption.py"),
             ("zero_shot.py", "idefics", "IDEFICS", "examples/few_shot.py"),
             ("caption.py", "clip", "CLIP", "examples/zero_shot.py"),
             ("caption.py", clip_source, "CLIP", "examples/zero_shot.py"),
             ("caption.py", "idefics", "IDEFICS", "examples/few_shot.py")]
    for name, model, label, instead in cases:
        model = str(demo.model_path(model)) if model in ("blip2", "clip", "idefics") else model
        error = run_refused(name, "--model", model, "--out", str(out), str(demo.images(1)[0]))
        assert f"{label} family" in error and instead in error and "--llm-precision" not in error, (name, error)
        assert files_of(out) == before, (name, model)
    run_refused("caption.py", "--model", str(demo.model_path("clip")), "--out", str(tmp_path / "new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zs"]
    # another CLIP than the demo's (a copy of it) is not given the demo's shape labels: refused before an export
    other = shutil.copytree(demo.model_path("clip"), tmp_path / "other" / "my-clip")
    error = run_refused("zero_shot.py", "--model", str(other), "--out", str(out), str(demo.images(1)[0]))
    assert "no --labels for" in error and files_of(out) == before, error


def test_example_caption_keeps_captioning_blip2_with_flan_t5(tmp_path):
    out = run_example("caption.py", "--model", str(demo.model_path("blip2_t5")), "--out", str(tmp_path / "cap"),
                      "--llm-precision", "fp32", "--max-new-tokens", "8", str(demo.images(1)[0]))
    assert out.splitlines()[-1] == f"scene-00.png: {demo.truth()['images']['scene-00.png']['caption']}"


def test_example_export_for_device_bakes_the_given_labels_and_replaces_an_earlier_copy(tmp_path):
    """Another CLIP than the demo's (here a copy of it) is not given the demo's 24 shape labels: it needs --labels
    (inline, or @FILE with one a line), which are baked in. A second export into the same --device-dir replaces the
    first copy whole: no file of the earlier BLIP-2 copy is left beside the CLIP one."""
    clip, orin, image = tmp_path / "my-clip", tmp_path / "orin", str(demo.images(1)[0])
    shutil.copytree(demo.model_path("clip"), clip)
    run_example("export_for_device.py", "--model", str(demo.model_path("blip2")), "--device-dir", str(orin), image)
    first = files_of(orin / "artifact")
    assert {"decoder.onnx", "prefix.onnx", "embed_tokens.npz"} <= set(first)
    error = run_refused("export_for_device.py", "--model", str(clip), "--device-dir", str(orin), image)
    assert "--labels" in error and files_of(orin / "artifact") == first
    labels = ["red circle", "blue square", "green cross"]
    (tmp_path / "labels.txt").write_text("\ufeff" + "\n".join(labels) + "\n")  # a BOM, as Notepad writes
    out = run_example("export_for_device.py", "--model", str(clip), "--labels", f"@{tmp_path / 'labels.txt'}",
                      "--device-dir", str(orin), image)
    assert Artifact.open(orin / "artifact").manifest["zero_shot"]["labels"] == labels
    run_line = out.splitlines()[-1]
    assert run_line.startswith(image) and "red circle" in run_line and "purple circle" not in run_line
    after = set(files_of(orin / "artifact"))
    assert "zero_shot.onnx" in after and not {"decoder.onnx", "prefix.onnx", "embed_tokens.npz"} & after, after
    assert [p.name for p in orin.iterdir()] == ["artifact"]  # no staging or old copy left beside it


def test_example_export_for_device_checks_the_device_dir_before_exporting(tmp_path):
    """A --device-dir that is a file (or under one), or whose artifact/ holds something else than an mmedge artifact,
    is refused before the export (it used to export, then fail with a NotADirectoryError traceback)."""
    notes, mine = tmp_path / "notes.txt", tmp_path / "orin" / "artifact" / "mine.txt"
    notes.write_text("notes")
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    for device_dir in (notes, notes / "sub"):
        assert "--device-dir" in run_refused("export_for_device.py", "--device-dir", str(device_dir))
    assert "not an mmedge artifact" in run_refused("export_for_device.py", "--device-dir", str(tmp_path / "orin"))
    assert notes.read_text() == "notes" and files_of(tmp_path / "orin") == {"artifact/mine.txt": b"mine"}


def test_example_typed_errors_are_one_line(tmp_path):
    """An mmedge error in an example (a missing image, a checkpoint that is not there, an unusable template) is one
    `error: ...` line on stderr and the error's exit code, as in the CLI: no traceback, and no export before it."""
    cases = [("zero_shot.py", "--out", str(tmp_path / "zs"), str(tmp_path / "missing.jpg")),
             ("export_for_device.py", "--model", str(tmp_path / "no-checkpoint")),
             ("export_for_device.py", "--device-dir", str(tmp_path / "orin"), str(tmp_path / "missing.jpg")),
             ("caption.py", "--out", str(tmp_path / "cap"), str(tmp_path / "missing.jpg")),
             ("zero_shot.py", "--out", str(tmp_path / "zs"), "--template", "no placeholder", str(demo.images(1)[0]))]
    for name, *args in cases:
        result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (name, args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, args, result.stderr)
    assert not any((tmp_path / name).exists() for name in ("cap", "orin", "zs"))  # each refused before any export


def test_example_reuses_an_artifact_only_when_exported_the_same_way(tmp_path):
    """zero_shot.py reuses its artifact only when its manifest.json says it came from the same model at the same
    precision; a changed --precision exports again (and says why) instead of silently running the old one."""
    zs, image = tmp_path / "zs", str(demo.images(1)[0])
    assert "no artifact" in run_example("zero_shot.py", "--out", str(zs), image)
    assert "using the artifact" in run_example("zero_shot.py", "--out", str(zs), image)
    out = run_example("zero_shot.py", "--out", str(zs), "--precision", "fp32", image)
    assert "exporting" in out and "vision int8" in out and "using the artifact" not in out
    components = json.loads((zs / "manifest.json").read_text())["components"].values()
    assert {component["precision"] for component in components} == {"fp32"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "few_shot.py"), "--compare", "--style", "shapes"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "not allowed" in result.stderr


def test_training_script_runs_end_to_end(tmp_path):
    """`examples/train_demo_models.py` with a few steps: both checkpoints load through `mmedge export`'s path, the
    cards state the measured scores, and the bundled-scene folder is written beside the models."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo_models.py"), "--out",
                             str(tmp_path / "models"),
                             "--train-scenes", "64", "--clip-scenes", "64", "--clip-steps", "2", "--blip2-steps", "2",
                             "--batch", "8", "--test-scenes", "8", "--demo-images", "2", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("clip", "blip2"):
        facts = json.loads((tmp_path / "models" / name / "training.json").read_text())
        assert facts["training"]["steps"] == 2 and facts["test_split"]["test_scenes"] == 8
        assert "both_models_train_seconds" in facts["training"]
        assert (tmp_path / "models" / name / "README.md").is_file()
    assert len(list((tmp_path / "images").glob("scene-*.png"))) == 2
    from mmedge.export import ExportOptions, export_model

    export_model(str(tmp_path / "models" / "clip"), tmp_path / "clip-artifact", ExportOptions(progress=False))
    assert (tmp_path / "clip-artifact" / "manifest.json").is_file()
    # the IDEFICS step of its own, after CLIP (its frozen vision tower is the CLIP's)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo_models.py"), "--out",
                             str(tmp_path / "models"), "--idefics", "--idefics-steps", "2", "--idefics-scenes", "64",
                             "--batch", "8", "--idefics-test-prompts", "2", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    facts = json.loads((tmp_path / "models" / "idefics" / "training.json").read_text())
    assert facts["training"]["steps"] == 2 and set(facts["test_split"]["exact_by_task"]) == set(flamingo_demo.TASKS)
    export_model(str(tmp_path / "models" / "idefics"), tmp_path / "idefics-artifact", ExportOptions(progress=False))
    assert list(Artifact.open(tmp_path / "idefics-artifact").components) == ["image_context", "decoder"]


def test_training_renders_the_same_pixels_in_parallel():
    import train_demo_models as training

    one_process, parallel = training.render("train", 120), training.render("train", 120, workers=2, chunk=50)
    assert one_process[0] == parallel[0] and np.array_equal(one_process[1], parallel[1])


def test_training_loss_runs_each_image_prefix_once():
    """The BLIP-2 training loss runs the query prefix once per image and continues every sequence from its KV cache:
    it must equal, in value and gradients, the loss over the full sequences [prefix rows, embed(ids)]."""
    import torch
    import train_demo_models as training
    import transformers

    tokenizer = training.make_opt_tokenizer()
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(training.blip2_config(tokenizer, qformer_dropout=0.0))
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)  # as training starts (HF's zero queries give the Q-Former no gradient)
    chosen, images = training.render("train", 3)
    items = []
    for scene in chosen:  # two sequences per image: its caption and its first question
        question, answer = scene.questions()[0]
        items += [(None, scene.caption), (scenes.VQA_TEMPLATE.format(question), answer)]
    ids, mask, labels = training.lm_batch(tokenizer, items, tokenizer.pad_token_id)  # [6, T]: two sequences per image
    pixels = training.to_pixels(images)

    results = []
    for loss_fn in (training.full_sequences_loss, training.blip2_loss):
        model.zero_grad()
        loss = loss_fn(model, pixels, 2, ids, mask, labels)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (reference, reference_grads), (shared, shared_grads) = results
    assert abs(reference - shared) < 1e-5 * reference
    assert reference_grads.keys() == shared_grads.keys() and len(reference_grads) > 100
    floor = 1e-5 * max(float(g.abs().max()) for g in reference_grads.values())  # key biases get only float noise
    for name, want in reference_grads.items():
        assert torch.allclose(shared_grads[name], want, rtol=1e-3, atol=floor), name


def test_demo_fidelity_benchmark(demo_run, tmp_path):
    """`benchmarks/demo_fidelity.py` measures every demo artifact on test scenes and writes its figures."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_fidelity.py"), "--scenes", "8",
                             "--cache", str(demo_run[0]), "--json", str(tmp_path / "fidelity.json")],
                            capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "fidelity.json").read_text())
    assert figures["scenes"] == 8 and set(figures["clip"]) == {"clip-fp32", "clip-int8"}
    assert 0.0 <= figures["blip2_int4_identical_captions"] <= 1.0 and "caption_exact" in figures["blip2"]["blip2-int4"]
    assert "| blip2-int4 |" in result.stdout and "| idefics-int4 |" in result.stdout
    assert 0.0 <= figures["idefics_int4_identical_answers"] <= 1.0 and set(figures["idefics"]["idefics-fp32"]) == set(
        flamingo_demo.TASKS)


def test_train_step_benchmark_compares_both_losses():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| full sequences |" in result.stdout and "| prefix once per image |" in result.stdout
    assert "faster per step" in result.stdout
