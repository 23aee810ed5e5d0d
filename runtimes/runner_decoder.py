"""A KV-cached decoder over any runner: the ``mmedge.generation.Decoder`` protocol where a backend's
``mmedge.runner.Runner`` runs the decoder graph (the layout, checks, positions and context are
``mmedge.runtimes.kv_decoder.GraphDecoder``'s, shared with ``OrtDecoder``).

This is how the decoder runs on TensorRT: ``mmedge.runtimes.tensorrt.create_decoder`` builds the decoder's engine
with ``keep_on_device=True`` and wraps its runner here. The presents a call returns are fed back unchanged as the
next call's pasts, so the cache stays wherever the runner put it: ``DeviceTensor``\\ s on the GPU for TensorRT
(read by the next call through ``__cuda_array_interface__``, no copy), ``OrtDeviceArray``\\ s for an IO-bound ONNX
Runtime runner, numpy arrays for a host runner. The prefill feeds a zero-length past ``[batch, heads, 0, head_dim]``
(TensorRT profiles allow a past of 0, see ``mmedge.runtimes.tensorrt_planning``). ``reorder`` (beam search)
gathers cache rows through host memory, one copy per reorder; the runner copies them back on the next call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmedge.embeddings import EmbeddingTable
from mmedge.errors import MmedgeError
from mmedge.runner import Runner
from mmedge.runtimes.kv_decoder import GraphDecoder, artifact_decoder, host


class RunnerDecoder(GraphDecoder):
    """``mmedge.generation.Decoder`` over ``runner``, a runner of the decoder component.

    ``embeddings [vocab, hidden]``: the token-embedding table (``np.ndarray`` or ``mmedge.embeddings.EmbeddingTable``).
    ``kv_cache``: the manifest's layout ``{"layers", "heads", "head_dim", "past", "present"}``. ``context_inputs``:
    the graph's inputs fed by ``set_context`` (IDEFICS). ``position_offset``, ``max_positions``: as ``OrtDecoder``'s.
    Closing the decoder closes the runner.
    """

    positions_note: str | None = None  # where a max_positions below the model's comes from (a TensorRT engine)
    backend = "tensorrt"  # the runner's, set at __init__ (a pipeline's repr names it)

    def __init__(self, runner: Runner, embeddings: np.ndarray | EmbeddingTable, kv_cache: Mapping[str, Any], *,
                 position_offset: int = 0, max_positions: int | None = None,
                 context_inputs: tuple[str, ...] | list[str] = ()):
        self._runner: Runner | None = runner
        self.backend = runner.backend
        inputs = {name: (np.dtype(meta.dtype), meta.shape) for name, meta in runner.input_metadata().items()}
        outputs = {name: meta.shape for name, meta in runner.output_metadata().items()}
        self._bind_graph(kv_cache, embeddings, inputs, outputs, context_inputs=context_inputs,
                         position_offset=position_offset, max_positions=max_positions)

    @classmethod
    def for_artifact(cls, runner: Runner, manifest: Mapping[str, Any],
                     embeddings: np.ndarray | EmbeddingTable) -> "RunnerDecoder":
        """The decoder of an artifact (its ``manifest``) over ``runner``, with the layout and settings the manifest
        names."""
        layout, options = artifact_decoder(manifest)
        return cls(runner, embeddings, layout, **options)

    @property
    def runner(self) -> Runner | None:
        return self._runner

    def close(self) -> None:
        self._past = []
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()

    # --- the cache and the graph -------------------------------------------------------------------
    def _fresh_past(self, empty: np.ndarray) -> list[Any]:
        return [empty] * len(self._past_names)

    def _reordered_past(self, rows: np.ndarray) -> list[Any]:
        return [np.ascontiguousarray(host(value)[rows]) for value in self._past]  # each [rows, heads, past, head_dim]

    def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self._runner is None:
            raise self._closed_error()
        feeds = {**feeds, **dict(zip(self._past_names, self._past))}
        try:
            outputs = self._runner.infer(feeds)
        except MmedgeError:
            raise  # the runner's own typed error (a shape outside a TensorRT profile says how to rebuild)
        except Exception as exc:
            raise self._run_error(f"backend '{self._runner.backend}'", exc) from None
        self._past = [outputs[name] for name in self._present_names]  # the next call's pasts, never copied
        return host(outputs["logits"])  # [batch, seq, vocab]


__all__ = ["RunnerDecoder"]
