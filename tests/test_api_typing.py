"""The public API's types ship (PEP 561) and its advice agrees with its limits (``threads``)."""

import inspect
import os
from pathlib import Path

import pytest

import mmedge
from mmedge.api import THREADS_PER_CORE_CAP, check_threads
from mmedge.errors import InputError
from mmedge.pipelines import Captioner, Embedder, ZeroShotClassifier

ROOT = Path(__file__).resolve().parents[1]


def test_thread_advice_names_the_limit_it_checks(monkeypatch):
    """threads=9 on 2 cores said "expected at most 8 ...; fix: ask for 2 threads or fewer", while 8 is taken."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    limit = THREADS_PER_CORE_CAP * 2
    with pytest.raises(InputError, match=rf"expected at most {limit} on this machine .*fix: ask for {limit} threads "
                                         r"or fewer \(2, one per core, is usually fastest\)"):
        check_threads(limit + 1)
    assert check_threads(limit) == limit


def test_the_package_ships_its_type_marker():
    assert (ROOT / "mmedge" / "py.typed").is_file()
    assert '"mmedge" = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()  # [tool.setuptools.package-data]


@pytest.mark.parametrize("function", [
    mmedge.load, Captioner.caption, Captioner.ask, Captioner.generate, Captioner.stream, ZeroShotClassifier.__call__,
    ZeroShotClassifier.probabilities, ZeroShotClassifier.label_bank, Embedder.embed_images, Embedder.embed_texts,
    Embedder.similarity,
], ids=lambda f: f.__qualname__)
def test_public_calls_say_what_they_return(function):
    assert inspect.signature(function).return_annotation is not inspect.Signature.empty
