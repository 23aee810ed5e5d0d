"""Generated tokens compared across backends and precisions without depending on one machine's rounding.

A candidate decoder (torch FP16 on a GPU, BF16 on a CPU, a TensorRT engine) cannot be required to pick the same
tokens as the reference (ONNX Runtime CPU, FP32) everywhere: where the reference's two best tokens are closer than
the candidate's rounding error, either token is a correct answer, and which one comes out depends on the kernels of
the CPU or GPU at hand. :func:`compare_generation` checks what every correct backend satisfies and a broken one
does not:

1. **Teacher forcing.** One search (greedy or beam) runs over both decoders at once, driven by the reference's
   logits: both get the same token ids, masks and cache reorders (the candidate its own prompt embeddings, from its
   own encoders). At every step the candidate's logits must meet ``min_cosine`` against the reference's, row by row
   (a wrong cache, mask, position or weight gives cosines far below the gates used here).
2. **The error bound** ``bound``: the worst absolute logit error measured in 1. (over every step and live row),
   times ``SAFETY`` for run-to-run and path variation. A decision is *safe* when errors within the bound cannot
   change it: a greedy step when the reference's top-2 logit margin exceeds ``2 * bound``. A beam search compares
   sums of log-probabilities; it is safe when every comparison that decided something is separated by more than
   ``SAFETY`` times the two sums' own measured errors.
3. **Tokens.** The candidate's own generation (free running, through the normal loop) must equal the reference's up
   to the first unsafe step of each row, and all of it when a row (or a beam search) has none. After an unsafe step
   teacher forcing goes on: at every later safe step the candidate's argmax must be the reference's token.
4. **Not vacuous.** At least ``min_decided`` of the greedy steps must be safe; otherwise the bound is too wide for
   the comparison to say anything and it fails, naming the bound.

What catches what: a wrong cache, mask, position or weight fails 1; a candidate whose own generation differs from
its teacher-forced path (state kept between calls, a captured CUDA graph replaying stale inputs, run-to-run noise
beyond the bound) fails 3; an error so large that most margins fall within it fails 4. Rounding alone cannot fail
any of them: the bound is measured, so a correct backend's near-ties are always excused, on any CPU or GPU.

Only the plain search is supported (no repetition penalty, ``min_new_tokens``, stop strings or sampling), since
the margins are read from raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmedge.generation import GenerationConfig, generate
from mmedge.generation.logits import log_softmax
from mmedge.metrics import cosine_rows

SAFETY = 2.0  # the bound is twice the worst error teacher forcing measured
NEG = -1.0e9  # the beam search's "never" score (mmedge.generation.search)


@dataclass
class _Call:
    """One start/step of both decoders: the ids fed (None for start) and each side's logits ``[rows, vocab]``."""

    ids: np.ndarray | None
    reference: np.ndarray
    candidate: np.ndarray


class _Paired:
    """A Decoder over two: the same ids, masks and reorders go to both; the reference's logits come back."""

    def __init__(self, reference, candidate, candidate_embeds: np.ndarray):
        self.reference, self.candidate, self.candidate_embeds = reference, candidate, candidate_embeds
        self.vocab_size = reference.vocab_size
        limits = [getattr(d, "max_positions", None) for d in (reference, candidate)]
        self.max_positions = min((n for n in limits if n is not None), default=None)
        self.events: list = []  # _Call or the rows of a reorder, in order

    def reserve(self, total: int) -> None:
        for decoder in (self.reference, self.candidate):
            if callable(getattr(decoder, "reserve", None)):
                decoder.reserve(total)

    def _record(self, ids, reference, candidate) -> np.ndarray:
        # copies: a decoder may hand back a view of a buffer its next step overwrites (the torch decoder's static
        # logits)
        call = _Call(ids, np.array(reference, np.float32), np.array(candidate, np.float32))
        self.events.append(call)
        return call.reference

    def start(self, inputs_embeds, attention_mask):
        return self._record(None, self.reference.start(inputs_embeds, attention_mask),
                            self.candidate.start(self.candidate_embeds, attention_mask))

    def step(self, token_ids, attention_mask):
        return self._record(np.array(token_ids), self.reference.step(token_ids, attention_mask),
                            self.candidate.step(token_ids, attention_mask))

    def reorder(self, rows) -> None:
        self.reference.reorder(rows)
        self.candidate.reorder(rows)
        self.events.append(np.array(rows))


