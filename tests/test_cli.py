"""The CLI: happy paths, and every typed error reaching the user as one line with a non-zero exit."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmedge
from mmedge.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def artifact_copy(clip_artifacts, tmp_path):
    """A private copy of the fp32 artifact that a test may tamper with."""
    dest = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), dest)
    return dest


def edit_manifest(folder: Path, edit):
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_run_prints_top_k(capsys, clip_artifacts, photos):
    code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], photos[1], "--labels", "cat", "dog",
                             "car", "--top-k", "2")
    assert code == 0 and len(out.strip().splitlines()) == 2 and out.count("(") == 4


def test_run_json_one_object_per_image(capsys, clip_artifacts, photos):
    code, out, _ = run_cli(capsys, "run", clip_artifacts("fused-int8"), *photos[:3], "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and [r["image"] for r in rows] == photos[:3]
    assert all(len(r["predictions"]) == 4 for r in rows)


def test_run_embed_json(capsys, clip_artifacts, photos):
    code, out, _ = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--task", "embed", "--json")
    assert code == 0 and len(json.loads(out)["embedding"]) == 16


def test_validate_passes_and_reports(capsys, clip_artifacts):
    code, out, _ = run_cli(capsys, "validate", clip_artifacts("int8-static"), "--backend", "onnxruntime")
    assert code == 0 and out.count(" ok") == 2 and "vision.image_embeds [int8, onnxruntime]" in out


def test_validate_json(capsys, clip_artifacts):
    code, out, _ = run_cli(capsys, "validate", clip_artifacts("fp32"), "--json")
    report = json.loads(out)
    assert code == 0 and report["vision"]["outputs"]["image_embeds"]["cosine"] > 0.99999


def test_doctor_without_and_with_artifact(capsys, clip_artifacts):
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0 and "onnxruntime providers: cpu" in out and "engines:" in out
    code, out, _ = run_cli(capsys, "doctor", clip_artifacts("fp32"), "--json")
    report = json.loads(out)
    assert report["plan"]["vision"]["backend"] == "onnxruntime" and report["reasons"]


def test_doctor_reports_damaged_files_and_every_backend_line(capsys, clip_artifacts, tmp_path):
    """doctor planned as usual for an artifact whose graph `run` refuses; its --json left out the backends' lines."""
    code, out, _ = run_cli(capsys, "doctor", clip_artifacts("fp32"), "--json")
    report = json.loads(out)
    assert code == 0 and report["files"].startswith("ok") and isinstance(report["backends"], list)
    assert "openvino" in report["device"]["engines"]  # installed or not, it is listed
    damaged = tmp_path / "damaged"
    shutil.copytree(clip_artifacts("fp32"), damaged)
    graph = damaged / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[:-16])
    code, out, _ = run_cli(capsys, "doctor", damaged)
    assert code == 2 and "files: DAMAGED: artifact file 'vision.onnx' in '" in out and "plan: vision" in out


def test_validate_and_tune_survive_damaged_device_caches(capsys, clip_artifacts, tmp_path):
    """engines/ is this device's cache: a damaged timings file counts as none (tune writes it again), a timings path
    that is a folder and an engines/ that is a file are typed errors before any measuring; a parity record without
    the export's figures prints 'unrecorded' (it was an internal error)."""
    artifact = tmp_path / "a"
    shutil.copytree(clip_artifacts("fp32"), artifact)
    (artifact / "engines").mkdir(exist_ok=True)
    timings = artifact / "engines" / "backend-timings.json"
    timings.write_text(json.dumps({"format": 1, "records": [1, {"device": {}, "components": []}]}))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["components"]["vision"]["parity"].pop("validation_samples")
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(capsys, "validate", artifact, "--backend", "onnxruntime")
    assert code == 0 and "(export unrecorded," in out
    timings.unlink()
    timings.mkdir()
    code, out, err = run_cli(capsys, "tune", artifact, "--runs", "3")
    assert code != 0 and "backend-timings.json' is a folder" in err and "opening every graph" not in err + out
    assert not list((artifact / "engines").glob(".backend-timings.json.*"))
    shutil.rmtree(artifact / "engines")
    (artifact / "engines").write_text("")
    code, _, err = run_cli(capsys, "tune", artifact, "--runs", "3")
    assert code != 0 and "is a file, not the artifact's engines/ folder" in err


