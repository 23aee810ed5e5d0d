"""A KV-cached language-model decoder on ONNX Runtime: the ``mmedge.generation.Decoder`` protocol over
one ONNX graph that runs both the prefill and every decode step.

The graph (as the exporters write it, names from the manifest's ``kv_cache`` patterns):

    inputs   inputs_embeds [batch, seq, hidden]          float
             attention_mask [batch, past + seq]          int64, 1 = real, 0 = padding
             position_ids [batch, seq]                   int64
             past_key_values.%d.key / .value [batch, heads, past, head_dim]
    outputs  logits [batch, seq, vocab]
             present.%d.key / .value [batch, heads, past + seq, head_dim]

Flamingo-style graphs take more inputs that do not grow with the cache (``context_inputs``: the
image attention mask, cross-attention keys/values); ``set_context`` gives their prefill and per-step
values, which follow the cache rows through ``reorder``.

The prefill feeds a zero-length past. With ``io_binding=True`` (the default) the presents of one call
stay ORT-owned OrtValues (on the GPU with the CUDA / TensorRT providers) and are bound as the pasts
of the next call: the cache never passes through numpy. ``io_binding=False`` feeds numpy arrays to
``session.run`` instead, which copies the whole cache twice per step; it exists so a benchmark can
show what IO binding saves. ``reorder`` (beam search) gathers cache rows through host memory: one copy
per reorder, none otherwise.

Position ids are ``cumsum(attention_mask) - 1`` (see ``mmedge.generation.position_ids``), plus
``position_offset`` for a graph that expects an offset applied outside it. OPT's +2 offset lives in
its position-embedding module inside the graph, so OPT graphs take ``position_offset=0``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mmedge.embeddings import EmbeddingTable
from mmedge.errors import BackendError, FeedError, IntegrityError, ManifestError
from mmedge.generation.decoder import position_ids as _position_ids
from mmedge.runtimes.onnxruntime import OrtOptions, _provider_list, session_options

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
KV_KEYS = ("layers", "heads", "head_dim", "past", "present")


class OrtDecoder:
    """``mmedge.generation.Decoder`` over an ONNX decoder graph with a KV cache.

    ``session``: an ``onnxruntime.InferenceSession``, or the path of the graph (then ``options``,
    an ``OrtOptions``, says how to build the session). ``embeddings [vocab, hidden]``: the table
    ``get_input_embeddings()`` of the model, to embed generated ids (any embedding scale included).
    ``kv_cache``: the manifest's layout ``{"layers", "heads", "head_dim", "past", "present"}`` with
    ``past``/``present`` patterns like ``"past_key_values.%d.%s"`` (layer, then "key"/"value").
    ``max_positions``: the model's position limit, if any (the loop checks prompt + new tokens
    against it).
    """

    def __init__(self, session: ort.InferenceSession | str | os.PathLike, embeddings: np.ndarray | EmbeddingTable, kv_cache: Mapping[str, Any], *,
                 options: OrtOptions | None = None, io_binding: bool = True, position_offset: int = 0,
                 max_positions: int | None = None, context_inputs: tuple[str, ...] | list[str] = ()):
        self._session = session if isinstance(session, ort.InferenceSession) else _load(session, options or OrtOptions())
        self.kv = _checked_layout(kv_cache)
        self.io_binding = io_binding
        self.position_offset = position_offset
        self.max_positions = max_positions
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        layers = self.kv["layers"]
        self._past_names = [self.kv["past"] % (i, kind) for i in range(layers) for kind in ("key", "value")]
        self._present_names = [self.kv["present"] % (i, kind) for i in range(layers) for kind in ("key", "value")]
        self._context_names = list(context_inputs)
        self._context: dict[str, dict[str, Any]] = {"prefill": {}, "step": {}}
        want_in = {"inputs_embeds", "attention_mask", "position_ids", *self._context_names, *self._past_names}
        want_out = {"logits", *self._present_names}
        if set(inputs) != want_in or not want_out <= set(outputs):
            raise IntegrityError(
                f"the decoder graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}",
                f"inputs {sorted(want_in)} and outputs {sorted(want_out)} (from the kv_cache layout)",
                "re-export the artifact; the graph and its manifest's kv_cache entry do not match",
            )
        self._embeds_dtype = _ORT_TYPES.get(inputs["inputs_embeds"].type, np.float32)
        self._past_dtype = _ORT_TYPES.get(inputs[self._past_names[0]].type, np.float32) if layers else np.float32
        self._mask_dtype = _ORT_TYPES.get(inputs["attention_mask"].type, np.int64)
        self._position_dtype = _ORT_TYPES.get(inputs["position_ids"].type, np.int64)
        if not isinstance(embeddings, EmbeddingTable):  # a compressed table stays compressed
            embeddings = np.ascontiguousarray(embeddings, dtype=self._embeds_dtype)
        hidden = inputs["inputs_embeds"].shape[-1]
        if len(embeddings.shape) != 2 or (isinstance(hidden, int) and embeddings.shape[1] != hidden):
            raise FeedError(
                f"the embedding table has shape {list(embeddings.shape)}", f"[vocab, {hidden}] (the graph's hidden size)",
                "pass the model's input embedding matrix (get_input_embeddings().weight)",
            )
        self._embeddings = embeddings
        vocab = outputs["logits"].shape[-1]
        self.vocab_size: int = vocab if isinstance(vocab, int) else embeddings.shape[0]
        provider = self._session.get_providers()[0]
        self._device = "cuda" if provider in _GPU_PROVIDERS else "cpu"
        self._device_id = int(self._session.get_provider_options().get(provider, {}).get("device_id", 0) or 0)
        self._binding: Any = None  # one IOBinding, re-bound every call
        self._past: list[Any] = []  # OrtValues (io_binding) or numpy arrays, in _past_names order
        self._batch = 0
        self.past_length = 0

    @property
    def session(self) -> ort.InferenceSession:
        return self._session

    def set_context(self, prefill: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> None:
        """Values of the ``context_inputs`` for the prefill and for every decode step (rows = prompts)."""
        for name, values in (("prefill", prefill), ("step", step)):
            if set(values) != set(self._context_names):
                raise FeedError(f"{name} context has {sorted(values)}", f"exactly {sorted(self._context_names)}",
                                "pass every context input the decoder graph takes")
        types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self._session.get_inputs()}
        self._context = {"prefill": {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in prefill.items()},
                         "step": {k: np.ascontiguousarray(v, dtype=types[k]) for k, v in step.items()}}

    # --- the Decoder protocol ----------------------------------------------------------------------
    def start(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Prefill ``inputs_embeds [batch, seq, hidden]`` (any previous cache dropped) -> logits ``[batch, vocab]``."""
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype)
        mask = np.ascontiguousarray(attention_mask, dtype=self._mask_dtype)
        if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
            raise FeedError(f"prefill got inputs_embeds {list(embeds.shape)} and attention_mask {list(mask.shape)}",
                            "[batch, seq, hidden] and [batch, seq]", "pass a mask with one column per prompt position")
        batch = embeds.shape[0]
        empty = np.zeros((batch, self.kv["heads"], 0, self.kv["head_dim"]), dtype=self._past_dtype)
        self._past = [empty] * len(self._past_names) if not self.io_binding else [
            ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        self._batch, self.past_length = batch, 0
        return self._run(embeds, mask, self._context["prefill"])

    def step(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embed ``token_ids [batch]``, run one position with ``attention_mask [batch, past + 1]`` -> ``[batch, vocab]``."""
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
        """Cache row ``i`` becomes old row ``rows[i]`` (copies the cache once)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self._batch and rows.size and (rows.min() < 0 or rows.max() >= self._batch):
            raise FeedError(f"reorder got rows {rows.tolist()[:8]}", f"row indices below {self._batch}", "index existing cache rows")
        if rows.shape[0] == self._batch and np.array_equal(rows, np.arange(self._batch)):
            return
        self._context["step"] = {k: np.ascontiguousarray(v[rows]) for k, v in self._context["step"].items()}
        if self.io_binding:
            self._past = [self._to_device(np.ascontiguousarray(value.numpy()[rows])) for value in self._past]
        else:
            self._past = [np.ascontiguousarray(value[rows]) for value in self._past]
        self._batch = rows.shape[0]

    def close(self) -> None:
        self._past = []
        self._binding = None
        self._session = None

    # --- running the graph -------------------------------------------------------------------------
    def _run(self, embeds: np.ndarray, mask: np.ndarray, context: dict[str, np.ndarray]) -> np.ndarray:
        seq = embeds.shape[1]
        positions = np.ascontiguousarray(_position_ids(mask, seq, self.position_offset), dtype=self._position_dtype)
        if set(context) != set(self._context_names):
            raise FeedError(f"the decoder has context {sorted(context)}", f"{sorted(self._context_names)}",
                            "call set_context() before generating")
        try:
            if self.io_binding:
                logits = self._run_bound(embeds, mask, positions, context)
            else:
                feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **context,
                         **dict(zip(self._past_names, self._past))}
                values = self._session.run(["logits", *self._present_names], feeds)
                logits, self._past = values[0], values[1:]
        except Exception as exc:
            if self._session is None:
                raise BackendError("the decoder is closed", "an open decoder", "create a new OrtDecoder") from None
            raise BackendError(
                f"ONNX Runtime failed running the decoder ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
                "feeds matching the decoder graph", "check that the kv_cache layout matches the graph",
            ) from None
        self.past_length = mask.shape[1]
        return np.asarray(logits[:, -1, :], dtype=np.float32)  # [batch, vocab]

    def _run_bound(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                   context: dict[str, np.ndarray]) -> np.ndarray:
        binding = self._binding
        if binding is None:
            binding = self._binding = self._session.io_binding()
        else:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in context.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the loop reads logits on the host
        for name in self._present_names:
            binding.bind_output(name, self._device, self._device_id)  # ORT allocates; stays on the device
        self._session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # OrtValues, in bind order
        self._past = list(outputs[1:])  # the next call's pasts, never copied
        return outputs[0].numpy()

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self._device, self._device_id)


