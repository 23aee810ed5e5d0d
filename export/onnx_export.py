"""Trace a spec to ONNX, then check the graph in ONNX Runtime against the PyTorch module."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from mmedge.errors import ExportError, ParityError
from mmedge.export.specs.base import ComponentSpec
from mmedge.export.streaming import attach_weights, module_bytes, named_tensors
from mmedge.metrics import compare_outputs

# Graphs whose weights exceed this go to an external .onnx.data file (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


TRACED_MODULES = r"(torch|transformers|onnx|onnxscript|mmedge\.export)(\.|$)"  # whose warnings tracing silences


@contextlib.contextmanager
def _quiet_tracing():
    """The TorchScript tracer warns about every Python-side branch; none of it is actionable for users. Only the
    warnings of the modules being traced and tracing them are silenced (another thread's own warnings pass)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", module=TRACED_MODULES)
        yield


def export_spec(spec: ComponentSpec, path: Path) -> Path:
    """Trace ``spec`` to ``path`` (opset ``spec.opset``, named dynamic axes). Returns the path.

    Modules whose weights pass protobuf's 2 GB limit are traced without weights, which are then
    streamed from PyTorch into one ``<name>.onnx.data`` file (``mmedge.export.streaming``), so the
    export never holds a second copy of them.
    """
    module = spec.traced_module()
    sample = spec.trace_inputs()
    streamed = module_bytes(module) > EXTERNAL_DATA_THRESHOLD  # read at call time: tests lower it
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), _quiet_tracing():
            torch.onnx.export(
                module,
                tuple(sample[name] for name in spec.inputs),
                buffer,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=spec.opset,
                do_constant_folding=not streamed,
                export_params=not streamed,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(
            f"tracing component '{spec.name}' to ONNX failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
            "a module torch.onnx.export can trace at opset " + str(spec.opset),
            "report this with the model id; try another transformers version meanwhile",
        ) from exc
    if not streamed:
        path.write_bytes(buffer.getvalue())
        return path
    graph = onnx.load_from_string(buffer.getvalue())
    try:
        attach_weights(graph, named_tensors(module), spec.inputs, path)
    except KeyError as exc:
        raise ExportError(f"streaming the weights of '{spec.name}' failed ({exc})",
                          "every traced graph input to be a declared input or a module weight",
                          "this is an exporter bug for this model; report it with the model id") from exc
    onnx.save(graph, str(path))
    return path


def save_graph(graph, path: Path) -> Path:
    """Save an ONNX graph, its weights in ``<name>.data`` beside it when they pass protobuf's 2 GB limit."""
    from onnx.external_data_helper import uses_external_data

    weight_bytes = sum(len(t.raw_data) if t.raw_data else 0 for t in graph.graph.initializer)
    external = any(uses_external_data(t) for t in graph.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD or external:  # read at call time: tests lower it
        save_weights_apart(graph, path)
    else:
        onnx.save(graph, str(path))
    return path


def save_weights_apart(graph, path: Path) -> None:
    """Save ``graph`` at ``path`` with its weights (tensors over 1 KiB) in one ``<name>.data`` file beside it."""
    onnx.save(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


# A graph whose file passes this keeps its weights in <name>.onnx.data beside it, whatever its size: ONNX Runtime then
# maps them instead of holding the protobuf's copy beside its own, and a loaded session's heap is 9-23% smaller at the
# same speed (after a call: CLIP ViT-B/32 670 -> 532 MiB, BLIP-2 ViT-B + OPT-125m 1658 -> 1400 MiB;
# benchmarks/RESULTS.md, ort_prepacking_cpu.py). Smaller graphs stay one file: the saving there is a few MiB.
WEIGHTS_APART_BYTES = 32 * 2**20


def keep_weights_apart(path: Path) -> bool:
    """Move the weights of the graph at ``path`` into ``<name>.onnx.data`` where its file passes
    ``WEIGHTS_APART_BYTES`` and they are not there yet (the same nodes and values: only where they are stored);
    True where it moved them."""
    if external_data_path(path) is not None or path.stat().st_size <= WEIGHTS_APART_BYTES:  # read at call time
        return False
    save_weights_apart(onnx.load(str(path)), path)
    return True


def external_data_path(path: Path) -> Path | None:
    """The ``<name>.onnx.data`` weight file of a graph, if it has one."""
    data = path.parent / (path.name + ".data")
    return data if data.is_file() else None


def torch_reference(spec: ComponentSpec, feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    module = spec.module()
    with torch.no_grad():
        out = module(*(feeds[name] for name in spec.inputs))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: value.detach().cpu().numpy() for name, value in zip(spec.outputs, out)}


def ort_session(path: Path, threads: int | None = None):
    """A CPU ``onnxruntime.InferenceSession`` for the exporter's checks (``session_from_path``, the runner's loader). A
    large graph's (weights in ``.onnx.data``) runs without ONNX Runtime's memory arena: fidelity decodes change shapes
    at every step, and the arena, which never shrinks, grew the full-size BLIP-2 INT4 export by about 10 GB (killed at
    24.9 GB); with it off, each tensor's memory goes back when it is freed."""
    from mmedge.runtimes.ort_session import OrtOptions, session_from_path

    small = external_data_path(Path(path)) is None
    return session_from_path(path, OrtOptions(threads=threads or None, memory_arena=small))


class OnnxSession:
    """A CPU ONNX Runtime session over a graph file; ``run(feeds)`` returns every output by name."""

    def __init__(self, path: Path, threads: int | None = None):
        self.session = ort_session(path, threads)
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def run_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
    return OnnxSession(path, threads).run(feeds)


def measure_parity(spec: ComponentSpec, path: Path, feeds: dict[str, np.ndarray] | None = None,
                   reference: dict[str, np.ndarray] | None = None) -> dict:
    """Run the graph beside the PyTorch module on the same inputs (fresh shapes by default).

    ``reference``: the module's outputs for ``feeds`` when the caller already has them.
    """
    torch_feeds = spec.check_inputs() if feeds is None else {k: torch.from_numpy(np.asarray(v)) for k,
                                                             v in feeds.items()}
    reference = torch_reference(spec, torch_feeds) if reference is None else reference
    actual = run_onnx(path, {k: v.numpy() for k, v in torch_feeds.items()})
    return {"reference": "torch-fp32", "inputs": {n: list(t.shape) for n, t in torch_feeds.items()},
            "outputs": compare_outputs(reference, actual)}


def gate_parity(component: str, parity: dict, max_abs: float | None, min_cosine: float, fix: str) -> dict:
    """Raise ParityError for the first output past tolerance; record the tolerance in ``parity``."""
    for name, metrics in parity["outputs"].items():
        if max_abs is not None and metrics["max_abs"] > max_abs:
            raise ParityError(component, name, "max_abs", metrics["max_abs"], max_abs, fix)
        if metrics["cosine"] < min_cosine:
            raise ParityError(component, name, "cosine", metrics["cosine"], min_cosine, fix)
    parity["tolerance"] = {"max_abs": max_abs, "cosine": min_cosine}
    return parity
