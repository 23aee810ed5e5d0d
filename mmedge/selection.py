"""Choosing a backend: a pure function of (device probe, manifest, user request) → plan with reasons.

A backend the user names is used or refused with what is missing; never silently swapped. With
``auto`` the best present backend is taken and every step of that choice is recorded in ``reasons``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmedge.device import DeviceProbe
from mmedge.errors import BackendUnavailableError
from mmedge.runtimes.registry import BACKENDS

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ComponentPlan:
    backend: str
    providers: tuple[str, ...]
    precision: str


@dataclass
class Plan:
    components: dict[str, ComponentPlan]
    reasons: list[str] = field(default_factory=list)


def _check_request(backend: str, device: str) -> None:
    if backend != "auto" and (not isinstance(backend, str) or backend not in BACKENDS):
        raise BackendUnavailableError(f"unknown backend '{backend}'", f"'auto' or one of {', '.join(BACKENDS)}",
                                      "pass --backend auto to let mmedge choose")
    if not isinstance(device, str) or device not in DEVICES:
        raise BackendUnavailableError(f"unknown device '{device}'", f"one of {', '.join(DEVICES)}",
                                      "pass --device auto, cpu or cuda")


def _ort_providers(probe: DeviceProbe, device: str, explicit: bool, reasons: list[str]) -> tuple[str, ...]:
    gpu_providers = [p for p in ("tensorrt", "cuda") if p in probe.ort_providers]
    if device == "cpu":
        reasons.append("device=cpu requested: ONNX Runtime CPU provider")
        return ("cpu",)
    if gpu_providers:
        reasons.append(f"ONNX Runtime offers {', '.join(gpu_providers)}: using them, CPU as fallback for unsupported ops")
        return tuple(gpu_providers)
    if device == "cuda":
        raise BackendUnavailableError(
            f"device=cuda was requested but this onnxruntime build offers only {probe.ort_providers}",
            "onnxruntime-gpu with the CUDA (or TensorRT) execution provider and an NVIDIA GPU",
            "pip uninstall onnxruntime && pip install onnxruntime-gpu, or pass --device cpu",
        )
    why = "no GPU found" if not probe.gpus and not probe.jetson else "this onnxruntime build has no GPU provider"
    reasons.append(f"{why}: ONNX Runtime CPU provider" + ("" if explicit else " (fallback)"))
    return ("cpu",)


def plan(probe: DeviceProbe, manifest: dict, backend: str = "auto", device: str = "auto") -> Plan:
    """Backend and providers per component, with the reasons, or a BackendUnavailableError."""
    _check_request(backend, device)
    reasons: list[str] = []
    if backend == "auto":
        for name in ("tensorrt", "torch"):
            info = BACKENDS[name]
            reason = "not in this release" if info.module is None else (
                "not installed" if not probe.engines.get(info.package) else "not preferred for this artifact")
            reasons.append(f"backend {name}: {reason}")
        chosen = "onnxruntime"
    else:
        from mmedge.runtimes.registry import import_backend_module

        import_backend_module(backend)  # raises with the install command when absent
        chosen = backend
        reasons.append(f"backend {backend}: requested")
    if not probe.engines.get("onnxruntime"):
        raise BackendUnavailableError("onnxruntime is not installed", "the onnxruntime package", "pip install onnxruntime")
    providers = _ort_providers(probe, device, backend != "auto", reasons)
    components = {name: ComponentPlan(chosen, providers, comp["precision"]) for name, comp in manifest["components"].items()}
    return Plan(components, reasons)
