"""`mmedge triton` hard-links the artifact's files into the repository, which changes their change time (and so
their identity in this device's record of sha256 checks, ``mmedge.file_checks``): the record is carried to the new
identity, so the artifact's next local load does not hash its graphs again. Real files, real links, real records."""

import shutil
import time

import pytest

import mmedge.artifact
from mmedge import file_checks
from mmedge.artifact import Artifact
from mmedge.triton import Options, write_repository


@pytest.fixture
def artifact(clip_artifacts, tmp_path):
    """A fresh copy of the tiny CLIP artifact (no record of checks yet)."""
    return shutil.copytree(clip_artifacts("fp32"), tmp_path / "clip", ignore=shutil.ignore_patterns("engines"))


def hashed_by_next_load(folder, monkeypatch) -> list[str]:
    """The files a new load of ``folder`` hashes before its graphs can be used."""
    hashed = []
    real = mmedge.artifact.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mmedge.artifact, "sha256_file", counting)
    loaded = Artifact.open(folder)
    for name in loaded.components:
        loaded.component_path(name)
    monkeypatch.setattr(mmedge.artifact, "sha256_file", real)
    return hashed


def test_the_next_load_trusts_the_checks_the_repository_write_made(artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.0)  # the copy is new: its checks may be recorded at once
    graph = artifact / "vision.onnx"
    write_repository([artifact], tmp_path / "repo", Options(platform="python"))
    assert graph.stat().st_nlink == 3  # the component model's and the inline zero-shot pipeline's links
    assert hashed_by_next_load(artifact, monkeypatch) == []
    write_repository([artifact], tmp_path / "repo", Options(platform="python"), overwrite=True)  # links replaced
    assert hashed_by_next_load(artifact, monkeypatch) == []


@pytest.mark.parametrize("worth_waiting", [True, False])
def test_the_record_waits_out_its_racy_window_only_where_rehashing_costs_more(artifact, tmp_path, monkeypatch,
                                                                              worth_waiting):
    """Within RACY_SECONDS of the links the record takes nothing; the write waits the rest out where hashing the
    files again would take longer than that (a big artifact), and leaves a small one to be hashed at its next load."""
    import mmedge.triton.placing as placing

    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.5)
    monkeypatch.setattr(placing, "HASH_BYTES_PER_SECOND", 1.0 if worth_waiting else 1e30)
    time.sleep(0.6)  # the copy's own change times leave the racy window: its checks are recorded
    started = time.monotonic()
    write_repository([artifact], tmp_path / "repo")
    waited = time.monotonic() - started
    hashed = hashed_by_next_load(artifact, monkeypatch)
    if worth_waiting:
        assert hashed == [] and waited >= 0.5
    else:
        assert sorted(hashed) == sorted(c["file"] for c in Artifact.open(artifact).components.values())
