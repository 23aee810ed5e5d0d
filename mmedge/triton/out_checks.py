"""What `mmedge triton` checks about ``--out`` before it reads an artifact, beside ``check_output_folder``'s checks
(that the repository can be written there): that it is not inside an artifact folder, and, with ``--overwrite``,
that the repository it would replace holds only what mmedge wrote (``.mmedge-repository.json`` lists its models)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from mmedge.errors import ArtifactError

MARKER_FILE = ".mmedge-repository.json"  # at the root: written by mmedge, so --overwrite may replace it
MODEL_FILES = ("config.pbtxt", "1")  # what mmedge writes in a model folder (the config and version 1)


def written_models(folder: Path) -> set[str] | None:
    """The models ``folder``'s marker lists (a repository `mmedge triton` wrote), or None where it has no readable
    marker."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        return {model for models in marker["models"].values() for model in models}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def unwritten_entries(folder: Path) -> list[str]:
    """What ``folder`` (a repository mmedge wrote) holds that mmedge did not write: entries beside its models and
    marker, and entries in a model folder beside its config and version folder ("model/2")."""
    models = written_models(folder) or set()
    found = []
    for entry in sorted(os.listdir(folder)):
        if entry == MARKER_FILE:
            continue
        if entry not in models:
            found.append(entry)
        elif (folder / entry).is_dir() and not (folder / entry).is_symlink():
            found += [f"{entry}/{inner}" for inner in sorted(os.listdir(folder / entry)) if inner not in MODEL_FILES]
        else:
            found.append(entry)
    return found


def is_repository(folder: Path) -> bool:
    """Whether ``folder`` is a model repository `mmedge triton` wrote (its marker lists every model in it) and holds
    nothing else: what ``--overwrite`` may replace."""
    return written_models(folder) is not None and not unwritten_entries(folder)


def refuse_unwritten_entries(out: str | os.PathLike) -> None:
    """With ``--overwrite``: ArtifactError naming what a repository mmedge wrote holds that mmedge did not write (a
    user's own model folder, notes), which replacing it would delete."""
    folder = Path(out)
    if not folder.is_dir() or written_models(folder) is None:
        return  # not mmedge's repository: check_output_folder says what it is
    found = unwritten_entries(folder)
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise ArtifactError(f"--out '{out}' is a repository mmedge wrote, but it also holds what mmedge did not write "
                            f"({shown}): --overwrite would delete it",
                            f"with --overwrite, a repository holding only the models mmedge wrote (its {MARKER_FILE} "
                            "lists them)", f"move {'it' if len(found) == 1 else 'them'} out of '{out}' first, or "
                            "choose another --out")


def refuse_out_inside(out: str | os.PathLike, artifacts: Iterable[str | os.PathLike]) -> None:
    """ArtifactError where ``out`` lies inside one of the artifact folders being read."""
    real = Path(out).resolve()
    for path in artifacts:
        root = Path(path).resolve()
        if root in real.parents:
            raise ArtifactError(f"--out '{out}' is inside the artifact folder '{path}'",
                                "--out outside the artifact folders it reads (an artifact folder holds what `mmedge "
                                "export` wrote: it is copied to devices whole)",
                                f"choose an --out outside '{path}', e.g. beside it")
