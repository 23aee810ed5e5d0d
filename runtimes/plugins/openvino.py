"""The OpenVINO backend's plug-in (``mmedge[openvino]``): x86 CPUs first, Intel GPUs / NPUs where OpenVINO reports
them (``backend_options={"openvino": {"device": "GPU"}}``).

Under ``auto`` on an x86 CPU (no NVIDIA GPU in use) it takes each component it runs faster than ONNX Runtime: where
``mmedge tune`` measured that graph on this device (``mmedge.runtimes.openvino.tune``), by the measurement; elsewhere
by the rule (``mmedge.runtimes.openvino.planning``: per graph recipe, per CPU class with or without VNNI). It says
why; ONNX Runtime, later in priority, takes the rest. A component ``auto`` gave OpenVINO that OpenVINO then cannot
read or compile here (an operator or pattern it does not support) runs on ONNX Runtime's CPU provider instead
(``FALLBACK``, the plan option ``Backend.fallback`` reads): ``mmedge.api.open_runners`` re-plans it there, with the
user's ONNX Runtime settings, and warns once per load saying why. Nothing of that is recorded: the next load asks
OpenVINO again (the failure may have been passing: memory, a full disk), while ``mmedge tune`` records a graph
OpenVINO could not run, and ``auto`` then plans ONNX Runtime for it. Named explicitly it runs every component on
OpenVINO (its CPU, or the device ``backend_options`` names; the plan's components show it, with the inference
precision where a precision hint or another device changes it, e.g. "fp32 (bf16 inference)").
``mmedge doctor`` lists OpenVINO's devices, the INT8 recipe the rule picks for this CPU, and the cached compiled
models of an artifact. Nothing here imports openvino.
"""

from __future__ import annotations

from dataclasses import replace

from mmedge.backends import Backend, ComponentPlan, PlanRequest
from mmedge.errors import BackendUnavailableError
from mmedge.runtimes.openvino.planning import faster_backend, has_vnni, openvino_unusable
from mmedge.runtimes.registry import BACKENDS

# the plan option of a component auto gave OpenVINO: the backend that runs it where OpenVINO refuses its graph (a
# backend the user named never falls back)
FALLBACK = "fallback"