def test_unreadable_arrays_with_a_matching_sha256_are_integrity_errors(capsys, blip2_artifact, tmp_path):
    """An .npz whose bytes match the manifest but do not read (the sha256 edited along): BadZipFile was an internal
    error; validate loads the embedding table the generation loop reads, so it fails where run would."""
    import hashlib

    for name in ("embed_tokens.npz", "validation.npz"):
        artifact = tmp_path / name
        shutil.copytree(blip2_artifact, artifact)
        (artifact / name).write_bytes((artifact / name).read_bytes()[:100])
        text = (artifact / "manifest.json").read_text()
        old = hashlib.sha256((blip2_artifact / name).read_bytes()).hexdigest()
        new = hashlib.sha256((artifact / name).read_bytes()).hexdigest()
        (artifact / "manifest.json").write_text(text.replace(old, new))
        code, _, err = run_cli(capsys, "validate", artifact)
        assert code == 2 and f"file '{name}' is unreadable (BadZipFile" in err and "internal error" not in err


def test_artifact_errors_name_the_folder(capsys, clip_artifacts, tmp_path):
    """A sha256 mismatch named only the file (ambiguous where a command takes several artifacts); a manifest.json
    that is a folder was reported as missing; a threads value validate_artifact and plan_for took as given."""
    from mmedge.api import plan_for
    from mmedge.errors import InputError
    from mmedge.validate import validate_artifact

    artifact = tmp_path / "a"
    shutil.copytree(clip_artifacts("fp32"), artifact)
    (artifact / "vision.onnx").write_bytes((artifact / "vision.onnx").read_bytes()[:-16])
    code, _, err = run_cli(capsys, "validate", artifact)
    assert code == 2 and f"artifact file 'vision.onnx' in '{artifact.resolve()}' has sha256" in err
    (artifact / "manifest.json").unlink()
    (artifact / "manifest.json").mkdir()
    code, _, err = run_cli(capsys, "run", artifact, "x.png")
    assert code == 3 and "has no manifest.json file (it is a folder)" in err
    for threads in ("2", 0):
        for call in (lambda: validate_artifact(clip_artifacts("fp32"), threads=threads),
                     lambda: plan_for(clip_artifacts("fp32"), threads=threads)):
            with pytest.raises(InputError, match="a positive integer"):
                call()


def test_export_with_pytorch_is_readable_by_others_and_counted(capsys, tiny_blip2_dir, tmp_path):
    """transformers writes pytorch/'s weights 0600: another account (a service, Triton's user) could not read them;
    and the size printed left pytorch/ out."""
    before = os.umask(0o022)
    try:
        code, out, _ = run_cli(capsys, "export", tiny_blip2_dir, tmp_path / "a", "--with-pytorch", "--quiet")
    finally:
        os.umask(before)
    files = [f for f in (tmp_path / "a").rglob("*") if f.is_file()]
    assert code == 0 and any(f.parent.name == "pytorch" for f in files)
    assert {f.relative_to(tmp_path).as_posix(): oct(f.stat().st_mode & 0o777) for f in files
            if f.stat().st_mode & 0o777 != 0o644} == {}
    from mmedge.artifact import Artifact

    size = Artifact.open(tmp_path / "a").size_bytes()  # what demo and Triton report (bench: what its plan loads)
    assert size >= sum(f.stat().st_size for f in files if f.parent.name == "pytorch" or f.suffix == ".onnx")
    assert f"({size / 1e6:.1f} MB)" in out.splitlines()[0]


def test_an_empty_labels_file_is_refused(capsys, tmp_path):
    (tmp_path / "labels.txt").write_text("\n   \n")
    code, _, err = run_cli(capsys, "export", "some/model", tmp_path / "o", "--labels-file", tmp_path / "labels.txt")
    assert code == 2 and "holds no labels (it is empty or blank)" in err and not (tmp_path / "o").exists()


