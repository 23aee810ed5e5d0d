"""Which devices OpenVINO reports here (``mmedge doctor`` lists them): CPU, and GPU / NPU where their drivers are
installed. Nothing is imported until asked, and an absent OpenVINO is an empty answer, not an error."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OvDevice:
    name: str  # OpenVINO's name: CPU, GPU.0, NPU
    full_name: str
    capabilities: tuple[str, ...]  # OPTIMIZATION_CAPABILITIES: FP32, FP16, INT8, BF16, EXPORT_IMPORT, ...


def list_devices() -> list[OvDevice]:
    """The devices OpenVINO reports, or [] when OpenVINO is not installed."""
    from mmedge.device import importable

    if not importable("openvino"):
        return []
    from mmedge.runtimes.openvino.core import core

    found = []
    for name in core().available_devices:
        try:
            full = str(core().get_property(name, "FULL_DEVICE_NAME"))
            caps = tuple(str(c) for c in core().get_property(name, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # a device whose driver answers nothing: listed by name only
            full, caps = name, ()
        found.append(OvDevice(name, full, caps))
    return found
