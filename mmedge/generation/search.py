"""The generation loop: greedy, sampling and beam search over any :class:`Decoder`, in numpy.

Token choices follow ``transformers`` 5 ``GenerationMixin`` (``_sample`` and ``_beam_search``):
greedy and beam search return the same tokens as ``model.generate`` for the same logits; sampling
uses the same processors in the same order but numpy's random generator, so it is reproducible
under a seed without matching torch's draws.

What is returned: the NEW tokens of each row (never the prompt), up to and including the token that
ended it (an EOS id, or the last token of a stop string), without padding; transformers returns the
same tokens, padded to a rectangle (and, when ``input_ids`` were passed as BLIP-2 does, after the
prompt ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mmedge.errors import InputError
from mmedge.generation.config import GenerationConfig
from mmedge.generation.decoder import Decoder
from mmedge.generation.logits import LogitsProcessor, check_finite, log_softmax, sample
from mmedge.tokenizer import settled_clean_up

_NEG = np.float32(-1.0e9)  # transformers' "never pick this" score in beam search


class TextDecoder(Protocol):
    """Anything that turns token ids into text: ``mmedge.tokenizer.TextTokenizer`` fits."""

    def decode(self, ids: Sequence[int]) -> str: ...


# --- public API ----------------------------------------------------------------------------------
def generate(decoder: Decoder, inputs_embeds: np.ndarray, attention_mask: np.ndarray | None = None,
             config: GenerationConfig | None = None, tokenizer: TextDecoder | None = None, *,
             prompt_ids: np.ndarray | None = None) -> list[list[int]]:
    """Generate new token ids for each row of a prompt given as embeddings.

    ``inputs_embeds [batch, seq, hidden]`` is the whole prompt (e.g. BLIP-2's 32 query embeddings
    followed by the embedded BOS and prompt text); ``attention_mask [batch, seq]`` marks real
    positions with 1 and LEFT padding with 0 (``None``: no padding). ``prompt_ids [batch, seq]``, when
    given, are the token ids aligned with the prompt, used only as context for the repetition penalty
    (pass what BLIP-2 passes as ``input_ids``; image positions may hold any id). ``tokenizer`` is needed
    for stop strings. Returns one list of new token ids per row (see the module docstring).
    """
    run = _prepare(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids)
    if run.config.num_beams > 1:
        return _beam_search(run)
    state = None
    for state in _sample_steps(run):
        pass
    return state.tokens


def generate_text(decoder: Decoder, inputs_embeds: np.ndarray, attention_mask: np.ndarray | None = None,
                  config: GenerationConfig | None = None, tokenizer: TextDecoder | None = None, *,
                  prompt_ids: np.ndarray | None = None) -> list[str]:
    """:func:`generate`, decoded: one text per row, without the final EOS token where it is a special token (an
    ordinary token given as an end token stays, as in transformers) and cut just before the first stop string it
    contains."""
    if tokenizer is None:
        raise InputError("generate_text was called without a tokenizer", "a tokenizer with a decode(ids) method",
                         "pass the artifact's TextTokenizer, or call generate() for token ids")
    config = config if config is not None else GenerationConfig()
    ids = generate(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids=prompt_ids)
    texts = _Texts(tokenizer, config)
    return [texts.final(row) for row in ids]


def stream(decoder: Decoder, inputs_embeds: np.ndarray, attention_mask: np.ndarray | None = None,
           config: GenerationConfig | None = None, tokenizer: TextDecoder | None = None, *,
           prompt_ids: np.ndarray | None = None) -> TextStream:
    """The text of one prompt (batch 1) piece by piece as tokens arrive, as a :class:`TextStream`.

    The pieces join to exactly ``generate_text(...)[0]``. A piece is held back while it ends in an
    incomplete UTF-8 character or in what may be the start of a stop string. Beam search cannot know
    its answer before it ends, so with ``num_beams > 1`` the whole text comes as one piece at the end.
    Nothing runs before the first piece is asked for.
    """
    return TextStream(lambda result: _pieces(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids,
                                            result))


class StreamEnd:
    """How a stream's answer ended, written by its generator once it is exhausted (``TextStream`` reads it)."""

    __slots__ = ("tokens", "finish_reason")

    def __init__(self) -> None:
        self.tokens: int | None = None
        self.finish_reason: str | None = None

    def finished(self, tokens: int, reason: str) -> None:
        self.tokens, self.finish_reason = tokens, reason


