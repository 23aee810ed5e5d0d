"""What a loaded pipeline holds after it is dropped or closed (an audit of load / close cycles, 2026-12-07)."""

from __future__ import annotations

import gc
import weakref

import pytest

import mmedge
from mmedge.errors import BackendError


def test_a_captioner_dropped_without_close_is_freed_at_once(blip2_artifact, photos):
    """Its input builder held the Captioner's bound method: a reference cycle, so every dropped Captioner (with its
    sessions) waited for the garbage collector; with collection off, 100 of them held 1 GB."""
    gc.collect()
    gc.disable()
    try:
        captioner = mmedge.load(blip2_artifact, threads=1)
        captioner.caption(photos[0], max_new_tokens=2)
        gone = weakref.ref(captioner)
        del captioner
        assert gone() is None
    finally:
        gc.enable()


def test_a_closed_classifier_drops_its_label_banks_and_answers_nothing(clip_artifacts, photos):
    classifier = mmedge.load(clip_artifacts("fp32"), threads=1)
    classifier(photos[0], labels=["cat", "dog"])
    assert classifier.label_bank(["cat", "dog"]).shape[0] == 2
    classifier.close()
    assert not classifier._banks
    with pytest.raises(BackendError, match="this ZeroShotClassifier is closed"):
        classifier.label_bank(["cat", "dog"])  # it was answered from the cache after close()
    with pytest.raises(BackendError, match="this ZeroShotClassifier is closed.*load the artifact again"):
        classifier(photos[0], labels=["cat", "dog"])  # the vision runner's "create a new one" before


def test_pipelines_used_after_close_say_so(clip_artifacts, blip2_artifact, photos):
    """Past close() or its with block, a pipeline says it is closed and to load the artifact again; it had answered
    with its runner's words ("runner for 'vision' is closed; fix: create a new one")."""
    with mmedge.load(clip_artifacts("fp32"), task="embed", threads=1) as embedder:
        embedder.embed_texts(["a cat"])
    for call in (lambda: embedder.embed_texts(["a cat"]), lambda: embedder.embed_images(photos[0])):
        with pytest.raises(BackendError, match="this Embedder is closed"):
            call()
    with mmedge.load(blip2_artifact, threads=1) as captioner:
        pending = captioner.stream(photos[0], max_new_tokens=2)
    with pytest.raises(BackendError, match="this Captioner is closed"):
        captioner.caption(photos[0], max_new_tokens=2)
    with pytest.raises(BackendError, match="this Captioner is closed"):
        captioner.prompt_positions(photos[0])
    with pytest.raises(BackendError, match="this Captioner is closed"):
        next(iter(pending))  # a stream made before close(), read after it


def test_a_closed_runner_says_so_when_asked_its_providers(clip_artifacts):
    classifier = mmedge.load(clip_artifacts("fp32"), backend="onnxruntime", threads=1)
    runner = classifier.runners["vision"]
    assert runner.providers == ["CPUExecutionProvider"]
    classifier.close()
    with pytest.raises(BackendError, match="runner for 'vision' is closed"):
        runner.providers  # an AttributeError ('_session') before
