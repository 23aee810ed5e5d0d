"""Logits processing in numpy, in transformers' order and with its formulas.

Order (as ``GenerationMixin._get_logits_processor`` builds it for the settings we support):
repetition penalty -> minimum new tokens (EOS masked) -> temperature -> top-k -> top-p; the last
three only when sampling. Everything is float32, as transformers computes it.
"""

from __future__ import annotations

import numpy as np

from mmedge.errors import BackendError
from mmedge.generation.config import GenerationConfig

NEG_INF = np.float32(-np.inf)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log_softmax`` over the last axis, float32: ``[rows, vocab] -> [rows, vocab]``."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (for sampling; ``-inf`` scores get probability 0)."""
    x = scores.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: for every token already in the row's context,
    a negative score is multiplied by ``penalty`` and a positive one divided by it (once per token,
    however often it occurred). ``scores [rows, vocab]`` float32, ``seen [rows, vocab]`` bool."""
    p = np.float32(penalty)
    penalized = np.where(scores < 0, scores * p, scores / p)
    return np.where(seen, penalized, scores)


def mask_tokens(scores: np.ndarray, token_ids: tuple[int, ...]) -> np.ndarray:
    """``scores`` with the given tokens set to ``-inf`` (how ``min_new_tokens`` keeps EOS away)."""
    out = scores.copy()
    out[:, [t for t in token_ids if t < scores.shape[1]]] = NEG_INF
    return out


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return scores / np.float32(temperature)


def apply_top_k(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the ``top_k`` highest scores per row (ties with the k-th kept, as transformers does)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]  # [rows, 1], the k-th largest
    return np.where(scores < kth, NEG_INF, scores)


def apply_top_p(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Nucleus filtering as transformers' ``TopPLogitsWarper``: sort ascending, drop the tokens whose cumulative
    probability stays within ``1 - top_p``, always keeping the ``min_tokens_to_keep`` best.

    float32 probabilities summed in float64 and rounded to float32, as torch's CPU ``cumsum`` does (a float32 sum
    moved the boundary token of a 50k vocabulary). Tied scores that straddle the boundary may keep another subset of
    the ties: torch's sort leaves their order unspecified (and it differs between CPU and GPU)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    shifted = np.exp(sorted_scores - sorted_scores.max(axis=-1, keepdims=True)).astype(np.float32)
    probs = shifted / shifted.sum(axis=-1, keepdims=True)  # [rows, vocab] float32
    cumulative = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, scores)


def check_finite(logits: np.ndarray) -> None:
    """BackendError when a row of the decoder's ``logits [rows, vocab]`` holds NaN or +inf: no token can be chosen
    from it (transformers' sampling raises on it too; its greedy choice would pick the NaN's token)."""
    bad = np.isnan(logits).any(axis=-1) | np.isposinf(logits).any(axis=-1)  # [rows]
    if bad.any():
        raise BackendError(
            f"the decoder's scores for row {int(np.argmax(bad))} of the batch hold NaN or +inf, so no next token can "
            "be chosen", "finite scores from the decoder graph",
            "the graph overflowed or is damaged: run `mmedge validate ARTIFACT` on this device; an FP16 graph: "
            "export at FP32, or at FP16 with its range guard (the default)")


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from ``softmax(scores)`` (inverse CDF; a ``-inf`` token is never drawn)."""
    if np.isneginf(scores).all(axis=-1).any():
        raise BackendError(
            f"every token of row {int(np.argmax(np.isneginf(scores).all(axis=-1)))} of the batch scores -inf, so none "
            "can be drawn", "at least one token with a finite score from the decoder graph",
            "run `mmedge validate ARTIFACT` on this device: a graph that scores every token -inf is damaged")
    probs = softmax(scores)  # [rows, vocab] float64
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(scores.shape[0]) * cdf[:, -1]
    picks = (cdf <= u[:, None]).sum(axis=-1)  # index of the first cdf entry above u
    return np.minimum(picks, scores.shape[-1] - 1).astype(np.int64)


class LogitsProcessor:
    """The per-step score pipeline for one batch, with the context each row's repetition penalty needs.

    ``prompt_ids [rows, prompt]`` (optional) are token ids aligned with the prompt's attention mask, as
    BLIP-2 passes ``input_ids`` beside ``inputs_embeds``; like transformers, the leading padding of each
    row (up to its first mask 1) is ignored. Without them the penalty sees generated tokens only.

    Known difference: when ``generate`` gets ``inputs_embeds`` WITHOUT ``input_ids``, transformers 5
    still skips the first ``left-padding length`` entries of each row's context, which are then the
    row's first generated tokens; on left-padded rows it so leaves those tokens unpenalized. We
    penalize every generated token. Unpadded rows, and every row when prompt ids are given (BLIP-2's
    case), get transformers' tokens exactly.
    """

    def __init__(self, config: GenerationConfig, vocab_size: int, rows: int,
                 prompt_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None):
        self.config = config
        self.vocab_size = vocab_size
        self.eos = config.eos_token_ids
        self.penalty = config.repetition_penalty
        self.seen: np.ndarray | None = None  # [rows, vocab] bool, only kept when the penalty is on
        if self.penalty != 1.0:
            self.seen = np.zeros((rows, vocab_size), dtype=bool)
            if prompt_ids is not None:
                starts = np.argmax(attention_mask != 0,
                                   axis=1) if attention_mask is not None else np.zeros(rows, np.int64)
                for row in range(rows):
                    ids = prompt_ids[row, starts[row]:]
                    self.seen[row, ids[(ids >= 0) & (ids < vocab_size)]] = True

    def __call__(self, scores: np.ndarray, generated: int) -> np.ndarray:
        """Process ``scores [rows, vocab]`` (logits, or log-probs in beam search) before picking token
        number ``generated + 1``."""
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, self.penalty)
        banned = self.banned(generated)
        if banned:
            scores = mask_tokens(scores, banned)
        return scores

    @property
    def only_bans(self) -> bool:
        """Whether processing a step's scores only bans tokens (no repetition penalty): then the greedy choice is
        ``argmax`` with :meth:`banned` excluded, which a decoder can take on its own device (``step_greedy``)."""
        return self.seen is None

    def banned(self, generated: int) -> tuple[int, ...]:
        """The token ids :meth:`__call__` sets to ``-inf`` before token number ``generated + 1``."""
        return tuple(self.eos) if self.eos and generated < self.config.min_new_tokens else ()

    def warp(self, scores: np.ndarray) -> np.ndarray:
        """The sampling-only warpers: temperature, top-k, top-p (each skipped at its neutral value)."""
        config = self.config
        if config.temperature != 1.0:
            scores = apply_temperature(scores, config.temperature)
        if config.top_k != 0:
            scores = apply_top_k(scores, config.top_k)
        if config.top_p < 1.0:
            scores = apply_top_p(scores, config.top_p)
        return scores

    def observe(self, tokens: np.ndarray) -> None:
        """Record the token each row just got (``tokens [rows]``)."""
        if self.seen is not None:
            valid = (tokens >= 0) & (tokens < self.vocab_size)
            self.seen[np.nonzero(valid)[0], tokens[valid]] = True

    def reorder(self, rows: np.ndarray) -> None:
        """Follow the decoder's cache reordering (beam search)."""
        if self.seen is not None:
            self.seen = self.seen[rows]
