"""Checks shared by the settings dataclasses of the backends (``OrtOptions``, ``OvOptions``, ``TorchSettings``) and
``mmedge.load``'s ``threads``: what a user passes in ``backend_options`` (or ``--backend-option``) is judged before
anything is loaded, with the same wording wherever it is given."""

from __future__ import annotations

from typing import Any

from mmedge.errors import InputError


def is_whole(value: Any, least: int) -> bool:
    """Whether ``value`` is an int (a bool is not one) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_switch(name: str, value: Any, none_means: str | None = None) -> None:
    """InputError unless ``value`` is True or False, or None where ``none_means`` says what None does."""
    if not isinstance(value, bool) and not (value is None and none_means):
        raise InputError(f"{name} is {value!r}", "True or False" + (f" (or None: {none_means})" if none_means else ""),
                         f"pass {name}=True or {name}=False")
