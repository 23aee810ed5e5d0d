"""Choosing a backend: a pure function of (device probe, manifest, user request) → plan with reasons.

A backend the user names is used or refused with what is missing; never silently swapped. With ``auto`` the
backends of ``mmedge.runtimes.registry`` are asked in priority order (each a plug-in answering through
``mmedge.backends.Backend``): first which components each must run ahead of the others (``claims``: the torch
backend's KV-cached decoder), then, in turn, which components each takes of those still free, or why it cannot run
here. ONNX Runtime, last, takes the rest. Every step is recorded in ``reasons``; where a better backend was absent
(TensorRT on a GPU machine without it), ``fallbacks`` says why, and ``log_fallbacks`` logs each such reason once per
process. What each backend takes is documented in its plug-in (``mmedge.runtimes.plugins``).
"""

from __future__ import annotations

import logging
import threading

from mmedge.backends import ComponentPlan, Plan, PlanRequest
from mmedge.device import DeviceProbe
from mmedge.errors import InputError

DEVICES = ("auto", "cpu", "cuda")

_LOGGED: set[str] = set()
_LOG_LOCK = threading.Lock()


def log_fallbacks(chosen: Plan, logger: logging.Logger | None = None) -> list[str]:
    """Log (WARNING) each of the plan's fallback reasons not logged before in this process; return those logged."""
    with _LOG_LOCK:
        new = [reason for reason in dict.fromkeys(chosen.fallbacks) if reason not in _LOGGED]
        _LOGGED.update(new)
    for reason in new:
        (logger or logging.getLogger("mmedge")).warning("mmedge: %s", reason)
    return new


def _check_request(backend: str, device: str) -> None:
    """A name that is no backend or device at all is bad input (InputError, exit 2), not an absent backend (exit 4)."""
    from mmedge.runtimes.registry import BACKENDS

    if backend != "auto" and (not isinstance(backend, str) or backend not in BACKENDS):
        raise InputError(f"unknown backend '{backend}'", f"'auto' or one of {', '.join(BACKENDS)}",
                         "pass backend 'auto' (--backend auto) to let mmedge choose")
    if not isinstance(device, str) or device not in DEVICES:
        raise InputError(f"unknown device '{device}'", f"one of {', '.join(DEVICES)}",
                         "pass device 'auto', 'cpu' or 'cuda' (--device)")


def plan(probe: DeviceProbe, manifest: dict, backend: str = "auto", device: str = "auto", *,
         pytorch_weights: bool | None = None, measured: dict[str, dict] | None = None) -> Plan:
    """Backend and providers per component, with the reasons, or a BackendUnavailableError.

    ``pytorch_weights``: whether the torch backend has weights to load (None: whether the manifest names them).
    ``measured``: component -> its timings on this device (``mmedge.tuning.measured_for``), which ``auto`` prefers
    to the backends' rules.
    """
    from mmedge.runtimes import registry

    _check_request(backend, device)
    weights = bool(manifest.get("pytorch")) if pytorch_weights is None else bool(pytorch_weights)
    request = PlanRequest(probe, manifest, device, explicit=backend != "auto", weights=weights,
                          measured=dict(measured or {}))
    components: dict[str, ComponentPlan] = {}
    if backend == "auto":
        ordered = registry.backends()
        for candidate in ordered:
            for name in candidate.claims(request):
                request.claims.setdefault(name, candidate.name)
        for candidate in ordered:
            why = candidate.unusable(request)
            if why is None:
                components.update(candidate.plan_components(request, dict(components)))
            else:
                candidate.declined(request, why, components)
    else:
        named = registry.backend(backend)
        named.import_runner_module()  # raises with the install command when absent
        request.reasons.append(f"backend {backend}: requested")
        components = named.plan_components(request, {})
    ordered_plan = {name: components[name] for name in manifest["components"]}
    return Plan(ordered_plan, request.reasons, request.fallbacks)


__all__ = ["DEVICES", "ComponentPlan", "Plan", "log_fallbacks", "plan"]
