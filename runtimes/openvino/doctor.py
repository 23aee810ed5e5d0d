"""What ``mmedge doctor`` says about OpenVINO: its devices, and the INT8 recipe the measured rule picks here."""

from __future__ import annotations

from mmedge.runtimes.openvino.devices import list_devices
from mmedge.runtimes.openvino.planning import int8_recipe


def doctor_report(probe) -> dict:
    recipe, why = int8_recipe(probe.cpu_flags)
    return {"devices": [{"name": d.name, "full_name": d.full_name, "capabilities": list(d.capabilities)}
                        for d in list_devices()],
            "int8_recipe": recipe, "int8_recipe_why": why}


def doctor_lines(probe) -> list[str]:
    report = doctor_report(probe)
    devices = "; ".join(f"{d['name']} ({d['full_name']}: {', '.join(d['capabilities'])})" for d in report["devices"])
    return [f"openvino devices: {devices or 'none reported'}",
            f"INT8 recipe for this CPU: {report['int8_recipe']} ({report['int8_recipe_why']})"]
