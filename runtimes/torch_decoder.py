"""A KV-cached language-model decoder on PyTorch: the ``mmedge.generation.Decoder`` protocol (start / step /
reorder) over the checkpoint's own causal LM, with a static, preallocated KV cache and, on CUDA, the one-token
decode step replayed as a CUDA graph.

- **Static cache.** Keys and values live in preallocated buffers ``[batch, kv_heads, capacity, head_dim]`` per layer
  (zero-filled, so masked slots are finite), written in place at the step's position (``index_copy_``) by a small
  cache object the model's attention layers call (``update``), as transformers' ``StaticCache`` does. Capacity is a
  multiple of ``cache_block`` covering the prompt plus the new tokens the generation loop announces (``reserve``);
  a longer generation grows it by a block (copying the cache once, recapturing the graph).
- **Masks and positions.** The model gets a 4-D additive mask ``[batch, 1, query, capacity]`` built on the device
  from the 2-D padding mask (a query at absolute position ``p`` sees slot ``k`` when ``k <= p`` and the slot is
  real), which transformers uses as is; positions are ``cumsum(mask) - 1`` as everywhere in mmedge (OPT's +2 is
  inside its position embedding, as in the decoder graph). Generated ids are embedded on the device with the LLM's
  own input embeddings.
- **CUDA graph (CUDA only).** The step (embed, mask, forward over the static cache, logits) reads and writes only
  static buffers, so it is captured once per (batch, capacity) after two warm-up runs on a side stream (a step is
  idempotent: it writes the same keys and values to the same slot) and replayed for every later token. A capture
  that fails (LLM.int8's outlier extraction synchronizes with the host) is logged once and the step runs eagerly;
  INT8 decoders skip capture by default for that reason. The prefill runs eagerly (its length varies).
- **Reorder** (beam search) gathers cache rows on the device: in place when the batch keeps its size, into new
  buffers (and a new graph) when it changes (expansion to beams).
- Logits come back to the host as float32 ``[batch, vocab]`` for the numpy generation loop: one device-to-host
  copy per step; the cache never leaves the device.

``torch`` is imported lazily (``mmedge.runtimes.torch_backend.import_torch``); this module imports without it.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import BackendError, FeedError
from mmedge.generation.decoder import position_ids as _position_ids
from mmedge.runtimes.torch_backend import (DTYPE_NAMES, GRAPH_WARMUP, PRECISION_OF_DTYPE, ModelHandle, acquire_model,
                                           import_torch, resolve_device, torch_dtype, weights_folder)

log = logging.getLogger("mmedge")

CACHE_BLOCK = 128  # cache capacity grows in blocks of this many positions


class _StaticKV:
    """What a transformers attention layer calls on its cache: ``update`` writes the new keys/values at
    ``write_positions`` into the preallocated buffers and returns the whole buffers (masked by the 4-D mask)."""

    is_compileable = False

    def __init__(self, keys: list, values: list, write_positions):
        self.keys, self.values = keys, values
        self.write_positions = write_positions  # [new tokens] int64 on the device
        self.length = 0  # positions written before this call (read by models that infer positions; we pass them)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_positions, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_positions, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)


class _State:
    """The device buffers of one (batch, capacity): cache, padding mask, step inputs and logits."""

    def __init__(self, torch, batch: int, capacity: int, layers: int, heads: int, head_dim: int, vocab: int, device, dtype):
        shape = (batch, heads, capacity, head_dim)
        self.batch, self.capacity = batch, capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.mask = torch.zeros((batch, capacity), dtype=torch.int64, device=device)  # [batch, capacity], 1 = real
        self.slots = torch.arange(capacity, device=device)  # [capacity]
        self.ids = torch.zeros((batch,), dtype=torch.int64, device=device)  # the step's token ids
        self.positions = torch.zeros((batch, 1), dtype=torch.int64, device=device)  # the step's position ids
        self.step_slot = torch.zeros((1,), dtype=torch.int64, device=device)  # where the step writes in the cache
        self.logits = torch.zeros((batch, vocab), dtype=torch.float32, device=device)  # the step's output
        self.cache = _StaticKV(self.keys, self.values, self.step_slot)


class TorchDecoder:
    """``mmedge.generation.Decoder`` over a transformers causal LM (fed input embeddings), static KV cache.

    ``language_model``: e.g. BLIP-2's ``model.language_model``, on ``device`` at ``dtype`` (possibly with
    bitsandbytes layers). ``cuda_graphs``: None = on for CUDA. ``position_offset``: added to ``cumsum(mask) - 1``
    (0 for OPT, whose offset is inside the model). ``max_positions``: the model's limit, for the loop's checks.
    """

    def __init__(self, language_model, *, device, dtype, cuda_graphs: bool | None = None, position_offset: int = 0,
                 max_positions: int | None = None, cache_block: int = CACHE_BLOCK, handle: ModelHandle | None = None,
                 quantization: dict | None = None):
        self.torch = torch = import_torch()
        self.model = language_model
        self.device, self.dtype = device, dtype
        config = language_model.config.get_text_config() if hasattr(language_model.config, "get_text_config") else language_model.config
        self.layers = int(config.num_hidden_layers)
        self.heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        head = language_model.get_output_embeddings()
        self.vocab_size: int = int(head.out_features if hasattr(head, "out_features") else head.weight.shape[0])
        self.max_positions = max_positions
        self.position_offset = int(position_offset)
        self.cache_block = int(cache_block)
        self.quantization = quantization or {}
        self._embed = language_model.get_input_embeddings()
        params = inspect.signature(language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        default_graphs = device.type == "cuda" and self.quantization.get("method") != "int8"
        self.cuda_graphs = default_graphs if cuda_graphs is None else bool(cuda_graphs) and device.type == "cuda"
        self.graph_status = "off (CPU)" if device.type != "cuda" else ("on" if self.cuda_graphs else "off")
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._graph: Any = None  # the captured step of the current state
        self._graph_failed: set[tuple[int, int]] = set()
        self._state: _State | None = None
        self._reserved: int | None = None
        self._handle = handle
        self._batch = 0
        self.past_length = 0

    @property
    def precision(self) -> str:
        return self.quantization.get("method") or PRECISION_OF_DTYPE[str(self.dtype).replace("torch.", "")]

    # --- the Decoder protocol ----------------------------------------------------------------------
    def reserve(self, total_positions: int) -> None:
        """The generation loop's hint: the next generation needs ``total_positions`` (prompt + new tokens)."""
        self._reserved = int(total_positions)

    def start(self, inputs_embeds, attention_mask) -> np.ndarray:
        """Prefill ``inputs_embeds [batch, seq, hidden]`` (any previous cache dropped) -> logits ``[batch, vocab]``."""
        torch = self.torch
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        shape = tuple(inputs_embeds.shape)
        if len(shape) != 3 or mask.shape != shape[:2]:
            raise FeedError(f"prefill got inputs_embeds {list(shape)} and attention_mask {list(mask.shape)}",
                            "[batch, seq, hidden] and [batch, seq]", "pass a mask with one column per prompt position")
        batch, seq = mask.shape
        need = max(seq + 1, self._reserved or 0, seq + self.cache_block // 2)
        self._reserved = None
        with torch.inference_mode():
            state = self._state_for(batch, need)
            state.mask.zero_()
            state.mask[:, :seq].copy_(torch.from_numpy(mask))
            embeds = inputs_embeds if isinstance(inputs_embeds, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(inputs_embeds))
            embeds = embeds.to(self.device, self.dtype)
            query = torch.arange(seq, device=self.device)
            positions = torch.from_numpy(_position_ids(mask, seq, self.position_offset)).to(self.device)
            state.cache.write_positions, state.cache.length = query, 0
            try:
                logits = self._forward(embeds, self._additive_mask(state.mask, query, state.slots), positions, state.cache)
            finally:
                state.cache.write_positions = state.step_slot
            out = logits.float().cpu().numpy()
        self._batch, self.past_length = batch, seq
        state.cache.length = seq
        return out

    def step(self, token_ids, attention_mask) -> np.ndarray:
        """Embed ``token_ids [batch]``, run one position with ``attention_mask [batch, past + 1]`` -> ``[batch, vocab]``."""
        torch = self.torch
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if self._state is None or ids.shape[0] != self._batch or mask.shape != (self._batch, self.past_length + 1):
            raise FeedError(
                f"decode step got {ids.shape[0]} token ids and a mask of shape {list(mask.shape)}",
                f"{self._batch} ids and a mask [{self._batch}, {self.past_length + 1}] (cache rows, past length + 1)",
                "call start() first, and reorder() when the number of rows changes")
        past = self.past_length
        with torch.inference_mode():
            if past + 1 > self._state.capacity:
                self._grow(past + 1)
            state = self._state
            state.ids.copy_(torch.from_numpy(ids))
            state.mask[:, : past + 1].copy_(torch.from_numpy(mask))
            state.positions.copy_(torch.from_numpy(_position_ids(mask, 1, self.position_offset)))
            state.step_slot.fill_(past)
            state.cache.length = past
            graph = self._captured(state) if self.cuda_graphs else None
            if graph is not None:
                graph.replay()
            else:
                self._step_core(state)
            out = state.logits.cpu().numpy()
        self.past_length = past + 1
        state.cache.length = past + 1
        return out

    def reorder(self, rows) -> None:
        """Cache row ``i`` becomes old row ``rows[i]`` (gathered on the device)."""
        torch = self.torch
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._batch and rows.size and (rows.min() < 0 or rows.max() >= self._batch):
            raise FeedError(f"reorder got rows {rows.tolist()[:8]}", f"row indices below {self._batch}", "index existing cache rows")
        if self._state is None or (rows.shape[0] == self._batch and np.array_equal(rows, np.arange(self._batch))):
            return
        with torch.inference_mode():
            index = torch.from_numpy(rows).to(self.device)
            old = self._state
            if rows.shape[0] == old.batch:
                for buffer in (*old.keys, *old.values, old.mask):
                    buffer.copy_(buffer.index_select(0, index))
            else:
                new = self._new_state(rows.shape[0], old.capacity)
                for target, source in zip((*new.keys, *new.values, new.mask), (*old.keys, *old.values, old.mask)):
                    target.copy_(source.index_select(0, index))
                new.cache.length = old.cache.length
                self._replace_state(new)
        self._batch = int(rows.shape[0])

    def close(self) -> None:
        self._graph = None
        self._state = None
        self.model = None
        if self._handle is not None:
            self._handle.release()
            self._handle = None

    # --- buffers -----------------------------------------------------------------------------------
    def _capacity(self, need: int) -> int:
        capacity = math.ceil(need / self.cache_block) * self.cache_block
        if self.max_positions:
            capacity = max(need, min(capacity, int(self.max_positions)))
        return capacity

    def _new_state(self, batch: int, capacity: int) -> _State:
        return _State(self.torch, batch, capacity, self.layers, self.heads, self.head_dim, self.vocab_size, self.device, self.dtype)

    def _replace_state(self, state: _State) -> None:
        self._graph = None  # a graph reads the old state's buffers
        self._state = state

    def _state_for(self, batch: int, need: int) -> _State:
        """The current buffers when they fit (the captured step is kept), else new ones."""
        state = self._state
        if state is None or state.batch != batch or state.capacity < need:
            self._replace_state(self._new_state(batch, self._capacity(need)))
        return self._state

    def _grow(self, need: int) -> None:
        old = self._state
        new = self._new_state(old.batch, self._capacity(max(need, old.capacity + self.cache_block)))
        length = old.capacity
        for target, source in zip((*new.keys, *new.values), (*old.keys, *old.values)):
            target[:, :, :length].copy_(source)
        new.mask[:, :length].copy_(old.mask)
        new.cache.length = old.cache.length
        self._replace_state(new)

    # --- running the model -------------------------------------------------------------------------
    def _additive_mask(self, mask, query, slots):
        """``[batch, 1, query, capacity]``: 0 where query position ``query[q]`` may see slot ``k``, else the dtype's minimum."""
        torch = self.torch
        allowed = (slots[None, :] <= query[:, None])[None, :, :] & mask.bool()[:, None, :]  # [batch, query, capacity]
        blocked = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.where(allowed, torch.zeros((), dtype=self.dtype, device=self.device), blocked)[:, None, :, :]

    def _forward(self, embeds, additive, positions, cache):
        kwargs = {self._cache_kwarg: cache, "use_cache": True}
        if self._keep_kwarg:
            kwargs[self._keep_kwarg] = 1
        out = self.model(inputs_embeds=embeds, attention_mask=additive, position_ids=positions, **kwargs)
        return out.logits[:, -1, :]  # [batch, vocab]

    def _step_core(self, state: _State) -> None:
        """The decode step over static buffers only (what the CUDA graph captures)."""
        embeds = self._embed(state.ids)[:, None, :].to(self.dtype)  # [batch, 1, hidden]
        additive = self._additive_mask(state.mask, state.step_slot, state.slots)  # [batch, 1, 1, capacity]
        state.logits.copy_(self._forward(embeds, additive, state.positions, state.cache).float())

    def _captured(self, state: _State):  # CUDA-only path, exercised by the GPU tests
        """The CUDA graph of the step for the current state, captured on first use (None: run eagerly)."""
        if self._graph is not None:
            return self._graph
        key = (state.batch, state.capacity)
        if key in self._graph_failed:
            return None
        torch = self.torch
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):  # idempotent: the same keys/values land in the same slot
                    self._step_core(state)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step_core(state)
        except Exception as exc:
            self._graph_failed.add(key)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self.graph_status = f"eager (capture failed: {reason})"
            log.warning("mmedge: CUDA graph capture of the decode step failed (%s); decoding eagerly", reason)
            torch.cuda.synchronize(self.device)
            return None
        self._graph = graph
        self.graph_status = "on"
        return graph


