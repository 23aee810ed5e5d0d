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


def cached_lines(artifact) -> list[str]:
    """The compiled OpenVINO models cached in the artifact's engines/, one line each (key, the inference precision
    the compiled model reported, size)."""
    import json

    folder = artifact.root / "engines"
    records = sorted(folder.glob("*-openvino-*.record")) if folder.is_dir() else []
    lines = [f"engines/: {len(records)} OpenVINO compiled model(s) cached"] if records else []
    for record in records:
        try:
            entry = json.loads(record.read_text())
            key = entry["key"]
            version = key["openvino_version"].split("-")[0]
            runs = entry.get("inference_precision")  # what the compiled model reported (a CPU may run f16 as bf16)
            inference = f"{runs} inference" if runs else f"{key['inference_precision']} hint"
            lines.append(f"  {record.with_suffix('.blob').name}: {entry['component']} {key['precision']} "
                         f"({inference}) on "
                         f"{key['device']} ({key['device_full_name']}), OpenVINO {version}, "
                         f"{entry['blob_bytes'] / 2**20:.1f} MiB")
        except (OSError, ValueError, KeyError, TypeError):
            lines.append(f"  {record.name}: unreadable record (it is recompiled on the next load)")
    return lines
