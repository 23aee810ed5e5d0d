"""`mmedge export` checks what is cheap before loading anything, fails fast and in one line when the hub cannot be
reached, lists the bundled --random-weights names, and keeps quiet under --quiet."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from mmedge.artifact import atomic_folder
from mmedge.cli import main
from mmedge.errors import (
    ArtifactError,
    CalibrationError,
    ExportError,
    InputError,
    ModelLoadError,
    ParityError,
    QuantizationError,
)
from mmedge.export import export_model
from tests.support.battery import api_error, cli_error

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to load a checkpoint fails the test."""
    import mmedge.export.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the options were checked")

    monkeypatch.setattr(loading, "load_checkpoint", refuse)


def test_an_existing_output_folder_is_refused_before_loading(tiny_clip_dir, tmp_path, nothing_loads):
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        export_model(str(tiny_clip_dir), tmp_path / "out", progress=False)


def test_an_unknown_random_weights_name_is_refused_before_loading(tmp_path, nothing_loads):
    with pytest.raises(ModelLoadError, match="neither a bundled config.*mmedge export --help"):
        export_model("openai/clip-vit-base-patch99", tmp_path / "out", random_weights=True, progress=False)


def test_an_idle_option_is_refused_before_loading(tiny_blip2_dir, tmp_path, nothing_loads, capsys):
    assert main(["export", str(tiny_blip2_dir), str(tmp_path / "out"), "--quantization", "static"]) == 2
    assert "--quantization static" in capsys.readouterr().err


def test_export_help_lists_the_bundled_configs_and_the_readme_names_them(capsys):
    from mmedge.export.loading import known_random_configs

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    for name in known_random_configs():
        assert name in text.replace("- ", "-"), name  # argparse may wrap a name at its hyphen
        assert name in readme, name


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the with block ends


def test_a_hub_id_without_a_reachable_hub_fails_at_once_in_one_line(tmp_path):
    """The hub's retries (half a minute, a line each) never start: one mmedge line within seconds."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "export", "someone/some-clip", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("mmedge: error: "), result.stderr
    assert "cannot be reached" in lines[0] and "someone/some-clip" in lines[0]
    assert seconds < 15, seconds  # interpreter and imports included; the retries alone took 31 s


def test_a_cached_model_loads_without_the_hub(tiny_clip_dir, tmp_path, monkeypatch):
    """Unreachable hub, model in the local cache: loaded from there, no request made."""
    import mmedge.export.hub as hub

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    hub.unreachable.cache_clear()
    monkeypatch.setattr(hub, "_cached", lambda model: model == "someone/cached")
    assert hub.hub_options("someone/cached") == {"local_files_only": True}
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        hub.hub_options("someone/elsewhere")
    hub.unreachable.cache_clear()


def test_quiet_export_prints_no_library_progress(tiny_blip2_dir, tmp_path, capfd):
    """transformers' "Loading weights" bar and its notices stay off with --quiet; the summary stays on stdout."""
    assert main(["export", str(tiny_blip2_dir), str(tmp_path / "out"), "--quiet", "--with-pytorch"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.startswith("wrote "), err


# --- --overwrite replaces only an artifact, and never the checkpoint being read --------------------------------
def test_overwrite_refuses_a_folder_holding_the_checkpoint_before_loading(tiny_clip_dir, tmp_path, nothing_loads,
                                                                          capsys):
    parent = tmp_path / "parent"
    checkpoint = parent / "models" / "clip"
    shutil.copytree(tiny_clip_dir, checkpoint)
    (parent / "notes.txt").write_text("precious")
    api_error(lambda: export_model(str(checkpoint), parent, overwrite=True, progress=False), ArtifactError,
              "is or holds", "--overwrite would delete it")
    api_error(lambda: export_model(str(checkpoint), checkpoint, overwrite=True, progress=False), ArtifactError,
              "is or holds")
    # an artifact's pytorch/ weights (--with-pytorch) exported into the artifact itself
    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"format": "mmedge.artifact"}))
    shutil.copytree(tiny_clip_dir, artifact / "pytorch")
    api_error(lambda: export_model(str(artifact / "pytorch"), artifact, overwrite=True, progress=False),
              ArtifactError, "is or holds")
    cli_error(capsys, ["export", checkpoint, parent, "--overwrite", "--quiet"], ArtifactError, "is or holds")
    assert (parent / "notes.txt").read_text() == "precious" and (checkpoint / "model.safetensors").is_file()


