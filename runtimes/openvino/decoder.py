"""A KV-cached language-model decoder on OpenVINO: the ``mmedge.generation.Decoder`` protocol over the artifact's
decoder graph (prefill and every step; layout, checks, positions and context are
``mmedge.runtimes.kv_decoder.GraphDecoder``'s), the same protocol the generation loop drives on ONNX Runtime.

The cache is the graph's explicit past / present tensors. Two infer requests take turns: the presents one request
writes are fed, without a copy, as the pasts of the other, whose own output buffers are distinct, so a call never
reads and writes the same memory; the previous call's buffers are only overwritten two calls later, after they were
read. ``reorder`` (beam search) gathers cache rows through host memory. ``OvOptions.weights`` ('int4', 'int8')
compresses an FP32 decoder's weights with NNCF at first load (cached compiled; see ``compile``), or reads the IR an
``--openvino-weights`` export compressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmedge.embeddings import EmbeddingTable
from mmedge.errors import IntegrityError
from mmedge.generation.kv_layout import STEP_INPUTS
from mmedge.runtimes.kv_decoder import GraphDecoder, artifact_decoder, cache_names, checked_layout
from mmedge.runtimes.openvino.compile import compiled_model, exported_weights
from mmedge.runtimes.openvino.core import OvOptions, import_openvino
from mmedge.runtimes.openvino.runner import port_names

_OV_NUMPY = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}


class OpenVinoDecoder(GraphDecoder):
    """``mmedge.generation.Decoder`` over a compiled OpenVINO decoder (``compiled``; ``source`` says where it came
    from). ``embeddings``, ``kv_cache``, ``position_offset``, ``max_positions``, ``context_inputs``: as
    ``OrtDecoder``'s."""

    backend = "openvino"

    def __init__(self, compiled, embeddings: np.ndarray | EmbeddingTable, kv_cache: Mapping[str, Any], *,
                 position_offset: int = 0, max_positions: int | None = None,
                 context_inputs: tuple[str, ...] | list[str] = (), source: str = ""):
        self._compiled = compiled
        self.source = source
        known = {*STEP_INPUTS, "logits", *context_inputs,
                 *cache_names(checked_layout(kv_cache), "past"), *cache_names(checked_layout(kv_cache), "present")}
        inputs = {name: (_OV_NUMPY.get(port.get_element_type().to_string()), _shape(port))
                  for name, port in zip(port_names(compiled.inputs, known), compiled.inputs)}
        outputs = {name: _shape(port) for name, port in zip(port_names(compiled.outputs, known), compiled.outputs)}
        self._bind_graph(kv_cache, embeddings, inputs, outputs, context_inputs=context_inputs,
                         position_offset=position_offset, max_positions=max_positions)
        self._requests = [compiled.create_infer_request(), compiled.create_infer_request()]
        self._turn = 0
        self._tensor = import_openvino().Tensor

    @classmethod
    def for_artifact(cls, artifact, embeddings: np.ndarray | EmbeddingTable, options: OvOptions) -> "OpenVinoDecoder":
        layout, keywords = artifact_decoder(artifact.manifest)
        exported = exported_weights(artifact, "decoder", options.weights)  # the IR --openvino-weights wrote
        compiled, source = compiled_model(exported or artifact.component_path("decoder"), "decoder",
                                          artifact.component("decoder"), options, exported=exported is not None)
        if exported is not None:
            source = f"{source} (NNCF {options.weights} weights from the export: {exported.name})"
        return cls(compiled, embeddings, layout, source=source, **keywords)

    def close(self) -> None:
        self._past = []
        self._requests = []
        self._compiled = None

    # --- the cache and the graph -------------------------------------------------------------------
    def _fresh_past(self, empty: np.ndarray) -> list[Any]:
        return [empty] * len(self._past_names)

    def _reordered_past(self, rows: np.ndarray) -> list[Any]:
        return [np.ascontiguousarray(np.asarray(value.data if hasattr(value, "data") else value)[rows])
                for value in self._past]  # each [rows, heads, past, head_dim]

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if not self._requests:
            raise self._closed_error()
        request = self._requests[self._turn]
        self._turn ^= 1
        try:
            for name, value in feeds.items():
                request.set_tensor(name, self._tensor(np.ascontiguousarray(value), shared_memory=True))
            for name, value in zip(self._past_names, self._past):
                request.set_tensor(name, value if isinstance(value, self._tensor)
                                   else self._tensor(np.ascontiguousarray(value), shared_memory=True))
            request.infer()
            # presents stay in this request's output tensors: the other request reads them next call
            self._past = [request.get_tensor(name) for name in self._present_names]
            return np.array(request.get_tensor("logits").data, copy=True)  # [batch, seq, vocab]
        except IntegrityError:
            raise
        except Exception as exc:
            raise self._run_error("OpenVINO", exc) from None


def _shape(port) -> tuple:
    """Fixed axes as ints, dynamic ones as None."""
    shape = port.get_partial_shape()
    return tuple(dim.get_length() if dim.is_static else None for dim in shape)
