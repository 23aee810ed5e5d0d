"""Where an export says its checkpoint came from, and what it says about its fidelity: a mistyped folder that is no
hub id is a typed error; one checkpoint however its path is spelt has one identity (manifest and ``export_needed``);
CLIP's text graph is measured on prompts it was not calibrated on; and a fidelity setting that measures nothing in this
export is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from mmedge.artifact import export_needed
from mmedge.errors import InputError, ModelLoadError
from mmedge.export import ExportOptions, export_model
from tests.support.battery import api_error, cli_error


# --- a mistyped folder that cannot be a hub id either --------------------------------------------------------------
@pytest.mark.parametrize("model", ["mö dels/nope", "clip ", "clip/ ", "my model"])
def test_a_missing_folder_that_is_no_valid_hub_id_is_a_typed_error(model, tiny_clip_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """It ended in "internal error: HFValidationError ... this is a bug" (exit 1), from the hub client."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip").symlink_to(tiny_clip_dir)  # 'clip ' with a trailing space: the folder beside it exists
    (tmp_path / "mö dels").mkdir()
    line = cli_error(capsys, ["export", model, "out", "--quiet"], ModelLoadError,
                     f"checkpoint folder '{model}' does not exist, and '{model}' is not a valid hub id either")
    assert "check the path" in line and not (tmp_path / "out").exists()
    hint = {"clip ": "('clip' exists: a stray space?)", "clip/ ": "('clip/' exists: a stray space?)",
            "mö dels/nope": "though 'mö dels' is: a mistyped path?"}.get(model, "")
    assert hint in line


# --- one checkpoint, one identity -------------------------------------------------------------------------------------
def test_the_source_is_the_same_however_the_folder_is_spelt(tiny_clip_dir, monkeypatch):
    """config_sha256 differed for 'clip', 'clip/', './clip' and the absolute path (transformers' _name_or_path), and
    source.model was the relative path as typed."""
    from mmedge.export.loading import load_checkpoint

    monkeypatch.chdir(tiny_clip_dir.parent)
    name = tiny_clip_dir.name
    sources = [load_checkpoint(spelt).source for spelt in (name, f"{name}/", f"./{name}", str(tiny_clip_dir))]
    assert {s["config_sha256"] for s in sources} == {sources[0]["config_sha256"]}
    assert {s["model"] for s in sources} == {str(tiny_clip_dir.resolve())}


def test_export_needed_compares_the_folder_not_its_spelling(clip_artifacts, tiny_clip_dir, tmp_path, monkeypatch):
    """The same checkpoint spelt differently was exported again; the same relative name from another directory reused
    the artifact of another checkpoint."""
    art = shutil.copytree(clip_artifacts("fp32"), tmp_path / "art")
    assert json.loads((art / "manifest.json").read_text())["source"]["model"] == str(tiny_clip_dir.resolve())
    monkeypatch.chdir(tiny_clip_dir.parent)
    for spelt in (tiny_clip_dir.name, f"./{tiny_clip_dir.name}/", str(tiny_clip_dir)):
        assert export_needed(art, spelt, "fp32") is None, spelt
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_clip_dir, elsewhere / tiny_clip_dir.name)  # another folder of the same name
    monkeypatch.chdir(elsewhere)
    assert export_needed(art, tiny_clip_dir.name, "fp32") is not None
    # an artifact written before paths were resolved: its relative path names no one folder, so it is exported again
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["source"]["model"] = tiny_clip_dir.name
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert export_needed(art, tiny_clip_dir.name, "fp32") is not None
    assert export_needed(art, "openai/clip-vit-base-patch32", "fp32") is not None
    manifest["source"]["model"] = "openai/clip-vit-base-patch32"  # a hub id: as typed, on both sides
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert export_needed(art, "openai/clip-vit-base-patch32", "fp32") is None


# --- CLIP's static INT8 text graph: fidelity on prompts it was not calibrated on -----------------------------------
@pytest.mark.parametrize("templates", [["a {}"], None])
def test_clip_text_fidelity_is_measured_on_prompts_outside_its_calibration(templates, tiny_clip_dir, tmp_path,
                                                                           monkeypatch):
    """With --templates "a {}" the 10 calibration prompts were exactly the fidelity prompts (and the default 80
    held them), while the manifest said held_out: true."""
    from mmedge.export.families import clip

    calibrated, measured = [], []
    calibration_prompts, label_bank = clip._calibration_prompts, clip.build_label_bank

    def calibration_spy(*args):
        calibrated.extend(calibration_prompts(*args))
        return calibrated

    def bank_spy(embed, labels, templates):
        measured.extend(t.replace("{}", label) for label in labels for t in templates)
        return label_bank(embed, labels, templates)

    monkeypatch.setattr(clip, "_calibration_prompts", calibration_spy)
    monkeypatch.setattr(clip, "build_label_bank", bank_spy)
    out = export_model(str(tiny_clip_dir), tmp_path / "out", precision="int8", quantization="static",
                       templates=templates, progress=False)
    assert calibrated and measured and not set(calibrated) & set(measured)
    fidelity = json.loads((out / "manifest.json").read_text())["components"]["text"]["parity"]["fidelity"]
    assert fidelity["held_out"] is True and fidelity["prompts"] == len(set(measured))


