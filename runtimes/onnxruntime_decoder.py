"""A KV-cached language-model decoder on ONNX Runtime: the ``mmedge.generation.Decoder`` protocol over one ONNX
graph that runs both the prefill and every decode step (the graph's layout, the argument checks, positions and
context are ``mmedge.runtimes.kv_decoder.GraphDecoder``'s).

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
from typing import Any

import numpy as np
import onnxruntime as ort

from mmedge.embeddings import EmbeddingTable
from mmedge.generation.kv_layout import KV_KEYS, context_inputs
from mmedge.runtimes.kv_decoder import GraphDecoder
from mmedge.runtimes.ort_session import ORT_DTYPES, OrtOptions, session_from_path

_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}


class OrtDecoder(GraphDecoder):
    """``mmedge.generation.Decoder`` over an ONNX decoder graph with a KV cache.

    ``session``: an ``onnxruntime.InferenceSession``, or the path of the graph (then ``options``,
    an ``OrtOptions``, says how to build the session). ``embeddings [vocab, hidden]``: the table
    ``get_input_embeddings()`` of the model, to embed generated ids (any embedding scale included).
    ``kv_cache``: the manifest's layout ``{"layers", "heads", "head_dim", "past", "present"}`` with
    ``past``/``present`` patterns like ``"past_key_values.%d.%s"`` (layer, then "key"/"value").
    ``max_positions``: the model's position limit, if any (the loop checks prompt + new tokens
    against it).
    """

    backend = "onnxruntime"  # what runs it (a pipeline's repr names it)

    def __init__(self, session: ort.InferenceSession | str | os.PathLike, embeddings: np.ndarray | EmbeddingTable,
                 kv_cache: Mapping[str, Any], *,
                 options: OrtOptions | None = None, io_binding: bool = True, position_offset: int = 0,
                 max_positions: int | None = None, context_inputs: tuple[str, ...] | list[str] = ()):
        if not isinstance(session, ort.InferenceSession):
            session = session_from_path(session, options or OrtOptions(), "the decoder")
        self._session = session
        self.io_binding = io_binding
        inputs = {i.name: (ORT_DTYPES.get(i.type), i.shape) for i in self._session.get_inputs()}
        outputs = {o.name: o.shape for o in self._session.get_outputs()}
        self._bind_graph(kv_cache, embeddings, inputs, outputs, context_inputs=context_inputs,
                         position_offset=position_offset, max_positions=max_positions)
        provider = self._session.get_providers()[0]
        self._device = "cuda" if provider in _GPU_PROVIDERS else "cpu"
        self._device_id = int(self._session.get_provider_options().get(provider, {}).get("device_id", 0) or 0)

    @property
    def session(self) -> ort.InferenceSession:
        return self._session

    def close(self) -> None:
        self._past = []
        self._session = None

    # --- the cache and the graph -------------------------------------------------------------------
    def _fresh_past(self, empty: np.ndarray) -> list[Any]:
        if not self.io_binding:
            return [empty] * len(self._past_names)
        return [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]

    def _reordered_past(self, rows: np.ndarray) -> list[Any]:
        if self.io_binding:
            return [self._to_device(np.ascontiguousarray(value.numpy()[rows])) for value in self._past]
        return [np.ascontiguousarray(value[rows]) for value in self._past]

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            if self.io_binding:
                return self._run_bound(feeds)
            values = self._session.run(["logits", *self._present_names],
                                       {**feeds, **dict(zip(self._past_names, self._past))})
            self._past = values[1:]
            return values[0]
        except Exception as exc:
            if self._session is None:
                raise self._closed_error() from None
            raise self._run_error("ONNX Runtime", exc) from None

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        # a new IOBinding every call: ONNX Runtime before 1.30 frees a binding's outputs when they are cleared for
        # the next call, and those outputs are the pasts bound in it (a segfault at the first decode step)
        binding = self._session.io_binding()
        for name, value in feeds.items():  # embeddings, mask, positions, context
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past_names, self._past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the loop reads logits on the host
        for name in self._present_names:
            binding.bind_output(name, self._device, self._device_id)  # ORT allocates; stays on the device
        self._session.run_with_iobinding(binding)
        binding.clear_binding_inputs()  # the outputs keep their binding alive: it must not keep the old pasts too
        outputs = binding.get_outputs()  # OrtValues, in bind order
        self._past = list(outputs[1:])  # the next call's pasts, never copied
        return outputs[0].numpy()

    def _to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(array, self._device, self._device_id)


__all__ = ["KV_KEYS", "OrtDecoder", "context_inputs"]
