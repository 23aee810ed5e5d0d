"""argparse types and actions shared by the ``mmedge`` subcommands (and the example scripts), so that a bad value is a
usage error (exit 2) before any work: a count below its least value, an empty string (``--triton ""`` read as "not
given" would quietly run something else), an option given twice that keeps one value, an output folder a script
would not replace."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# the _Parser of mmedge.cli prints these after "--flag ": "--labels-file is empty; expected ...; fix: ..."
EMPTY = "is empty"


def count(text: str) -> int:
    """A whole number of at least 1: threads, instances, workers, batch sizes."""
    return _whole_number(text, least=1)


def non_negative(text: str) -> int:
    """A whole number of at least 0: delays."""
    return _whole_number(text, least=0)


def threads(text: str) -> int:
    """CPU threads per graph: a whole number from 1 to ``mmedge.api.THREADS_PER_CORE_CAP`` per core of this machine
    (the check ``mmedge.load`` makes, in the flag's words)."""
    value = count(text)
    from mmedge.api import THREADS_PER_CORE_CAP

    cores = os.cpu_count() or 1
    if value > THREADS_PER_CORE_CAP * cores:
        raise argparse.ArgumentTypeError(
            f"{value} is above {THREADS_PER_CORE_CAP * cores}: expected at most {THREADS_PER_CORE_CAP * cores} on "
            f"this machine ({THREADS_PER_CORE_CAP} per core, {cores} cores: more threads than cores wait on each "
            f"other); fix: pass --threads {cores} or fewer, or drop --threads for all cores")
    return value


def whole_number_between(least: int, most: int):
    """A type: a whole number from ``least`` to ``most``."""

    def judged(text: str) -> int:
        value = _whole_number(text, least)
        if value > most:
            raise argparse.ArgumentTypeError(f"{value} is above {most}: expected a whole number from {least} to "
                                             f"{most}")
        return value

    judged.__name__ = "whole number"
    return judged


def export_folder(value: str) -> Path:
    """The ``--out`` of a script that exports an artifact there when it is missing or stale (examples/zero_shot.py):
    a new path, an empty folder, or an mmedge artifact (replaced once the new export is complete). A file, or a
    folder holding anything else, is refused before any work, in the script's own terms (the export's refusal names
    an --overwrite such a script does not have)."""
    from mmedge.artifact import check_output_folder, is_artifact_folder
    from mmedge.errors import ArtifactError

    path = Path(text(value))
    if is_artifact_folder(path):
        return path  # maybe up to date: a script only reads it, from read-only storage too (a container image)
    if os.path.lexists(path) and not (path.is_dir() and not any(path.iterdir())):
        what = "a file" if path.is_file() else "a folder that holds no mmedge artifact" if path.is_dir() else \
            "a broken symbolic link"
        raise argparse.ArgumentTypeError(f"'{value}' is {what}, which this script does not replace; expected a new "
                                         "path, an empty folder or an artifact it exported there before; fix: choose "
                                         "another --out, e.g. artifacts/NAME")
    try:  # what is left for the export to refuse: the current directory, a path that cannot be written
        check_output_folder(path, overwrite=True)
    except ArtifactError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return path


def text(value: str) -> str:
    """A non-empty string: a prompt, a question, a label, a URL, a path (an empty one is not "not given")."""
    if not value:
        raise argparse.ArgumentTypeError(f"{EMPTY}; expected a non-empty value; fix: give one, or drop the option")
    return value


class Once(argparse.Action):
    """A single-value option: given twice, refused (argparse keeps the last one and drops the first quietly)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, f"given twice ('{getattr(namespace, self.dest)}', '{values}'); "
                                         "expected it once; fix: keep one of them")
        setattr(namespace, self.dest, values)


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}: expected a whole number of at least {least}")
    return value