class TextStream:
    """An iterator over the pieces of one answer that says, once it is exhausted, how the answer ended.

    ``tokens``: the new tokens generated, the one that ended the answer included (OpenAI's ``completion_tokens``);
    ``finish_reason``: ``"stop"`` (an end-of-sequence token or a stop string) or ``"length"`` (``max_new_tokens``
    reached). Both stay None while pieces remain, and after ``close()`` before the end.
    """

    def __init__(self, pieces_of: Callable[[StreamEnd], Iterator[str]]):
        self._end = StreamEnd()
        # the generator is handed the StreamEnd, never this stream: no reference cycle, so a stream dropped half-way
        # is closed at once (its generator finalized: a decoder lock it holds is let go), not at the next gc pass
        self._pieces = pieces_of(self._end)

    @property
    def tokens(self) -> int | None:
        return self._end.tokens

    @property
    def finish_reason(self) -> str | None:
        return self._end.finish_reason

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (a generation that holds a decoder lets it go)."""
        self._pieces.close()


def _pieces(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids, result: StreamEnd) -> Iterator[str]:
    if tokenizer is None:
        raise InputError("stream was called without a tokenizer", "a tokenizer with a decode(ids) method",
                         "pass the artifact's TextTokenizer, or call generate() for token ids")
    run = _prepare(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids)
    if run.mask.shape[0] != 1:
        raise InputError(f"stream got a batch of {run.mask.shape[0]} prompts", "one prompt (batch 1)",
                         "stream each prompt on its own, or call generate_text() for a batch")
    texts = _Texts(tokenizer, run.config)
    if run.config.num_beams > 1:
        tokens = _beam_search(run)[0]
        final = texts.final(tokens)
        result.finished(len(tokens), texts.finish_reason(tokens))
        if final:
            yield final
        return
    emitted = ""
    state = None
    for state in _sample_steps(run):
        if state.finished[0]:
            break
        safe = texts.safe_prefix(state.tokens[0])
        if len(safe) > len(emitted) and safe.startswith(emitted):
            yield safe[len(emitted):]
            emitted = safe
    tokens = state.tokens[0]
    final = texts.final(tokens)
    result.finished(len(tokens), texts.finish_reason(tokens))
    if len(final) > len(emitted) and final.startswith(emitted):
        yield final[len(emitted):]


def pad_rows(rows: Sequence[Sequence[int]], pad_token_id: int) -> np.ndarray:
    """Rows of different lengths as one int64 array ``[batch, longest]``, padded on the right
    (the shape transformers returns)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


# --- preparation ---------------------------------------------------------------------------------
@dataclass
class _Run:
    decoder: Decoder
    embeds: np.ndarray  # [batch, seq, hidden]
    mask: np.ndarray  # [batch, seq] int64
    config: GenerationConfig
    prompt_ids: np.ndarray | None  # [batch, seq] int64
    stops: "_Texts | None"  # set when there are stop strings


