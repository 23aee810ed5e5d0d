"""What every KV-cached decoder over an exported decoder graph shares, whatever runs the graph.

``GraphDecoder`` is the ``mmedge.generation.Decoder`` protocol over one graph that runs both the prefill and every
decode step (the layout the exporters write, names from the manifest's ``kv_cache`` patterns):

    inputs   inputs_embeds [batch, seq, hidden]          float
             attention_mask [batch, past + seq]          int64, 1 = real, 0 = padding
             position_ids [batch, seq]                   int64
             past_key_values.%d.key / .value [batch, heads, past, head_dim]
             context inputs (IDEFICS: image mask, cross-attention K/V), fed by ``set_context``
    outputs  logits [batch, seq, vocab]
             present.%d.key / .value [batch, heads, past + seq, head_dim]

It checks the graph against the layout, the arguments of ``start`` / ``step`` / ``reorder`` and the context, embeds
generated ids and computes position ids (``mmedge.generation.position_ids`` + ``position_offset``). A subclass
holds the cache and runs the graph: ``OrtDecoder`` over an onnxruntime session with IO binding,
``RunnerDecoder`` over any ``mmedge.runner.Runner`` (the TensorRT backend's, which keeps the cache on the GPU).
Nothing here imports an engine.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmedge.embeddings import EmbeddingTable
from mmedge.errors import BackendError, FeedError, IntegrityError, MmedgeError
from mmedge.generation.decoder import position_ids as _position_ids
from mmedge.generation.kv_layout import LOGITS_POSITIONS, cache_names, checked_layout, context_inputs
from mmedge.manifest import decoder_settings


def artifact_decoder(manifest: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kv_cache layout, keywords) a graph decoder takes from an artifact's manifest: ``position_offset``,
    ``max_positions`` and the graph's ``context_inputs``."""
    settings = decoder_settings(manifest)
    layout = settings["kv_cache"]
    context = context_inputs(manifest["components"]["decoder"]["inputs"], layout)  # IDEFICS: image mask, cross K/V
    return layout, {"position_offset": settings.get("position_offset", 0),
                    "max_positions": settings.get("max_positions"),
                    "context_inputs": context}


def _rows(context: Mapping[str, np.ndarray]) -> int:
    return next(iter(context.values())).shape[0] if context else 0


def host(value: Any) -> np.ndarray:
    """A host copy of a backend's output (``numpy()`` of a device array or an OrtValue), or the array itself."""
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