def context_inputs(input_names, kv_cache: Mapping[str, Any]) -> list[str]:
    """The decoder graph's inputs beyond embeddings, mask, positions and the KV cache (IDEFICS: the image
    attention mask and the cross-attention K/V), in graph order: what ``set_context`` must feed."""
    layout = _checked_layout(kv_cache)
    known = {"inputs_embeds", "attention_mask", "position_ids"}
    known |= {layout["past"] % (layer, kind) for layer in range(layout["layers"]) for kind in ("key", "value")}
    return [name for name in input_names if name not in known]


def _load(path: str | os.PathLike, options: OrtOptions) -> ort.InferenceSession:
    providers = _provider_list(options)
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(options),
                                    providers=[p for p, _ in providers], provider_options=[o for _, o in providers])
    except Exception as exc:
        raise IntegrityError(
            f"ONNX Runtime could not load the decoder from '{Path(path).name}' "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
            "a valid ONNX decoder graph as written by `mmedge export`", "re-export the artifact or copy the file again",
        ) from None


def _checked_layout(kv_cache: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(kv_cache, Mapping) or set(KV_KEYS) - set(kv_cache):
        missing = sorted(set(KV_KEYS) - set(kv_cache)) if isinstance(kv_cache, Mapping) else list(KV_KEYS)
        raise ManifestError(f"the decoder's kv_cache layout lacks {missing}", f"an object with {', '.join(KV_KEYS)}",
                            "re-export the artifact with this version of mmedge")
    layout = dict(kv_cache)
    for key in ("layers", "heads", "head_dim"):
        if not isinstance(layout[key], int) or isinstance(layout[key], bool) or layout[key] < (0 if key == "layers" else 1):
            raise ManifestError(f"kv_cache.{key} is {layout[key]!r}", "a positive integer", "re-export the artifact")
    for key in ("past", "present"):
        try:
            layout[key] % (0, "key")
        except (TypeError, ValueError):
            raise ManifestError(f"kv_cache.{key} is {layout[key]!r}", 'a pattern with %d (layer) and %s ("key"/"value")',
                                'use e.g. "past_key_values.%d.%s"') from None
    return layout