def _prepare(decoder, inputs_embeds, attention_mask, config, tokenizer, prompt_ids) -> _Run:
    if not isinstance(decoder, Decoder):
        raise InputError(f"the decoder is a {type(decoder).__name__}",
                         "an object with vocab_size, start(), step() and reorder()",
                         "pass an OrtDecoder (mmedge.runtimes.onnxruntime_decoder) or another Decoder")
    embeds = np.asarray(inputs_embeds)
    if embeds.ndim != 3 or not np.issubdtype(embeds.dtype, np.floating) or embeds.shape[0] == 0 or embeds.shape[1] == 0:
        raise InputError(f"inputs_embeds has shape {list(embeds.shape)} and dtype {embeds.dtype}",
                         "a float array shaped [batch, seq, hidden] with batch and seq of at least 1",
                         "pass the prompt's embeddings (prefix embeddings followed by the embedded prompt tokens)")
    batch, seq = embeds.shape[:2]
    if attention_mask is None:
        mask = np.ones((batch, seq), dtype=np.int64)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != (batch, seq) or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            raise InputError(f"attention_mask has shape {list(mask.shape)} and dtype {mask.dtype}",
                             f"integers shaped [batch, seq] = {[batch, seq]}, like inputs_embeds",
                             "pass one 0/1 mask column per prompt position")
        mask = mask.astype(np.int64)
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask holds values other than 0 and 1", "1 for real positions, 0 for padding",
                             "build the mask from the prompt lengths")
        if not mask[:, -1].all():
            rows = np.nonzero(mask[:, -1] == 0)[0].tolist()
            raise InputError(f"attention_mask rows {rows} end in padding",
                             "left padding: every row's last position real",
                             "pad shorter prompts on the left (decoder-only models continue from the last position)")
    if prompt_ids is not None:
        prompt_ids = np.asarray(prompt_ids)
        if prompt_ids.shape != (batch, seq) or not np.issubdtype(prompt_ids.dtype, np.integer):
            raise InputError(f"prompt_ids has shape {list(prompt_ids.shape)} and dtype {prompt_ids.dtype}",
                             f"integer token ids shaped [batch, seq] = {[batch, seq]}, aligned with inputs_embeds",
                             "pass the input_ids the prompt embeddings were made from (any id at prefix positions)")
        prompt_ids = prompt_ids.astype(np.int64)
    config = config if config is not None else GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InputError(f"config is a {type(config).__name__}", "a mmedge.generation.GenerationConfig",
                         "build one with GenerationConfig(...) or GenerationConfig.from_dict(manifest['generation'])")
    config.validate(max_positions=getattr(decoder, "max_positions", None), vocab_size=decoder.vocab_size,
                    prompt_length=seq, positions_note=getattr(decoder, "positions_note", None))
    if config.stop_strings and tokenizer is None:
        raise InputError(f"stop_strings {config.stop_strings} were given without a tokenizer",
                         "a tokenizer to decode the generated tokens", "pass tokenizer=..., or drop stop_strings")
    stops = _Texts(tokenizer, config) if config.stop_strings else None
    reserve = getattr(decoder, "reserve", None)
    if callable(reserve):  # a decoder with a preallocated cache sizes it once (mmedge.runtimes.torch_decoder)
        reserve(seq + config.max_new_tokens)
    return _Run(decoder, embeds, mask, config, prompt_ids, stops)


# --- greedy and sampling -------------------------------------------------------------------------
@dataclass
class _State:
    tokens: list[list[int]]  # new tokens per row, up to and including the one that ended the row
    finished: np.ndarray  # [batch] bool


def _sample_steps(run: _Run) -> Iterator[_State]:
    """Greedy or sampled decoding; yields the state after every new token (the same object, updated).

    Greedy decoding whose processing only bans tokens (no repetition penalty) lets a decoder with ``step_greedy``
    pick the token on its own device: only the ids cross to the host, not ``[batch, vocab]`` logits."""
    config, decoder = run.config, run.decoder
    batch = run.mask.shape[0]
    processor = LogitsProcessor(config, decoder.vocab_size, batch, run.prompt_ids, run.mask)
    rng = np.random.default_rng(config.seed) if config.do_sample else None
    step_greedy = getattr(decoder, "step_greedy", None) if rng is None and processor.only_bans else None
    eos = set(config.eos_token_ids)
    fill = config.fill_token_id
    state = _State([[] for _ in range(batch)], np.zeros(batch, dtype=bool))
    mask = run.mask
    tokens = np.zeros(batch, dtype=np.int64)  # chosen from the prefill's logits before any step reads them
    logits = decoder.start(run.embeds, mask)  # [batch, vocab]
    for generated in range(config.max_new_tokens):
        if generated:
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)  # [batch, past + 1]
            if callable(step_greedy):
                tokens = np.asarray(step_greedy(tokens, mask, processor.banned(generated)), dtype=np.int64)
            else:
                logits = decoder.step(tokens, mask)
        if not generated or not callable(step_greedy):
            logits = np.asarray(logits, dtype=np.float32)  # [batch, vocab]
            check_finite(logits)
            scores = processor(logits, generated)
            if rng is not None:
                tokens = sample(processor.warp(scores), rng)
            else:
                tokens = np.argmax(scores, axis=-1).astype(np.int64)  # first maximum, as torch.argmax
        if fill is not None:
            tokens = np.where(state.finished, fill, tokens)  # finished rows are fed padding
        processor.observe(tokens)
        for row in np.nonzero(~state.finished)[0]:
            token = int(tokens[row])
            state.tokens[row].append(token)
            if token in eos or (run.stops is not None and run.stops.hit(state.tokens[row])):
                state.finished[row] = True
        yield state
        if state.finished.all():
            return


