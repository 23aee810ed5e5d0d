"""`mmedge triton`: where the repository goes (--out) and the model names it gets, refused before anything is written
when they cannot work, with messages that name --out or the artifacts; real folders, real file-system limits."""

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mmedge.errors import ArtifactError, InputError
from mmedge.triton import write_repository
from mmedge.triton.repository import MARKER_FILE
from tests.support.battery import api_error, cli_error


@pytest.fixture(scope="module")
def clip(clip_artifacts, tmp_path_factory):
    """The tiny CLIP artifact, as a symlink named 'clip'."""
    link = tmp_path_factory.mktemp("triton-out") / "clip"
    link.symlink_to(clip_artifacts("fp32"), target_is_directory=True)
    return link


def copy_artifact(source: Path, dest: Path) -> Path:
    shutil.copytree(source.resolve(), dest, ignore=shutil.ignore_patterns("engines"))
    return dest


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_overwrite_refuses_a_repository_holding_what_mmedge_did_not_write(clip, tmp_path, capsys):
    """The marker lists the models mmedge wrote: a user's own model folder, notes, or a version folder they added
    to one of mmedge's models would be deleted by --overwrite, so it is refused, naming them."""
    repo = tmp_path / "repo"
    written = write_repository([clip], repo)
    (repo / "my_ensemble" / "1").mkdir(parents=True)
    (repo / "my_ensemble" / "config.pbtxt").write_text('name: "my_ensemble"\n')
    (repo / "NOTES.txt").write_text("mine")
    (repo / "clip__vision" / "2").mkdir()
    api_error(lambda: write_repository([clip], repo, overwrite=True), ArtifactError,
              f"--out '{repo}' is a repository mmedge wrote, but it also holds what mmedge did not write "
              "(NOTES.txt, clip__vision/2, my_ensemble)", "move them out")
    cli_error(capsys, ["triton", clip, "--out", repo, "--overwrite", "--quiet"], ArtifactError, "my_ensemble")
    assert (repo / "NOTES.txt").read_text() == "mine" and (repo / "my_ensemble" / "config.pbtxt").is_file()
    assert (repo / "clip__vision" / "2").is_dir() and leftovers(tmp_path) == []
    shutil.rmtree(repo / "my_ensemble")
    (repo / "NOTES.txt").unlink()
    (repo / "clip__vision" / "2").rmdir()
    assert write_repository([clip], repo, overwrite=True) == written  # only mmedge's models: replaced
    assert json.loads((repo / MARKER_FILE).read_text())["models"] == written


def test_an_artifact_given_as_dot_dot_keeps_its_folder_name(clip, tmp_path, monkeypatch):
    artifact = copy_artifact(clip, tmp_path / "clip-b32")
    (artifact / "sub").mkdir()
    monkeypatch.chdir(artifact / "sub")
    written = write_repository([".."], tmp_path / "repo")
    assert written[".."] == ["clip-b32__vision", "clip-b32__text", "clip-b32-zero-shot", "clip-b32-embed"]
    monkeypatch.chdir(artifact)
    assert write_repository(["."], tmp_path / "repo2")["."][0] == "clip-b32__vision"


