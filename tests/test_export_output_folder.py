"""What an export may do to its output folder, at the start and at the final rename: nothing that is the user's is
moved or deleted (a folder that appeared meanwhile, the export's own inputs inside an old artifact), an old artifact is
never left hidden in a ``.OUT.old-*`` folder, and a path that names no folder ('x/..') is refused before any work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mmedge.artifact import atomic_folder
from mmedge.errors import ArtifactError
from mmedge.export import export_model
from tests.support.battery import api_error, check_error, cli_error


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to load a checkpoint fails the test."""
    import mmedge.export.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the options were checked")

    monkeypatch.setattr(loading, "load_checkpoint", refuse)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def old_artifact(folder: Path, note: str = "old") -> Path:
    """A folder --overwrite may replace: an artifact's manifest (what ``is_artifact_folder`` recognises)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "mmedge.artifact", "note": note}))
    return folder


# --- the final rename judges again what is at OUT by then ----------------------------------------------------------
def test_a_folder_that_appears_during_the_write_is_never_replaced_without_overwrite(tmp_path):
    """It used to be moved aside and deleted at the rename, though the start refuses an existing OUT."""
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError) as info:
        with atomic_folder(dest) as stage:
            (stage / "new.onnx").write_bytes(b"new")
            dest.mkdir()  # another export, or the user, meanwhile
            (dest / "notes.txt").write_text("mine")
    check_error(info.value, ArtifactError, "'" + str(dest) + "' appeared while", "nothing was written")
    assert info.value.exit_code == 2
    assert files_of(dest) == {"notes.txt": b"mine"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ArtifactError, match="appeared while"):  # an artifact too: without --overwrite, never
        with atomic_folder(tmp_path / "other") as stage:
            old_artifact(tmp_path / "other")
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["note"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_with_overwrite_only_what_the_start_would_replace_is_replaced_at_the_rename(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match="is not empty and is not an mmedge artifact"):
        with atomic_folder(dest, overwrite=True) as stage:
            (stage / "new.onnx").write_bytes(b"new")
            dest.mkdir()
            (dest / "notes.txt").write_text("mine")
    assert files_of(dest) == {"notes.txt": b"mine"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    shutil.rmtree(dest)
    with atomic_folder(dest, overwrite=True) as stage:  # an artifact that appeared meanwhile: the start's rule takes it
        (stage / "new.onnx").write_bytes(b"new")
        old_artifact(dest)
    assert files_of(dest) == {"new.onnx": b"new"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_old_artifact_is_put_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    """The second rename failing used to leave OUT missing and the old artifact in a hidden .OUT.old-* folder."""
    dest = old_artifact(tmp_path / "out")
    before = files_of(dest)
    real_replace = os.replace

    def failing(src, dst):
        if ".partial-" in str(src):  # the staging folder onto OUT
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        with atomic_folder(dest, overwrite=True) as stage:
            (stage / "new.onnx").write_bytes(b"new")
    assert files_of(dest) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_export_refuses_an_output_folder_that_appeared_while_it_ran(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from mmedge.export.pipeline import ArtifactBuilder

    out, finish = tmp_path / "out", ArtifactBuilder.finish

    def finish_while_someone_writes_out(self, specs):
        finish(self, specs)
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(ArtifactBuilder, "finish", finish_while_someone_writes_out)
    cli_error(capsys, ["export", tiny_clip_dir, out, "--quiet"], ArtifactError, f"'{out}' appeared while")
    assert files_of(out) == {"notes.txt": b"mine"} and [p.name for p in tmp_path.iterdir()] == ["out"]


# --- --overwrite never deletes what the export reads --------------------------------------------------------------
def test_overwrite_refuses_an_old_artifact_holding_the_exports_own_inputs(tiny_clip_dir, photos, tmp_path,
                                                                         nothing_loads):
    """Calibration images, fidelity images and the labels file inside the old artifact were deleted with it (and the
    manifest named a calibration folder that no longer existed)."""
    out = old_artifact(tmp_path / "out")
    for name in ("calib", "fid"):
        (out / name).mkdir()
        for photo in photos[:2]:
            shutil.copy(photo, out / name)
    (out / "labels.txt").write_text("cat\ndog\n")
    before = files_of(out)
    static = {"precision": "int8", "quantization": "static", "overwrite": True, "progress": False}
    api_error(lambda: export_model(str(tiny_clip_dir), out, calibration=str(out / "calib"), **static), ArtifactError,
              f"is or holds '{out / 'calib'}', which `mmedge export` reads", "--overwrite would delete it")
    api_error(lambda: export_model(str(tiny_clip_dir), out, fidelity=str(out / "fid"), **static), ArtifactError,
              f"is or holds '{out / 'fid'}'")
    labels = {"labels": ["cat", "dog"], "labels_file": str(out / "labels.txt")}  # as the CLI reads --labels-file
    api_error(lambda: export_model(str(tiny_clip_dir), out, overwrite=True, progress=False, **labels), ArtifactError,
              f"is or holds '{out / 'labels.txt'}'")
    assert files_of(out) == before


# --- an output path that names no folder ---------------------------------------------------------------------------
def test_an_output_path_ending_in_dot_dot_is_refused_before_any_work(tiny_clip_dir, tmp_path, monkeypatch, capsys,
                                                                     nothing_loads):
    """'newout3/..' passed the checks, ran the whole export, then failed "Device or resource busy" (exit 1) leaving
    newout3/ with a hidden '....old-*' folder in it."""
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, ["export", tiny_clip_dir, "newout3/..", "--quiet"], ArtifactError,
                     "output path 'newout3/..' ends in '..'")
    assert "expected an output path whose last part is the folder's own name" in line
    (tmp_path / "sub").mkdir()
    api_error(lambda: export_model(str(tiny_clip_dir), "sub/..", overwrite=True, progress=False), ArtifactError,
              "is the current directory")
    old_artifact(tmp_path / "sub" / "art")
    api_error(lambda: export_model(str(tiny_clip_dir), "sub/art/..", overwrite=True, progress=False), ArtifactError,
              "is not empty and is not an mmedge artifact")
    with pytest.raises(ArtifactError, match="ends in '..'"):
        with atomic_folder(tmp_path / "sub" / "art" / "x" / ".."):
            raise AssertionError("the staging folder was made")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "sub", "sub/art", "sub/art/manifest.json"]


# --- the umask is read, never toggled --------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc/self/status")
def test_the_written_artifact_takes_the_umask_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to read it back made every other thread's files in that moment world-writable."""
    import mmedge.artifact as artifact

    previous = os.umask(0o027)
    try:
        def refuse(mask):
            raise AssertionError("the umask was set while an artifact was written")

        monkeypatch.setattr(artifact.os, "umask", refuse)
        with atomic_folder(tmp_path / "art") as stage:
            (stage / "manifest.json").write_text("{}")
            os.chmod(stage / "manifest.json", 0o600)  # a writer that makes its files private
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert (tmp_path / "art" / "manifest.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o750