# --- beam search ---------------------------------------------------------------------------------
def _beam_search(run: _Run) -> list[list[int]]:
    """transformers' ``_beam_search`` (deterministic, ``num_return_sequences=1``), step for step.

    * Beam scores start at 0 for beam 0 and -1e9 for the others, so the first step expands one beam.
    * Each step scores ``log_softmax(logits)`` (then the processors) + the beam's running score, and
      keeps the top ``max(2, 1 + n_eos) * num_beams`` candidates over all beams.
    * A candidate that ends (EOS, max_new_tokens, stop string) becomes a finished hypothesis only if it
      is among the first ``num_beams`` of those, scored ``sum_logprobs / generated ** length_penalty``
      where ``generated`` counts new tokens including the EOS (the prompt never counts); the best
      ``num_beams`` finished hypotheses are kept. The best ``num_beams`` unfinished candidates run on.
    * Stop: ``early_stopping=True`` when every row has ``num_beams`` finished hypotheses;
      ``False`` when the best running beam, scored at its current length, cannot beat the worst kept
      hypothesis; ``"never"`` the same but, for ``length_penalty > 0``, scored at max_new_tokens;
      always when every candidate ended. Rows that are done stop collecting but the batch steps on.
    * The answer is the best finished hypothesis of each row.
    """
    config, decoder = run.config, run.decoder
    batch, _ = run.mask.shape
    beams, vocab, limit = config.num_beams, decoder.vocab_size, config.max_new_tokens
    eos = np.array(config.eos_token_ids, dtype=np.int64)
    keep = max(2, 1 + len(eos)) * beams
    first_beams = np.arange(keep) < beams  # [keep]: only these candidates may finish
    exponent = config.length_penalty

    expand = np.repeat(np.arange(batch), beams)  # [batch * beams]: each prompt once per beam
    logits = decoder.start(run.embeds, run.mask)[expand]
    decoder.reorder(expand)
    mask = run.mask[expand]
    prompt_ids = run.prompt_ids[expand] if run.prompt_ids is not None else None
    processor = LogitsProcessor(config, vocab, batch * beams, prompt_ids, mask)

    running = np.zeros((batch, beams, limit), dtype=np.int64)  # new tokens of each running beam
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = _NEG
    done_tokens = np.zeros((batch, beams, limit), dtype=np.int64)  # finished hypotheses
    done_scores = np.full((batch, beams), _NEG, dtype=np.float32)
    done_lengths = np.zeros((batch, beams), dtype=np.int64)
    is_done = np.zeros((batch, beams), dtype=bool)
    can_improve = np.ones((batch, 1), dtype=bool)
    row_base = (np.arange(batch) * beams)[:, None]  # [batch, 1]

    for generated in range(limit):
        if generated:
            mask = np.concatenate([mask, np.ones((batch * beams, 1), dtype=np.int64)], axis=1)
            logits = decoder.step(running[:, :, generated - 1].reshape(-1), mask)
        logits = np.asarray(logits, dtype=np.float32)  # [batch * beams, vocab]
        check_finite(logits)
        log_probs = processor(log_softmax(logits), generated)  # [batch * beams, vocab]
        totals = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, beams * vocab)
        picked = _topk(totals, keep)  # [batch, keep]
        cand_scores = np.take_along_axis(totals, picked, axis=1)
        cand_origin, cand_token = picked // vocab, picked % vocab
        candidates = np.take_along_axis(running, cand_origin[:, :, None], axis=1)  # [batch, keep, limit]
        candidates[:, :, generated] = cand_token
        ends = np.isin(cand_token, eos) | (generated + 1 >= limit)
        if run.stops is not None:
            for b, k in zip(*np.nonzero(~ends)):
                ends[b, k] = run.stops.hit(candidates[b, k, : generated + 1].tolist())

        # the beams that run on: the best candidates that did not end
        alive_scores = cand_scores + ends.astype(np.float32) * _NEG
        chosen = _topk(alive_scores, beams)  # [batch, beams]
        running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        running_scores = np.take_along_axis(alive_scores, chosen, axis=1)
        running_origin = np.take_along_axis(cand_origin, chosen, axis=1)

        # finished hypotheses: merge the candidates that just ended into the kept ones
        just_done = ends & first_beams[None, :]
        scores = cand_scores / np.float32((generated + 1) ** exponent)
        full = is_done.all(axis=1, keepdims=True) & (config.early_stopping is True)
        scores = scores + full.astype(np.float32) * _NEG
        scores = scores + (~can_improve).astype(np.float32) * _NEG
        scores = scores + (~just_done).astype(np.float32) * _NEG
        merged_scores = np.concatenate([done_scores, scores], axis=1)
        best = _topk(merged_scores, beams)
        done_scores = np.take_along_axis(merged_scores, best, axis=1)
        done_tokens = np.take_along_axis(np.concatenate([done_tokens, candidates], axis=1), best[:, :, None], axis=1)
        done_lengths = np.take_along_axis(
            np.concatenate([done_lengths, np.full((batch, keep), generated + 1, dtype=np.int64)], axis=1), best, axis=1)
        is_done = np.take_along_axis(np.concatenate([is_done, just_done], axis=1), best, axis=1)

        # can any row still improve?
        length = limit if (config.early_stopping == "never" and exponent > 0) else generated + 1
        best_possible = running_scores[:, :1] / np.float32(length ** exponent)
        worst_kept = np.where(is_done, done_scores.min(axis=1, keepdims=True), _NEG)
        can_improve = can_improve & np.any(best_possible > worst_kept, axis=1, keepdims=True)
        all_full = is_done.all() and config.early_stopping is True
        if not can_improve.any() or all_full or ends.all():
            break
        rows = (row_base + running_origin).reshape(-1)  # the cache follows the running beams
        decoder.reorder(rows)
        processor.reorder(rows)
        processor.observe(running[:, :, generated].reshape(-1))

    return [done_tokens[b, 0, : done_lengths[b, 0]].tolist() for b in range(batch)]


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values of each row, largest first (ties: lower index first)."""
    n = values.shape[1]
    part = np.argpartition(-values, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), values.shape)
    vals = np.take_along_axis(values, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


# --- text ----------------------------------------------------------------------------------------
class _Texts:
    """Decoding of generated ids with stop strings: detection, trimming and safe streaming prefixes."""

    def __init__(self, tokenizer: TextDecoder, config: GenerationConfig):
        self.tokenizer = tokenizer
        self.stop_strings = list(config.stop_strings)
        self.eos = set(config.eos_token_ids)
        special = getattr(tokenizer, "special_token_ids", getattr(tokenizer, "all_special_ids", None))
        self.special = None if special is None else frozenset(special)
        self.byte_tokens = getattr(tokenizer, "byte_token_ids", frozenset())  # TextTokenizer's; none for others
        # a decode that cleans up spaces decides each by the characters after it ("do n" + "'t" -> "don't")
        self.cleans_up = bool(getattr(tokenizer, "cleans_up_spaces", False))

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._without_eos(ids))

    def _without_eos(self, ids: Sequence[int]) -> list[int]:
        """The ids without a last end token that is a special token; one that is an ordinary token
        (``eos_token_id=[2, <the id of ".">]``) stays in the text, as in transformers' decode. A tokenizer that does
        not say which tokens are special (``special_token_ids``, transformers' ``all_special_ids``) loses any last
        end token."""
        ids = list(ids)
        if ids and ids[-1] in self.eos and (self.special is None or ids[-1] in self.special):
            return ids[:-1]
        return ids

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def hit(self, ids: Sequence[int]) -> bool:
        return self._stop_at(self.text(ids)) is not None

    def finish_reason(self, ids: Sequence[int]) -> str:
        """How the answer ended: "stop" (an end-of-sequence token or a stop string) or "length" (max_new_tokens)."""
        stopped = bool(ids) and (ids[-1] in self.eos or (bool(self.stop_strings) and self.hit(ids)))
        return "stop" if stopped else "length"

    def final(self, ids: Sequence[int]) -> str:
        text = self.text(ids)
        cut = self._stop_at(text)
        return text if cut is None else text[:cut]

    def safe_prefix(self, ids: Sequence[int]) -> str:
        """The part of the text so far that no later token can change: without a trailing incomplete
        UTF-8 character (decoded as U+FFFD), without a trailing run of byte-fallback tokens (``<0xNN>``: the run
        decodes as a whole, and a byte that ends it incomplete turns all of it into U+FFFD) and without a tail that
        may grow into a stop string."""
        ids = list(ids)
        while ids and ids[-1] in self.byte_tokens:
            ids.pop()
        text = self.final(ids)
        if self.cleans_up:  # only what later characters cannot clean up differently
            text = text[:len(settled_clean_up(self.tokenizer.decode(self._without_eos(ids), clean_up_spaces=False)))]
        text = text.rstrip("\ufffd")
        hold = 0
        for stop in self.stop_strings:  # a tail that may still grow into one
            for size in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:size]):
                    hold = size
                    break
        return text[: len(text) - hold]