def test_the_same_artifact_twice_is_named_as_such(clip, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(clip.parent)
    api_error(lambda: write_repository(["clip", "./clip/"], tmp_path / "repo"), InputError,
              "was given twice ('clip' and './clip/')", "drop one of them")
    cli_error(capsys, ["triton", "clip", "./clip/", "--out", tmp_path / "repo"], InputError, "was given twice")
    assert not (tmp_path / "repo").exists()


def test_names_that_lose_every_character_collide_with_the_rule_named(clip, tmp_path):
    for name in ("日本", "中文"):
        (tmp_path / name).symlink_to(clip.resolve(), target_is_directory=True)
    api_error(lambda: write_repository([tmp_path / "日本", tmp_path / "中文"], tmp_path / "repo"), InputError,
              "would both be served as 'model'", "only the characters A-Za-z0-9_.- survive in a model name")
    assert not (tmp_path / "repo").exists()


def test_a_prefix_that_is_another_artifacts_model_name_is_refused_naming_both(clip, clip_artifacts, tmp_path,
                                                                              capsys):
    """Artifact 'clip' serves its embeddings as 'clip-embed': a fused CLIP in a folder named 'clip-embed' beside it
    was written too, and connect(url, "clip-embed") then reached clip's Embedder. Refused in either order, naming
    both artifacts; under another name (a symlink) the two are written."""
    fused = tmp_path / "clip-embed"
    fused.symlink_to(clip_artifacts("fused-fp32"), target_is_directory=True)
    for artifacts in ([clip, fused], [fused, clip]):
        api_error(lambda: write_repository(artifacts, tmp_path / "repo"), InputError,
                  f"the artifact '{fused}' would be served under the prefix 'clip-embed', which is also the name of a "
                  f"model of the artifact '{clip}' (prefix 'clip')", "clip-zero-shot, clip-embed)",
                  "rename its folder, or pass a symlink to it named otherwise")
    cli_error(capsys, ["triton", clip, fused, "--out", tmp_path / "repo"], InputError, "'clip-embed'")
    assert not (tmp_path / "repo").exists()
    renamed = tmp_path / "clip-fused"
    renamed.symlink_to(fused.resolve(), target_is_directory=True)
    assert list(write_repository([clip, renamed], tmp_path / "repo")) == [str(clip), str(renamed)]


def test_out_under_a_file_is_refused_naming_out(clip, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = afile / "repo"
    api_error(lambda: write_repository([clip], out), ArtifactError, f"output path '{out}' cannot be written: "
              f"'{afile}' is a file, not a folder")
    cli_error(capsys, ["triton", clip, "--out", out], ArtifactError, "is a file, not a folder")
    deeper = afile / "a" / "b" / "repo"
    api_error(lambda: write_repository([clip], deeper), ArtifactError, f"'{afile}' is a file")


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder`` made unwritable: its mode, and for root (whom modes do not stop) the immutable attribute."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder unwritable here (root, without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_an_unwritable_parent_is_refused_naming_out(clip, tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    with unwritable(locked):
        out = locked / "repo"
        api_error(lambda: write_repository([clip], out), ArtifactError, f"output path '{out}' cannot be written: its "
                  f"folder, '{locked}', is not writable")
        cli_error(capsys, ["triton", clip, "--out", locked / "new" / "repo"], ArtifactError,
                  f"the nearest existing folder above it, '{locked}', is not writable")
        assert list(locked.iterdir()) == []


def test_a_write_that_fails_anyway_is_typed_and_names_out(clip):
    """/proc takes no new folders (root passes the permission check, and then the write fails): the failure is
    mmedge's, naming --out, and nothing is left."""
    api_error(lambda: write_repository([clip], "/proc/repo"), ArtifactError, "--out '/proc/repo'")


def test_names_past_the_file_systems_limit_are_refused_before_writing(clip, tmp_path, capsys):
    """The longest model name is the prefix and "-zero-shot" (10 bytes): a 246-byte folder name makes a 256-byte
    model folder, refused before anything is written; 245 bytes fit (and are written)."""
    long_artifact = tmp_path / ("a" * 246)
    long_artifact.symlink_to(clip.resolve(), target_is_directory=True)
    api_error(lambda: write_repository([long_artifact], tmp_path / "repo"), ArtifactError,
              f"that --out '{tmp_path / 'repo'}' would get", "is 256 bytes long", "at most 245 bytes")
    assert not (tmp_path / "repo").exists() and leftovers(tmp_path) == []
    long_out = tmp_path / ("r" * 240)
    cli_error(capsys, ["triton", clip, "--out", long_out], ArtifactError, "has a name of 240 bytes",
              "shorter output name")
    assert not long_out.exists() and leftovers(tmp_path) == []
    fits = tmp_path / ("a" * 245)
    fits.symlink_to(clip.resolve(), target_is_directory=True)
    assert ("a" * 245 + "-zero-shot") in write_repository([fits], tmp_path / "repo")[str(fits)]


def test_out_inside_an_artifact_folder_is_refused(clip, tmp_path, capsys):
    artifact = copy_artifact(clip, tmp_path / "clip")
    before = sorted(p.name for p in artifact.iterdir())
    api_error(lambda: write_repository([artifact], artifact / "repo"), ArtifactError,
              f"--out '{artifact / 'repo'}' is inside the artifact folder '{artifact}'")
    cli_error(capsys, ["triton", clip, artifact, "--out", artifact / "a" / "repo"], ArtifactError,
              "is inside the artifact folder")
    assert sorted(p.name for p in artifact.iterdir()) == before
