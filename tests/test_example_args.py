"""The demo training script's counts are usage errors (exit 2, no traceback) before any work: `--batch 0` raised a
RuntimeError from torch, `--test-scenes 0` a ValueError, after minutes of rendering scenes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--test-scenes", "0"), ("--threads", "-1"),
                                        ("--clip-steps", "zero"), ("--demo-images", "-1"),
                                        ("--idefics-budget-seconds", "0"), ("--t5-budget-seconds", "nan")])
def test_a_bad_count_is_a_usage_error(flag, value, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo_models.py"), "--out",
                             str(tmp_path / "models"), flag, value], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and f"argument {flag}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "models").exists()


# --- examples/export_for_device.py ----------------------------------------------------------------------------------
def _export_for_device(*args: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the example as `python examples/export_for_device.py ARGS`, after ``prelude`` (Python run first)."""
    script = ROOT / "examples" / "export_for_device.py"
    code = f"{prelude}\nimport runpy, sys\nsys.argv = {[str(script), *args]!r}\nrunpy.run_path({str(script)!r}, " \
           "run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_export_for_device_refusals_say_what_was_expected(tmp_path):
    """Its refusals gave only a fix: no "expected ..." part, as every mmedge error has."""
    from mmedge import demo

    (tmp_path / "dfile").write_text("")
    (tmp_path / "orin" / "artifact").mkdir(parents=True)
    (tmp_path / "orin" / "artifact" / "mine.txt").write_text("mine")
    other_clip = shutil.copytree(demo.model_path("clip"), tmp_path / "my-clip")  # not the shipped one: needs --labels
    cases = [(["--device-dir", "dfile"], "--device-dir 'dfile' is not a folder"),
             (["--device-dir", "orin"], "is not an mmedge artifact"),
             (["--model", str(other_clip)], "no labels to bake"),
             (["--model", str(demo.model_path("idefics"))], "is an IDEFICS model")]
    for args, what in cases:
        result = _export_for_device(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert what in result.stderr and "; expected " in result.stderr and "; fix: " in result.stderr, result.stderr
    assert (tmp_path / "orin" / "artifact" / "mine.txt").read_text() == "mine"


def test_export_for_device_interrupted_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C during its export printed a KeyboardInterrupt traceback and exited 1; `mmedge export` prints one line
    and exits 130. Nothing is left in --device-dir."""
    prelude = ("import mmedge.export\n"
               "def interrupted(*args, **kwargs):\n"
               "    raise KeyboardInterrupt\n"
               "mmedge.export.export_model = interrupted")
    result = _export_for_device("--device-dir", "orin", cwd=tmp_path, prelude=prelude)
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr
    assert list(tmp_path.iterdir()) == []


# --- --out of the scripts that export when their artifact is missing or stale ---------------------------------------
@pytest.mark.parametrize("script", ["zero_shot.py", "caption.py", "few_shot.py"])
def test_an_out_that_is_no_artifact_is_refused_in_the_scripts_terms_before_work(script, tmp_path):
    """`zero_shot.py --out FOLDER-OF-NOTES` printed "exporting ..." and then the export's refusal, which told the user
    to pass --overwrite, an option these scripts do not have. Now --out is judged as the arguments are read."""
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    cases = [("foreign", "'foreign' is a folder that holds no mmedge artifact, which this script does not replace"),
             ("afile", "'afile' is a file, which this script does not replace"),
             ("afile/sub", "output path 'afile/sub' cannot be written: 'afile' is a file, not a folder")]
    for out, what in cases:
        result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--out", out], capture_output=True,
                                text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and f"{script}: error: argument --out: {what}" in result.stderr, result.stderr
        assert "; expected " in result.stderr and "; fix: " in result.stderr, result.stderr
        assert "--overwrite" not in result.stderr and "Traceback" not in result.stderr and not result.stdout
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "mine"


def test_an_out_a_script_may_export_into_is_taken(clip_artifacts, tmp_path):
    """A new path, an empty folder, or an artifact (re-exported there when stale): what the scripts' --out takes."""
    from mmedge.cli_args import export_folder

    (tmp_path / "empty").mkdir()
    for out in (str(tmp_path / "new" / "zs"), str(tmp_path / "empty"), str(clip_artifacts("fp32"))):
        assert export_folder(out) == Path(out)


def test_an_artifact_on_read_only_storage_is_taken_as_out(clip_artifacts, monkeypatch):
    """An up-to-date artifact is only read: its folder's writability is the export's to judge, when one is needed (a
    read-only mount, a container image: the scripts had refused it before reading it)."""
    import mmedge.artifact
    from mmedge.cli_args import export_folder
    from mmedge.errors import ArtifactError

    def read_only(path, **kwargs):
        raise ArtifactError(f"output path '{path}' cannot be written", "a writable folder", "mount it read-write")

    monkeypatch.setattr(mmedge.artifact, "check_output_folder", read_only)
    assert export_folder(str(clip_artifacts("fp32"))) == Path(clip_artifacts("fp32"))
