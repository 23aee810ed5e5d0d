"""The TensorRT backend's plug-in: on an NVIDIA GPU with TensorRT and cuda-python, engines for every component it
can build (float and static-QDQ INT8 graphs, the KV-cached decoder's included; see ``tensorrt_planning``), at the
device's defaults (``tensorrt_defaults``), except FP32 graphs that overflow at FP16 (T5's; ``fp16_overflow``), built at
FP32. Graphs with ONNX Runtime-only operators stay on ONNX Runtime under ``auto``; named explicitly, TensorRT refuses
them. GPUs below sm 7.0 (which TensorRT 10 does not support) leave every component to ONNX Runtime."""

from __future__ import annotations

import json

from mmedge.backends import Backend, ComponentPlan, PlanRequest, listed
from mmedge.errors import BackendUnavailableError
from mmedge.generation.kv_layout import decoder_context
from mmedge.runtimes.registry import BACKENDS
from mmedge.runtimes.tensorrt_planning import (
    FP16_EXPORT,
    engine_precision,
    fp16_overflow,
    is_kv_decoder,
    require_gpu,
    tensorrt_defaults,
    unbuildable_reason,
    unsupported_gpu,
)


class TensorRTBackend(Backend):
    runner_module = "mmedge.runtimes.tensorrt"
    settings = None  # engine settings come from the plan and `mmedge build`, not from backend_options

    def unusable(self, request: PlanRequest) -> str | None:
        return self.gpu_unusable(request) or unsupported_gpu(request.probe)

    def declined(self, request: PlanRequest, why: str, taken: dict[str, ComponentPlan]) -> None:
        request.reasons.append(f"backend tensorrt: {why}")
        if request.device != "cpu" and request.has_gpu:
            request.fallbacks.append(f"TensorRT is not used on this GPU: {why}; ONNX Runtime runs every "
                                     "component instead")

    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        """Every component TensorRT builds (not those another backend claims), with the reasons; named explicitly, a
        component it cannot build is refused."""
        probe, manifest, explicit, reasons = request.probe, request.manifest, request.explicit, request.reasons
        if explicit:
            self.require_installed(probe.engines)
            require_gpu(probe, request.device)
        defaults = tensorrt_defaults(probe)
        chosen: dict[str, ComponentPlan] = {}
        for name, comp in manifest["components"].items():
            if name in taken:
                continue
            owner = request.claims.get(name, self.name)
            if owner != self.name:
                reasons.append(f"component '{name}': not a TensorRT engine, {owner} runs it (see backend {owner})")
                continue
            why = unbuildable_reason(name, comp)
            if why:
                if explicit:
                    raise BackendUnavailableError(why, "components TensorRT can build: float or static-QDQ INT8 graphs",
                                                  "use --backend auto (TensorRT for what it builds, ONNX "
                                                  "Runtime for the "
                                                  "rest) or --backend onnxruntime")
                reasons.append(f"{why}: ONNX Runtime")
                continue
            precision = engine_precision(name, comp, None, defaults.precision, manifest)
            overflow = fp16_overflow(manifest, name, comp) if defaults.precision == "fp16" else None
            if overflow:
                reasons.append(f"{overflow}: its TensorRT engine is built at FP32, not FP16; for FP16, {FP16_EXPORT}")
            chosen[name] = ComponentPlan(self.name, (), precision, {"precision": precision,
                                                                    "workspace_mb": defaults.workspace_mb,
                                                                    "max_batch": defaults.max_batch})
            if name == "decoder" or is_kv_decoder(comp):
                context = decoder_context(manifest) if name == "decoder" else []
                reasons.append(f"component '{name}': the KV-cached decoder as a TensorRT engine "
                               f"({comp.get('precision')} "
                               f"graph without ONNX Runtime-only operators, built at {precision}; its cache "
                               "stays on the "
                               "GPU between steps" + (f"; its context {listed(context)} fed beside the cache"
                                                      if context else "") + ")")
        if chosen:
            reasons.append(f"backend tensorrt: {'requested' if explicit else 'installed, with an NVIDIA GPU'}; engines "
                           f"built on this device for {', '.join(chosen)} ({defaults.why}; cached under the artifact's "
                           "engines/)")
        return chosen

    def open_runner(self, artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False):
        """The component's cached engine (built now if stale); engines/build.json, if any, comes before the plan."""
        return self.import_runner_module().create_runner(artifact.component_path(name), name, artifact.component(name),
                                                         artifact=artifact, defaults=plan.options,
                                                         keep_on_device=keep_on_device)

    def open_decoder(self, artifact, plan: ComponentPlan, table, *, threads: int | None = None,
                     settings: dict | None = None):
        """``RunnerDecoder`` over the decoder's engine (TensorRT itself is imported when the engine is obtained)."""
        return self.import_runner_module().create_decoder(artifact, table, defaults=plan.options)

    def device_lines(self, probe) -> list[str]:
        if not (probe.gpus or probe.jetson):
            return []
        unsupported = unsupported_gpu(probe)
        if unsupported:
            return [f"tensorrt: not usable, {unsupported}"]
        defaults = tensorrt_defaults(probe)
        return [f"tensorrt defaults: {defaults.why}, max batch {defaults.max_batch}"]

    def artifact_lines(self, artifact) -> list[str]:
        engines = artifact.root / "engines"
        if not engines.is_dir():
            return []
        from mmedge.runtimes.engine_cache import describe_engines, load_build_settings

        saved = load_build_settings(engines)
        described = describe_engines(engines)
        if not described and not saved:  # other backends' caches only: not a line about TensorRT
            return []
        count = f"{len(described)} cached TensorRT engine{'' if len(described) == 1 else 's'}"
        return ([f"engines/: {count}" + (f", built with {json.dumps(saved)}" if saved else "")]
                + [f"  {line}" for line in described])


BACKEND = TensorRTBackend(BACKENDS["tensorrt"])
