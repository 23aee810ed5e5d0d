"""TensorRT backend: an engine per component, built from the artifact's ONNX on the device itself.

Engines are built with the TensorRT 10.x Python API (``trt.Builder`` → ``create_network`` → ``trt.OnnxParser.
parse_from_file``, which reads a graph's ``.onnx.data`` weights beside it → ``build_serialized_network``) and
cached under the artifact's ``engines/`` by ``mmedge.runtimes.engine_cache``, keyed by the graph's sha256 (and its
external data's), precision, shape profile, TensorRT version, GPU name and compute capability, and mmedge version.
A stale or foreign engine is rebuilt, never handed to TensorRT. Builds share a timing cache per TensorRT version
and GPU (``engines/timing-*.cache``).

- **Precision.** Float graphs build at FP16 by default (``BuilderFlag.FP16``), FP32 on request. A static QDQ
  INT8 graph builds as INT8 by explicit quantization: the network is created ``STRONGLY_TYPED`` and no precision
  flag is set, as TensorRT's documentation asks for Q/DQ networks ("Use explicit quantization with Strong
  Typing. Precision-control build flags are not required and should not be specified."). Which components can
  be built and at what precision is decided in ``mmedge.runtimes.tensorrt_planning`` (no TensorRT needed).
- **Shapes.** One optimization profile per engine, from the manifest's named dynamic axes and the user's limits
  (``tensorrt_planning.derive_profile``). A call larger than the profile's batch is split into profile-sized
  calls; any other shape outside the profile is refused with the rebuild command.
- **Memory.** Device buffers come from **cuda-python** (``mmedge.runtimes.cuda_buffers``: ``cuda.bindings.runtime``;
  ``cuda.cudart`` on older releases), not torch, so the device needs no PyTorch: ``cudaMalloc`` once per
  input/output at the profile's largest shape, one ``cudaStream`` and one ``IExecutionContext`` per runner
  (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). Calls on one runner are serialized by a lock.
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
  one step are the pasts of the next without leaving the GPU. The prefill feeds a zero-length past.
- **Not here.** Graphs with ONNX Runtime-only operators: INT4 weight-only (``com.microsoft.MatMulNBits``) and
  dynamic INT8 (``MatMulInteger``, ``DynamicQuantizeLinear``), which TensorRT cannot parse; ``create_runner``
  refuses them with a BackendError and selection keeps them on ONNX Runtime.

``tensorrt`` and ``cuda`` are imported when an engine is built or loaded, never at import time: without them
this module imports, and using it raises BackendUnavailableError with the install command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from mmedge.backends import refuse_unknown_options
from mmedge.errors import BackendError, BackendUnavailableError, FeedError, InputError, IntegrityError, StaleEngineError
from mmedge.runner import Runner, TensorMeta
from mmedge.runtimes.cuda_buffers import INSTALL, CudaRuntime, DevicePool, DeviceTensor, cai_stream, import_cudart
from mmedge.runtimes.engine_cache import EngineCache, EngineKey, _atomic_write
from mmedge.runtimes.tensorrt_planning import (DEFAULT_MAX_BATCH, MIB, MemoryNeed, ProfileLimits, check_memory,
                                               derive_profile, engine_bytes, engine_precision, kv_cache_need,
                                               profile_text, require_gpu, tensorrt_defaults,
                                               unbuildable_reason)

log = logging.getLogger("mmedge")

MIN_TENSORRT_MAJOR = 10


# --- lazy imports ----------------------------------------------------------------------------------
def import_tensorrt():
    """The ``tensorrt`` module (10.x), or BackendUnavailableError naming what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'tensorrt' needs the Python package 'tensorrt', which cannot be imported ({exc})",
            "TensorRT 10.x importable as 'tensorrt' on a machine with an NVIDIA GPU", INSTALL) from None
    if getattr(trt, "__file__", None) is None:  # a namespace package: a folder without TensorRT's bindings
        raise BackendUnavailableError(
            f"the 'tensorrt' that imports ({list(getattr(trt, '__path__', []))}) is a folder without TensorRT's bindings "
            "(type stubs such as tensorrt-stubs install one)",
            "TensorRT 10.x importable as 'tensorrt' on a machine with an NVIDIA GPU", INSTALL)
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError(f"TensorRT {getattr(trt, '__version__', '?')} is installed",
                                      f"TensorRT {MIN_TENSORRT_MAJOR}.x or newer (the name-based tensor API)", INSTALL)
    return trt