class GraphDecoder(abc.ABC):
    """Base of the graph decoders: checks and bookkeeping; ``_fresh_past``, ``_reordered_past`` and ``_forward``
    (which runs the graph and keeps the presents as the next pasts) are the subclass's."""

    vocab_size: int

    def _bind_graph(self, kv_cache: Mapping[str, Any], embeddings: np.ndarray | EmbeddingTable,
                    inputs: Mapping[str, tuple[Any, Any]], outputs: Mapping[str, Any], *, context_inputs=(),
                    position_offset: int = 0, max_positions: int | None = None) -> None:
        """``inputs``: name -> (numpy dtype or None when unknown, shape); ``outputs``: name -> shape. Shapes hold
        ints for fixed axes."""
        self.kv = checked_layout(kv_cache)
        self.position_offset = position_offset
        self.max_positions = max_positions
        self._past_names = cache_names(self.kv, "past")
        self._present_names = cache_names(self.kv, "present")
        self._context_names = list(context_inputs)
        self._context: dict[str, dict[str, Any]] = {"prefill": {}, "step": {}}
        self._context_given: dict[str, Any] = {}  # the step context set_context got, one row per prompt
        self._context_rows = np.zeros(0, dtype=np.int64)  # the row of _context_given each cache row's step context is
        # a graph with relative positions (T5) computes them from the cache length and takes no position_ids
        self._takes_positions = "position_ids" in inputs
        # a graph that takes logits_positions computes the LM head for the last position only (exports since
        # 2026-12-06); an older graph computes every position's logits and the loop reads the last
        self._takes_logit_positions = LOGITS_POSITIONS in inputs
        want_in = {"inputs_embeds", "attention_mask", *(("position_ids",) if self._takes_positions else ()),
                   *((LOGITS_POSITIONS,) if self._takes_logit_positions else ()), *self._context_names,
                   *self._past_names}
        want_out = {"logits", *self._present_names}
        if set(inputs) != want_in or not want_out <= set(outputs):
            raise IntegrityError(
                f"the decoder graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}",
                f"inputs {sorted(want_in)} and outputs {sorted(want_out)} (from the kv_cache layout)",
                "re-export the artifact; the graph and its manifest's kv_cache entry do not match",
            )
        self._input_types = {name: dtype for name, (dtype, _) in inputs.items()}
        self._embeds_dtype = self._dtype("inputs_embeds", np.float32)
        self._past_dtype = self._dtype(self._past_names[0], np.float32) if self._past_names else np.float32
        self._mask_dtype = self._dtype("attention_mask", np.int64)
        self._position_dtype = self._dtype("position_ids", np.int64)
        self._logit_positions_dtype = self._dtype(LOGITS_POSITIONS, np.int64)
        if not isinstance(embeddings, EmbeddingTable):  # a compressed table stays compressed
            embeddings = np.ascontiguousarray(embeddings, dtype=self._embeds_dtype)
        hidden = inputs["inputs_embeds"][1][-1]
        if len(embeddings.shape) != 2 or (isinstance(hidden, int) and embeddings.shape[1] != hidden):
            raise FeedError(
                f"the embedding table has shape {list(embeddings.shape)}",
                f"[vocab, {hidden}] (the graph's hidden size)",
                "pass the model's input embedding matrix (get_input_embeddings().weight)",
            )
        self._embeddings = embeddings
        vocab = outputs["logits"][-1]
        self.vocab_size = vocab if isinstance(vocab, int) else embeddings.shape[0]
        self._past: list[Any] = []  # in _past_names order; the subclass's kind of array
        self._batch = 0
        self.past_length = 0

    def _dtype(self, name: str, default) -> Any:
        return self._input_types.get(name) or default

    def set_context(self, prefill: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> None:
        """Values of the ``context_inputs`` for the prefill and for every decode step (rows = prompts)."""
        for name, values in (("prefill", prefill), ("step", step)):
            if set(values) != set(self._context_names):
                raise FeedError(f"{name} context has {sorted(values)}", f"exactly {sorted(self._context_names)}",
                                "pass every context input the decoder graph takes")
        self._context = {kind: {k: np.ascontiguousarray(v, dtype=self._dtype(k, np.float32)) for k, v in values.items()}
                         for kind, values in (("prefill", prefill), ("step", step))}
        self._context_given = dict(self._context["step"])  # one row per prompt; reorder gathers from these
        self._context_rows = np.arange(_rows(self._context_given))

    # --- the Decoder protocol ----------------------------------------------------------------------
    def start(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Prefill ``inputs_embeds [batch, seq, hidden]`` (any previous cache dropped) -> logits ``[batch, vocab]``."""
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype)
        mask = np.ascontiguousarray(attention_mask, dtype=self._mask_dtype)
        if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
            raise FeedError(f"prefill got inputs_embeds {list(embeds.shape)} and attention_mask {list(mask.shape)}",
                            "[batch, seq, hidden] and [batch, seq]", "pass a mask with one column per prompt position")
        batch = embeds.shape[0]
        # [batch, heads, 0, head_dim]
        empty = np.zeros((batch, self.kv["heads"], 0, self.kv["head_dim"]), dtype=self._past_dtype)
        self._past = self._fresh_past(empty)
        self._batch, self.past_length = batch, 0
        if self._context_names:  # a new generation: the step context is the one set, one row per prompt again
            self._context["step"] = dict(self._context_given)
            self._context_rows = np.arange(_rows(self._context_given))
        return self._run(embeds, mask, self._context["prefill"])

    def step(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embed ``token_ids [batch]``, run one position with ``attention_mask [batch, past + 1]`` -> ``[batch,
        vocab]``."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        mask = np.ascontiguousarray(attention_mask, dtype=self._mask_dtype)
        if ids.shape[0] != self._batch or mask.shape != (self._batch, self.past_length + 1):
            raise FeedError(
                f"decode step got {ids.shape[0]} token ids and a mask of shape {list(mask.shape)}",
                f"{self._batch} ids and a mask [{self._batch}, {self.past_length + 1}] (cache rows, past length + 1)",
                "call start() first, and reorder() when the number of rows changes",
            )
        embeds = np.asarray(self._embeddings[ids], dtype=self._embeds_dtype)[:, None, :]  # [batch, 1, hidden]
        return self._run(embeds, mask, self._context["step"])

    def reorder(self, rows: np.ndarray) -> None:
        """Cache row ``i`` becomes old row ``rows[i]`` (copies the cache once, through host memory)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._batch and rows.size and (rows.min() < 0 or rows.max() >= self._batch):
            raise FeedError(f"reorder got rows {rows.tolist()[:8]}", f"row indices below {self._batch}",
                            "index existing cache rows")
        if rows.shape[0] == self._batch and np.array_equal(rows, np.arange(self._batch)):
            return
        if self._context_names:
            # Context rows depend only on the prompt: gather them only when some cache row changes prompt (expanding
            # prompts to beams), not when beams swap within one prompt (every beam-search step).
            source = self._context_rows[rows]
            if not np.array_equal(source, self._context_rows):
                self._context["step"] = {k: np.ascontiguousarray(v[source]) for k, v in self._context_given.items()}
            self._context_rows = source
        self._past = self._reordered_past(rows)
        self._batch = rows.shape[0]

    # --- running the graph -------------------------------------------------------------------------
    def _run(self, embeds: np.ndarray, mask: np.ndarray, context: dict[str, np.ndarray]) -> np.ndarray:
        seq = embeds.shape[1]
        if set(context) != set(self._context_names):
            raise FeedError(f"the decoder has context {sorted(context)}", f"{sorted(self._context_names)}",
                            "call set_context() before generating")
        feeds = {"inputs_embeds": embeds, "attention_mask": mask}
        if self._takes_positions:
            feeds["position_ids"] = np.ascontiguousarray(_position_ids(mask, seq, self.position_offset),
                                                         dtype=self._position_dtype)
        if self._takes_logit_positions:  # [batch, 1]: the last position (prompts are left-padded)
            feeds[LOGITS_POSITIONS] = np.full((embeds.shape[0], 1), seq - 1, dtype=self._logit_positions_dtype)
        logits = self._forward({**feeds, **context})  # [batch, seq or 1, vocab]
        self.past_length = mask.shape[1]
        return np.asarray(logits[:, -1, :], dtype=np.float32)  # [batch, vocab]

    def _closed_error(self) -> BackendError:
        return BackendError("the decoder is closed", "an open decoder", f"create a new {type(self).__name__}")

    def _run_error(self, engine: str, exc: Exception) -> MmedgeError:
        from mmedge.device import SMALLER_CALLS, out_of_memory, out_of_memory_error

        if out_of_memory(exc):
            return out_of_memory_error(f"{engine} ran out of memory running the decoder", exc, SMALLER_CALLS)
        detail = str(exc).splitlines()[0][:200] if str(exc) else "no detail"
        return BackendError(f"{engine} failed running the decoder ({type(exc).__name__}: {detail})",
                            "feeds matching the decoder graph", "check that the kv_cache layout matches the graph")

    @abc.abstractmethod
    def _fresh_past(self, empty: np.ndarray) -> list[Any]:
        """The prefill's pasts, one per name in ``_past_names``, from a zero-length ``empty [batch, heads, 0,
        head_dim]``."""

    @abc.abstractmethod
    def _reordered_past(self, rows: np.ndarray) -> list[Any]:
        """The pasts with row ``i`` taken from old row ``rows[i]``."""

    @abc.abstractmethod
    def _forward(self, feeds: dict[str, np.ndarray]) -> Any:
        """Run the graph on ``feeds`` (embeddings, mask, position ids when the graph takes them, context) and the
        pasts; keep its presents in ``self._past``; return its logits ``[batch, seq, vocab]``."""
