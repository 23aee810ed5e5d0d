"""The ONNX Runtime backend's plug-in: the last in priority, it takes every component the others left, on the
CPU or on its CUDA / TensorRT execution providers (provider options from ``ort_options``)."""

from __future__ import annotations

from mmedge.backends import Backend, ComponentPlan, PlanRequest
from mmedge.errors import BackendUnavailableError
from mmedge.runtimes.registry import BACKENDS
from mmedge.runtimes.tensorrt_planning import provider_fp16, tensorrt_defaults, unsupported_gpu

GPU_PROVIDERS = ("tensorrt", "cuda")


def ort_options(probe, providers: tuple[str, ...], component: dict, manifest: dict | None = None,
                name: str = "") -> dict:
    """Provider options for one ONNX Runtime component: device id, IO binding on GPU providers (outputs stay on the
    GPU between stages), and for the TensorRT provider FP16 (``provider_fp16``: per ``tensorrt_defaults``, never for
    INT8 graphs, FP16 graphs with FP32 islands or FP32 graphs that overflow at FP16, e.g. T5's) and the builder
    workspace."""
    if not any(p in providers for p in GPU_PROVIDERS):
        return {}
    options = {"device_id": 0, "io_binding": True}
    if "tensorrt" in providers:
        defaults = tensorrt_defaults(probe)
        options.update(fp16=provider_fp16(manifest, name, component, defaults.precision),
                       workspace_mb=defaults.workspace_mb)
    return options


# ONNX Runtime's CPU threads spin after a call (``allow_spinning``) so that the next call of the same graph starts at
# once. A generation pipeline runs its graphs in turn (image graph, then the decoder, step after step): the threads
# of the graph that just ran would spin on the cores the next graph needs. Stopping them when a call returns took
# 17-30% off BLIP-2's (OPT-125m shapes) time to first token and 24-37% off IDEFICS-mid's, decoding as fast
# (benchmarks/spinning_cpu.py, RESULTS.md).
STOP_SPINNING_AFTER_CALLS = {"session.force_spinning_stop": "1"}


def turn_taking(request: PlanRequest, providers: tuple[str, ...]) -> dict:
    """Session entries for a pipeline whose graphs take turns on the CPU (a decoder and its encoders): spinning stops
    when a call returns. One-graph pipelines (CLIP) keep spinning between calls."""
    components = request.manifest["components"]
    if providers != ("cpu",) or "decoder" not in components or len(components) < 2:
        return {}
    request.reasons.append("its graphs run in turn: ONNX Runtime's CPU threads stop spinning when a call returns "
                           "(session.force_spinning_stop), so the next graph has the cores")
    return {"config_entries": dict(STOP_SPINNING_AFTER_CALLS)}


def with_settings(options: dict, settings: dict | None) -> dict:
    """``options`` with the user's ``settings`` on top; their ``config_entries`` add to the plan's, key by key."""
    settings = dict(settings or {})
    entries = {**options.get("config_entries", {}), **settings.pop("config_entries", {})}
    return {**options, **settings, **({"config_entries": entries} if entries else {})}


def _providers(request: PlanRequest) -> tuple[str, ...]:
    probe, reasons = request.probe, request.reasons
    gpu_providers = [p for p in GPU_PROVIDERS if p in probe.ort_providers]
    old_gpu = unsupported_gpu(probe) if "tensorrt" in gpu_providers else None
    if old_gpu:  # ONNX Runtime's TensorRT provider is TensorRT 10 too
        gpu_providers.remove("tensorrt")
        reasons.append(f"ONNX Runtime's TensorRT provider left out: {old_gpu}")
    if request.device == "cpu":
        reasons.append("device=cpu requested: ONNX Runtime CPU provider")
        return ("cpu",)
    if gpu_providers:
        reasons.append(f"ONNX Runtime offers {', '.join(gpu_providers)}: using them, CPU as fallback for "
                       "unsupported ops")
        return tuple(gpu_providers)
    if request.device == "cuda":
        raise BackendUnavailableError(
            f"device=cuda was requested but this onnxruntime build offers only {probe.ort_providers}",
            "onnxruntime-gpu with the CUDA (or TensorRT) execution provider and an NVIDIA GPU",
            "pip uninstall onnxruntime && pip install onnxruntime-gpu, or pass --device cpu",
        )
    why = "no GPU found" if not request.has_gpu else "this onnxruntime build has no GPU provider"
    reasons.append(f"{why}: ONNX Runtime CPU provider" + ("" if request.explicit else " (fallback)"))
    return ("cpu",)


# OrtOptions fields that only a GPU execution provider reads -> those providers
GPU_PROVIDER_SETTINGS = {"device_id": ("cuda", "tensorrt"), "keep_on_device": ("cuda", "tensorrt"),
                         "workspace_mb": ("tensorrt",), "fp16": ("tensorrt",), "engine_cache": ("tensorrt",)}


def _runs_at(precision: str, options: dict) -> str:
    """The precision a component runs at: its graph's, and "(fp16 inference)" where the TensorRT provider builds it
    at FP16 (what bench reports and validate's floor follows), as OpenVINO labels its inference precision."""
    return f"{precision} (fp16 inference)" if options.get("fp16") and "fp16" not in precision else precision


