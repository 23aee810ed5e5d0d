"""TensorRT backend: an engine per component, built from the artifact's ONNX on the device itself.

Engines are built with the TensorRT 10.x Python API (``trt.Builder`` → ``create_network`` → ``trt.OnnxParser.
parse_from_file``, which reads a graph's ``.onnx.data`` weights beside it → ``build_serialized_network``) and
cached under the artifact's ``engines/`` by ``mmedge.runtimes.engine_cache``, keyed by the graph's sha256 (and its
external data's), precision, shape profile, TensorRT version, GPU name and compute capability, and mmedge version.
A stale or foreign engine is rebuilt, never handed to TensorRT. Builds share a timing cache per TensorRT version
and GPU (``engines/timing-*.cache``).

- **Precision.** A graph whose types the export chose is built ``STRONGLY_TYPED`` with no precision flag, as
  TensorRT's documentation asks ("Precision-control build flags are not required and should not be specified"):
  a static QDQ INT8 graph (explicit quantization), and an FP16 graph, whose FP32 islands (``quantization.fp32_nodes``,
  the nodes the export's range guard found overflowing FP16) TensorRT then obeys. An FP32 graph builds at FP16 by
  default (weakly typed, ``BuilderFlag.FP16``), FP32 on request, and at FP32 when it overflows at FP16 (T5's LLM
  components; ``tensorrt_planning.fp16_overflow``). Which components can be built and at what precision is decided in
  ``mmedge.runtimes.tensorrt_planning`` (no TensorRT needed); TensorRT 10 runs on sm 7.0 and newer GPUs only.
- **Shapes.** One optimization profile per engine, from the manifest's named dynamic axes and the user's limits
  (``tensorrt_planning.derive_profile``). A call larger than the profile's batch is split into profile-sized
  calls; any other shape outside the profile is refused with the rebuild command.
- **Memory.** Device buffers come from **cuda-python** (``mmedge.runtimes.cuda_buffers``: ``cuda.bindings.runtime``;
  ``cuda.cudart`` on older releases), not torch, so the device needs no PyTorch: ``cudaMalloc`` once per
  input/output at the profile's largest shape, one ``cudaStream`` and one ``IExecutionContext`` per runner
  (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``; each one's bool checked). Calls on one runner
  are serialized by a lock. A GPU feed is bound in place only at a 256-byte aligned address (TensorRT binds no
  other); an output whose shape depends on the data (a -1 dim) is refused.
- **Outputs on the GPU.** With ``keep_on_device=True`` outputs are ``DeviceTensor``\\ s: GPU memory that another
  TensorRT runner takes as a feed without a copy, that CuPy/PyTorch/Numba read through
  ``__cuda_array_interface__``, and that ``numpy()`` copies to the host. By default outputs are numpy arrays.
  Such a runner gives each call's outputs their real shape, in buffers from its ``DevicePool``: a buffer comes back
  when its tensor is collected and serves a later call, so a decoder's steady-state steps allocate nothing.
- **Feeds from other streams.** A GPU feed whose ``__cuda_array_interface__`` names the stream it was written on
  (v3 ``stream``) is read only after that stream's work: an event recorded there, waited on by the runner's stream
  (``cudaStreamWaitEvent``; the host does not block), or, if no event can be made, that stream synchronized.
- **The KV-cached decoder.** ``create_runner`` builds the decoder graph like any other (its profile keeps
  total = past + new tokens at every point, see ``tensorrt_planning``); ``create_decoder`` builds it with
  ``keep_on_device=True`` and wraps it in ``mmedge.runtimes.runner_decoder.RunnerDecoder``, so the presents of
  one step are the pasts of the next without leaving the GPU. The prefill feeds a zero-length past. Its
  ``max_positions`` is the engine profile's when smaller than the model's, so a request longer than the engine takes
  is refused before the first step (rebuild with a larger ``--max-sequence``).
- **Where.** This module is the runner (``TensorRTRunner``, ``create_runner``, ``create_decoder``); building is
  ``mmedge.runtimes.tensorrt_build``, the engine cache and ``mmedge build``'s settings ``mmedge.runtimes.engine_cache``.
- **Not here.** Graphs with ONNX Runtime-only operators: INT4 weight-only (``com.microsoft.MatMulNBits``) and
  dynamic INT8 (``MatMulInteger``, ``DynamicQuantizeLinear``), which TensorRT cannot parse; ``create_runner``
  refuses them with a BackendError and selection keeps them on ONNX Runtime.

``tensorrt`` and ``cuda`` are imported when an engine is built or loaded, never at import time: without them
this module imports, and using it raises BackendUnavailableError with the install command.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from mmedge.backends import refuse_unknown_options
from mmedge.errors import BackendError, FeedError, IntegrityError
from mmedge.runner import Runner, TensorMeta
from mmedge.runtimes.cuda_buffers import (
    TENSOR_ALIGNMENT,
    CudaRuntime,
    DevicePool,
    DeviceTensor,
    cai_stream,
    check_alignment,
    import_cudart,
)
from mmedge.runtimes.engine_cache import (
    BUILD_SETTINGS,
    EngineOutcome,
    EngineSettings,
    describe_engines,
    engine_key,
    load_build_settings,
    obtain_plan,
    save_build_settings,
    timing_cache_path,
)
from mmedge.runtimes.tensorrt_build import (
    _Builder,
    build_artifact,
    build_serialized_engine,
    import_tensorrt,
    resolve_settings,
)
from mmedge.runtimes.tensorrt_planning import (
    engine_positions,
    unbuildable_reason,
    usable_positions,
)

log = logging.getLogger("mmedge")


# --- the runner ------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    """One component's engine with its execution context, stream and device buffers."""

    backend = "tensorrt"

    def __init__(self, plan: bytes, component_name: str, component: dict, *, device_id: int = 0,
                 keep_on_device: bool = False):
        super().__init__(component_name, component)
        self._trt = trt = import_tensorrt()
        self._cuda = CudaRuntime(device_id)
        self._keep_on_device = keep_on_device
        self._lock = threading.Lock()
        self._closed = False
        self._buffers: dict[str, int] = {}  # inputs at the profile's largest shape; outputs not kept on the GPU
        # outputs kept on the GPU, reused across calls
        self._pool = DevicePool(self._cuda.malloc, self._cuda.free_quietly)
        self._stream = None
        self._event = None  # made on the first feed that names its producer's stream
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise IntegrityError(f"TensorRT could not load the engine of component '{component_name}'",
                                 "an engine built by this TensorRT version on this GPU",
                                 "delete the artifact's engines/ folder; mmedge rebuilds it")
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"TensorRT could not create an execution context for '{component_name}'",
                               "enough free GPU memory for the engine's activations",
                               "free GPU memory, or build with a smaller --max-batch")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._engine_inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._engine_outputs = [n for n in names if n not in self._engine_inputs]
        if set(self._engine_inputs) != set(self._inputs) or not set(self._outputs) <= set(self._engine_outputs):
            raise IntegrityError(f"component '{component_name}' engine has inputs {sorted(self._engine_inputs)} "
                                 "and outputs "
                                 f"{sorted(self._engine_outputs)}, which do not match its manifest entry",
                                 f"inputs {sorted(self._inputs)} and outputs {sorted(self._outputs)}",
                                 "delete the artifact's engines/ folder; mmedge rebuilds it from the graph")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for n in self._engine_inputs:
            shape = _dims(engine.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                lo, _, hi = engine.get_tensor_profile_shape(n, 0)
                self._ranges[n] = (_dims(lo), _dims(hi))
            else:
                self._ranges[n] = (shape, shape)
        try:
            self._stream = self._cuda.stream()
            for n in self._engine_inputs:  # buffers for the largest shapes the profile allows, allocated once
                hi = self._ranges[n][1]
                if not self._context.set_input_shape(n, hi):
                    raise IntegrityError(f"TensorRT refused the largest shape {list(hi)} of its own profile for input "
                                         f"'{n}' of component '{component_name}'",
                                         "an engine that takes the shapes its profile declares",
                                         "delete the artifact's engines/ folder; mmedge rebuilds it")
                self._buffers[n] = self._cuda.malloc(int(np.prod(hi, dtype=np.int64)) * self._dtypes[n].itemsize)
            for n in self._engine_outputs:  # refused on either path: a -1 dim has no size to allocate
                shape = output_shape(n, component_name, _dims(self._context.get_tensor_shape(n)))
                if keep_on_device and n in self._outputs:
                    # each call's DeviceTensor has the real shape, from the pool (a decoder's cache: no max-size copy)
                    continue
                self._buffers[n] = self._cuda.malloc(int(np.prod(shape, dtype=np.int64)) * self._dtypes[n].itemsize)
        except BaseException:
            self._release()
            raise
        self._split_axis = self._batch_axis_name()

    # --- feeds ----------------------------------------------------------------------------------
    def _feed_dtype(self, meta: TensorMeta) -> np.dtype:
        return self._dtypes[meta.name]  # the engine's input type

    def _device_feed(self, meta: TensorMeta, value: Any):
        """A GPU array is read in place (a stream it names, or an address TensorRT cannot bind, is refused here,
        before any GPU work); a device array in host memory is copied."""
        interface = getattr(value, "__cuda_array_interface__", None)
        if interface is None:
            return np.asarray(value)
        what = f"component '{self.component_name}' input '{meta.name}'"
        cai_stream(interface, what)
        check_alignment(interface, what)
        return value

    def _batch_axis_name(self) -> str | None:
        """The shared first axis ("batch" or "images") of every input and output, along which a call may be split."""
        names = {meta.axis_names[0] if meta.axis_names else None
                 for meta in [*self._inputs.values(), *self._outputs.values()]}
        return names.pop() if len(names) == 1 and names <= {"batch", "images"} else None

    def _infer_impl(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            stream = self._stream
            if self._closed or stream is None:
                raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner",
                                   "create a new one")
            if self._cuda.device_id:
                self._cuda.use_device()  # the current device is per thread
            first = next(iter(feeds.values()))
            limit = min(self._ranges[n][1][0] for n in self._engine_inputs) if self._split_axis else None
            if (limit and first.shape[0] > limit and not self._keep_on_device
                    and all(isinstance(v, np.ndarray) for v in feeds.values())):
                parts = [self._run({n: v[i:i + limit] for n, v in feeds.items()}, stream)
                         for i in range(0, first.shape[0], limit)]
                return {n: np.concatenate([p[n] for p in parts], axis=0) for n in parts[0]}
            return self._run(feeds, stream)

    def _run(self, feeds: dict[str, Any], stream) -> dict[str, Any]:
        context, staged = self._context, []
        for name, value in feeds.items():
            shape = tuple(value.shape)
            lo, hi = self._ranges[name]
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi)) or not context.set_input_shape(name, shape):
                raise FeedError(f"component '{self.component_name}' input '{name}' has shape {list(shape)}, "
                                "outside its "
                                f"TensorRT engine's profile", f"a shape from {list(lo)} to {list(hi)}",
                                "rebuild the engine for larger shapes: mmedge build ARTIFACT --max-batch N "
                                "--max-sequence N")
            interface = getattr(value, "__cuda_array_interface__", None)
            if interface is not None:
                pointer = int(interface["data"][0])
                self._wait_for_producer(interface, name, stream)
            else:
                host = np.ascontiguousarray(value, dtype=self._dtypes[name])
                staged.append(host)  # alive until the stream is synchronized
                pointer = self._buffers[name]
                self._cuda.to_device(pointer, host, stream)
            bind_address(context.set_tensor_address, name, pointer, self.component_name)
        results: dict[str, Any] = {}
        for name in self._engine_outputs:
            shape = output_shape(name, self.component_name, _dims(context.get_tensor_shape(name)))
            if self._keep_on_device and name in self._outputs:
                results[name] = DeviceTensor(self._cuda, shape, self._dtypes[name], pool=self._pool, name=name)
                bind_address(context.set_tensor_address, name, results[name].ptr, self.component_name, feed=False)
            else:
                bind_address(context.set_tensor_address, name, self._buffers[name], self.component_name, feed=False)
                results[name] = np.empty(shape, self._dtypes[name])
        if not context.execute_async_v3(int(stream)):
            raise BackendError(f"TensorRT failed running component '{self.component_name}'",
                               "feeds within the engine's profile", "see TensorRT's log above; check input shapes")
        for name, value in results.items():
            if isinstance(value, np.ndarray):
                self._cuda.to_host(value, self._buffers[name], stream)
        self._cuda.synchronize(stream)
        del staged
        return {name: results[name] for name in self._outputs}

    def _wait_for_producer(self, interface: Mapping[str, Any], name: str, stream) -> None:
        """Order ``stream`` after the work still writing a GPU feed: the stream its ``__cuda_array_interface__`` names
        gets an event that ``stream`` waits on; if no event can be made, that stream is synchronized."""
        producer = cai_stream(interface, f"component '{self.component_name}' input '{name}'")
        if producer is None or producer == int(stream):
            return
        if self._event is None:
            try:
                self._event = self._cuda.event()
            except BackendError as exc:
                log.warning("mmedge: %s; synchronizing the feeds' streams instead", exc.what)
                self._cuda.synchronize(producer)
                return
        self._cuda.wait_for(stream, producer, self._event)

    def longest_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's largest shape in the engine's profile."""
        return {name: hi for name, (_, hi) in self._ranges.items()}

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._release()

    def _release(self) -> None:
        for pointer in self._buffers.values():
            self._cuda.free_quietly(pointer)
        self._buffers = {}
        self._pool.close()  # idle buffers now; those still held by DeviceTensors when they are collected
        for handle, destroy in ((self._event, self._cuda.destroy_event), (self._stream, self._cuda.destroy_stream)):
            if handle is not None:
                with contextlib.suppress(BackendError):  # closing goes on past a failed CUDA call
                    destroy(handle)
        self._event = self._stream = None
        for attribute in ("_context", "_engine", "_runtime"):  # context before engine before runtime
            if hasattr(self, attribute):
                delattr(self, attribute)


class _Dims(Protocol):
    """What TensorRT's ``Dims`` declares: a length and indexing, no ``__iter__``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> int: ...


