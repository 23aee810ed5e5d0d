"""The runtime releases an artifact needs: pyproject.toml's floors are mmedge.versions', an export records the
releases it validated with, and a graph or tokenizer that this device's release is too old to read is reported as
that, with the upgrade to make (an older release is made here by recording a newer one than this machine has, and a
file this release truly cannot read: a graph of a future opset, a tokenizer of an unknown model type)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import onnx
import onnxruntime
import pytest
import tokenizers
import tomllib

import mmedge
from mmedge import versions
from mmedge.errors import BackendError, IntegrityError, TokenizerError
from tests.support.battery import api_error, edit_manifest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_states_the_floors_mmedge_checks_against():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(re.fullmatch(r"([A-Za-z]+)>=([\d.]+)", d).groups() for d in dependencies)
    assert floors["onnxruntime"] == versions.MIN_ONNXRUNTIME and floors["tokenizers"] == versions.MIN_TOKENIZERS


def test_an_export_records_the_releases_it_validated_with(clip_artifacts):
    manifest = json.loads((clip_artifacts("fp32") / "manifest.json").read_text())
    assert manifest["export"]["validated_with"] == {"onnxruntime": onnxruntime.__version__}
    assert manifest["tokenizer"]["tokenizers_version"] == tokenizers.__version__


def test_release_reads_leading_numbers():
    assert versions.release("1.23.0.dev20250101+cu126") == (1, 23, 0) and versions.release("0.20") == (0, 20)
    assert versions.older_than_needed("1.18.0", "1.22", "1.32.0", "validated on") == ("validated on 1.32.0", "1.32.0")
    assert versions.older_than_needed("1.18.0", "1.22", None, "validated on") == ("mmedge needs 1.22 or newer", "1.22")
    assert versions.older_than_needed("1.32.0", "1.22", "1.32.0", "validated on") is None


def _rehash(folder: Path, field: str) -> None:
    def edit(data):
        entry = data
        for key in field.split("."):
            entry = entry[key]
        entry["sha256"] = hashlib.sha256((folder / entry["file"]).read_bytes()).hexdigest()
    edit_manifest(folder, edit)


@pytest.fixture
def future_graph(clip_artifacts, tmp_path):
    """The CLIP artifact with its vision graph at an opset no ONNX Runtime has yet (rehashed: the file is intact)."""
    folder = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), folder)
    graph = onnx.load(str(folder / "vision.onnx"))
    next(o for o in graph.opset_import if o.domain in ("", "ai.onnx")).version = 999
    onnx.save(graph, str(folder / "vision.onnx"))
    _rehash(folder, "components.vision")
    return folder


def test_a_graph_an_older_onnxruntime_cannot_load_names_the_upgrade(future_graph):
    edit_manifest(future_graph, lambda data: data["export"]["validated_with"].update(onnxruntime="999.1.0"))
    api_error(lambda: mmedge.load(future_graph).close(), BackendError,
              f"ONNX Runtime {onnxruntime.__version__} could not load component 'vision' from 'vision.onnx'",
              "expected an onnxruntime release that runs this graph (the export validated it on 999.1.0)",
              'fix: upgrade onnxruntime (pip install -U "onnxruntime>=999.1.0"')


def test_without_a_newer_release_recorded_an_unloadable_graph_stays_an_integrity_error(future_graph):
    """An artifact written before the record (or by this release): nothing says an upgrade would help."""
    edit_manifest(future_graph, lambda data: data["export"].pop("validated_with"))
    api_error(lambda: mmedge.load(future_graph).close(), IntegrityError,
              "ONNX Runtime could not load component 'vision' from 'vision.onnx'", "re-export the artifact")


def test_a_tokenizer_an_older_tokenizers_cannot_read_names_the_upgrade(clip_artifacts, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["type"] = "BPE2"  # a model type a later release might write
    (folder / "tokenizer.json").write_text(json.dumps(data))
    _rehash(folder, "tokenizer")
    edit_manifest(folder, lambda manifest: manifest["tokenizer"].update(tokenizers_version="999.0.0"))
    api_error(lambda: mmedge.load(folder).close(), TokenizerError,
              f"cannot be read by tokenizers {tokenizers.__version__}",
              "expected a tokenizers release that reads it (the export wrote it with 999.0.0)",
              'fix: upgrade it: pip install -U "tokenizers>=999.0.0"')
    edit_manifest(folder, lambda manifest: manifest["tokenizer"].pop("tokenizers_version"))
    api_error(lambda: mmedge.load(folder).close(), TokenizerError, "cannot be read (", "re-export the artifact")


def test_doctor_warns_of_two_onnxruntime_builds_sharing_one_module(tmp_path, monkeypatch, capsys):
    """`pip install mmedge` beside onnxruntime-gpu adds the CPU build: two distributions, one module, and the one
    installed last decides the providers. doctor says so and which to keep (the second build is a distribution's
    metadata on sys.path, as pip leaves it)."""
    from mmedge.cli import main

    info = tmp_path / "onnxruntime_gpu-1.22.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.22.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert (f"onnxruntime: WARNING: onnxruntime {onnxruntime.__version__} and onnxruntime-gpu 1.22.0 are installed "
            "together; they share one onnxruntime module") in out
    assert ("pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu==1.22.0 (or "
            "onnxruntime-gpu's own wheel, as a Jetson's came)") in out
    monkeypatch.undo()
    assert main(["doctor"]) == 0 and "WARNING" not in capsys.readouterr().out


def test_a_patch_release_apart_or_a_failure_no_release_mends_names_no_upgrade(future_graph, clip_artifacts, tmp_path):
    """Patch releases add no operator; out of memory, a provider that fails to start or a graph broken inside
    (an intact file ONNX Runtime refuses for its own reasons) is no version matter: those keep the original error."""
    major, minor, patch = (onnxruntime.__version__.split(".") + ["0"])[:3]
    assert versions.older_than_needed(f"{major}.{minor}.{patch}", "1.22", f"{major}.{minor}.{int(patch) + 1}",
                                      "validated on") is None
    edit_manifest(future_graph, lambda data: data["export"]["validated_with"].update(
        onnxruntime=f"{major}.{minor}.{int(patch) + 1}"))
    api_error(lambda: mmedge.load(future_graph).close(), IntegrityError, "re-export the artifact")
    folder = tmp_path / "broken"
    shutil.copytree(clip_artifacts("fp32"), folder)
    graph = onnx.load(str(folder / "vision.onnx"))
    graph.graph.node[0].input[0] = "a_tensor_nothing_makes"  # intact protobuf, a graph no release can run
    onnx.save(graph, str(folder / "vision.onnx"))
    _rehash(folder, "components.vision")
    edit_manifest(folder, lambda data: data["export"]["validated_with"].update(onnxruntime="999.1.0"))
    api_error(lambda: mmedge.load(folder).close(), IntegrityError, "ONNX Runtime could not load component 'vision'",
              "re-export the artifact")
