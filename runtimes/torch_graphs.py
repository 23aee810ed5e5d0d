"""CUDA graphs, ``torch.compile`` and pinned host buffers for the torch backend's runners and decoder.

- **One capture routine** (``capture``): warm-up runs on the caller's own stream, then the capture on that stream
  under a process-wide lock, with ``capture_error_mode="thread_local"`` so that other threads may keep using CUDA
  (a Captioner runs its prefix outside the decoder's lock) while this thread captures. Each ``GraphCache`` and each
  decoder owns its stream: destroying a graph clears the cuBLAS workspace of its capture stream (PyTorch #175276),
  which must not be another live graph's. Graphs are destroyed rarely: caches keep them until closed or evicted.
- **Compilation** (``compiled``): ``torch.compile(fullgraph=True, dynamic=False)``; the compiled function is what
  the warm-up runs compile and what the CUDA graph captures, so a replay runs inductor's fused kernels with no
  Python. A compile error is not fatal: the caller falls back to the eager function and says why.
- **Pinned host buffers** (``HostBuffers``): one page-locked buffer per (name, shape, dtype), reused, so host ↔
  device copies are asynchronous DMA and a call allocates nothing.

``torch`` is imported lazily (``mmedge.runtimes.torch_backend.import_torch``); nothing here runs at import.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np

log = logging.getLogger("mmedge")

CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process (captures share the allocator's pools)
GRAPH_WARMUP = 2  # eager (or compiling) runs on the capture stream before a capture: cuBLAS workspaces, lazy inits
DEFAULT_MAX_GRAPHS = 8
COMPILE_BACKEND = "inductor"


def _torch():
    from mmedge.runtimes.torch_backend import import_torch

    return import_torch()


def failure(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for logs and status fields."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# --- compilation -----------------------------------------------------------------------------------
def compile_backend(setting: bool | str | None, *, default: bool) -> str | None:
    """The ``torch.compile`` backend a setting asks for: None (off), "inductor" (True, or auto when ``default``) or
    the backend named (``torch._dynamo.list_backends()``; "aot_eager" checks tracing without code generation)."""
    from mmedge.errors import BackendUnavailableError

    if setting is None:
        return COMPILE_BACKEND if default else None
    if setting is False:
        return None
    if setting is True:
        return COMPILE_BACKEND
    torch = _torch()
    known = sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"eager", "aot_eager", COMPILE_BACKEND})
    if not isinstance(setting, str) or setting not in known:
        raise BackendUnavailableError(f"torch compile setting {setting!r} is not a torch.compile backend",
                                      f"True, False, None (auto: on for CUDA graphs) or one of {', '.join(known)}",
                                      "pass compile=True (inductor) or compile=False")
    return setting


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from torch.compile's tracing or code generation (not from running the model)."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo",
                              "torch._inductor")) or type(exc).__name__ in ("BackendCompilerFailed", "Unsupported")


class Compiled:
    """``fn`` under ``torch.compile(fullgraph=True)`` (shapes specialised at first, made dynamic by torch on the
    first new shape, so a function compiles at most twice); when compilation fails, ``fn`` itself from then on,
    with the reason in ``status`` and the log. ``backend`` None: ``fn`` as it is."""

    def __init__(self, fn: Callable, backend: str | None, name: str = ""):
        self.eager, self.backend, self.name = fn, backend, name
        self.fn = fn if backend is None else _torch().compile(fn, backend=backend, fullgraph=True)
        self.status = "off" if backend is None else f"on ({backend})"

    def __call__(self, *args):
        if self.fn is self.eager:
            return self.eager(*args)
        try:
            return self.fn(*args)
        except Exception as exc:
            if not is_compile_error(exc):
                raise
            self.fn = self.eager
            self.status = f"off (compilation failed: {failure(exc)})"
            log.warning("mmedge: torch.compile of '%s' failed (%s); running it uncompiled", self.name, failure(exc))
            return self.eager(*args)


# --- capture -----------------------------------------------------------------------------------------
def capture(fn: Callable[..., Any], args: tuple, *, device, stream, pool, warmup: int = GRAPH_WARMUP):
    """Run ``fn(*args)`` ``warmup`` times on ``stream``, then capture one call as a ``torch.cuda.CUDAGraph`` there.

    ``fn`` must read and write only ``args`` and tensors it owns (the static buffers a replay reuses).
    Returns ``(graph, outputs of the captured call)``; raises what the warm-up or capture raised.
    """
    torch = _torch()
    with CAPTURE_LOCK:
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*args)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            outputs = fn(*args)
        current.wait_stream(stream)
    return graph, outputs


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class GraphCache:
    """``fn(*tensors) -> tensor | tuple`` captured as one CUDA graph per input signature (shapes, dtypes), at most
    ``max_graphs``; other signatures, and those whose capture failed, run ``fn`` directly. CUDA only.

    ``static_dtype(dtype)`` gives the dtype of the graph's static input for a given input dtype (the runner's compute
    dtype for floats): inputs are copied into the static inputs with ``copy_`` (host → device when they are pinned
    host tensors, cast on the way), so callers hand over host or device tensors alike.
    """

    def __init__(self, fn: Callable, device, max_graphs: int = DEFAULT_MAX_GRAPHS, name: str = "",
                 static_dtype: Callable[[Any], Any] = lambda dtype: dtype):
        torch = self.torch = _torch()
        self.fn, self.device, self.max_graphs, self.name = fn, device, max_graphs, name
        self.static_dtype = static_dtype
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.graphs: dict[tuple, tuple[list, Any, tuple]] = {}
        self.failed: dict[tuple, str] = {}

    def __call__(self, *inputs) -> tuple:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.failed or len(self.graphs) >= self.max_graphs:
                return self._direct(inputs)
            entry = self._capture(key, inputs)
            if entry is None:
                return self._direct(inputs)
        static_inputs, graph, static_outputs = entry
        for static, value in zip(static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return static_outputs  # overwritten by the next replay: callers copy what they keep

    def _direct(self, inputs) -> tuple:
        moved = [t.to(self.device, self.static_dtype(t.dtype), non_blocking=True) for t in inputs]
        return as_tuple(self.fn(*moved))

    def _capture(self, key: tuple, inputs) -> tuple | None:  # CUDA-only path, exercised by the GPU tests
        torch = self.torch
        static_inputs = [torch.empty(t.shape, dtype=self.static_dtype(t.dtype), device=self.device) for t in inputs]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        try:
            graph, outputs = capture(self.fn, tuple(static_inputs), device=self.device, stream=self.stream,
                                     pool=self.pool)
        except Exception as exc:  # an op that synchronizes with the host cannot be captured: run it directly
            self.failed[key] = failure(exc)
            log.warning("mmedge: CUDA graph capture of '%s' for shapes %s failed (%s); running it without a graph",
                        self.name, [list(s) for s, _ in key], self.failed[key])
            torch.cuda.synchronize(self.device)
            return None
        self.graphs[key] = (static_inputs, graph, as_tuple(outputs))
        return self.graphs[key]

    def close(self) -> None:
        self.graphs.clear()


# --- pinned host buffers --------------------------------------------------------------------------
class HostBuffers:
    """Reusable page-locked host tensors keyed by (name, shape, dtype) for asynchronous copies (CUDA), or plain
    host tensors (a CPU device, where pinning means nothing).

    A staged buffer may still be read by a queued host → device copy when the next call wants to write it (outputs
    left on the GPU end a call without synchronizing): ``queued(names)`` records an event after the copies, and
    ``stage`` waits for a buffer's event before overwriting it.
    """

    def __init__(self, device):
        self.torch = _torch()
        self.device = device
        self.pin = device.type == "cuda"
        self._buffers: dict[tuple, Any] = {}
        self._events: dict[str, Any] = {}

    def get(self, name: str, shape: tuple, dtype) -> Any:
        key = (name, tuple(shape), dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self.torch.empty(tuple(shape), dtype=dtype, pin_memory=self.pin)
            self._buffers[key] = buffer
        return buffer

    def stage(self, name: str, array: np.ndarray) -> Any:
        """``array`` copied into its pinned buffer (one memcpy), ready for a non-blocking host → device copy."""
        event = self._events.pop(name, None)
        if event is not None:
            event.synchronize()  # the previous call's copy out of this buffer has run
        array = np.ascontiguousarray(array)
        buffer = self.get(name, array.shape, self.torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype)
        buffer.numpy()[...] = array
        return buffer

    def queued(self, names) -> None:
        """The staged buffers ``names`` are being read by copies queued on the current stream (CUDA)."""
        if self.pin:
            for name in names:
                event = self.torch.cuda.Event()
                event.record(self.torch.cuda.current_stream(self.device))
                self._events[name] = event

    def fetch(self, name: str, tensor) -> Any:
        """Queue ``tensor``'s copy into its pinned buffer (non-blocking); read it after the stream is synchronized."""
        buffer = self.get(name, tuple(tensor.shape), tensor.dtype)
        buffer.copy_(tensor, non_blocking=self.pin)
        return buffer


__all__ = ["CAPTURE_LOCK", "DEFAULT_MAX_GRAPHS", "GRAPH_WARMUP", "GraphCache", "HostBuffers", "as_tuple", "capture",
           "Compiled", "compile_backend", "failure", "is_compile_error"]