def test_overwrite_refuses_a_file_a_foreign_folder_and_the_current_directory(tiny_clip_dir, tmp_path, nothing_loads,
                                                                              monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("data")
    api_error(lambda: export_model(str(tiny_clip_dir), afile, overwrite=True, progress=False), ArtifactError,
              "is a file, not a folder")
    assert afile.read_text() == "data"
    site = tmp_path / "site"  # a web app's manifest.json is not an artifact's
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "my app"}))
    cli_error(capsys, ["export", tiny_clip_dir, site, "--overwrite", "--quiet"], ArtifactError,
              "is not empty and is not an mmedge artifact")
    assert [p.name for p in site.iterdir()] == ["manifest.json"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        api_error(lambda: export_model(str(tiny_clip_dir), out, overwrite=True, progress=False), ArtifactError,
                  "is the current directory or one above it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "site", "work"] and not any(work.iterdir())


def test_overwrite_replaces_an_empty_folder(tiny_clip_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    export_model(str(tiny_clip_dir), out, overwrite=True, progress=False)
    assert (out / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- --allow-pickle ----------------------------------------------------------------------------------------------
def test_allow_pickle_is_refused_where_safetensors_are_loaded_anyway(tiny_clip_dir, tmp_path, nothing_loads, capsys):
    """from_pretrained loads model.safetensors before any pickle: the flag would change nothing."""
    api_error(lambda: export_model(str(tiny_clip_dir), tmp_path / "out", allow_pickle=True, progress=False),
              InputError, "--allow-pickle would change nothing", "model.safetensors", "drop --allow-pickle")
    cli_error(capsys, ["export", tiny_clip_dir, tmp_path / "out", "--allow-pickle", "--quiet"], InputError,
              "--allow-pickle would change nothing")
    assert not (tmp_path / "out").exists()


def test_allow_pickle_still_loads_safetensors_where_it_cannot_tell_first(tiny_clip_dir):
    """A hub id is not listed before loading: with --allow-pickle its safetensors are still what is loaded (the
    flag allows a pickle, it does not ask for one)."""
    import torch

    from mmedge.export.loading import _load_pretrained, load_checkpoint

    loaded = _load_pretrained(str(tiny_clip_dir), allow_pickle=True).model.state_dict()
    reference = load_checkpoint(str(tiny_clip_dir)).model.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


# --- option values checked before loading ------------------------------------------------------------------------
@pytest.mark.parametrize("block", [7, 0, -32, 8, 48, 512])
def test_an_unsupported_int4_block_size_is_refused_before_loading(block, tiny_blip2_dir, tmp_path, nothing_loads):
    api_error(lambda: export_model(str(tiny_blip2_dir), tmp_path / "out", llm_precision="int4", int4_block_size=block,
                                   progress=False), QuantizationError, f"block size {block} ", "from 16 to 256")


def test_int4_options_without_an_int4_llm_are_refused_before_loading(tiny_blip2_dir, tmp_path, nothing_loads, capsys):
    cli_error(capsys, ["export", tiny_blip2_dir, tmp_path / "out", "--int4-block-size", "7"], QuantizationError,
              "block size 7")
    for flags in (["--int4-block-size", "64"], ["--llm-precision", "int8", "--int4-head", "fp32"],
                  ["--precision", "int8", "--int4-accuracy-level", "0"]):
        cli_error(capsys, ["export", tiny_blip2_dir, tmp_path / "out", *flags], InputError, "would change nothing")


def test_image_folders_labels_and_templates_are_checked_before_loading(tiny_clip_dir, tmp_path, nothing_loads):
    (tmp_path / "notimg.png").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    static = {"precision": "int8", "quantization": "static", "progress": False}
    out = tmp_path / "out"
    for folder, said in (("notimg.png", "is a file, not a folder"), ("missing", "does not exist"),
                         ("empty", "holds no images")):
        api_error(lambda: export_model(str(tiny_clip_dir), out, calibration=str(tmp_path / folder), **static),
                  CalibrationError, f"calibration folder '{tmp_path / folder}' {said}")
        api_error(lambda: export_model(str(tiny_clip_dir), out, precision="int8", fidelity=str(tmp_path / folder),
                                       progress=False), InputError, f"fidelity folder '{tmp_path / folder}' {said}")
    api_error(lambda: export_model(str(tiny_clip_dir), out, labels=["cat", "cat"], progress=False), InputError,
              "duplicates ('cat')")
    api_error(lambda: export_model(str(tiny_clip_dir), out, labels=["cat", "dog"], templates=["no braces"],
                                   progress=False), InputError, "'no braces' is not usable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notimg.png"]


# --- a refused export leaves nothing new on disk ------------------------------------------------------------------
def test_an_export_refused_midway_leaves_no_new_parent_folders(tiny_clip_dir, tmp_path):
    """Refused at the fidelity gate, after the staging folder was made: the folders made for it go too."""
    with pytest.raises(ParityError, match="failed parity: cosine"):
        export_model(str(tiny_clip_dir), tmp_path / "new" / "deeper" / "out", precision="int8",
                     min_quantized_cosine=1.0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_removes_only_the_parents_it_made_and_only_when_empty(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "kept" / "a" / "b" / "art") as stage:
            (stage / "half.onnx").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


# --- a killed export leaves nothing the next one does not remove ---------------------------------------------------
def _dead_pid() -> int:
    for pid in range(2**22 + 12345, 2**22 + 12445):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no unused process id found")


def test_the_scratch_lies_beside_the_output_where_the_next_export_removes_it(tiny_clip_dir, tmp_path, monkeypatch):
    """The FP32 graphs to lower (and ONNX Runtime's copies of them) go to a ``.OUT.partial-PID-scratch-*`` folder
    beside OUT, never to the system's temporary folder: what a killed export (kill -9) left there, the next export to
    OUT removes with its abandoned staging folder."""
    import tempfile

    abandoned = tmp_path / f".out.partial-{_dead_pid()}-scratch-x1y2z3"
    abandoned.mkdir()
    (abandoned / "vision.onnx").write_bytes(b"x" * 1000)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    made, mkdtemp = [], tempfile.mkdtemp

    def recorded(*args, **kwargs):
        made.append(Path(mkdtemp(*args, **kwargs)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", recorded)
    export_model(str(tiny_clip_dir), tmp_path / "out", precision="int8", quantization="static", progress=False)
    scratch = [p for p in made if "-scratch-" in p.name]
    assert [p.parent for p in scratch] == [tmp_path], made
    assert scratch[0].name.startswith(f".out.partial-{os.getpid()}-scratch-")
    assert len(made) > 2 and not [p for p in made if system_tmp in p.parents], made  # ONNX Runtime's folders too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "system-tmp"] and not any(system_tmp.iterdir())
    assert tempfile.tempdir == str(system_tmp)  # given back after the export


# --- --task where it changes nothing -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blip2", "idefics"])
def test_task_is_refused_where_one_artifact_serves_every_task(family, tiny_blip2_dir, tiny_idefics_dir, tmp_path,
                                                               nothing_loads, capsys):
    source, label = {"blip2": (tiny_blip2_dir, "BLIP-2"), "idefics": (tiny_idefics_dir, "IDEFICS")}[family]
    for task in ("vqa", "caption"):
        api_error(lambda: export_model(str(source), tmp_path / "out", task=task, progress=False), InputError,
                  f"--task {task} would change nothing for {label}", "answers captions and questions alike",
                  "fix: drop --task")
    cli_error(capsys, ["export", source, tmp_path / "out", "--task", "vqa"], InputError,
              f"--task vqa would change nothing for {label}")
    # a task the family lacks: the advice is not to pass another --task
    error = api_error(lambda: export_model(str(source), tmp_path / "out", task="embed", progress=False), InputError,
                      f"task 'embed' is not a {label} task", "fix: drop --task")
    assert "pass --task" not in str(error)
    assert not (tmp_path / "out").exists()


# --- images in --calibration / --fidelity-images that do not open ------------------------------------------------
def test_an_unreadable_image_in_an_image_folder_is_refused_before_loading(tiny_clip_dir, photos, tmp_path,
                                                                          nothing_loads, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(Path(photos[0]).read_bytes())
    (folder / "b.jpg").write_bytes(Path(photos[1]).read_bytes()[:2000])  # truncated
    static = {"precision": "int8", "quantization": "static", "progress": False}
    for kind, kwargs, flag in ((CalibrationError, {"calibration": str(folder), **static}, "--calibration"),
                               (InputError, {"precision": "int8", "fidelity": str(folder), "progress": False},
                                "--fidelity-images")):
        api_error(lambda: export_model(str(tiny_clip_dir), tmp_path / "out", **kwargs), kind,
                  f"{flag} image 'b.jpg' is unusable", f"fix: remove or replace '{folder / 'b.jpg'}' in the {flag}")
    cli_error(capsys, ["export", tiny_clip_dir, tmp_path / "out", "--precision", "int8", "--fidelity-images", folder],
              InputError, "--fidelity-images image 'b.jpg' is unusable")
    (folder / "b.jpg").write_text("not an image")
    api_error(lambda: export_model(str(tiny_clip_dir), tmp_path / "out", calibration=str(folder), **static),
              CalibrationError, "--calibration image 'b.jpg' is unusable", "not an image PIL can read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# --- Python API values the CLI's parser would have refused -------------------------------------------------------
@pytest.mark.parametrize("kwargs,kind,fragments", [
    ({"llm_precision": "int4", "int4_block_size": 32.0}, QuantizationError, ["block size 32.0 ", "an int"]),
    ({"llm_precision": "int4", "int4_block_size": True}, QuantizationError, ["block size True "]),
    ({"llm_precision": "int4", "int4_accuracy_level": 4.0}, QuantizationError, ["accuracy level 4.0 "]),
    ({"llm_precision": "int4", "int4_accuracy_level": True}, QuantizationError, ["accuracy level True "]),
    ({"precision": "int8", "min_quantized_cosine": 1.5}, ExportError, ["min_quantized_cosine 1.5 ", "(0, 1]"]),
    ({"precision": "int8", "min_quantized_cosine": 0}, ExportError, ["min_quantized_cosine 0 "]),
    ({"precision": "int8", "min_quantized_cosine": float("nan")}, ExportError, ["min_quantized_cosine nan "]),
    ({"precision": "int8", "min_quantized_cosine": "0.9"}, ExportError, ["min_quantized_cosine '0.9' "]),
    ({"seed": 3}, InputError, ["seed would change nothing", "random_weights=True", "drop seed"]),
])
def test_api_values_are_refused_before_loading(kwargs, kind, fragments, tiny_blip2_dir, tmp_path, nothing_loads):
    api_error(lambda: export_model(str(tiny_blip2_dir), tmp_path / "out", progress=False, **kwargs), kind,
              *fragments)
    assert not (tmp_path / "out").exists()


# --- what a failed fidelity gate advises -------------------------------------------------------------------------
@pytest.mark.parametrize("options,advice", [
    ({"llm_precision": "int4"}, "pass --llm-precision int8 or a smaller --int4-block-size (16)"),
    ({"llm_precision": "int4", "int4_block_size": 16}, "pass --llm-precision int8"),
    ({"llm_precision": "int4", "int4_block_size": 64, "int4_head": "int4"},
     "pass --llm-precision int8, a smaller --int4-block-size (16 or 32) or --int4-head int8"),
    ({"precision": "int8"}, "pass --llm-precision fp16 or fp32"),
    ({"precision": "int8", "llm_precision": "fp16"}, "pass --llm-precision fp32"),
])
def test_the_llm_fidelity_advice_suggests_only_what_differs(options, advice):
    from mmedge.export.families.base import llm_fix
    from mmedge.export.pipeline import ExportOptions

    assert llm_fix(ExportOptions(**options).settled("caption")) == advice


def _gated(family: str, name: str, inputs: tuple, lowered_to: str, options: dict):
    """An ArtifactBuilder as the fidelity gate sees it: component ``name`` traced and lowered to ``lowered_to``."""
    from types import SimpleNamespace

    from mmedge.export.families import FAMILIES
    from mmedge.export.pipeline import ArtifactBuilder, ExportOptions

    builder = ArtifactBuilder.__new__(ArtifactBuilder)  # no checkpoint: only what the advice reads
    builder.family = FAMILIES[family]
    builder.options = ExportOptions(**options).settled(builder.family.default_task)
    builder.traced = {name: SimpleNamespace(name=name, inputs=dict.fromkeys(inputs))}
    builder.entries = {name: {"precision": lowered_to}}
    return builder


@pytest.mark.parametrize("builder,advice", [
    (("clip", "vision", ("pixel_values",), "int8", {"precision": "int8"}),
     "pass --quantization static with --calibration images of the model's domain, or --precision fp16"),
    (("clip", "vision", ("pixel_values",), "int8", {"precision": "int8", "quantization": "static"}),
     "pass more representative --calibration images, --quantization dynamic, or --precision fp16"),
    (("clip", "text", ("input_ids", "attention_mask"), "int8", {"precision": "int8", "quantization": "static"}),
     "pass --quantization dynamic, or --precision fp16"),  # calibrated on label prompts, not images
    (("idefics", "cross_kv", ("visual_tokens",), "int8", {"precision": "int8", "quantization": "static"}),
     "pass --precision fp16 with --llm-precision int8"),  # static INT8 never calibrates it
    (("blip2", "prefix", ("pixel_values",), "fp16", {"precision": "fp16", "llm_precision": "int4"}),
     "pass --precision fp32 with --llm-precision int4"),
    (("blip2", "prefix", ("pixel_values",), "int8", {"precision": "int8", "llm_precision": "int4"}),
     "pass --quantization static with --calibration images of the model's domain, or --precision fp16 with "
     "--llm-precision int4"),
])
def test_the_encoder_fidelity_advice_suggests_only_what_differs(builder, advice):
    from mmedge.export.families.base import encoder_fix

    assert encoder_fix(_gated(*builder), builder[1]) == advice


def test_a_failed_int4_llm_at_the_smallest_block_size_is_not_told_to_shrink_it(tiny_idefics_dir, tmp_path, capsys):
    line = cli_error(capsys, ["export", tiny_idefics_dir, tmp_path / "out", "--llm-precision", "int4",
                              "--int4-block-size", "16", "--quiet"], ParityError,
                     "component 'decoder' output 'logits' failed parity")
    assert line.endswith("fix: pass --llm-precision int8.") and not (tmp_path / "out").exists()


# --- the progress line and the manifest say what static INT8 did -------------------------------------------------
def test_static_int8_says_the_llm_is_dynamic_and_the_calibration_images_are_not_held_out(tiny_blip2_dir, photos,
                                                                                       tmp_path, capfd):
    folder = tmp_path / "mine"
    folder.mkdir()
    for path in photos[:2]:
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    out = export_model(str(tiny_blip2_dir), tmp_path / "out", precision="int8", quantization="static",
                       calibration=str(folder))
    assert "lowering precision: prefix → INT8 static, decoder → INT8 dynamic" in capfd.readouterr().err
    components = json.loads((out / "manifest.json").read_text())["components"]
    assert components["decoder"]["quantization"]["method"] == "int8-dynamic"
    for entry in components.values():
        fidelity = entry["parity"]["fidelity"]
        assert fidelity["held_out"] is False and fidelity["images"] == "mine/ (2 images): the --calibration images, " \
                                                                       "not held out"


def test_a_small_calibration_set_is_warned_about_and_a_large_one_says_what_was_kept(photos, tmp_path):
    """A static calibration on one image ran without a word; a folder of more than 256 images was cut to the first
    256 by name while the manifest's note said only '(256 images)'."""
    from types import SimpleNamespace

    from PIL import Image

    from mmedge.export.calibration import MAX_CALIBRATION_IMAGES, calibration_paths, check_image_folders

    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(Path(photos[0]).read_bytes())
    static = SimpleNamespace(calibration=str(one), fidelity=None, quantization="static", precision="int8")
    with pytest.warns(UserWarning, match=r"holds 1 image: activation ranges measured on fewer than 16"):
        check_image_folders(static)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled set (no --calibration) is not warned about
        check_image_folders(SimpleNamespace(calibration=None, fidelity=None, quantization="static", precision="int8"))
    many = tmp_path / "many"
    many.mkdir()
    for index in range(MAX_CALIBRATION_IMAGES + 2):
        Image.new("RGB", (4, 4)).save(many / f"{index:04d}.png")
    paths, note = calibration_paths(many)
    assert len(paths) == MAX_CALIBRATION_IMAGES and paths[-1].name == "0255.png"
    assert note == f"many/ (the first {MAX_CALIBRATION_IMAGES} of {MAX_CALIBRATION_IMAGES + 2} images by name)"
    assert calibration_paths(one)[1] == "one/ (1 image)"


# --- the fidelity images a static export calibrates on are not called held out -----------------------------------
def test_fidelity_images_that_are_also_calibration_images_are_left_out_or_said_not_held_out(tmp_path):
    """`--fidelity-images export/data/images` held the bundled calibration-*.jpg a static export calibrated on, and
    the manifest called the measurement held-out: folders were compared, not files."""
    from types import SimpleNamespace

    from mmedge.export.calibration import DATA_DIR, bundled, fidelity_on_calibration, fidelity_paths

    def options(fidelity, quantization="static", calibration=None):
        return SimpleNamespace(precision="int8", quantization=quantization, calibration=calibration,
                               fidelity=str(fidelity))

    paths, note = fidelity_paths(options(DATA_DIR))  # the same files, by path
    assert [p.name for p in paths] == [p.name for p in bundled("holdout")]
    assert note == "images/ (8 images; 8 calibrated on, left out)" and not fidelity_on_calibration(options(DATA_DIR))
    copies = tmp_path / "copies"  # the same bytes under other names
    copies.mkdir()
    for path in bundled("calibration")[:2]:
        (copies / f"copy-{path.name}").write_bytes(path.read_bytes())
    paths, note = fidelity_paths(options(copies))
    assert len(paths) == 2 and fidelity_on_calibration(options(copies))  # nothing else to measure on: said so
    assert note == "copies/ (2 images): the bundled calibration images, not held out"
    own = tmp_path / "own"
    own.mkdir()
    (own / "mine.jpg").write_bytes(bundled("holdout")[0].read_bytes())
    (own / "also-calibrated.jpg").write_bytes(bundled("calibration")[0].read_bytes())
    mine = options(own, calibration=str(copies))  # a --calibration folder: its files are the calibration images
    assert fidelity_paths(mine) == ([own / "mine.jpg"], "own/ (1 image; 1 calibrated on, left out)")
    assert fidelity_paths(options(own, quantization="dynamic")) == (sorted(own.iterdir()), "own/ (2 images)")


# --- an output path that cannot be written is refused before loading ----------------------------------------------
def test_an_output_path_that_cannot_be_written_is_refused_before_loading(tiny_clip_dir, tmp_path, nothing_loads,
                                                                        monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    cli_error(capsys, ["export", tiny_clip_dir, tmp_path / "afile" / "new" / "out"], ArtifactError,
              f"output path '{tmp_path / 'afile' / 'new' / 'out'}' cannot be written", "afile' is a file, not a folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system: that is what access() reports there
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode,
                                                                                                          **kw))
    for out, where in ((locked / "out", "its folder"), (locked / "a" / "b" / "out", "the nearest existing folder")):
        cli_error(capsys, ["export", tiny_clip_dir, out], ArtifactError,
                  f"output path '{out}' cannot be written: {where}", f"'{locked}', is not writable")
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []


# --- an option the checkpoint cannot take, from its config -----------------------------------------------------
def test_fused_attention_on_a_non_opt_llm_is_refused_before_loading(tiny_instructblip_dir, tiny_blip2_dir, tmp_path,
                                                                     nothing_loads, capsys):
    """--help promises it for an OPT LLM; an InstructBLIP with a Llama LLM was refused only after loading."""
    cli_error(capsys, ["export", tiny_instructblip_dir, tmp_path / "out", "--fused-attention"], InputError,
              "--fused-attention cannot rewrite this InstructBLIP checkpoint's LLM ('llama'", "drop --fused-attention")
    from mmedge.export.families import FAMILIES
    from mmedge.export.option_checks import check_export_options
    from mmedge.export.pipeline import ExportOptions

    opt = json.loads((tiny_blip2_dir / "config.json").read_text())
    check_export_options(ExportOptions(extra={"fused_attention": True}), FAMILIES["blip2"], opt)  # OPT: taken


def hub_cache(checkpoint: Path, home: Path, repo: str) -> Path:
    """``checkpoint`` laid out in ``home`` as huggingface_hub's download leaves a repo: refs/main naming a snapshot
    whose files are symlinks into blobs/ (named by their sha256)."""
    import hashlib

    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot, blobs = root / "snapshots" / revision, root / "blobs"
    blobs.mkdir()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_an_instructblip_hub_id_exports_offline_from_the_hub_cache(tiny_instructblip_dir, tmp_path):
    """The Q-Former's tokenizer sits in qformer_tokenizer/ of the snapshot; AutoTokenizer's subfolder= looked for a
    config.json there (hub repos have none) and, offline, refused a cache that held the tokenizer whole."""
    hub_cache(tiny_instructblip_dir, tmp_path / "hf", "someone/tiny-instructblip")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mmedge", "export", "someone/tiny-instructblip",
                             str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "qformer_tokenizer.json").is_file()
