"""argparse types for counts, so that a count below its least value is a usage error (exit 2) before any work."""

from __future__ import annotations

import argparse


def count(text: str) -> int:
    """A whole number of at least 1: threads, instances, workers, batch sizes."""
    return _whole_number(text, least=1)


def non_negative(text: str) -> int:
    """A whole number of at least 0: delays."""
    return _whole_number(text, least=0)


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}: expected a whole number of at least {least}")
    return value
