"""Progress for long steps (loading, tracing, calibration, engine builds), on stderr.

On a terminal a counter redraws in place; in logs and CI each step prints a line when it starts and
one when it ends, and each item of a step one line, so a minutes-long step is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0

    def _write(self, text: str, end: str = "\n") -> None:
        if self.enabled:
            self.stream.write(text + end)
            self.stream.flush()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        prefix = f"[{self.done}/{self.total}] {text}"
        self._write(prefix + " ...", end="\r" if self._tty() else "\n")
        yield
        self._write(f"{prefix} ... done ({time.perf_counter() - start:.1f} s)")

    def items(self, iterable: Iterable[T], total: int, text: str) -> Iterator[T]:
        """Yield from ``iterable``, showing ``text i/total`` (in place on a terminal)."""
        for i, item in enumerate(iterable, 1):
            self._write(f"    {text} {i}/{total}", end="\r" if self._tty() else "\n")
            yield item
        if self._tty():
            self._write(" " * (len(text) + 20), end="\r")

    def _tty(self) -> bool:
        return self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
