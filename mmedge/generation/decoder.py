"""What the generation loop needs from a language model: prefill, one step, and cache reordering.

A decoder owns its KV cache and its token-embedding table; the loop only ever hands it token ids,
attention masks and row indices, so no cache tensor crosses into the loop (and none is copied by it).
Backends implement this protocol (``mmedge.backends.Backend.open_decoder`` opens theirs):
``mmedge.runtimes.onnxruntime_decoder.OrtDecoder`` over an ONNX graph on ONNX Runtime,
``mmedge.runtimes.runner_decoder.RunnerDecoder`` over any runner's graph (the TensorRT backend's engine, the cache
kept on the GPU) and ``mmedge.runtimes.torch_decoder.TorchDecoder`` over the checkpoint's own LLM (static KV cache,
CUDA graphs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Decoder(Protocol):
    """A causal language model with a KV cache it keeps between calls.

    ``vocab_size`` is the width of the logits. A decoder may also expose ``max_positions``
    (``int | None``): how many positions (prompt + generated) it can attend to; ``reserve(total)``, which
    the loop calls before ``start`` with prompt length + max_new_tokens (a preallocated cache sizes itself); and
    ``step_greedy(token_ids, attention_mask, banned) -> int64 [batch]``: ``step`` followed by the greedy choice
    made where the logits are (``argmax`` with the ``banned`` ids excluded, the first maximum), which the loop uses
    for greedy decoding without a repetition penalty, so that only token ids cross to the host.
    """

    vocab_size: int

    def start(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Prefill: ``inputs_embeds [batch, seq, hidden]``, ``attention_mask [batch, seq]`` (0 = padding,
        padded on the left) -> float32 logits of the last position ``[batch, vocab]``.
        Drops any previous cache and fills it with the prompt's keys and values."""
        ...

    def step(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One new token per row: ``token_ids [batch]`` (int64), ``attention_mask [batch, past + 1]``
        -> float32 logits ``[batch, vocab]``. The decoder embeds the ids itself and appends to its cache."""
        ...

    def reorder(self, rows: np.ndarray) -> None:
        """Make cache row ``i`` a copy of old row ``rows[i]`` (``rows [new_batch]``, int64; may repeat rows,
        e.g. to expand each prompt to its beams, and may change the batch size)."""
        ...


def position_ids(attention_mask: np.ndarray, new: int, offset: int = 0) -> np.ndarray:
    """Positions of the last ``new`` columns of ``attention_mask [batch, total]`` -> int64 ``[batch, new]``.

    A token's position is the number of real (mask 1) tokens before it, so left padding does not
    shift the prompt: ``cumsum(mask) - 1``, which is what transformers' OPT (and the generic
    ``generate`` path of LLaMA-style models) compute from the mask. Padding columns get 0 here where
    OPT computes -1; a padding column is masked out of every attention, so its position never reaches
    a real token's output. ``offset`` is added for graphs that expect a model-specific offset applied
    outside (OPT's +2 lives inside its position-embedding module, so an OPT graph takes offset 0).
    """
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [batch, total]
    return positions[:, mask.shape[1] - new:] + offset
