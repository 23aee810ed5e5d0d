"""`mmedge` command lines: values judged before anything loads, list options that combine, empty strings refused,
errors in the flags' words and naming their artifact (the CLI audit's defects)."""

import json
import shutil
import subprocess
import sys

import pytest

from mmedge.cli import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr), a bad command line's included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def damaged(folder, tmp_path):
    """A copy of ``folder`` with one byte of its first graph changed: loading it fails its sha256 check."""
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    graph = copy / json.loads((copy / "manifest.json").read_text())["components"].popitem()[1]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("argv, fragment", [
    (["--sample", "--temperature", "-1"], "--temperature -1.0 is not usable"),
    (["--sample", "--top-p", "2"], "--top-p 2.0 is not usable"),
    (["--sample", "--num-beams", "2"], "--num-beams 1 when --sample"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000 is not usable"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is not usable"),
    (["--num-beams", "0"], "--num-beams 0 is not usable"),
    (["--sample", "--top-k-tokens", "-1"], "--top-k-tokens -1 is not usable"),
    (["--sample", "--seed", "-1"], "--seed -1 is not usable; expected an integer of 0 or more"),
    (["--stop", ""], "--stop is empty"),
    (["--task", "zero-shot"], "task 'zero-shot' is not one this artifact was exported for"),
    (["--task", "vqa"], "--task vqa was given without --question"),
])
def test_generation_values_are_judged_before_the_model_loads(capsys, blip2_artifact, photos, tmp_path, argv,
                                                             fragment):
    """They were refused only inside the pipeline, after the load (and the sha256 of every file), in the Python API's
    words (max_new_tokens=30, do_sample=False)."""
    code, _, err = run_cli(capsys, "run", damaged(blip2_artifact, tmp_path), photos[0], *argv)
    assert code == 2 and fragment in err and "sha256" not in err, err
    assert "do_sample" not in err and "max_new_tokens" not in err and "generation setting" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--labels", "a", "a"], "labels contain duplicates ('a')"),
    (["--labels", "a", " "], "blank entries"),
    (["--labels", "a", "b", "--templates", "no slot"], "prompt template 'no slot' is not usable"),
    (["--labels", "a", "b", "--top-k", "0"], "--top-k: 0 is below 1"),
    (["--labels", "a", "--threads", "100000"], "--threads: 100000 is above"),
])
def test_zero_shot_values_are_judged_before_the_model_loads(capsys, clip_artifacts, photos, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, "run", damaged(clip_artifacts("fp32"), tmp_path), photos[0], *argv)
    assert code == 2 and fragment in err and "sha256" not in err, err
    assert "top_k=" not in err and "threads is" not in err


def test_list_options_given_twice_combine(capsys, clip_artifacts, photos, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("car\n")
    code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--labels", "cat", "--labels", "dog",
                             "--labels-file", labels, "--top-k", "9", "--json")
    assert code == 0, err
    assert sorted(p["label"] for p in json.loads(out)["predictions"]) == ["car", "cat", "dog"]
    code, _, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--labels-file", labels,
                           "--labels-file", labels)
    assert code == 2 and "--labels-file given twice" in err


@pytest.mark.parametrize("argv, flag", [
    (["run", "A", "x.png", "--triton", ""], "--triton"),
    (["run", "A", "x.png", "--labels-file", ""], "--labels-file"),
    (["run", "A", "x.png", "--prompt", ""], "--prompt"),
    (["run", "A", "--interleaved", "", "x.png"], "images"),
    (["export", "CLIP", "out", "--task", ""], "--task"),
    (["bench", "A", "--plot", ""], "--plot"),
    (["demo", "--cache", ""], "--cache"),
])
def test_an_empty_value_is_refused_not_taken_as_not_given(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"mmedge: error: {flag} is empty; expected ") and "fix: " in err