def test_sigterm_unwinds_an_export_like_ctrl_c(tiny_clip_dir, tmp_path):
    """A terminated export (a scheduler's kill, `timeout`) left its staging folder; now it unwinds and exits 143."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "mmedge.cli", "export", str(tiny_clip_dir), str(tmp_path / "o"),
                                "--precision", "int8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".o.partial-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the export ended before it could be terminated"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and "mmedge: terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no staging folder, no output


def test_the_parity_line_says_whether_fidelity_images_were_held_out():
    """Static INT8 given only --calibration measures fidelity on the images it calibrated on: not "held-out"."""
    from mmedge.cli import _parity_line

    parity = {"outputs": {"probs": {"cosine": 0.9991}}, "fidelity": {"top1_agreement": 1.0}}
    assert "held-out top-1 agreement vs FP32 1.000" in _parity_line(parity)
    parity["fidelity"]["held_out"] = False
    assert "calibration-image top-1 agreement" in _parity_line(parity) and "held-out" not in _parity_line(parity)


def test_export_cli(capsys, tiny_clip_dir, tmp_path):
    code, out, err = run_cli(capsys, "export", tiny_clip_dir, tmp_path / "x", "--labels", "cat", "dog")
    assert code == 0 and "zero_shot: zero_shot.onnx fp32" in out and "[3/5] tracing" in err


# --- each typed error, from the CLI -------------------------------------------------------------
def expect_error(capsys, argv, exit_code, *fragments):
    code, out, err = run_cli(capsys, *argv)
    assert code == exit_code, err
    progress = re.compile(r"^(\[\d+/\d+\] .*|    .* \d+/\d+)$")  # step lines of mmedge.progress, not errors
    lines = [line for line in err.strip().splitlines() if not progress.match(line)]
    assert len(lines) == 1 and lines[0].startswith("mmedge: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "expected" in lines[0] and "fix:" in lines[0]


def test_missing_artifact(capsys, tmp_path, photos):
    expect_error(capsys, ["run", tmp_path / "nope", photos[0]], 3, "does not exist")


def test_missing_graph_file(capsys, artifact_copy, photos):
    (artifact_copy / "vision.onnx").unlink()
    expect_error(capsys, ["run", artifact_copy, photos[0], "--labels", "a"], 3, "vision.onnx", "missing")


def test_sha_mismatch(capsys, artifact_copy, photos):
    with open(artifact_copy / "vision.onnx", "ab") as handle:
        handle.write(b"\x00")
    expect_error(capsys, ["run", artifact_copy, photos[0], "--labels", "a"], 2, "sha256", "vision.onnx")


def test_manifest_naming_parent_path(capsys, artifact_copy, photos):
    edit_manifest(artifact_copy, lambda m: m["components"]["vision"].update(file="../x.onnx"))
    expect_error(capsys, ["run", artifact_copy, photos[0], "--labels", "a"], 2, "'../x.onnx'", "plain file name")


def test_symlink_leaving_the_folder(capsys, artifact_copy, photos, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(artifact_copy / "vision.onnx", outside)
    (artifact_copy / "vision.onnx").symlink_to(outside)
    expect_error(capsys, ["run", artifact_copy, photos[0], "--labels", "a"], 2, "outside the artifact folder")


def test_newer_format_version(capsys, artifact_copy, photos):
    edit_manifest(artifact_copy, lambda m: m.update(format_version=99, mmedge_version="7.0.0"))
    expect_error(capsys, ["run", artifact_copy, photos[0]], 2, "format version 99", "mmedge 7.0.0",
                 "pip install -U mmedge")


def test_manifest_not_json(capsys, artifact_copy, photos):
    (artifact_copy / "manifest.json").write_text('{"format": ')
    expect_error(capsys, ["validate", artifact_copy], 2, "not valid JSON")


def test_non_image_file(capsys, clip_artifacts, tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("this is text, not a JPEG")
    expect_error(capsys, ["run", clip_artifacts("fp32"), bogus, "--labels", "a", "b"], 2, "notes.jpg")


def test_empty_label_list(capsys, clip_artifacts, photos):
    expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels"], 2, "no labels")


def test_no_labels_for_unfused_artifact(capsys, clip_artifacts, photos):
    expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0]], 2, "no labels were given", "--labels cat dog")


def test_absent_backend_named(capsys, clip_artifacts, photos):
    expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels", "a", "--backend", "tensorrt"], 4,
                 "backend 'tensorrt'")
    expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels", "a", "--device", "cuda"], 4,
                 "device=cuda", "onnxruntime-gpu")


def test_corrupt_graph_with_matching_hash(capsys, artifact_copy, photos):
    """Random bytes whose sha256 was also written into the manifest: the engine refuses, mmedge says so."""
    from mmedge.artifact import sha256_file

    (artifact_copy / "vision.onnx").write_bytes(b"\x08\x07garbage" * 10)
    edit_manifest(artifact_copy,
                  lambda m: m["components"]["vision"].update(sha256=sha256_file(artifact_copy / "vision.onnx")))
    expect_error(capsys, ["run", artifact_copy, photos[0], "--labels", "a"], 2, "could not load component 'vision'")


def test_export_of_missing_checkpoint(capsys, tmp_path):
    expect_error(capsys, ["export", tmp_path / "no-such-model", tmp_path / "out"], 2, "no-such-model")


def test_real_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "run", str(tmp_path / "missing"), "x.jpg"],
                            capture_output=True, text=True)
    assert result.returncode == 3 and result.stderr.startswith("mmedge: error: ") and "Traceback" not in result.stderr


def test_a_labels_file_that_is_not_text_or_is_a_folder(capsys, clip_artifacts, photos, monkeypatch):
    """Refused before the model loads (it loaded first: minutes for a large one), as is a run without labels."""
    import mmedge

    def not_loaded(*args, **kwargs):
        raise AssertionError("mmedge.load ran before the labels were judged")

    monkeypatch.setattr(mmedge, "load", not_loaded)
    for path, fragment in ((photos[0], "is not UTF-8 text"), (Path(photos[0]).parent, "is a folder")):
        expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels-file", path], 2, fragment)
    expect_error(capsys, ["run", clip_artifacts("fp32"), photos[0]], 2, "no labels were given")


def test_a_missing_image_stops_the_run_before_any_line(capsys, clip_artifacts, photos, tmp_path):
    """The second path is mistyped: nothing is printed for the first (a --json reader would get half a run)."""
    missing = tmp_path / "photo-2.jpg"
    code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], missing, "--labels", "a", "b", "--json")
    assert code == 2 and out == "" and "photo-2.jpg' does not exist" in err
    code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], tmp_path, "--labels", "a", "b")
    assert code == 2 and out == "" and "is not a file" in err


@pytest.mark.parametrize("argv,fragment", [
    (["doctor", "--backend", "onnxruntime"], "--backend would change nothing without an artifact"),
    (["doctor", "--device", "cpu"], "--device would change nothing without an artifact"),
    (["doctor", "--threads", "2"], "--threads would change nothing without an artifact"),
])
def test_doctor_refuses_plan_options_without_an_artifact(capsys, argv, fragment):
    expect_error(capsys, argv, 2, fragment)


@pytest.mark.parametrize("argv", [
    ["validate", "ART", "--threads", "0"], ["doctor", "ART", "--threads", "-5"], ["run", "ART", "x.png", "--threads",
                                                                                 "0"],
    ["tune", "ART", "--threads", "0"], ["demo", "--threads", "0"], ["demo", "--images", "0"],
    ["demo", "--backend", "foo"], ["doctor", "--backend", "foo"], ["run", "ART", "x.png", "--backend", "tvm"],
    ["run", "ART", "x.png", "--device", "tpu"], ["triton", "ART", "--out", "R", "--threads", "-3"],
    ["triton", "ART", "--out", "R", "--queue-delay-us", "-5"], ["triton", "ART", "--out", "R", "--workers", "0"],
    ["triton", "ART", "--out", "R", "--max-batch-size", "0"], ["triton", "ART", "--out", "R", "--instances", "x"],
])
def test_counts_and_backends_are_checked_before_any_work(capsys, clip_artifacts, argv):
    """A usage error (exit 2, argparse's line naming the option), where `validate --threads 0` used to pass and
    `demo --backend foo` to export every demo model first."""
    with pytest.raises(SystemExit) as exited:
        main([str(clip_artifacts("fp32")) if a == "ART" else a for a in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and ("invalid choice" in err or "whole number" in err), err


def test_a_reader_that_leaves_is_not_an_error():
    """`mmedge doctor | head -1`: the pipe closes under the printing command, which stops quietly (it printed
    "mmedge: error: Broken pipe; fix: check the path, free space and permissions")."""
    process = subprocess.Popen([sys.executable, "-m", "mmedge.cli", "doctor"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line
    err = process.stderr.read().decode()
    assert process.wait() == 141 and err == ""


def test_python_dash_m_mmedge_is_the_command(tmp_path):
    """`python -m mmedge` (a Python whose scripts folder is not on PATH) runs the CLI, exit codes and all."""
    version = subprocess.run([sys.executable, "-m", "mmedge", "--version"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"mmedge {mmedge.__version__}", version
    missing = subprocess.run([sys.executable, "-m", "mmedge", "run", str(tmp_path / "nothing"), "x.png"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert missing.returncode == 3 and missing.stderr.startswith("mmedge: error:"), missing
