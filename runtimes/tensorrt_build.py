"""Building TensorRT engines on the device: the TensorRT 10.x Python API (``trt.Builder`` → ``create_network`` →
``trt.OnnxParser.parse_from_file``, which reads a graph's ``.onnx.data`` weights beside it →
``build_serialized_network``), one shared timing cache per TensorRT version and GPU, engines stored in and looked up
from ``mmedge.runtimes.engine_cache``; ``build_artifact`` is ``mmedge build``. What is built, at which precision
and over which profile is decided in ``mmedge.runtimes.tensorrt_planning`` (no TensorRT needed); the runner is
``mmedge.runtimes.tensorrt``. ``tensorrt`` is imported when an engine is built or loaded, never at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from mmedge.artifact import write_whole
from mmedge.errors import BackendError, BackendUnavailableError, InputError
from mmedge.runtimes.cuda_buffers import INSTALL, CudaRuntime, import_cudart
from mmedge.runtimes.engine_cache import (
    EngineCache,
    EngineKey,
    EngineOutcome,
    EngineSettings,
    engine_key,
    obtain_plan,
    save_build_settings,
    timing_cache_path,
)
from mmedge.runtimes.tensorrt_planning import (
    DEFAULT_MAX_BATCH,
    MIB,
    MemoryNeed,
    ProfileLimits,
    check_memory,
    derive_profile,
    engine_bytes,
    engine_precision,
    idle_limit,
    key_precision,
    kv_cache_need,
    network_typing,
    profile_text,
    refuse_max_sequence,
    require_gpu,
    tensorrt_defaults,
    unbuildable_reason,
)

log = logging.getLogger("mmedge")
T = TypeVar("T")

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
            f"the 'tensorrt' that imports ({list(getattr(trt, '__path__', []))}) is a folder without "
            "TensorRT's bindings "
            "(type stubs such as tensorrt-stubs install one)",
            "TensorRT 10.x importable as 'tensorrt' on a machine with an NVIDIA GPU", INSTALL)
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError(f"TensorRT {getattr(trt, '__version__', '?')} is installed",
                                      f"TensorRT {MIN_TENSORRT_MAJOR}.x or newer (the name-based tensor API)", INSTALL)
    return trt


# --- building --------------------------------------------------------------------------------------
def build_serialized_engine(onnx_path: str | os.PathLike, profile: Mapping, precision: str, *, workspace_bytes: int,
                            timing_cache: Path | None = None, component: str = "",
                            progress: Callable[[str], None] | None = None, graph_precision: str | None = None
                            ) -> bytes:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and build a serialized engine (plan bytes); ``graph_precision``:
    the precision the graph was exported at (the manifest's), which decides the network's typing
    (``tensorrt_planning.network_typing``)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (flag 0 = weakly typed); Q/DQ graphs and FP16 graphs (types chosen
    # at export, FP32 islands included) are built strongly typed, without a precision flag
    strongly_typed, fp16_flag = network_typing(graph_precision, precision)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed
                                     else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so weights in <name>.onnx.data are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser refused component '{component}' ({errors[:400] or 'no detail'})",
                           "a graph whose operators TensorRT supports",
                           "run this component on ONNX Runtime (--backend auto or onnxruntime)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if profile:
        shapes = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            shapes.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        if config.add_optimization_profile(shapes) < 0:  # -1: TensorRT found the profile invalid
            raise BackendError(f"TensorRT refused the shape profile of component '{component}' "
                               f"({profile_text(profile)})",
                               "min <= opt <= max on every axis, for every dynamic input of the graph",
                               "check --max-batch / --max-sequence / --max-images, or re-export the artifact")
    cached = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    # keyed per TensorRT version and GPU: no foreign timings (ignore_mismatch=False)
    open_timing_cache(config.create_timing_cache, lambda made: config.set_timing_cache(made, ignore_mismatch=False),
                      cached, timing_cache)
    monitor = _progress_monitor(progress) if progress is not None and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # kept referenced until the build returns
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine for component '{component}' at {precision}",
                           "a successful build (TensorRT's log above says what failed)",
                           "free GPU memory or lower --workspace-mb / --max-batch / --max-sequence, or try "
                           "--precision fp32")
    if timing_cache is not None:
        write_whole(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def open_timing_cache(create: Callable[[bytes], T | None], attach: Callable[[T], bool], cached: bytes,
                      where: Path | None = None) -> T:
    """The builder's timing cache: ``create`` (``IBuilderConfig.create_timing_cache``) over the ``cached`` bytes,
    attached with ``attach`` (``set_timing_cache``, which says whether it took it). A cache TensorRT cannot read or
    will not take (``create`` raising or returning None, ``attach`` returning False) only costs build time: a fresh
    one is started, with a log line. BackendError when even a fresh one is refused."""
    if cached:
        try:
            made = create(cached)
        except Exception as exc:  # TensorRT's own error types
            made, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "TensorRT could not read it" if made is None else "TensorRT refused to use it"
        if made is not None and attach(made):
            return made
        log.warning("mmedge: the timing cache %s was not used (%s); starting a fresh one, so this build takes longer",
                 where or "given", why)
    made = create(b"")
    if made is None or not attach(made):
        raise BackendError("TensorRT could not start an empty timing cache",
                           "IBuilderConfig.create_timing_cache(b'') and set_timing_cache to succeed",
                           "check TensorRT's log above; free GPU memory and retry")
    return made


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
        return engine_precision(name, self.manifest["components"][name], self.settings.precision,
                                self.defaults.precision, self.manifest)

    def key(self, name: str) -> EngineKey:
        component = self.manifest["components"][name]
        return engine_key(component, key_precision(component, self.precision(name)),
                          derive_profile(self.manifest, name, self.settings.limits),
                          tensorrt_version=self.trt.__version__, gpu_name=self.gpu_name,
                          compute_capability=self.compute_capability)

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
                                           timing_cache=self.timing, component=name, progress=progress,
                                           graph_precision=self.manifest["components"][name].get("precision"))

        outcome = obtain_plan(self.cache, name, self.key(name), build, allow_build=allow_build, force=force)
        for reason in outcome.reasons:
            log.info("mmedge: engine for '%s' rebuilt: %s", name, reason)
        return outcome


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


def build_artifact(path: str | os.PathLike, settings: EngineSettings | None = None, *,
                   components: list[str] | None = None,
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
        engine_precision(name, manifest["components"][name], settings.precision, manifest=manifest)
        derive_profile(manifest, name, settings.limits)
    idle = idle_limit(manifest, targets, settings.limits)
    if not idle:
        refuse_max_sequence(manifest, targets, settings.limits)
    if idle:
        flag = "--" + idle.replace("_", "-")
        takes = "a token sequence of varying length" if idle == "max_sequence" else "a varying number of images"
        raise InputError(f"{flag} would change nothing for '{artifact.root.name}': no component built here "
                         f"({', '.join(targets)}) takes {takes}",
                         "a component with such an input (a text encoder or decoder for --max-sequence, a graph "
                         "taking several images for --max-images)", f"drop {flag}")
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
        write(f"TensorRT {builder.trt.__version__} on {builder.gpu_name} (sm {builder.compute_capability}); "
              f"{memory_line}")
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