# --- the engine cache ------------------------------------------------------------------------------
def engine_key(component: Mapping, precision: str, profile: Mapping, *, tensorrt_version: str, gpu_name: str,
               compute_capability: str) -> EngineKey:
    """The cache key of a component's engine: graph and weight hashes from the manifest, precision, profile,
    TensorRT version, GPU, and the mmedge version."""
    from mmedge import __version__

    external = component.get("external_data") or {}
    return EngineKey.create(onnx_sha256=component["sha256"], precision=precision, profile=profile,
                            tensorrt_version=tensorrt_version, gpu_name=gpu_name, compute_capability=compute_capability,
                            external_data_sha256=external.get("sha256"), mmedge_version=__version__)


@dataclass
class EngineOutcome:
    """What ``obtain_plan`` did: "loaded" a fresh engine, "built" a first one, or "rebuilt" over stale ones
    (``reasons`` says why each was refused)."""

    action: str
    plan: bytes = field(repr=False)
    path: Path
    reasons: list[str] = field(default_factory=list)


def obtain_plan(cache: EngineCache, component: str, key: EngineKey, build: Callable[[], bytes], *,
                allow_build: bool = True, force: bool = False) -> EngineOutcome:
    """The engine bytes for ``key``: the cached plan when it is fresh (its key and sha256 match), else ``build()``,
    stored in the cache. Stale and foreign engines are deleted and rebuilt; their bytes are never returned, so
    never reach TensorRT. With ``allow_build=False`` a missing or stale engine raises StaleEngineError."""
    found = cache.lookup(component, key)
    if found.fresh and not force:
        try:
            return EngineOutcome("loaded", cache.load(component, key), cache.paths(component, key)[0])
        except StaleEngineError as exc:  # changed on disk between lookup and read
            found = cache.lookup(component, key)
            found.reasons = found.reasons or [exc.what]
    if not allow_build:
        cache.load(component, key)  # raises StaleEngineError with the reasons
    reasons = list(found.reasons)
    if force:
        for path in cache.paths(component, key):
            path.unlink(missing_ok=True)
        reasons.append("a rebuild was requested")
    cache.remove_stale(component, key)
    plan = cache.store(component, key, build())
    action = "rebuilt" if found.status == "stale" or force else "built"
    return EngineOutcome(action, plan, cache.paths(component, key)[0], reasons)


