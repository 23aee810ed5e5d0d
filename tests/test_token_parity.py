"""``tests/support/token_parity.py`` (how generated tokens are compared across backends and precisions) on real
ONNX Runtime decoders: a candidate that differs from the reference only at a near-tie passes; a broken one fails."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mmedge
from tests.support.token_parity import compare_generation


class Faulty:
    """A second decoder over the same artifact with a fault: ``logits(call, rows)`` edits the logits of the
    ``call``-th start/step; ``feed`` changes the ids it is fed, ``rows`` the rows of a cache reorder."""

    def __init__(self, decoder, logits=None, feed=None, rows=None):
        self.decoder, self.logits, self.feed, self.rows = decoder, logits, feed, rows
        self.vocab_size, self.max_positions, self.calls = decoder.vocab_size, getattr(decoder, "max_positions", None), 0

    def _out(self, logits):
        logits = np.array(logits, np.float32)
        if self.logits is not None:
            self.logits(self.calls, logits)
        self.calls += 1
        return logits

    def start(self, embeds, mask):
        self.calls = 0
        return self._out(self.decoder.start(embeds, mask))

    def step(self, ids, mask):
        return self._out(self.decoder.step(self.feed(ids) if self.feed else ids, mask))

    def reorder(self, rows):
        self.decoder.reorder(self.rows(rows) if self.rows else rows)


@pytest.fixture(scope="module")
def pair(blip2_artifact):
    """(reference, candidate pipeline, the batch's inputs) on the tiny random BLIP-2, whose margins vary widely.
    Every comparison starts both decoders afresh, so one pair serves the module."""
    from tests.conftest import HOLDOUT

    photos = [str(p) for p in HOLDOUT]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, other = mmedge.load(blip2_artifact,
                                       backend="onnxruntime"), mmedge.load(blip2_artifact, backend="onnxruntime")
    built = reference.inputs.for_images(photos[:3], None, 12)
    yield reference, other, (built["embeds"], built["mask"], built["ids"])
    reference.close()
    other.close()


def _compare(pair, candidate, **settings):
    reference, _, inputs = pair
    config = reference._config({"max_new_tokens": 12, **settings})
    return compare_generation(reference.decoder, candidate, inputs, inputs, config)


def _nudge(step: int, row: int, size: float):
    """A fault that lowers the best logit of (step, row) and raises the second by ``size`` each."""
    def fault(call, logits):
        if call == step:
            first, second = np.argsort(logits[row])[::-1][:2]
            logits[row, first] -= size
            logits[row, second] += size
    return fault


def test_a_flip_at_the_narrowest_margin_passes(pair):
    """The step with the narrowest margin flips (as rounding may): the rows differ after it, and the check passes."""
    honest = _compare(pair, Faulty(pair[1].decoder))
    honest.check(1 - 1e-6)
    assert honest.candidate == honest.reference and honest.decided_everywhere
    margins = np.where(honest.live, honest.margins, np.inf)
    step, row = np.unravel_index(np.argmin(margins), margins.shape)
    report = _compare(pair, Faulty(pair[1].decoder, logits=_nudge(step, row, 0.51 * margins[step, row])))
    report.check(0.9999)
    assert report.candidate[row][step] != report.reference[row][step]
    assert report.first_unsafe(row) <= step and not report.decided_everywhere


def test_a_flip_at_a_wide_margin_fails(pair):
    """Flipping the widest decision takes an error the FP32 cosine floor sees; under a looser floor the error bound
    it implies leaves too few steps decided, and the check still refuses to pass."""
    honest = _compare(pair, Faulty(pair[1].decoder))
    margins = np.where(honest.live, honest.margins, -np.inf)
    step, row = np.unravel_index(np.argmax(margins), margins.shape)
    report = _compare(pair, Faulty(pair[1].decoder, logits=_nudge(step, row, 0.51 * margins[step, row])))
    with pytest.raises(AssertionError, match="cosine"):
        report.check(0.9999)
    with pytest.raises(AssertionError, match="decided"):
        report.check(0.99)


def test_a_wrong_cache_fails_on_the_logits_cosine(pair):
    """The candidate's cache holds other tokens than it was fed (a broken step)."""
    report = _compare(pair, Faulty(pair[1].decoder, feed=lambda ids: (ids + 1) % pair[1].decoder.vocab_size))
    with pytest.raises(AssertionError, match="cosine"):
        report.check(0.99)


def test_beam_search_with_misordered_cache_rows_fails(pair):
    report = _compare(pair, Faulty(pair[1].decoder, rows=lambda rows: rows[::-1]), num_beams=3, max_new_tokens=8)
    with pytest.raises(AssertionError, match="cosine"):
        report.check(0.99)


def test_beam_search_of_the_same_decoder_is_decided_and_identical(pair):
    report = _compare(pair, Faulty(pair[1].decoder), num_beams=3, max_new_tokens=8)
    report.check(1 - 1e-6)
    assert report.beam_safe and report.candidate == report.reference


def test_sampling_is_refused(pair):
    with pytest.raises(AssertionError, match="plain greedy or beam"):
        _compare(pair, Faulty(pair[1].decoder), do_sample=True, seed=0)