# --- fidelity settings that would measure nothing ------------------------------------------------------------------
def _check(model_family: str, **options) -> None:
    from mmedge.export.families import FAMILIES
    from mmedge.export.option_checks import check_export_options

    check_export_options(ExportOptions(**options), FAMILIES[model_family])


@pytest.mark.parametrize("family,options,refused", [
    ("clip", {"min_quantized_cosine": 0.5}, "min_quantized_cosine"),  # FP32: nothing is measured
    ("clip", {"precision": "fp16", "min_quantized_cosine": 0.5}, "min_quantized_cosine"),  # FP16 CLIP: parity only
    ("blip2", {"llm_precision": "int4", "min_quantized_cosine": 0.5}, "min_quantized_cosine"),  # FP32 encoders
    ("blip2", {"extra": {"min_logits_cosine": 0.5}}, "extra setting min_logits_cosine"),
    ("blip2", {"extra": {"fidelity_max_new_tokens": 3}}, "extra setting fidelity_max_new_tokens"),
    ("blip2", {"precision": "int8", "llm_precision": "fp32", "extra": {"fidelity_images": 2}},
     "extra setting fidelity_images"),
    ("blip2_t5", {"precision": "fp16", "extra": {"min_logits_cosine": 0.5}}, "extra setting min_logits_cosine"),
    ("idefics", {"extra": {"fidelity_prompts": [["{image}"]]}}, "extra setting fidelity_prompts"),
])
def test_a_fidelity_setting_that_would_measure_nothing_is_refused(family, options, refused):
    api_error(lambda: _check(family, **options), InputError, f"{refused} would change nothing")


@pytest.mark.parametrize("family,options", [
    ("clip", {"precision": "int8", "min_quantized_cosine": 0.5}),
    ("blip2", {"precision": "fp16", "llm_precision": "int4", "min_quantized_cosine": 0.5}),  # FP16 encoders gated
    ("blip2", {"llm_precision": "int4", "extra": {"min_logits_cosine": 0.5, "fidelity_max_new_tokens": 3}}),
    ("blip2", {"precision": "int8", "llm_precision": "fp16", "extra": {"min_logits_cosine": 0.5}}),  # FP16 LLM gated
    ("blip2", {"openvino_weights": "int4", "extra": {"min_logits_cosine": 0.5}}),  # gates the NNCF IR
    ("idefics", {"llm_precision": "int8", "extra": {"fidelity_prompts": [["{image}"]]}}),
])
def test_a_fidelity_setting_that_is_measured_is_taken(family, options):
    _check(family, **options)


def test_min_quantized_cosine_left_out_still_means_098():
    assert ExportOptions().min_quantized_cosine is None  # "not given", so that an idle one can be refused
    assert ExportOptions(precision="int8").settled("zero-shot").min_quantized_cosine == 0.98


def test_an_fp32_export_with_a_fidelity_floor_is_refused_before_loading(tiny_clip_dir, tmp_path):
    api_error(lambda: export_model(str(tiny_clip_dir), tmp_path / "out", min_quantized_cosine=0.5, progress=False),
              InputError, "min_quantized_cosine would change nothing", "drop min_quantized_cosine")
    assert not (tmp_path / "out").exists()


# --- labels read from a file are refused under the file's flag ------------------------------------------------------
def test_labels_from_a_file_are_refused_as_labels_file(tmp_path):
    """`mmedge export BLIP2 OUT --labels-file f` was refused as "--labels would change nothing" (a flag the user never
    typed). The CLI passes labels_file with the labels it read."""
    (tmp_path / "labels.txt").write_text("cat\n")
    api_error(lambda: _check("blip2", labels=["cat"], labels_file=str(tmp_path / "labels.txt")), InputError,
              "--labels-file would change nothing", "drop --labels-file")
    api_error(lambda: _check("blip2", labels=["cat"]), InputError, "--labels would change nothing")
    _check("clip", labels=["cat"], labels_file=str(tmp_path / "labels.txt"))


def test_labels_file_without_its_labels_is_refused(tmp_path):
    """labels_file names where the labels were read from: the export does not read it, so alone it would do nothing."""
    from mmedge.errors import ExportError

    api_error(lambda: export_model("anything", tmp_path / "out", labels_file="labels.txt", progress=False),
              ExportError, "labels_file 'labels.txt' was given without labels")


def test_the_cli_refuses_a_labels_file_under_its_own_flag(tiny_blip2_dir, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    cli_error(capsys, ["export", tiny_blip2_dir, tmp_path / "out", "--labels-file", labels], InputError,
              "--labels-file would change nothing")
    assert not (tmp_path / "out").exists()