def timing_cache_path(engines_dir: Path, tensorrt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU: kernel timings from one never steer a build on another."""
    digest = hashlib.sha256(f"{tensorrt_version}|{gpu_name}|{compute_capability}".encode()).hexdigest()[:16]
    return Path(engines_dir) / f"timing-{digest}.cache"


# --- building --------------------------------------------------------------------------------------
def build_serialized_engine(onnx_path: str | os.PathLike, profile: Mapping, precision: str, *, workspace_bytes: int,
                            timing_cache: Path | None = None, component: str = "", progress: Callable[[str], None] | None = None
                            ) -> bytes:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build a serialized engine (plan bytes)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (flag 0 = weakly typed); Q/DQ graphs are built strongly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "int8" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so weights in <name>.onnx.data are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser refused component '{component}' ({errors[:400] or 'no detail'})",
                           "a graph whose operators TensorRT supports",
                           "run this component on ONNX Runtime (--backend auto or onnxruntime)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if profile:
        shapes = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            shapes.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(shapes)
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    try:
        timings = config.create_timing_cache(cached)
    except Exception:  # an unreadable cache only costs build time: start an empty one
        timings = config.create_timing_cache(b"")
    config.set_timing_cache(timings, ignore_mismatch=False)  # keyed per TensorRT version and GPU: no foreign timings
    monitor = _progress_monitor(progress) if progress is not None and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # kept referenced until the build returns
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine for component '{component}' at {precision}",
                           "a successful build (TensorRT's log above says what failed)",
                           "free GPU memory or lower --workspace-mb / --max-batch / --max-sequence, or try --precision fp32")
    if timing_cache is not None:
        _atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def _progress_monitor(write: Callable[[str], None]):
    trt = import_tensorrt()  # here, not a parameter: the static check then knows IProgressMonitor's API

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:  # top-level phases only: one line each
                write(f"    TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


@dataclass
class EngineSettings:
    """How a component's engine is built; ``None`` fields take the device's defaults (``tensorrt_planning.tensorrt_defaults``)."""

    precision: str | None = None
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    workspace_mb: int | None = None
    device_id: int = 0


class _Builder:
    """Keys, looks up and (when needed) builds the engines of one artifact on this GPU."""

    def __init__(self, manifest: Mapping, engines_dir: Path, settings: EngineSettings, probe=None):
        from mmedge import device

        self.trt = import_tensorrt()
        self.cuda = CudaRuntime(settings.device_id)
        self.manifest = manifest
        self.settings = settings
        self.probe = probe or device.probe()
        self.defaults = tensorrt_defaults(self.probe)
        self.workspace = (settings.workspace_mb or self.defaults.workspace_mb) * MIB
        self.gpu_name, self.compute_capability = self.cuda.identity()
        self.cache = EngineCache(engines_dir)
        self.timing = timing_cache_path(engines_dir, self.trt.__version__, self.gpu_name, self.compute_capability)

    def precision(self, name: str) -> str:
        return engine_precision(name, self.manifest["components"][name], self.settings.precision, self.defaults.precision)

    def key(self, name: str) -> EngineKey:
        return engine_key(self.manifest["components"][name], self.precision(name), derive_profile(self.manifest, name, self.settings.limits),
                          tensorrt_version=self.trt.__version__, gpu_name=self.gpu_name, compute_capability=self.compute_capability)

    def memory_need(self, paths: Mapping[str, Path]) -> MemoryNeed:
        engines = {}
        for name, path in paths.items():
            component = self.manifest["components"][name]
            size = path.stat().st_size
            external = component.get("external_data")
            if external:
                size += (path.parent / external["file"]).stat().st_size
            engines[name] = engine_bytes(component, size, self.precision(name))
        return MemoryNeed(engines, self.workspace, kv_cache_need(self.manifest, self.settings.limits, paths))

    def obtain(self, name: str, onnx_path: Path, *, allow_build: bool = True, force: bool = False,
               progress: Callable[[str], None] | None = None) -> EngineOutcome:
        def build() -> bytes:
            check_memory(self.probe, self.memory_need({name: onnx_path}), self.settings.device_id)
            profile = derive_profile(self.manifest, name, self.settings.limits)
            log.info("mmedge: building the TensorRT engine for '%s' (%s, %s); this takes a while once per device",
                     name, self.precision(name), profile_text(profile))
            return build_serialized_engine(onnx_path, profile, self.precision(name), workspace_bytes=self.workspace,
                                           timing_cache=self.timing, component=name, progress=progress)

        outcome = obtain_plan(self.cache, name, self.key(name), build, allow_build=allow_build, force=force)
        for reason in outcome.reasons:
            log.info("mmedge: engine for '%s' rebuilt: %s", name, reason)
        return outcome


BUILD_SETTINGS = "build.json"  # under engines/: the limits `mmedge build` used, so later loads look up the same engines
_SETTING_FIELDS = ("precision", "max_batch", "opt_batch", "max_sequence", "max_images", "workspace_mb")


def save_build_settings(engines_dir: Path, settings: EngineSettings) -> Path:
    """Record the limits and precision engines were prebuilt with: ``mmedge.load`` then keys its engines the same way."""
    limits = settings.limits
    data = {"format": "mmedge.engine-settings", "format_version": 1, "precision": settings.precision,
            "max_batch": limits.max_batch, "opt_batch": limits.opt_batch, "max_sequence": limits.max_sequence,
            "max_images": limits.max_images, "workspace_mb": settings.workspace_mb}
    path = Path(engines_dir) / BUILD_SETTINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
    return path


def load_build_settings(engines_dir: Path) -> dict:
    """The settings ``save_build_settings`` recorded ({} when there are none or they are unreadable: defaults apply)."""
    try:
        data = json.loads((Path(engines_dir) / BUILD_SETTINGS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != "mmedge.engine-settings" or data.get("format_version") != 1:
        return {}
    out = {}
    for name in _SETTING_FIELDS:
        value = data.get(name)
        if name == "precision":
            if value in (None, "fp32", "fp16", "int8"):
                out[name] = value
        elif value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            out[name] = value
    return out


def describe_engines(engines_dir: Path) -> list[str]:
    """One line per engine cached under ``engines_dir``: what it was built for, read from its record (nothing is loaded)."""
    lines = []
    for record in sorted(Path(engines_dir).glob("*.json")):
        if record.name == BUILD_SETTINGS:
            continue
        try:
            entry = json.loads(record.read_text())
            key = EngineKey.from_dict(entry["key"])
        except (OSError, ValueError, KeyError, TypeError, InputError):
            lines.append(f"{record.stem}: unreadable record (rebuilt when needed)")
            continue
        lines.append(f"{record.stem}: {key.precision}, GPU '{key.gpu_name}' (sm {key.compute_capability}), TensorRT "
                     f"{key.tensorrt_version}, mmedge {key.mmedge_version or '?'}, {entry.get('plan_bytes', 0) / MIB:.1f} MiB")
    return lines


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
        self._pool = DevicePool(self._cuda.malloc, self._cuda.free_quietly)  # outputs kept on the GPU, reused across calls
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
                               "enough free GPU memory for the engine's activations", "free GPU memory, or build with a smaller --max-batch")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._engine_inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._engine_outputs = [n for n in names if n not in self._engine_inputs]
        if set(self._engine_inputs) != set(self._inputs) or not set(self._outputs) <= set(self._engine_outputs):
            raise IntegrityError(f"component '{component_name}' engine has inputs {sorted(self._engine_inputs)} and outputs "
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
                self._context.set_input_shape(n, hi)
                self._buffers[n] = self._cuda.malloc(int(np.prod(hi, dtype=np.int64)) * self._dtypes[n].itemsize)
            for n in self._engine_outputs:
                if keep_on_device and n in self._outputs:
                    continue  # each call's DeviceTensor has the real shape, from the pool (a decoder's cache: no max-size copy)
                shape = _dims(self._context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise BackendError(f"output '{n}' of component '{component_name}' has a data-dependent shape {list(shape)}",
                                       "outputs whose shape follows from the input shapes", "run this component on ONNX Runtime")
                self._buffers[n] = self._cuda.malloc(int(np.prod(shape, dtype=np.int64)) * self._dtypes[n].itemsize)
        except BaseException:
            self._release()
            raise
        self._split_axis = self._batch_axis_name()

    # --- feeds ----------------------------------------------------------------------------------
    def _check_one(self, meta: TensorMeta, value: Any):
        interface = getattr(value, "__cuda_array_interface__", None)
        if interface is None:
            return super()._check_one(meta, value)
        shape, dtype = tuple(interface["shape"]), np.dtype(interface["typestr"])
        if interface.get("strides") is not None and interface["strides"] != _contiguous_strides(shape, dtype):
            raise FeedError(f"component '{self.component_name}' input '{meta.name}' is a non-contiguous GPU array",
                            "a C-contiguous GPU array", "make it contiguous (e.g. .contiguous() / cupy.ascontiguousarray)")
        if dtype != self._dtypes[meta.name]:
            raise FeedError(f"component '{self.component_name}' input '{meta.name}' is a GPU array of dtype {dtype}",
                            f"{self._dtypes[meta.name]} (the engine's input type)", "convert it on the GPU before feeding it")
        if len(shape) != len(meta.shape) or any(w is not None and w != g for w, g in zip(meta.shape, shape)):
            raise FeedError(f"component '{self.component_name}' input '{meta.name}' has shape {list(shape)}",
                            f"shape {self._describe(meta)}", "reshape the input to the declared shape")
        cai_stream(interface, f"component '{self.component_name}' input '{meta.name}'")  # refused here, before any GPU work
        return value

    def _batch_axis_name(self) -> str | None:
        """The shared first axis ("batch" or "images") of every input and output, along which a call may be split."""
        names = {meta.axis_names[0] if meta.axis_names else None for meta in [*self._inputs.values(), *self._outputs.values()]}
        return names.pop() if len(names) == 1 and names <= {"batch", "images"} else None

    def _infer_impl(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            stream = self._stream
            if self._closed or stream is None:
                raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner", "create a new one")
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
                raise FeedError(f"component '{self.component_name}' input '{name}' has shape {list(shape)}, outside its "
                                f"TensorRT engine's profile", f"a shape from {list(lo)} to {list(hi)}",
                                "rebuild the engine for larger shapes: mmedge build ARTIFACT --max-batch N --max-sequence N")
            interface = getattr(value, "__cuda_array_interface__", None)
            if interface is not None:
                pointer = int(interface["data"][0])
                self._wait_for_producer(interface, name, stream)
            else:
                host = np.ascontiguousarray(value, dtype=self._dtypes[name])
                staged.append(host)  # alive until the stream is synchronized
                pointer = self._buffers[name]
                self._cuda.to_device(pointer, host, stream)
            context.set_tensor_address(name, pointer)
        results: dict[str, Any] = {}
        for name in self._engine_outputs:
            shape = _dims(context.get_tensor_shape(name))
            if self._keep_on_device and name in self._outputs:
                results[name] = DeviceTensor(self._cuda, shape, self._dtypes[name], pool=self._pool, name=name)
                context.set_tensor_address(name, results[name].ptr)
            else:
                context.set_tensor_address(name, self._buffers[name])
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


def _contiguous_strides(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    strides, step = [], dtype.itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


class _Dims(Protocol):
    """What TensorRT's ``Dims`` declares: a length and indexing, no ``__iter__``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> int: ...


def _dims(shape: _Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints, read by index: ``tuple(dims)`` works only through Python's fallback to
    ``__getitem__``, which TensorRT's declared API does not promise."""
    return tuple(int(shape[i]) for i in range(len(shape)))


# --- entry points ----------------------------------------------------------------------------------
def resolve_settings(explicit: Mapping, saved: Mapping, defaults: Mapping, device_id: int = 0) -> EngineSettings:
    """Engine settings by precedence: what the caller passed, then what ``mmedge build`` recorded under engines/,
    then the device defaults from the plan (``tensorrt_planning.tensorrt_defaults``), then mmedge's."""
    def pick(name, fallback=None):
        for source in (explicit, saved, defaults):
            if source.get(name) is not None:
                return source[name]
        return fallback

    limits = ProfileLimits(max_batch=pick("max_batch", DEFAULT_MAX_BATCH), opt_batch=pick("opt_batch", 1),
                           max_sequence=pick("max_sequence"), max_images=pick("max_images"))
    # precision: None in build.json means "per component" (INT8 for QDQ graphs, the default for float graphs)
    precision = explicit.get("precision") or (saved["precision"] if "precision" in saved else defaults.get("precision"))
    return EngineSettings(precision, limits, pick("workspace_mb"), device_id)


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
        raise BackendError(why, "a component TensorRT builds (a float or static-QDQ INT8 graph, the decoder's included)",
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
    same ``options``) with its outputs kept on the GPU, wrapped in ``RunnerDecoder`` so the cache stays there between
    steps. ``embeddings``: the artifact's token-embedding table."""
    from mmedge.runtimes.runner_decoder import RunnerDecoder

    runner = create_runner(artifact.component_path("decoder"), "decoder", artifact.component("decoder"),
                           **{**options, "artifact": artifact, "keep_on_device": True})
    try:
        return RunnerDecoder.for_artifact(runner, artifact.manifest, embeddings)
    except BaseException:
        runner.close()
        raise


def build_artifact(path: str | os.PathLike, settings: EngineSettings | None = None, *, components: list[str] | None = None,
                   force: bool = False, progress: bool = True, stream=None, probe=None) -> list[dict]:
    """Prebuild the TensorRT engines of an artifact on this device (``mmedge build``); one dict per component.

    Everything that can be decided without TensorRT is checked first (component names, which components
    TensorRT builds, precisions, profiles), so a bad request fails the same way on any machine; then TensorRT,
    the GPU and the memory the engines need.
    """
    from mmedge import device
    from mmedge.artifact import Artifact
    from mmedge.progress import Progress

    settings = settings or EngineSettings()
    stream = stream or sys.stderr
    artifact = Artifact.open(path)
    manifest = artifact.manifest
    names = list(components or manifest["components"])
    unknown = [n for n in names if n not in manifest["components"]]
    if unknown:
        raise InputError(f"artifact '{artifact.root.name}' has no component {', '.join(repr(n) for n in unknown)}",
                         f"components among {', '.join(manifest['components'])}", "pass --components with those names")
    skipped = {n: unbuildable_reason(n, manifest["components"][n]) for n in names}
    targets = [n for n in names if not skipped[n]]
    skipped = {n: why for n, why in skipped.items() if why}
    if not targets:
        raise BackendUnavailableError(f"no component of '{artifact.root.name}' can be built by TensorRT: "
                                      + "; ".join(skipped.values()), "a float or static-QDQ INT8 graph",
                                      "run this artifact on ONNX Runtime (--backend onnxruntime)")
    for name in targets:  # refuse bad precisions and profiles before touching TensorRT
        engine_precision(name, manifest["components"][name], settings.precision)
        derive_profile(manifest, name, settings.limits)
    import_tensorrt()
    import_cudart()
    probe = probe or device.probe()
    require_gpu(probe)
    builder = _Builder(manifest, artifact.engines_dir(), settings, probe)
    paths = {name: artifact.component_path(name) for name in targets}
    def say(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    write = say if progress else None
    memory_line = check_memory(probe, builder.memory_need(paths), settings.device_id)
    if write:
        write(f"TensorRT {builder.trt.__version__} on {builder.gpu_name} (sm {builder.compute_capability}); {memory_line}")
        for name, why in skipped.items():
            write(f"skipped: {why}")
    steps = Progress(len(targets), enabled=progress, stream=stream)
    results = []
    for name in targets:
        profile = derive_profile(manifest, name, settings.limits)
        with steps.step(f"engine for {name}: {builder.precision(name)}, {profile_text(profile)}"):
            outcome = builder.obtain(name, paths[name], force=force, progress=write)
        if write:
            why = f" ({'; '.join(outcome.reasons)})" if outcome.reasons else ""
            write(f"    {outcome.action} {outcome.path.name}, {len(outcome.plan) / MIB:.1f} MiB{why}")
        results.append({"component": name, "action": outcome.action, "precision": builder.precision(name),
                        "engine": str(outcome.path), "bytes": len(outcome.plan), "reasons": outcome.reasons})
    save_build_settings(artifact.engines_dir(), settings)
    return results


__all__ = ["CudaRuntime", "DeviceTensor", "EngineOutcome", "EngineSettings", "TensorRTRunner", "build_artifact",
           "build_serialized_engine", "create_decoder", "create_runner", "describe_engines", "engine_key", "import_cudart",
           "import_tensorrt", "load_build_settings", "obtain_plan", "resolve_settings", "save_build_settings",
           "timing_cache_path"]