@dataclass
class Report:
    """What :func:`compare_generation` measured; :meth:`check` asserts it."""

    reference: list[list[int]]  # the reference's tokens per row
    candidate: list[list[int]]  # the candidate's own (free-running) tokens per row
    live: np.ndarray  # [steps, rows] where a row's logits decided something (greedy: until its last token)
    cosines: np.ndarray  # [steps, rows] teacher-forced logits cosine
    max_abs: float  # worst teacher-forced logit error
    bound: float  # SAFETY * max_abs
    beam: bool
    margins: np.ndarray | None = None  # greedy: [steps, rows] the reference's top-2 logit margin
    safe: np.ndarray | None = None  # greedy: [steps, rows] True where the margin exceeds 2 * bound
    forced: np.ndarray | None = None  # greedy: [steps, rows] the candidate's teacher-forced argmax
    beam_safe: bool = False  # beam search: no comparison it made was within the errors

    @property
    def decided_everywhere(self) -> bool:
        """No near-tie anywhere: the whole outputs must agree."""
        return self.beam_safe if self.beam else bool(self.safe[self.live].all())

    def first_unsafe(self, row: int) -> int:
        """The first greedy step of ``row`` whose decision is within the error bound (its length if none)."""
        steps = len(self.reference[row])
        unsafe = np.nonzero(~self.safe[:steps, row])[0]
        return int(unsafe[0]) if len(unsafe) else steps

    def check(self, min_cosine: float, min_decided: float = 0.5, label: str = "") -> None:
        """Assert points 1, 3 and 4 of the module docstring; ``label`` starts every message."""
        where = f"{label}: " if label else ""
        live = self.live
        bad = live & ~(self.cosines >= min_cosine)  # NaN logits fail too
        assert not bad.any(), (f"{where}teacher-forced logits cosine "
                               f"{np.nanmin(np.where(live, self.cosines, 1.0)):.6f} "
                               f"below {min_cosine} at (step, row) {np.argwhere(bad).tolist()[:5]}")
        if self.beam:
            if self.beam_safe:
                assert self.candidate == self.reference, f"{where}beam search: {self.candidate} vs {self.reference}"
            return
        decided = float(self.safe[live].mean())
        assert decided >= min_decided, (f"{where}only {decided:.0%} of the steps are decided: the error bound "
                                        f"{self.bound:.3g} (max abs {self.max_abs:.3g}) covers most margins")
        for row, (want, got) in enumerate(zip(self.reference, self.candidate)):
            cut = self.first_unsafe(row)
            if cut == len(want):  # no near-tie: the whole row, its length included
                assert got == want, f"{where}row {row}: {got} vs {want} (no near-tie within {self.bound:.3g})"
            else:
                assert got[:cut] == want[:cut], \
                    f"{where}row {row} differs before its first near-tie (step {cut}): {got} vs {want}"
            for step, token in enumerate(want):
                if self.safe[step, row]:
                    assert self.forced[step, row] == token, (
                        f"{where}row {row} step {step}: teacher-forced argmax {self.forced[step, row]} vs {token} "
                        f"(margin above {2 * self.bound:.3g})")


def compare_generation(reference, candidate, reference_inputs: tuple, candidate_inputs: tuple,
                       config: GenerationConfig) -> Report:
    """Teacher-forced and free-running generation of ``candidate`` against ``reference`` (both :class:`Decoder`s).

    ``*_inputs``: ``(inputs_embeds [batch, seq, hidden], attention_mask [batch, seq], prompt_ids or None)`` as each
    side's encoders made them (the masks must be equal). Returns a :class:`Report`; call its ``check``.
    """
    _plain(config)
    embeds, mask, ids = reference_inputs
    cand_embeds, cand_mask, cand_ids = candidate_inputs
    assert np.array_equal(mask, cand_mask), "both sides must build the same prompt mask"
    paired = _Paired(reference, candidate, cand_embeds)
    expected = generate(paired, embeds, mask, config, prompt_ids=ids)
    got = generate(candidate, cand_embeds, cand_mask, config, prompt_ids=cand_ids)
    calls = [e for e in paired.events if isinstance(e, _Call)]
    beam = config.num_beams > 1
    live = _live_rows(calls, expected, config.num_beams)  # [steps, rows]
    cosines, errors = np.ones(live.shape), np.zeros(live.shape)
    for t, call in enumerate(calls):
        ref, cand = call.reference, call.candidate
        if t == 0 and beam:  # start: one row per prompt, before the expansion to beams
            rows = np.arange(live.shape[1]) // config.num_beams
            ref, cand = ref[rows], cand[rows]
        cosines[t] = cosine_rows(ref, cand)
        errors[t] = np.where(live[t], np.abs(cand.astype(np.float64) - ref).max(axis=1), 0.0)
    max_abs = float(errors.max())  # NaN logits make it NaN; the cosine check reports them first
    report = Report(expected, got, live, cosines, max_abs, SAFETY * max_abs, beam)
    if beam:
        report.beam_safe = _beam_decisions_safe(paired.events, config)
    else:
        refs = np.stack([c.reference for c in calls])  # [steps, rows, vocab]
        top2 = np.sort(refs, axis=-1)[..., -2:].astype(np.float64)
        report.margins = top2[..., 1] - top2[..., 0]
        report.safe = report.margins > 2 * report.bound
        report.forced = np.stack([c.candidate for c in calls]).argmax(-1)
    return report


def _plain(config: GenerationConfig) -> None:
    assert not config.do_sample and config.repetition_penalty == 1.0 and config.min_new_tokens == 0 \
        and not config.stop_strings, \
        "compare_generation reads margins from raw logits: plain greedy or beam search only"