def output_shape(name: str, component_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` of output ``name`` as the context reports it for the bound inputs; BackendError for a data-dependent
    (-1) dimension, whose size is known only after the run (no buffer can be sized for it), on either output path."""
    if any(d < 0 for d in shape):
        raise BackendError(f"output '{name}' of component '{component_name}' has a data-dependent shape {list(shape)}",
                           "outputs whose shape follows from the input shapes",
                           "run this component on ONNX Runtime (--backend onnxruntime)")
    return shape


def bind_address(set_address: Callable[[str, int], bool], name: str, pointer: int, component_name: str, *,
                 feed: bool = True) -> None:
    """Bind tensor ``name`` to ``pointer`` with ``set_address`` (``IExecutionContext.set_tensor_address``), which
    returns False, leaving the tensor unbound, for an address TensorRT will not take (not 256-byte aligned): a
    FeedError for an input (the caller's array), a BackendError for an output (mmedge's own buffer)."""
    if set_address(name, pointer):
        return
    what = (f"TensorRT refused address {pointer:#x} for {'input' if feed else 'output'} '{name}' of component "
            f"'{component_name}'")
    expected = f"a GPU address aligned to {TENSOR_ALIGNMENT} bytes, of a tensor the engine has"
    if feed:
        raise FeedError(what, expected, "feed an array in its own allocation (x.copy() in CuPy, x.clone() in PyTorch, "
                                        "or a numpy array)")
    raise BackendError(what, expected, "close the runner and open a new one; report this if it persists")


def _dims(shape: _Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints, read by index: ``tuple(dims)`` works only through Python's fallback to
    ``__getitem__``, which TensorRT's declared API does not promise."""
    return tuple(int(shape[i]) for i in range(len(shape)))


# --- entry points ----------------------------------------------------------------------------------
RUNNER_OPTIONS = ("artifact", "precision", "max_batch", "opt_batch", "max_sequence", "max_images", "workspace_mb",
                  "device_id", "keep_on_device", "build", "defaults")


def create_runner(path, component_name: str, component: dict, *, artifact=None, precision: str | None = None,
                  max_batch: int | None = None, opt_batch: int | None = None, max_sequence: int | None = None,
                  max_images: int | None = None, workspace_mb: int | None = None, device_id: int = 0,
                  keep_on_device: bool = False, build: bool = True, defaults: Mapping | None = None,
                  **unknown) -> TensorRTRunner:
    """A runner for one component: its cached engine if fresh, else one built now (minutes, once per device;
    ``mmedge build`` prebuilds). ``build=False`` refuses to build (StaleEngineError) instead. Settings not
    passed come from engines/build.json (what ``mmedge build`` used), then ``defaults`` (the plan's)."""
    refuse_unknown_options("tensorrt", unknown, RUNNER_OPTIONS)
    why = unbuildable_reason(component_name, component)
    if why:
        raise BackendError(why,
                           "a component TensorRT builds (a float or static-QDQ INT8 graph, the decoder's included)",
                           "load with backend='auto' (TensorRT for what it builds, ONNX Runtime for the rest)")
    manifest = artifact.manifest if artifact is not None else {"components": {component_name: component}}
    engines_dir = artifact.engines_dir() if artifact is not None else Path(path).parent / "engines"
    explicit = {"precision": precision, "max_batch": max_batch, "opt_batch": opt_batch, "max_sequence": max_sequence,
                "max_images": max_images, "workspace_mb": workspace_mb}
    settings = resolve_settings(explicit, load_build_settings(engines_dir), defaults or {}, device_id)
    builder = _Builder(manifest, engines_dir, settings)
    outcome = builder.obtain(component_name, Path(path), allow_build=build)
    return TensorRTRunner(outcome.plan, component_name, component, device_id=device_id, keep_on_device=keep_on_device)


def create_decoder(artifact, embeddings, **options):
    """The artifact's KV-cached decoder on TensorRT: the decoder component's engine (as ``create_runner`` obtains it,
    same ``options``) with its outputs kept on the GPU, wrapped in ``RunnerDecoder`` (``engine_decoder``) so the cache
    stays there between steps. ``embeddings``: the artifact's token-embedding table."""
    runner = create_runner(artifact.component_path("decoder"), "decoder", artifact.component("decoder"),
                           **{**options, "artifact": artifact, "keep_on_device": True})
    try:
        return engine_decoder(runner, artifact.manifest, embeddings, runner.longest_shapes())
    except BaseException:
        runner.close()
        raise


def engine_decoder(runner: Runner, manifest: Mapping, embeddings, longest: Mapping[str, tuple[int, ...]]):
    """``RunnerDecoder`` over ``runner``, a runner of the decoder whose engine takes at most the ``longest`` input
    shapes: its ``max_positions`` is the engine profile's when smaller than the manifest's (``usable_positions``), so
    the generation loop refuses a prompt + max_new_tokens past the profile before the first step, not mid-generation.
    """
    from mmedge.runtimes.kv_decoder import artifact_decoder
    from mmedge.runtimes.runner_decoder import RunnerDecoder

    layout, options = artifact_decoder(manifest)
    positions = engine_positions(manifest["components"]["decoder"], longest)
    usable = usable_positions(options["max_positions"], positions)
    decoder = RunnerDecoder(runner, embeddings, layout, **{**options, "max_positions": usable})
    if usable is not None and usable != options["max_positions"]:  # the engine's profile, not the model, limits it
        decoder.positions_note = (f"its TensorRT engine takes {usable} positions, the model "
                                  f"{options['max_positions']}: `mmedge build ARTIFACT --max-sequence N` builds one "
                                  "for longer prompts and answers")
    return decoder


__all__ = ["BUILD_SETTINGS", "CudaRuntime", "DeviceTensor", "EngineOutcome", "EngineSettings", "TensorRTRunner",
           "bind_address", "build_artifact", "build_serialized_engine", "create_decoder", "create_runner",
           "describe_engines", "engine_decoder", "engine_key", "import_cudart", "import_tensorrt",
           "load_build_settings", "obtain_plan", "output_shape", "resolve_settings", "save_build_settings",
           "timing_cache_path"]
