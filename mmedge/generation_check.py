"""`mmedge validate`'s generation check: the KV-cached decoder ``mmedge.load`` opens, run as generation runs it,
against the same logits computed without a cache.

The parity check runs the decoder graph once, as a plain graph, so a cache that is not carried from one step to the
next (an IOBinding that freed the pasts between calls, infer requests that overwrite each other's presents) passes it
while every caption is garbage. Here the decoder's validation sample becomes one unpadded prompt: the cached decoder
prefills it and takes ``STEPS`` greedy steps; then the plain decoder graph runs once over the prompt and those tokens
with an empty past. With a sound cache the two give the same logits at the prefill's last position and at every
step. It needs nothing beyond what every artifact carries (the sample and the embedding table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mmedge.generation.decoder import position_ids
from mmedge.generation.kv_layout import LOGITS_POSITIONS, cache_names, checked_layout, decoder_context
from mmedge.manifest import decoder_settings
from mmedge.metrics import compare

STEPS = 3  # decode steps after the prefill: each reads the cache the calls before it left


@dataclass(frozen=True)
class SamplePrompt:
    """The decoder's validation sample as a prompt for an empty cache: ``embeds [batch, seq, hidden]``, and the
    context the decoder reads beside its cache for the prefill and for each step (IDEFICS: the image mask, one row per
    position, and the cross-attention K/V; Flan-T5: the encoder mask and cross K/V), with ``sequence_axes``: the axis
    of each context input that runs along the prompt's positions."""

    embeds: np.ndarray
    prefill: dict[str, np.ndarray]
    step: dict[str, np.ndarray]
    sequence_axes: dict[str, int]


@dataclass(frozen=True)
class CachedRun:
    """What the cached decoder gave for ``prompt``: the ``tokens [batch, steps]`` it was fed (its greedy choices), their
    ``token_embeds [batch, steps, hidden]`` from the embedding table, and the ``logits [batch, steps + 1, vocab]`` of
    the prefill's last position and of each step."""

    prompt: SamplePrompt
    tokens: np.ndarray
    token_embeds: np.ndarray
    logits: np.ndarray


def sample_prompt(manifest: Mapping, inputs: Mapping[str, np.ndarray]) -> SamplePrompt:
    """The prompt of the decoder's sample ``inputs`` (its past is left out: the cache starts empty). A context input
    with the prompt's sequence axis gives each step its last row, as the captioning pipelines do."""
    shapes = manifest["components"]["decoder"]["inputs"]
    sequence = shapes["inputs_embeds"]["shape"][1]  # the axis name ("sequence") every per-position input shares
    context = {name: inputs[name] for name in decoder_context(manifest)}
    axes = {name: shapes[name]["shape"].index(sequence) for name in context if sequence in shapes[name]["shape"]}
    step = {name: _last_row(value, axes[name]) if name in axes else value for name, value in context.items()}
    return SamplePrompt(inputs["inputs_embeds"], context, step, axes)


def run_cached(decoder, prompt: SamplePrompt, table, steps: int = STEPS) -> CachedRun:
    """Prefill ``prompt`` through ``decoder`` (an ``mmedge.generation.Decoder``, as ``mmedge.load`` opens it) and feed
    it its own greedy choice (among the ids of the embedding ``table``) ``steps`` times."""
    batch, seq = prompt.embeds.shape[:2]
    if prompt.prefill:
        decoder.set_context(prompt.prefill, prompt.step)
    reserve = getattr(decoder, "reserve", None)
    if callable(reserve):  # a preallocated cache sizes itself first, as the generation loop has it do
        reserve(seq + steps)
    logits = [decoder.start(prompt.embeds, np.ones((batch, seq), dtype=np.int64))]  # each [batch, vocab]
    tokens = []
    for step in range(1, steps + 1):
        tokens.append(np.argmax(logits[-1][:, :table.shape[0]], axis=-1).astype(np.int64))  # [batch]
        logits.append(decoder.step(tokens[-1], np.ones((batch, seq + step), dtype=np.int64)))
    chosen = np.stack(tokens, axis=1)
    return CachedRun(prompt, chosen, np.asarray(table[chosen], dtype=prompt.embeds.dtype), np.stack(logits, axis=1))


def uncached_feeds(manifest: Mapping, inputs: Mapping[str, np.ndarray], run: CachedRun) -> dict[str, np.ndarray]:
    """Feeds of the plain decoder graph for ``run``'s prompt followed by the tokens it fed, in one pass from an empty
    past, its logits asked for the positions the cached run gave; dtypes as the decoder sample's ``inputs``."""
    prompt = run.prompt
    batch, seq = prompt.embeds.shape[:2]
    steps = run.tokens.shape[1]
    total = seq + steps
    settings = decoder_settings(manifest)
    mask = np.ones((batch, total), dtype=inputs["attention_mask"].dtype)
    feeds = {"inputs_embeds": np.concatenate([prompt.embeds, run.token_embeds], axis=1), "attention_mask": mask}
    if "position_ids" in inputs:
        positions = position_ids(mask, total, settings.get("position_offset", 0))
        feeds["position_ids"] = positions.astype(inputs["position_ids"].dtype)
    if LOGITS_POSITIONS in inputs:
        wanted = np.broadcast_to(np.arange(seq - 1, total), (batch, steps + 1))
        feeds[LOGITS_POSITIONS] = np.ascontiguousarray(wanted, dtype=inputs[LOGITS_POSITIONS].dtype)
    for name in cache_names(checked_layout(settings["kv_cache"]), "past"):  # [batch, heads, 0, head_dim]
        feeds[name] = np.ascontiguousarray(inputs[name][:, :, :0])
    for name, value in prompt.prefill.items():
        axis = prompt.sequence_axes.get(name)
        feeds[name] = value if axis is None else np.concatenate(
            [value, np.repeat(_last_row(value, axis), steps, axis=axis)], axis=axis)
    return feeds


def judged(run: CachedRun, uncached_logits: np.ndarray, floor: float) -> dict:
    """The report entry: the worst cosine over every row and checked position, the largest difference, the floor and
    whether it held."""
    checked = run.logits.shape[1]
    reference = np.asarray(uncached_logits)[:, -checked:, :]  # the graph's logits of the same positions
    measured = compare(*(np.reshape(logits, (-1, logits.shape[-1])) for logits in (reference, run.logits)))
    return {"steps": checked - 1, "reference": "the decoder graph without a cache", **measured, "min_cosine": floor,
            "ok": bool(measured["cosine"] >= floor)}


def _last_row(value: np.ndarray, axis: int) -> np.ndarray:
    """``value``'s last row along ``axis``, the axis kept (length 1)."""
    return np.ascontiguousarray(np.take(value, [-1], axis=axis))