def create_decoder(artifact, *, device: str | None = "auto", dtype: str | None = None, cuda_graphs: bool | None = None,
                   quantization: str | None = None, checkpoint: str | Path | None = None,
                   cache_block: int = CACHE_BLOCK, **_ignored) -> TorchDecoder:
    """The artifact's KV-cached decoder on torch, from its PyTorch weights (or ``checkpoint``), sharing the model
    with the artifact's torch runners; ``quantization``: None, "int8" or "nf4" (bitsandbytes) for the LLM's layers."""
    from mmedge.export.families import FAMILIES

    import_torch()
    family = artifact.manifest["family"]
    settings = artifact.manifest[family]["decoder"]
    chosen = resolve_device(device)
    precision = torch_dtype(dtype, chosen)
    handle = acquire_model(weights_folder(artifact, checkpoint), family, chosen, precision, quantization=quantization,
                           decoder=True)
    llm = FAMILIES[family].reference_language_model(handle.model)
    if llm is None:
        handle.release()
        raise BackendError(f"the torch backend's KV-cached decoder does not run {family} decoders (they take image "
                           "context beside the cache)", "a BLIP-2-style causal LLM",
                           "load with backend='auto' (the decoder then runs on ONNX Runtime)")
    return TorchDecoder(llm, device=chosen, dtype=precision, cuda_graphs=cuda_graphs,
                        position_offset=settings.get("position_offset", 0), max_positions=settings.get("max_positions"),
                        cache_block=cache_block, handle=handle, quantization=handle.quantization)


__all__ = ["CACHE_BLOCK", "DTYPE_NAMES", "TorchDecoder", "create_decoder"]
