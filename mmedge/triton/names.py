"""The Triton model names a repository gets from its artifact folders, and the refusals of names that cannot work:
two artifacts that would share a prefix, a prefix that is another artifact's model name, and model folder names past
the file system's limit."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from mmedge.artifact import NAME_MAX_BYTES, Artifact
from mmedge.errors import ArtifactError, InputError

ALLOWED = "A-Za-z0-9_.-"  # the characters a model name keeps (Triton's names are folder names and URL parts)
_OTHERS = re.compile(f"[^{ALLOWED}]+")


def model_prefix(artifact: Artifact, path: str | os.PathLike | None = None) -> str:
    """The artifact folder's name as given (``path``; a symlink's own name; for ``.`` or ``..`` the folder's real
    name), as a Triton model name prefix (characters outside [A-Za-z0-9_.-] become '-')."""
    return _OTHERS.sub("-", given_name(artifact, path)).strip("-.") or "model"


def given_name(artifact: Artifact, path: str | os.PathLike | None = None) -> str:
    """The name of the artifact folder as given (a symlink's own name), or for ``.`` or ``..`` (whose
    ``Path.name`` is empty or "..") the real folder's."""
    name = Path(path).name if path is not None else ""
    return artifact.root.name if name in ("", ".", "..") else name


def refuse_shared_prefixes(paths: Sequence[str | os.PathLike], opened: Sequence[Artifact],
                           prefixes: Sequence[str]) -> None:
    """InputError where two artifacts would get the same model names: the same folder given twice, or two folders
    whose names agree in the characters a model name keeps."""
    seen: dict[str, int] = {}
    for index, prefix in enumerate(prefixes):
        if prefix not in seen:
            seen[prefix] = index
            continue
        first = seen[prefix]
        given = f"'{paths[first]}' and '{paths[index]}'"
        names = [given_name(opened[i], paths[i]) for i in (first, index)]
        if opened[first].root == opened[index].root and names[0] == names[1]:
            raise InputError(f"the artifact '{opened[index].root}' was given twice ({given})",
                             "each artifact folder once", "drop one of them from the command")
        renamed = [name for name in names if _OTHERS.sub("-", name).strip("-.") != name]
        why = (f" (only the characters {ALLOWED} survive in a model name: the others become '-', a leading or "
               "trailing '-' or '.' is dropped, and a name left empty becomes 'model')") if renamed else ""
        raise InputError(f"two artifacts would both be served as '{prefix}': {given}{why}",
                         "artifact folders whose names differ in the characters a model name keeps",
                         f"rename one of the folders (its name is the models' prefix), using only {ALLOWED}")


def refuse_prefixes_read_as_models(paths: Sequence[str | os.PathLike], prefixes: Sequence[str],
                                   models: Sequence[Sequence[str]]) -> None:
    """InputError where an artifact's prefix is the name of another artifact's model (``models``: each artifact's
    model names): artifact 'clip' serves its embeddings as 'clip-embed', so an artifact folder named 'clip-embed'
    beside it would leave ``connect(url, "clip-embed")`` (a pipeline's name or an artifact's prefix) two meanings.
    Two prefixes that give one model name always meet here first (the suffixes a name adds end no other suffix)."""
    for index, prefix in enumerate(prefixes):
        for other, names in enumerate(models):
            if other != index and prefix in names:
                raise InputError(f"the artifact '{paths[index]}' would be served under the prefix '{prefix}', which "
                                 f"is also the name of a model of the artifact '{paths[other]}' (prefix "
                                 f"'{prefixes[other]}'): a client asking for '{prefix}' could get either",
                                 f"a prefix that is none of the model names of '{paths[other]}' "
                                 f"({', '.join(models[other])})",
                                 f"serve '{paths[index]}' under another name: rename its folder, or pass a symlink to "
                                 "it named otherwise (the folder's name as given is its models' prefix)")


def refuse_long_names(path: str | os.PathLike, prefix: str, names: Sequence[str], out: str | os.PathLike) -> None:
    """ArtifactError for a model folder name past ``NAME_MAX_BYTES`` (``names``: the models of the artifact at
    ``path``, each starting with ``prefix``), before anything is written."""
    longest = max(names, key=lambda name: len(name.encode()), default="")
    size = len(longest.encode())
    if size > NAME_MAX_BYTES:
        keep = NAME_MAX_BYTES - (size - len(prefix.encode()))
        raise ArtifactError(f"the model folder '{longest[:40]}…' that --out '{out}' would get for '{path}' is "
                            f"{size} bytes long", f"model folder names of at most {NAME_MAX_BYTES} bytes (the file "
                            "system's limit)", "rename (or symlink) the artifact folder to a name of at most "
                            f"{max(keep, 1)} bytes: its name prefixes the models")
