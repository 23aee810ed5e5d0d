"""An option that would change nothing is refused, never ignored: the one shape of the rule tables of
``mmedge export`` (``mmedge.export.option_checks``) and ``mmedge run`` (``mmedge.run_options``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from mmedge.errors import InputError


@dataclass(frozen=True)
class Rule:
    """``flag`` does something only when ``works(options, target)``; ``needs`` and ``fix`` say what would."""

    flag: str
    given: Callable[..., bool]
    works: Callable[..., bool]
    needs: str
    fix: str


def refuse_idle(rules: Iterable[Rule], options, target, where: str) -> None:
    """InputError (exit 2) for the first option given in ``options`` that would change nothing for ``target``;
    ``where`` ends the message's first part: "for this BLIP-2 caption artifact"."""
    for rule in rules:
        if rule.given(options) and not rule.works(options, target):
            raise InputError(f"{rule.flag} would change nothing {where}", rule.needs, rule.fix)
