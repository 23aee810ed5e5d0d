"""What every case of the reliability battery asserts, from the API and from the CLI.

A refused input must raise the typed mmedge error for its kind, whose message names the problem
(``fragments``) and says what was expected and what to do; the CLI must print exactly one
``mmedge: error:`` line, exit with that error's code, and show no traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from mmedge.cli import main
from mmedge.errors import MmedgeError


def check_error(error: BaseException, kind: type[MmedgeError], *fragments: str) -> MmedgeError:
    """``error`` is a ``kind`` whose what / expected / fix are all filled and whose text holds ``fragments``."""
    assert isinstance(error, kind), f"{type(error).__name__} is not a {kind.__name__}: {error}"
    assert error.what and error.expected and error.fix, str(error)
    text = str(error)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return error


def api_error(call: Callable[[], Any], kind: type[MmedgeError], *fragments: str) -> MmedgeError:
    """Run ``call``; it must raise a ``kind`` (see ``check_error``)."""
    with pytest.raises(MmedgeError) as info:
        call()
    return check_error(info.value, kind, *fragments)


def cli_error(capsys, argv: list[Any], kind: type[MmedgeError], *fragments: str) -> str:
    """Run the CLI in-process; it must exit with ``kind.exit_code`` after one error line. Returns the line."""
    capsys.readouterr()  # drop what came before (e.g. a fixture's export progress)
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == kind.exit_code, f"exit {code}, expected {kind.exit_code} ({kind.__name__}): {err}"
    assert len(lines) == 1 and lines[0].startswith("mmedge: error: "), err
    assert "Traceback" not in err and "expected" in lines[0] and "fix:" in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- tampering with a copied artifact -----------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, data: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(data))


def edit_manifest(folder: Path, edit: Callable[[dict], Any]) -> None:
    data = read_manifest(folder)
    edit(data)
    write_manifest(folder, data)


def replace_component_file(folder: Path, component: str, data: bytes, *, rehash: bool) -> None:
    """Overwrite a component's graph; with ``rehash`` the manifest's sha256 is updated to match, so the
    file gets past the integrity check and reaches the engine."""
    manifest = read_manifest(folder)
    (folder / manifest["components"][component]["file"]).write_bytes(data)
    if rehash:
        manifest["components"][component]["sha256"] = hashlib.sha256(data).hexdigest()
        write_manifest(folder, manifest)
