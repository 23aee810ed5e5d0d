"""Checks shared by the settings dataclasses of the backends (``OrtOptions``, ``OvOptions``, ``TorchSettings``) and
``mmedge.load``'s ``threads``: what a user passes in ``backend_options`` (or ``--backend-option``) is judged before
anything is loaded, with the same wording wherever it is given."""

from __future__ import annotations

import numbers
from typing import Any

from mmedge.errors import InputError


def is_whole(value: Any, least: int) -> bool:
    """Whether ``value`` is an int (a bool is not one) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def as_count(value: Any, least: int) -> int | None:
    """``value`` as a plain int when it is an integer of at least ``least`` (a numpy integer too, as generation
    settings take one; a bool is not one), else None. For a call's own counts (``threads``, ``top_k``), which are
    used at once; backend settings stay plain ints (``is_whole``), since they are stored and handed on."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        return None
    return int(value)


def check_switch(name: str, value: Any, none_means: str | None = None) -> None:
    """InputError unless ``value`` is True or False, or None where ``none_means`` says what None does."""
    if not isinstance(value, bool) and not (value is None and none_means):
        raise InputError(f"{name} is {value!r}", "True or False" + (f" (or None: {none_means})" if none_means else ""),
                         f"pass {name}=True or {name}=False")
