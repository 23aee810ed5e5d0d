"""The benchmarks' export cache (``benchmarks/_common.export_once``): an artifact made with the exporter's current
default recipes is reused, one from an older recipe revision (or with none recorded) is exported again."""

import json
import sys
from pathlib import Path

import pytest

from mmedge.manifest import RECIPE_REVISION

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import export_once  # noqa: E402


def _artifact(folder: Path, revision: str | None) -> Path:
    folder.mkdir()
    export = {"memory": None} | ({"recipe_revision": revision} if revision else {})
    (folder / "manifest.json").write_text(json.dumps({"format": "mmedge.artifact", "export": export}))
    return folder


@pytest.mark.parametrize("revision,reused", [(RECIPE_REVISION, True), ("2000-01-01.1", False), (None, False)])
def test_a_cached_export_is_reused_only_when_made_with_the_current_recipes(tmp_path, capsys, revision, reused):
    folder = _artifact(tmp_path / "a", revision)
    calls = []
    result = export_once("a", folder, True, lambda: calls.append("exported"))
    assert result["cached"] is reused and calls == ([] if reused else ["exported"])
    assert ("predates the exporter's recipe revision" in capsys.readouterr().err) is not reused


def test_a_cache_the_caller_rejects_is_exported_again(tmp_path):
    folder = _artifact(tmp_path / "a", RECIPE_REVISION)
    calls = []
    assert export_once("a", folder, False, lambda: calls.append("exported"))["cached"] is False and calls