def _live_rows(calls: list[_Call], expected: list[list[int]], beams: int) -> np.ndarray:
    """``[steps, rows]``: where a row's logits decided something (greedy: until its last token; beams: always)."""
    live = np.ones((len(calls), calls[0].reference.shape[0] * beams), dtype=bool)
    if beams == 1:
        for row, tokens in enumerate(expected):
            live[len(tokens):, row] = False
    return live


def _beam_decisions_safe(events: list, config: GenerationConfig) -> bool:
    """Whether the reference's beam search made a decision closer than the candidate's errors could bridge.

    Replays the search (``mmedge.generation.search._beam_search``: transformers' rules) along the reference's path
    from the logits, reorders and fed tokens, on both sides, so every score it compares (a sum of log-probabilities,
    or one normalized by length) has its own measured error. For each prompt still able to improve, safe means that
    every comparison that decides something is separated by more than ``SAFETY`` times both errors: the candidates
    from the best down to the one past the last beam that runs on (which go on, which end, in what order); the
    finished hypotheses entering the kept ones (which are kept, which is the answer); and the best running beam
    against the worst kept hypothesis (the stopping rule). A prompt whose answer no running beam can beat any more
    is settled: its later decisions are not checked.
    """
    beams, limit, exponent = config.num_beams, config.max_new_tokens, config.length_penalty
    eos = np.array(config.eos_token_ids, dtype=np.int64)
    keep = max(2, 1 + len(eos)) * beams
    calls = iter(events)
    first, expand = next(calls), next(calls)
    batch = len(expand) // beams
    log_probs = [log_softmax(logits)[expand].astype(np.float64) for logits in (first.reference, first.candidate)]
    scores = [np.tile(np.r_[0.0, np.full(beams - 1, NEG)], batch)] * 2  # [batch * beams] per side
    kept: list[list[tuple[float, float]]] = [[] for _ in range(batch)]  # (normalized score, its error), best first
    improving = [True] * batch
    generated = 0
    while True:
        vocab = log_probs[0].shape[1]
        totals = [(lp + sc[:, None]).reshape(batch, beams * vocab) for lp, sc in zip(log_probs, scores)]
        picked = np.argsort(-totals[0], axis=1, kind="stable")[:, :keep + 1]  # [batch, keep + 1], best first
        best = np.take_along_axis(totals[0], picked, axis=1)
        error = SAFETY * np.abs(np.take_along_axis(totals[1], picked, axis=1) - best)
        close = best[:, :-1] - best[:, 1:] <= error[:, :-1] + error[:, 1:]  # [batch, keep]: rank k vs rank k + 1
        ends = np.isin(picked[:, :keep] % vocab, eos) | (generated + 1 >= limit)
        scale = float(generated + 1) ** exponent
        length = float(limit if (config.early_stopping == "never" and exponent > 0) else generated + 1) ** exponent
        for b in np.nonzero(improving)[0]:
            alive = np.nonzero(~ends[b])[0]
            last = alive[beams - 1] if len(alive) >= beams else keep - 1
            if close[b, :max(last, beams - 1) + 1].any():
                return False
            done = [(best[b, k] / scale, error[b, k] / scale) for k in np.nonzero(ends[b, :beams])[0]]
            if done:
                merged = sorted(kept[b] + done, reverse=True)[:beams + 1]
                if _any_close(merged):
                    return False
                kept[b] = merged[:beams]
            if kept[b] and (not len(alive) or _settled(kept[b][0], best[b, alive[0]], error[b, alive[0]], generated,
                                                       config)):
                improving[b] = False  # no running beam can beat the answer any more: later decisions cannot change it
            elif len(kept[b]) == beams:  # every slot holds a hypothesis: can the best running beam still beat them?
                if config.early_stopping is True:
                    improving[b] = False
                    continue
                running = (best[b, alive[0]] / length, error[b, alive[0]] / length)
                if _any_close([running, kept[b][-1]]):
                    return False
                improving[b] = running[0] > kept[b][-1][0]
        reorder, step = next(calls, None), next(calls, None)
        if step is None:
            return True
        tokens = step.ids
        ended = np.where(np.isin(tokens, eos), NEG, 0.0)
        scores = [sc[reorder] + lp[reorder, tokens] + ended for lp, sc in zip(log_probs, scores)]
        log_probs = [log_softmax(logits).astype(np.float64) for logits in (step.reference, step.candidate)]
        generated += 1


def _settled(answer: tuple[float, float], total: float, error: float, generated: int, config: GenerationConfig) -> bool:
    """Whether the best kept hypothesis beats whatever the best running beam (``total`` so far) can still become: its
    log-probability only falls, so its best normalized score is at the shortest or longest length it may reach."""
    divisors = [float(n) ** config.length_penalty for n in (generated + 1, config.max_new_tokens)]
    return answer[0] - answer[1] > max(total / d for d in divisors) + error / min(divisors)


def _any_close(values: list[tuple[float, float]]) -> bool:
    """Whether two neighbours of ``values`` (sorted, best first; (value, error) each) lie within their errors."""
    return any(abs(a[0] - b[0]) <= a[1] + b[1] for a, b in zip(values, values[1:]))
