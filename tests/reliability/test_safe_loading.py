"""Safe loading: weights come from safetensors; pickled checkpoints are refused unless --allow-pickle, and
even then go through torch.load(weights_only=True), so a pickle that runs code is refused before it runs.
Nothing touches the network at run time, nor at export from a local folder."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmedge
from mmedge.errors import ModelLoadError
from mmedge.export.loading import load_checkpoint
from tests.support.battery import api_error, cli_error

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


class RunsCode:
    """Unpickling this object calls os.mkdir(marker): code handed over as data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickled_checkpoint(source: Path, folder: Path, **extra) -> Path:
    """``source``'s checkpoint with its weights (plus ``extra`` objects) in a pickled pytorch_model.bin."""
    folder.mkdir()
    for name in SIDE_FILES:
        shutil.copy(source / name, folder / name)
    torch.save({**load_file(source / "model.safetensors"), **extra}, folder / "pytorch_model.bin")
    return folder


def test_pickled_checkpoint_refused_without_the_flag(capsys, tiny_clip_dir, tmp_path):
    folder = pickled_checkpoint(tiny_clip_dir, tmp_path / "pickled")
    api_error(lambda: load_checkpoint(str(folder)), ModelLoadError, "pytorch_model.bin", "--allow-pickle",
              "weights_only=True")
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError, "holds only pickled weights")
    assert not (tmp_path / "out").exists()


def test_allowed_pickle_of_plain_tensors_loads_the_same_weights(tiny_clip_dir, tmp_path):
    folder = pickled_checkpoint(tiny_clip_dir, tmp_path / "pickled")
    loaded = load_checkpoint(str(folder), allow_pickle=True).model.state_dict()
    reference = load_checkpoint(str(tiny_clip_dir)).model.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_allowed_pickle_that_runs_code_is_refused_before_it_runs(capsys, tiny_clip_dir, tmp_path):
    marker = tmp_path / "code-ran"
    folder = pickled_checkpoint(tiny_clip_dir, tmp_path / "evil", payload=RunsCode(marker))
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control: a plain pickle load runs it
    assert marker.is_dir()
    marker.rmdir()
    api_error(lambda: load_checkpoint(str(folder), allow_pickle=True), ModelLoadError,
              "refused to load the pickled weights",
              "weights_only=True")
    cli_error(capsys, ["export", folder, tmp_path / "out", "--allow-pickle", "--quiet"], ModelLoadError,
              "hold more than tensors")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_mistyped_checkpoint_folder_fails_at_once(tmp_path):
    api_error(lambda: load_checkpoint(str(tmp_path / "chekpoint")), ModelLoadError, "does not exist", "check the path")
    api_error(lambda: load_checkpoint("./models/clip"), ModelLoadError, "'./models/clip' does not exist")


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection or DNS lookup is recorded and fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError(101, "network access attempted during a test that forbids it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_no_network_at_run_time(no_network, clip_artifacts, blip2_artifact, photos, capsys):
    from mmedge.cli import main

    with mmedge.load(clip_artifacts("fp32")) as classifier:
        assert classifier(photos[0], labels=["cat", "dog"])
    with mmedge.load(blip2_artifact) as captioner:
        assert isinstance(captioner.caption(photos[0], max_new_tokens=3), str)
    assert main(["validate", str(clip_artifacts("fp32"))]) == 0
    assert main(["doctor", str(blip2_artifact)]) == 0
    capsys.readouterr()
    assert no_network == []


def test_no_network_when_exporting_from_a_local_folder(no_network, tiny_clip_dir, tiny_blip2_dir):
    assert load_checkpoint(str(tiny_clip_dir)).family == "clip"
    assert load_checkpoint(str(tiny_blip2_dir)).family == "blip2"
    assert no_network == []