@pytest.mark.parametrize("flag", ["--labels", "--stop"])
def test_an_image_path_a_list_option_took_is_refused(capsys, clip_artifacts, blip2_artifact, photos, flag):
    artifact = clip_artifacts("fp32") if flag == "--labels" else blip2_artifact
    code, _, err = run_cli(capsys, "run", artifact, photos[0], flag, "cat", photos[1])
    assert code == 2 and f"{flag} value '{photos[1]}' names an image file" in err and f"before {flag}" in err


def test_a_label_that_names_another_file_is_a_label(capsys, clip_artifacts, photos, tmp_path, monkeypatch):
    """A file 'dog' in the current folder had made --labels cat dog refused, as though dog were a misplaced image."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dog").write_text("")
    code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--labels", "cat", "dog")
    assert code == 0 and ("cat" in out and "dog" in out), err


def test_manifest_errors_name_their_artifact(capsys, clip_artifacts, tmp_path):
    bad = tmp_path / "bad1"
    shutil.copytree(clip_artifacts("fp32"), bad)
    (bad / "manifest.json").write_text("{")
    code, _, err = run_cli(capsys, "run", bad, "x.png")
    assert code == 2 and f"artifact '{bad}': manifest.json is not valid JSON" in err
    manifest = json.loads((clip_artifacts("fp32") / "manifest.json").read_text())
    del manifest["family"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "run", bad, "x.png")
    assert code == 2 and f"artifact '{bad}': manifest.json field 'family' is missing" in err


def test_a_labels_file_may_be_a_pipe_or_standard_input(clip_artifacts, photos):
    command = [sys.executable, "-m", "mmedge.cli", "run", str(clip_artifacts("fp32")), photos[0], "--top-k", "9"]
    done = subprocess.run([*command, "--labels-file", "-"], input="cat\ndog\n", capture_output=True, text=True)
    assert done.returncode == 0 and "cat (" in done.stdout and "dog (" in done.stdout, done.stderr
    done = subprocess.run(["bash", "-c", 'exec "$@" --labels-file <(printf "cat\\ndog\\n")', "_", *command],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "cat (" in done.stdout, done.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--max-sequence", "8"], "--max-sequence would change nothing"),
    (["--max-images", "2"], "--max-images would change nothing"),
    (["--workspace-mb", "-1"], "--workspace-mb: -1 is below 1"),
    (["--workspace-mb", "0"], "--workspace-mb: 0 is below 1"),
    (["--max-batch", "0"], "--max-batch: 0 is below 1"),
])
def test_build_refuses_idle_and_bad_limits_before_tensorrt(capsys, clip_artifacts, argv, fragment):
    code, _, err = run_cli(capsys, "build", clip_artifacts("fused-fp32"), *argv)
    assert code == 2 and fragment in err, err


def test_system_errors_are_bad_input_lines_not_bugs(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "CLIP", "/proc/mmedge-out")
    assert code == 2 and "cannot write the artifact OUT '/proc/mmedge-out'" in err and ".partial" not in err
    done = subprocess.run(f'"{sys.executable}" -m mmedge.cli doctor > /dev/full', shell=True, capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.startswith("mmedge: error: No space left on device"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_doctor_reports_a_missing_file_with_the_device(capsys, clip_artifacts, tmp_path):
    artifact = tmp_path / "a"
    shutil.copytree(clip_artifacts("fp32"), artifact)
    (artifact / "vision.onnx").unlink()
    code, out, _ = run_cli(capsys, "doctor", artifact, "--json")
    report = json.loads(out)
    assert code == 3 and report["files"].startswith("MISSING: artifact file 'vision.onnx'")
    assert report["device"] and "vision" in report["plan"]


def test_an_unknown_option_points_at_its_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["run", "A", "x.png", "--bogus"])
    assert exit.value.code == 2 and "fix: see `mmedge run --help`" in capsys.readouterr().err


def test_tune_runs_bound_is_the_tuners():
    from mmedge.cli import MAX_TUNE_RUNS
    from mmedge.runtimes.openvino.tune import MAX_RUNS

    assert MAX_TUNE_RUNS == MAX_RUNS
