"""A KV-cached language-model decoder on PyTorch: the ``mmedge.generation.Decoder`` protocol (start / step /
reorder, and ``step_greedy``) over the checkpoint's own causal LM, with a static, preallocated KV cache and, on
CUDA, the one-token decode step compiled and replayed as a CUDA graph.

- **Static cache, one per (batch, capacity).** Keys and values live in preallocated buffers
  ``[batch, kv_heads, capacity, head_dim]`` per layer (zero-filled, so masked slots are finite), written in place
  at the step's slot (``index_copy_``) by a small cache object the model's attention layers call (``update``), as
  transformers' ``StaticCache`` does. Each (batch, capacity) has its own buffers and its own captured step, kept in
  a small LRU (``max_states``): beam search prefills B rows and gathers them into the B×beams buffers, and every
  later beam caption finds both with their graph (nothing recaptured). Capacity is a multiple of ``cache_block``
  covering the prompt plus the new tokens the generation loop announces (``reserve``); a longer generation grows
  it by a block (the cache copied once, the smaller buffers dropped).
- **The step on the device.** The step reads the token ids (one pinned, asynchronous host → device copy of
  ``[batch]`` int64), marks its cache slot in the 2-D mask and derives the position ids from it
  (``sum(mask) - 1``: ``cumsum(mask) - 1`` at the new column, as everywhere in mmedge; OPT's +2 is inside the model),
  builds the 4-D additive mask ``[batch, 1, 1, capacity]``, runs the model over the static cache, writes the float32
  logits into a static buffer and the greedy choice (argmax after a ``[vocab]`` bias that bans tokens, e.g. EOS
  before ``min_new_tokens``) into another. ``step`` copies the logits back (pinned, ``[batch, vocab]``) for the
  numpy loop's processors; ``step_greedy`` copies back only the ``[batch]`` token ids. The host sends a new mask only
  when the loop's mask is not the previous one plus a column of ones.
- **One step ahead (greedy, CUDA graphs).** After a greedy step, before waiting for its ids, ``step_greedy`` launches
  the next step on the GPU with the ids it just chose (device to device) and the same banned tokens, so the GPU
  decodes while the host runs the loop. When the loop's next call brings exactly those ids, the previous mask plus a
  column of ones and the same bans, that step is already running and is taken as it is; otherwise it is run again
  with the loop's inputs (it writes the same cache slot, so nothing needs undoing). It never runs past the positions
  the loop reserved or the cache's capacity; a generation that ends early (EOS) leaves one step computed for
  nothing. ``run_ahead``: None = on where the step is a CUDA graph.
- **Compiled and captured (CUDA).** The step is one function over static buffers, so it is compiled with
  ``torch.compile(fullgraph=True)`` (inductor; ``compile``), run twice on the decoder's own stream (a step is
  idempotent: the same keys and values land in the same slot), captured once per (batch, capacity) and replayed
  for every later token. A capture that fails (LLM.int8's outlier extraction synchronizes with the host) is logged
  once and the step runs without a graph; INT8 decoders skip capture, and quantized ones compilation, by default.
  The prefill runs eagerly (its length varies).
- **Reorder** (beam search) gathers cache rows on the device: in place when the batch keeps its size, into the
  buffers of the new batch size otherwise.

``torch`` is imported lazily (``mmedge.runtimes.torch_backend.import_torch``); this module imports without it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import BackendError, FeedError
from mmedge.generation.decoder import position_ids as _position_ids
from mmedge.manifest import decoder_settings
from mmedge.runtimes.torch_backend import (
    PRECISION_OF_DTYPE,
    ModelHandle,
    acquire_model,
    import_torch,
    resolve_device,
    torch_dtype,
    weights_folder,
)
from mmedge.runtimes.torch_checkpoint import refuse_another_size
from mmedge.runtimes.torch_graphs import Compiled, HostBuffers, capture, compile_backend, failure

log = logging.getLogger("mmedge")

CACHE_BLOCK = 128  # cache capacity grows in blocks of this many positions
MAX_STATES = 4  # (batch, capacity) buffer sets, with their captured steps, kept at once


class _StaticKV:
    """What a transformers attention layer calls on its cache: ``update`` writes the new keys/values at
    ``write_positions`` into the preallocated buffers and returns the whole buffers (masked by the 4-D mask).

    Positions and the 4-D mask are always passed to the model, so it never needs the cache's length:
    ``get_seq_length`` answers 0 whatever was written, which keeps a compiled step free of a per-token constant.
    """

    is_compileable = False

    def __init__(self, keys: list, values: list, write_positions):
        self.keys, self.values = keys, values
        self.write_positions = write_positions  # [new tokens] int64 on the device

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_positions, key_states.to(keys.dtype))
        values.index_copy_(2, self.write_positions, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)


class _State:
    """The device buffers of one (batch, capacity): cache, padding mask, step inputs and outputs, and its graph."""

    def __init__(self, torch, batch: int, capacity: int, layers: int, heads: int, head_dim: int, vocab: int, device,
                 dtype):
        shape = (batch, heads, capacity, head_dim)
        self.batch, self.capacity = batch, capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.mask = torch.zeros((batch, capacity), dtype=torch.int64, device=device)  # [batch, capacity], 1 = real
        self.slots = torch.arange(capacity, device=device)  # [capacity]
        self.ids = torch.zeros((batch,), dtype=torch.int64, device=device)  # the step's token ids
        self.new_mask = torch.ones((batch, 1), dtype=torch.int64, device=device)  # the step's mask column
        self.new_mask_ones = True
        self.step_slot = torch.zeros((1,), dtype=torch.int64, device=device)  # where the step writes in the cache
        self.logits = torch.zeros((batch, vocab), dtype=torch.float32, device=device)  # the step's logits
        self.bias = torch.zeros((vocab,), dtype=torch.float32, device=device)  # -inf on banned tokens
        self.banned: tuple[int, ...] = ()
        self.next_ids = torch.zeros((batch,), dtype=torch.int64, device=device)  # argmax(logits + bias)
        self.cache = _StaticKV(self.keys, self.values, self.step_slot)
        self.graph: Any = None  # the captured step (CUDA)
        self.graph_failed = False


class _Ahead:
    """A step launched before the loop asked for it: the buffers, the slot it writes, the ids and bans it used."""

    def __init__(self, state: _State, slot: int, banned: tuple[int, ...]):
        self.state, self.slot, self.banned = state, slot, banned
        self.ids: np.ndarray | None = None  # the ids it runs on: the previous step's choice, once read on the host


class TorchDecoder:
    """``mmedge.generation.Decoder`` over a transformers causal LM (fed input embeddings), static KV cache.

    ``language_model``: e.g. BLIP-2's ``model.language_model``, on ``device`` at ``dtype`` (possibly with
    bitsandbytes layers). ``cuda_graphs``: None = on for CUDA (off for LLM.int8). ``compile``: None = on where CUDA
    graphs are and the weights are not bitsandbytes-quantized; True, False or a torch.compile backend name.
    ``position_offset``: added to ``cumsum(mask) - 1`` (0 for OPT, whose offset is inside the model).
    ``max_positions``: the model's limit, for the loop's checks.
    """

    backend = "torch"

    def __init__(self, language_model, *, device, dtype, cuda_graphs: bool | None = None,
                 compile: bool | str | None = None,
                 position_offset: int = 0, max_positions: int | None = None, cache_block: int = CACHE_BLOCK,
                 max_states: int = MAX_STATES, handle: ModelHandle | None = None, quantization: dict | None = None,
                 run_ahead: bool | None = None):
        self.torch = torch = import_torch()
        self.model = language_model
        self.device, self.dtype = device, dtype
        config = language_model.config.get_text_config() if hasattr(language_model.config,
                                                                    "get_text_config") else language_model.config
        self.layers = int(config.num_hidden_layers)
        self.heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        head = language_model.get_output_embeddings()
        self.vocab_size: int = int(head.out_features if hasattr(head, "out_features") else head.weight.shape[0])
        self.max_positions = max_positions
        self.position_offset = int(position_offset)
        self.cache_block = int(cache_block)
        self.max_states = max(2, int(max_states))
        self.quantization = quantization or {}
        self._embed = language_model.get_input_embeddings()
        params = inspect.signature(language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        cuda = device.type == "cuda"
        default_graphs = cuda and self.quantization.get("method") != "int8"
        self.cuda_graphs = default_graphs if cuda_graphs is None else bool(cuda_graphs) and cuda
        backend = compile_backend(compile, default=self.cuda_graphs and not self.quantization)
        self._step_fn = Compiled(self._step_core, backend, "decode step")
        self.graph_status = "off (CPU)" if not cuda else ("on" if self.cuda_graphs else "off")
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._stream = torch.cuda.Stream(device) if self.cuda_graphs else None
        self._host = HostBuffers(device)
        self._states: OrderedDict[tuple[int, int], _State] = OrderedDict()  # LRU: most recent last
        self._state: _State | None = None
        self._host_mask: np.ndarray | None = None  # [batch, past] the mask the device holds
        self._reserved: int | None = None
        self._limit: int | None = None  # prompt + new tokens the loop reserved for this generation
        self.run_ahead = run_ahead  # None: when the step is a CUDA graph
        self._ahead: _Ahead | None = None
        self.steps_ahead = {"taken": 0, "redone": 0}  # run-ahead steps the loop took as they were / ran again
        self._handle = handle
        self._batch = 0
        self.past_length = 0

    @property
    def precision(self) -> str:
        return self.quantization.get("method") or PRECISION_OF_DTYPE[str(self.dtype).replace("torch.", "")]

    @property
    def compile_status(self) -> str:
        return self._step_fn.status

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
        self._limit, self._reserved = self._reserved, None
        self._ahead = None
        with torch.inference_mode():
            state = self._state_for(batch, need)
            state.mask.zero_()
            state.mask[:, :seq].copy_(self._host.stage("mask", mask), non_blocking=True)
            embeds = inputs_embeds if isinstance(inputs_embeds,
                                                 torch.Tensor) else self._host.stage("embeds", inputs_embeds)
            embeds = embeds.to(self.device, self.dtype, non_blocking=True)
            positions = self._host.stage("positions",
                                         _position_ids(mask, seq,
                                                       self.position_offset)).to(self.device, non_blocking=True)
            self._host.queued(("mask", "embeds", "positions"))
            query = torch.arange(seq, device=self.device)
            state.cache.write_positions = query
            try:
                logits = self._forward(embeds, self._additive_mask(state.mask, query, state.slots), positions,
                                       state.cache)
            finally:
                state.cache.write_positions = state.step_slot
            out = self._to_host("logits", logits.float())
        self._batch, self.past_length = batch, seq
        self._host_mask = mask
        return out

    def step(self, token_ids, attention_mask) -> np.ndarray:
        """Embed ``token_ids [batch]``, run one position with ``attention_mask [batch, past + 1]`` -> ``[batch,
        vocab]``."""
        with self.torch.inference_mode():
            state = self._run_step(token_ids, attention_mask, ())
            return self._to_host("logits", state.logits)

    def step_greedy(self, token_ids, attention_mask, banned: tuple[int, ...] = ()) -> np.ndarray:
        """:meth:`step`, then the greedy choice on the device: ``argmax`` of the logits with the ``banned`` token ids
        excluded (the first maximum, as numpy's) -> int64 ``[batch]``; only the ids come back to the host. With
        ``run_ahead``, the next step is started before this one's ids are read (see the module docstring)."""
        with self.torch.inference_mode():
            state = self._run_step(token_ids, attention_mask, tuple(int(t) for t in banned), greedy=True)
            if self.device.type != "cuda":
                ids = state.next_ids.clone().numpy()
                self._launch_ahead(state)
                return self._ahead_ids(ids)
            pinned = self._host.fetch("next_ids", state.next_ids)
            done = self.torch.cuda.Event()
            done.record(self.torch.cuda.current_stream(self.device))
            self._launch_ahead(state)  # queued behind the copy: the GPU goes on while the host waits for the ids
            done.synchronize()
            return self._ahead_ids(pinned.numpy().copy())

    def reorder(self, rows) -> None:
        """Cache row ``i`` becomes old row ``rows[i]`` (gathered on the device)."""
        torch = self.torch
        self._ahead = None
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._batch and rows.size and (rows.min() < 0 or rows.max() >= self._batch):
            raise FeedError(f"reorder got rows {rows.tolist()[:8]}", f"row indices below {self._batch}",
                            "index existing cache rows")
        if self._state is None or (rows.shape[0] == self._batch and np.array_equal(rows, np.arange(self._batch))):
            return
        with torch.inference_mode():
            index = torch.from_numpy(rows).to(self.device)
            old = self._state
            if rows.shape[0] == old.batch:
                for buffer in (*old.keys, *old.values, old.mask):
                    buffer.copy_(buffer.index_select(0, index))
            else:
                new = self._state_for(int(rows.shape[0]), old.capacity, exact=True)
                for target, source in zip((*new.keys, *new.values, new.mask), (*old.keys, *old.values, old.mask)):
                    torch.index_select(source, 0, index, out=target)
        self._batch = int(rows.shape[0])
        if self._host_mask is not None:
            self._host_mask = self._host_mask[rows]

    def close(self) -> None:
        self._ahead = None
        self._states.clear()
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

    def _state_for(self, batch: int, need: int, exact: bool = False) -> _State:
        """The buffers for ``batch`` rows holding ``need`` positions (``exact``: of capacity ``need``): the smallest
        kept one that fits (with its captured step), else new ones. Kept buffers of that batch that are smaller are
        dropped (a grown cache replaces them), and the least recently used beyond ``max_states``."""
        fitting = [key for key in self._states if key[0] == batch and (key[1] == need if exact else key[1] >= need)]
        if fitting:
            key = min(fitting, key=lambda k: k[1])
            self._states.move_to_end(key)
        else:
            capacity = need if exact else self._capacity(need)
            for small in [k for k in self._states if k[0] == batch and k[1] < capacity]:
                del self._states[small]
            key = (batch, capacity)
            self._states[key] = _State(self.torch, batch, capacity, self.layers, self.heads, self.head_dim,
                                       self.vocab_size,
                                       self.device, self.dtype)
            while len(self._states) > self.max_states:
                self._states.popitem(last=False)
        self._state = self._states[key]
        return self._state

    def _grow(self, need: int) -> _State:
        """Buffers with room for ``need`` positions, the cache copied over; the smaller ones are dropped."""
        old = self._state
        with self.torch.inference_mode():
            new = self._state_for(old.batch, self._capacity(max(need, old.capacity + self.cache_block)), exact=True)
            length = old.capacity
            for target, source in zip((*new.keys, *new.values), (*old.keys, *old.values)):
                target[:, :, :length].copy_(source)
            new.mask.zero_()
            new.mask[:, :length].copy_(old.mask)
        return new

    def _to_host(self, name: str, tensor) -> np.ndarray:
        """``tensor`` on the host (through a pinned buffer on CUDA: one copy, one synchronization), a fresh array."""
        if self.device.type != "cuda":
            return tensor.detach().clone().numpy()
        buffer = self._host.fetch(name, tensor)
        self.torch.cuda.current_stream(self.device).synchronize()
        return buffer.numpy().copy()

    # --- one step ------------------------------------------------------------------------------------
    def _run_step(self, token_ids, attention_mask, banned: tuple[int, ...], greedy: bool = False) -> _State:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        mask = np.asarray(attention_mask)
        past = self.past_length
        if self._state is None or ids.shape[0] != self._batch or mask.shape != (self._batch, past + 1):
            raise FeedError(
                f"decode step got {ids.shape[0]} token ids and a mask of shape {list(mask.shape)}",
                f"{self._batch} ids and a mask [{self._batch}, {past + 1}] (cache rows, past length + 1)",
                "call start() first, and reorder() when the number of rows changes")
        ahead, self._ahead = self._ahead, None
        if ahead is not None and greedy and self._is_ahead(ahead, ids, mask, past, banned):
            self.steps_ahead["taken"] += 1
            state = ahead.state  # this very step is already running (or done) on the GPU
        else:
            self.steps_ahead["redone"] += ahead is not None
            state = self._state if past + 1 <= self._state.capacity else self._grow(past + 1)
            self._feed(state, ids, mask, past, banned)
            self._launch(state)
        self._host_mask = np.ascontiguousarray(mask, dtype=np.int64)
        self.past_length = past + 1
        return state

    def _launch(self, state: _State) -> None:
        """Run the step of ``state`` as fed: its CUDA graph when there is one, else the (compiled) function."""
        if self.cuda_graphs and self._captured(state):
            state.graph.replay()
        else:
            self._step_fn(state)

    def _is_ahead(self, ahead: _Ahead, ids: np.ndarray, mask: np.ndarray, past: int, banned: tuple[int, ...]) -> bool:
        """Whether the step launched ahead is the one the loop asks for: same buffers, slot, ids, bans, and a mask that
        is the previous one plus a column of ones (what the step wrote on the device)."""
        return (ahead.state is self._state and ahead.slot == past and ahead.banned == banned and ahead.ids is not None
                and np.array_equal(ids, ahead.ids) and self._host_mask is not None
                and self._host_mask.shape == (len(ids), past) and bool(mask[:, past].all())
                and np.array_equal(mask[:, :past], self._host_mask))

    def _launch_ahead(self, state: _State) -> None:
        """Start the next step on this step's choice (device to device), where the loop will want it."""
        slot = self.past_length  # the next step's cache slot
        enabled = (self.cuda_graphs and state.graph is not None) if self.run_ahead is None else self.run_ahead
        fits = slot + 1 <= state.capacity and (self._limit is None or slot + 1 < self._limit)
        if not enabled or not fits or not state.new_mask_ones:
            return
        state.ids.copy_(state.next_ids)
        state.step_slot.fill_(slot)
        self._launch(state)
        self._ahead = _Ahead(state, slot, state.banned)

    def _ahead_ids(self, ids: np.ndarray) -> np.ndarray:
        """The ids a launched-ahead step runs on are those just returned to the loop."""
        if self._ahead is not None:
            self._ahead.ids = ids
        return ids

    def _feed(self, state: _State, ids: np.ndarray, mask: np.ndarray, past: int, banned: tuple[int, ...]) -> None:
        """Host → device: the ids (pinned, asynchronous), the cache slot, the mask only where it is not the previous
        one plus a column of ones, the banned-token bias only when the banned set changes."""
        state.ids.copy_(self._host.stage("ids", ids), non_blocking=True)
        staged = ["ids"]
        state.step_slot.fill_(past)
        column = mask[:, past:]
        stale_mask = self._host_mask is None or self._host_mask.shape != (state.batch, past)
        if stale_mask or not np.array_equal(mask[:, :past], self._host_mask):
            state.mask[:, :past].copy_(self._host.stage("mask", np.ascontiguousarray(mask[:, :past], dtype=np.int64)),
                                       non_blocking=True)
            staged.append("mask")
        if not column.all() or not state.new_mask_ones:
            state.new_mask.copy_(self._host.stage("column", np.ascontiguousarray(column, dtype=np.int64)),
                                 non_blocking=True)
            staged.append("column")
            state.new_mask_ones = bool(column.all())
        if banned != state.banned:
            state.bias.zero_()
            valid = [t for t in banned if 0 <= t < self.vocab_size]
            if valid:
                state.bias[valid] = float("-inf")
            state.banned = banned
        self._host.queued(staged)

    # --- running the model -------------------------------------------------------------------------
    def _additive_mask(self, mask, query, slots):
        """``[batch, 1, query, capacity]``: 0 where query position ``query[q]`` may see slot ``k``, else the dtype's
        minimum."""
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
        """The decode step over the state's static buffers only (what is compiled and what the CUDA graph captures)."""
        state.mask.index_copy_(1, state.step_slot, state.new_mask)  # [batch, capacity]: the step's own column
        positions = (state.mask.sum(dim=1, keepdim=True) - 1).clamp_min(0) + self.position_offset  # [batch, 1]
        embeds = self._embed(state.ids)[:, None, :].to(self.dtype)  # [batch, 1, hidden]
        additive = self._additive_mask(state.mask, state.step_slot, state.slots)  # [batch, 1, 1, capacity]
        logits = self._forward(embeds, additive, positions, state.cache).float()  # [batch, vocab]
        state.logits.copy_(logits)
        state.next_ids.copy_((logits + state.bias).argmax(dim=-1))  # [batch]: the first maximum, as np.argmax

    def _captured(self, state: _State) -> bool:  # CUDA-only path, exercised by the GPU tests
        """Whether the state's step is captured (capturing it on first use); False: run it without a graph."""
        if state.graph is not None:
            return True
        if state.graph_failed:
            return False
        try:
            state.graph, _ = capture(self._step_fn, (state,), device=self.device, stream=self._stream, pool=self._pool)
        except Exception as exc:
            state.graph_failed = True
            self.graph_status = f"eager (capture failed: {failure(exc)})"
            log.warning("mmedge: CUDA graph capture of the decode step failed (%s); decoding without a graph",
                        failure(exc))
            self.torch.cuda.synchronize(self.device)
            return False
        self.graph_status = "on"
        return True


def create_decoder(artifact, *, device: str | None = "auto", dtype: str | None = None, cuda_graphs: bool | None = None,
                   compile: bool | str | None = None, quantization: str | None = None,
                   checkpoint: str | Path | None = None,
                   cache_block: int = CACHE_BLOCK, **unknown) -> TorchDecoder:
    """The artifact's KV-cached decoder on torch, from its PyTorch weights (or ``checkpoint``), sharing the model
    with the artifact's torch runners; ``quantization``: None, "int8" or "nf4" (bitsandbytes) for the LLM's layers."""
    from mmedge.backends import refuse_unknown_options
    from mmedge.export.families import FAMILIES

    refuse_unknown_options("torch", unknown, ("device", "dtype", "cuda_graphs", "compile", "quantization", "checkpoint",
                                              "cache_block"))
    import_torch()
    family = artifact.manifest["family"]
    settings = decoder_settings(artifact.manifest)
    chosen = resolve_device(device)
    precision = torch_dtype(dtype, chosen)
    folder = weights_folder(artifact, checkpoint)
    handle = acquire_model(folder, family, chosen, precision, quantization=quantization, decoder=True)
    if checkpoint is not None:
        try:
            refuse_another_size(artifact.manifest, handle.model, folder)
        except BaseException:
            handle.release()
            raise
    llm = FAMILIES[family].reference_language_model(handle.model)
    if llm is None:
        handle.release()
        raise BackendError(f"the torch backend's KV-cached decoder does not run {family} decoders (they take image "
                           "context beside the cache)", "a BLIP-2-style causal LLM",
                           "load with backend='auto' (the decoder then runs on ONNX Runtime)")
    return TorchDecoder(llm, device=chosen, dtype=precision, cuda_graphs=cuda_graphs, compile=compile,
                        position_offset=settings.get("position_offset", 0), max_positions=settings.get("max_positions"),
                        cache_block=cache_block, handle=handle, quantization=handle.quantization)


__all__ = ["CACHE_BLOCK", "TorchDecoder", "create_decoder"]