class OnnxRuntimeBackend(Backend):
    runner_module = "mmedge.runtimes.onnxruntime"
    plan_owned = ("providers", "threads")
    decoder_only = ()

    @property
    def settings(self):  # OrtOptions lives beside the runner, which imports onnxruntime
        from mmedge.runtimes.onnxruntime import OrtOptions

        return OrtOptions

    def unusable(self, request: PlanRequest) -> str | None:
        return None if request.probe.engines.get("onnxruntime") else "onnxruntime is not installed"

    def idle_settings(self, settings: dict, plans: list[ComponentPlan]) -> dict[str, str]:
        """``device_id`` and ``keep_on_device`` (outputs left on the GPU) are for the GPU providers, ``workspace_mb``,
        ``fp16`` and ``engine_cache`` for the TensorRT provider: elsewhere they change nothing."""
        used = {provider for plan in plans for provider in plan.providers}
        idle = {}
        for setting, needs in GPU_PROVIDER_SETTINGS.items():
            if setting in settings and not used & set(needs):
                idle[setting] = (f"it is for ONNX Runtime's {' or '.join(needs)} provider, and the plan runs "
                                 f"{', '.join(sorted(used))}")
        return idle

    def declined(self, request: PlanRequest, why: str, taken: dict[str, ComponentPlan]) -> None:
        if any(name not in taken for name in request.manifest["components"]):
            raise BackendUnavailableError(why, "the onnxruntime package", "pip install onnxruntime")

    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        rest = [name for name in request.manifest["components"] if name not in taken]
        if not rest:
            return {}
        why = self.unusable(request)
        if why:
            self.declined(request, why, taken)
        providers = _providers(request)
        components = request.manifest["components"]
        shared = turn_taking(request, providers)
        planned = {}
        for name in rest:
            options = {**ort_options(request.probe, providers, components[name], request.manifest, name), **shared}
            planned[name] = ComponentPlan(self.name, providers, _runs_at(components[name]["precision"], options),
                                          options)
        return planned

    def runner_options(self, artifact, plan: ComponentPlan, threads: int | None) -> dict:
        """``OrtOptions`` fields from the plan: providers, threads, provider options, the TensorRT provider's cache."""
        options = {"providers": plan.providers, "threads": threads, **plan.options}
        if "tensorrt" in plan.providers:
            options["engine_cache"] = artifact.engines_dir()
        return options

    def open_runner(self, artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False):
        options = with_settings(self.runner_options(artifact, plan, threads), self.runner_settings(settings))
        if keep_on_device:
            options["keep_on_device"] = True  # its outputs feed another stage on the same GPU backend
        from mmedge.runtimes.ort_session import release_named_when_too_old

        with release_named_when_too_old(artifact.manifest):
            return self.import_runner_module().create_runner(artifact.component_path(name), name,
                                                             artifact.component(name), **options)

    def open_decoder(self, artifact, plan: ComponentPlan, table, *, threads: int | None = None,
                     settings: dict | None = None):
        """``OrtDecoder`` over the decoder graph; it binds its cache itself (no ``io_binding`` / ``keep_on_device``)."""
        from mmedge.runtimes.kv_decoder import artifact_decoder
        from mmedge.runtimes.onnxruntime import OrtOptions
        from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

        layout, decoder_options = artifact_decoder(artifact.manifest)  # IDEFICS: context inputs (image mask, cross K/V)
        ort_settings = {k: v for k, v in with_settings(self.runner_options(artifact, plan, threads), settings).items()
                        if k not in ("io_binding", "keep_on_device")}
        from mmedge.runtimes.ort_session import release_named_when_too_old

        with release_named_when_too_old(artifact.manifest):
            return OrtDecoder(artifact.component_path("decoder"), table, layout, options=OrtOptions(**ort_settings),
                              **decoder_options)

    def device_lines(self, probe) -> list[str]:
        """A warning where several onnxruntime distributions are installed together (``pip install mmedge`` beside
        onnxruntime-gpu adds the CPU build): they share the one ``onnxruntime`` module, so whichever was installed
        last decides which providers run."""
        from mmedge.device import ORT_DISTRIBUTIONS, installed_distributions

        found = installed_distributions(ORT_DISTRIBUTIONS)
        if len(found) < 2:
            return []
        builds = [name for name in found if name != "onnxruntime"]
        if "onnxruntime" in found and len(builds) == 1:  # the CPU build pip added beside a device's own
            keep = builds[0]
            fix = (f"pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps {keep}=={found[keep]} "
                   f"(or {keep}'s own wheel, as a Jetson's came): the CPU build's files replaced its module")
        else:
            fix = ("keep the build you need: pip uninstall -y the others, then reinstall it (pip install "
                   "--force-reinstall --no-deps NAME==VERSION, or its own wheel)")
        return [f"onnxruntime: WARNING: {' and '.join(f'{n} {v}' for n, v in found.items())} are installed together; "
                "they share one onnxruntime module, and the one installed last decides which providers run (now: "
                f"{', '.join(probe.ort_providers) or 'none'}): {fix}"]

    def hands_over_on_gpu(self, plan: ComponentPlan) -> bool:
        return bool(plan.options.get("io_binding"))


BACKEND = OnnxRuntimeBackend(BACKENDS["onnxruntime"])
