"""A graph's sha256 is checked once per version of the file on a device (``mmedge.file_checks``), not on every load;
any write to the file, a changed manifest, ``recheck`` and ``mmedge validate`` make it read again."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

import mmedge
import mmedge.artifact
from mmedge import file_checks
from mmedge.artifact import ENGINES_DIR, Artifact
from mmedge.errors import IntegrityError


@pytest.fixture
def artifact_copy(clip_artifacts, tmp_path):
    dest = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), dest, ignore=shutil.ignore_patterns(ENGINES_DIR))
    return dest


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files hashed, in order."""
    names: list[str] = []
    real = mmedge.artifact.sha256_file

    def counting(path):
        names.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(mmedge.artifact, "sha256_file", counting)
    return names


def check_graphs(folder, **options) -> None:
    artifact = Artifact.open(folder, **options)
    for name in artifact.components:
        artifact.component_path(name)


def test_a_graph_is_hashed_once_until_it_is_written(artifact_copy, hashed, photos):
    time.sleep(file_checks.RACY_SECONDS + 0.1)  # the copy's files were just written: older ones are recorded (and
    # the byte flipped below then gets a change time at least this much later, on any file system's clock)
    graphs = sorted(c["file"] for c in Artifact.open(artifact_copy).components.values())
    check_graphs(artifact_copy)
    assert sorted(hashed) == graphs
    record = json.loads((artifact_copy / ENGINES_DIR / file_checks.RECORD_FILE).read_text())
    assert sorted(record) == graphs and all(entry["sha256"] for entry in record.values())
    hashed.clear()
    check_graphs(artifact_copy)  # a new Artifact object, as a new process has: the record is trusted
    with mmedge.load(artifact_copy) as classifier:
        classifier(photos[0], labels=["cat", "dog"])
    assert [name for name in hashed if name in graphs] == []  # (the tokenizer was hashed: its first check)
    hashed.clear()
    check_graphs(artifact_copy, recheck=True)  # recheck: read whatever the record says
    assert sorted(hashed) == graphs
    hashed.clear()

    vision = artifact_copy / "vision.onnx"  # the same size and modification time, one byte changed
    stat, data = vision.stat(), bytearray(vision.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vision.write_bytes(bytes(data))
    os.utime(vision, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the change time cannot be set back
    with pytest.raises(IntegrityError, match="artifact file 'vision.onnx' in '.*' has sha256"):
        check_graphs(artifact_copy)
    assert hashed == ["vision.onnx"]


def test_a_changed_manifest_sha256_is_not_matched_by_the_record(artifact_copy, hashed, monkeypatch):
    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.0)
    check_graphs(artifact_copy)
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["components"]["vision"]["sha256"] = "0" * 64
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="but the manifest records 000000000000"):
        check_graphs(artifact_copy)


def test_a_file_written_just_now_is_not_recorded(artifact_copy, hashed):
    """Within RACY_SECONDS of a write, a second write in the same tick of a coarse clock could leave the times as they
    were: such a file is hashed on each load until it is older."""
    check_graphs(artifact_copy)
    assert not (artifact_copy / ENGINES_DIR / file_checks.RECORD_FILE).exists()
    hashed.clear()
    check_graphs(artifact_copy)
    assert len(hashed) == len(Artifact.open(artifact_copy).components)


def test_an_unwritable_or_unreadable_record_only_means_hashing(artifact_copy, hashed, monkeypatch):
    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.0)
    graphs = len(Artifact.open(artifact_copy).components)
    (artifact_copy / ENGINES_DIR).write_text("not a folder")  # as on read-only media: the record cannot be written
    check_graphs(artifact_copy)
    check_graphs(artifact_copy)
    assert len(hashed) == 2 * graphs
    (artifact_copy / ENGINES_DIR).unlink()
    (artifact_copy / ENGINES_DIR).mkdir()
    (artifact_copy / ENGINES_DIR / file_checks.RECORD_FILE).write_text("{truncated")
    hashed.clear()
    check_graphs(artifact_copy)  # unreadable: nothing trusted, and written anew
    assert len(hashed) == graphs
    assert len(json.loads((artifact_copy / ENGINES_DIR / file_checks.RECORD_FILE).read_text())) == graphs
    assert [p.name for p in (artifact_copy / ENGINES_DIR).iterdir()] == [file_checks.RECORD_FILE]  # no temporaries


def test_validate_hashes_every_file_again(artifact_copy, hashed, monkeypatch):
    from mmedge.validate import validate_artifact

    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.0)
    check_graphs(artifact_copy)
    hashed.clear()
    validate_artifact(artifact_copy)
    assert {c["file"] for c in Artifact.open(artifact_copy).components.values()} <= set(hashed)


def test_validate_checks_the_files_no_graph_opens(artifact_copy, hashed):
    """`mmedge validate` vouches for the whole folder: a flipped byte in the tokenizer (or an embedding table, or
    another backend's weights) fails it, where it used to pass and `mmedge run` then refused the artifact."""
    from mmedge.errors import IntegrityError
    from mmedge.validate import validate_artifact

    validate_artifact(artifact_copy)
    named = {name for _, name in Artifact.open(artifact_copy).named_files()}
    assert "tokenizer.json" in named and named <= set(hashed)
    data = bytearray((artifact_copy / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 1
    (artifact_copy / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="tokenizer.json"):
        validate_artifact(artifact_copy)
