"""What the FP16 range-guard tests share (``tests/test_fp16_guard.py`` on CLIP, ``tests/test_fp16_t5.py`` on T5): an
FP32 artifact's stored validation inputs per component, and a graph's outputs compared with the FP32 graph's on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmedge.export.onnx_export import OnnxSession
from mmedge.metrics import compare_outputs


def validation_samples(artifact: Path) -> dict[str, np.ndarray]:
    """Everything an artifact's ``validation.npz`` holds: ``<component>/inputs/<name>`` and ``/reference/<name>``."""
    with np.load(Path(artifact) / "validation.npz") as data:
        return {key: data[key] for key in data.files}


def component_feeds(samples: dict[str, np.ndarray], component: str) -> dict[str, np.ndarray]:
    """The stored validation inputs of ``component``, by input name."""
    return {k.split("/")[-1]: v for k, v in samples.items() if k.startswith(f"{component}/inputs/")}


def vs_fp32(fp32_graph: Path, graph: Path, feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """``graph``'s outputs vs ``fp32_graph``'s on ``feeds``: max abs diff and cosine per output."""
    return compare_outputs(OnnxSession(fp32_graph).run(feeds), OnnxSession(graph).run(feeds))


def _topologically_sorted(model):
    """``model`` with its nodes in an order where each runs after the producers of its inputs (ONNX Runtime's FP16
    converter appends the input Casts at the end; ONNX Runtime sorts, the reference evaluator does not)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(name in ready for name in n.input)]
        assert runnable, "the graph has a cycle or an input nothing produces"
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


class TrueFp16Graph:
    """A graph run by ``onnx.reference`` (numpy), which computes every FP16 op in FP16 and every FP32 op in FP32, as a
    GPU or TensorRT does. ONNX Runtime's CPU provider runs the FP16 ops it has no FP16 kernel for in FP32 (its
    inserted Casts, merged across neighbours), which hides an overflow the same graph has on a GPU: measured on the
    overflowing T5 of ``tests/test_fp16_t5.py``, its unguarded FP16 encoder gives cosine 1.0 vs FP32 there, 0.0 here."""

    def __init__(self, graph: Path):
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(_topologically_sorted(onnx.load(str(graph))))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import warnings

        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return dict(zip(self.evaluator.output_names, self.evaluator.run(None, feeds)))