class OpenVinoBackend(Backend):
    runner_module = "mmedge.runtimes.openvino.runner"
    plan_owned = ("threads", "engine_cache")
    decoder_only = ("weights",)  # NNCF weight compression applies to the LLM, which only the decoder runs

    @property
    def settings(self):
        from mmedge.runtimes.openvino.core import OvOptions

        return OvOptions

    def require_installed(self, engines: dict) -> None:
        """As ``Backend``'s; a probe that did not look for openvino (no key) is completed by a module lookup."""
        if "openvino" not in engines:
            from mmedge.device import importable

            engines = {**engines, "openvino": "installed" if importable("openvino") else None}
        super().require_installed(engines)

    def _installed(self, engines: dict) -> bool:
        try:
            self.require_installed(engines)
        except BackendUnavailableError:
            return False
        return True

    def unusable(self, request: PlanRequest) -> str | None:
        return openvino_unusable(request.probe, request.device, self._installed(request.probe.engines))

    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        components = request.manifest["components"]
        if request.explicit:
            self.require_installed(request.probe.engines)
            if request.device == "cuda":
                raise BackendUnavailableError(
                    "device=cuda was requested for backend 'openvino', which runs Intel CPUs, GPUs and NPUs, not "
                    "NVIDIA GPUs", "device auto or cpu",
                    "pass --device cpu (an Intel GPU / NPU: backend_options={'openvino': {'device': 'GPU'}})")
            request.reasons.append("backend openvino: every component on OpenVINO (its CPU unless "
                                   "backend_options['openvino']['device'] names another; the plan shows which)")
            return {name: ComponentPlan(self.name, (), comp["precision"], {"device": "CPU"})
                    for name, comp in components.items()}
        chosen: dict[str, ComponentPlan] = {}
        for name, component in components.items():
            if name in taken or request.claims.get(name, self.name) != self.name:
                continue
            faster, reason = faster_backend(name, component, request.probe.cpu_flags, request.measured.get(name))
            request.reasons.append(f"{reason}: {faster}")
            if faster == self.name:
                chosen[name] = ComponentPlan(self.name, (), component["precision"],
                                             {"device": "CPU", FALLBACK: "onnxruntime"})
        isa = "with VNNI" if has_vnni(request.probe.cpu_flags) else "without VNNI"
        request.reasons.append(f"backend openvino: installed, x86 CPU {isa}; it takes {', '.join(chosen) or 'nothing'}"
                               " (compiled models cached under the artifact's engines/)")
        return chosen

    def settled(self, artifact, name: str, plan: ComponentPlan, settings: dict) -> ComponentPlan:
        """As ``Backend``'s; the ``device`` named replaces the plan's CPU; a decoder with ``weights`` runs
        NNCF-compressed weights: the export's IR where it wrote one ("fp32+nncf-int4-exported"), else compressed at
        first load ("fp32+nncf-int4"); a ``precision_hint`` or a device other than the CPU adds the inference
        precision OpenVINO compiles at where it is not FP32 ("fp32 (bf16 inference)": an f16 hint on a CPU with
        BF16 and no FP16)."""
        from mmedge.runtimes.openvino.compile import planned_inference_precision, precision_label, require_available

        precision = plan.precision
        weights = settings.get("weights") if name == "decoder" else None
        if weights:
            component = artifact.component(name)
            exported = (component.get("openvino") or {}).get(weights) is not None
            precision = precision_label(component, weights, exported)
        device = settings.get("device") or plan.options.get("device", "CPU")
        if device != "CPU":
            require_available(device)  # as loading would refuse it, before a plan that cannot run is shown
        if settings.get("precision_hint") or device != "CPU":
            runs = planned_inference_precision(device, settings.get("precision_hint"))
            precision += f" ({runs} inference)" if runs not in (None, "f32") else ""
        return replace(plan, precision=precision, options={**plan.options, "device": device})

    def idle_settings(self, settings: dict, plans: list[ComponentPlan]) -> dict[str, str]:
        """``weights`` where the decoder graph is not FP32 (NNCF compresses FP32 weights; loading would refuse it
        after the encoders compiled), and an ``f16`` / ``bf16`` precision hint on a CPU that compiles it at f32 (no
        FP16 or BF16 there): they would change nothing."""
        from mmedge.runtimes.openvino.compile import labelled_graph

        idle = {}
        graph = next((g for g in (labelled_graph(plan.precision) for plan in plans) if g not in (None, "fp32")), None)
        if settings.get("weights") and graph:
            idle["weights"] = (f"the decoder graph is {graph} already, and NNCF compresses the weights of an FP32 "
                               "decoder (load the FP32 export with these weights, or run this graph as it is)")
        hint = settings.get("precision_hint")
        if hint in ("f16", "bf16") and (settings.get("device") or "CPU") == "CPU":
            lacking = _cpu_runs_only_f32(hint)
            if lacking:
                idle["precision_hint"] = lacking
        return idle

    def _options(self, artifact, plan: ComponentPlan, threads: int | None, settings: dict | None) -> dict:
        # engines/ is not made here: where it cannot be (read-only storage) the compiled models run uncached
        options = {k: v for k, v in plan.options.items() if k != FALLBACK}
        return {**options, "threads": threads, "engine_cache": artifact.engines_path, **(settings or {})}

    def open_runner(self, artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False):
        options = self._options(artifact, plan, threads, self.runner_settings(settings))
        return self.import_runner_module().create_runner(artifact.component_path(name), name,
                                                         artifact.component(name), **options)

    def open_decoder(self, artifact, plan: ComponentPlan, table, *, threads: int | None = None,
                     settings: dict | None = None):
        from mmedge.runtimes.openvino import create_decoder

        return create_decoder(artifact, table, **self._options(artifact, plan, threads, settings))

    def fallback(self, plan: ComponentPlan) -> str | None:
        return plan.options.get(FALLBACK)

    def device_lines(self, probe) -> list[str]:
        if not self._installed(probe.engines):
            return []
        from mmedge.runtimes.openvino.doctor import doctor_lines

        return doctor_lines(probe)

    def artifact_lines(self, artifact) -> list[str]:
        from mmedge.device import probe
        from mmedge.runtimes.openvino.doctor import cached_lines
        from mmedge.tuning import record_lines

        return cached_lines(artifact) + record_lines(artifact, probe())


def _cpu_runs_only_f32(hint: str) -> str | None:
    """Why a ``hint`` precision hint changes nothing on this CPU (OpenVINO compiles it at f32: the CPU has neither
    FP16 nor BF16), or None where it changes the precision or OpenVINO cannot tell."""
    from mmedge.runtimes.openvino.compile import planned_inference_precision
    from mmedge.runtimes.openvino.devices import list_devices

    if planned_inference_precision("CPU", hint) != "f32":
        return None
    capabilities = next((d.capabilities for d in list_devices() if d.name == "CPU"), ())
    return (f"OpenVINO compiles precision_hint={hint!r} at f32 on this CPU, which has neither FP16 nor BF16 "
            f"(its capabilities: {', '.join(capabilities) or 'not reported'})")


BACKEND = OpenVinoBackend(BACKENDS["openvino"])
