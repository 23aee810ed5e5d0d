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
            f"INT8 recipe for this CPU: {report['int8_recipe']} ({report['int8_recipe_why']})",
            f"openvino telemetry: {telemetry_state()}"]


def telemetry_state() -> str:
    """Whether importing openvino sends Intel usage events (its Model Conversion API, imported with the package,
    starts openvino-telemetry, which is on unless the user opted out, and sends from a forked process), read from
    openvino-telemetry's own consent check without importing openvino."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return "openvino-telemetry is not installed: nothing is sent"
    result = OptInChecker().check(enable_opt_in_dialog=False, disable_in_ci=True)
    if result == ConsentCheckResult.DECLINED:
        return "off (opted out, or a CI environment)"
    how = "opted in" if result == ConsentCheckResult.ACCEPTED else "on by default: no choice recorded"
    return (f"ON ({how}): each process that imports openvino sends anonymous usage events to Intel (Google "
            "Analytics) from a forked process; opt out with `opt_in_out --opt_out` (openvino-telemetry's command)")


def cached_lines(artifact) -> list[str]:
    """The compiled OpenVINO models cached in the artifact's engines/, one line each (key, the inference precision
    the compiled model reported, size)."""
    import json

    folder = artifact.root / "engines"
    records = sorted(folder.glob("*-openvino-*.record")) if folder.is_dir() else []
    orphans = [blob for blob in (sorted(folder.glob("*-openvino-*.blob")) if folder.is_dir() else [])
               if not blob.with_suffix(".record").is_file()]
    lines = [f"engines/: {len(records)} OpenVINO compiled model(s) cached"] if records or orphans else []
    for record in records:
        try:
            entry = json.loads(record.read_text())
            key = entry["key"]
            version = key["openvino_version"].split("-")[0]
            runs = entry.get("inference_precision")  # what the compiled model reported (a CPU may run f16 as bf16)
            inference = f"{runs} inference" if runs else f"{key['inference_precision']} hint"
            stale = _stale(artifact, entry["component"], key)
            size = f"{entry['blob_bytes'] / 2**20:.1f} MiB"
            lines.append(f"  {record.with_suffix('.blob').name}: {entry['component']} {key['precision']} "
                         f"({inference}) on "
                         f"{key['device']} ({key['device_full_name']}), OpenVINO {version}, {size}"
                         + (f"; STALE ({stale}): never loaded again, delete it and its .record to free {size}"
                            if stale else ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            lines.append(f"  {record.name}: unreadable record (it is recompiled on the next load)")
    for blob in orphans:  # a write cut short, or a record deleted: no load imports it
        size = f"{_size(blob) / 2**20:.1f} MiB"
        lines.append(f"  {blob.name}: no .record beside it, never loaded: delete it to free {size}")
    return lines


def _size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _stale(artifact, component: str, key: dict) -> str | None:
    """Why a cached compiled model can serve no load of this artifact here any more (its graph, external weights or
    the export's OpenVINO IR replaced; weights compressed by another NNCF; another OpenVINO or mmedge version), or
    None."""
    from mmedge import __version__
    from mmedge.runtimes.openvino.cache import older_key_fields
    from mmedge.runtimes.openvino.core import WEIGHT_MODES, version

    lacking = older_key_fields(key)
    if lacking:
        return f"recorded by an older mmedge (its key lacks {', '.join(lacking)}): no load here reads it"
    graph = (artifact.manifest.get("components") or {}).get(component)
    if graph is None:
        return f"the artifact has no component '{component}' now"
    if key.get("onnx_sha256") != graph.get("sha256"):
        return "its graph was replaced since"
    if key.get("external_data_sha256", "") != str((graph.get("external_data") or {}).get("sha256") or ""):
        return "its graph's external weights were replaced since"
    weights = key["precision"].partition("+nncf-")[2].removesuffix("-exported")
    if key.get("ir_sha256"):
        ir = (graph.get("openvino") or {}).get(weights)
        if not isinstance(ir, dict):
            return f"compiled from the export's {weights} OpenVINO IR, which the artifact no longer has"
        if key["ir_sha256"] != f"{ir.get('sha256')}+{(ir.get('weights_file') or {}).get('sha256')}":
            return f"compiled from an earlier export's {weights} OpenVINO IR, replaced since"
    if key.get("compression") and weights in WEIGHT_MODES:
        from mmedge.runtimes.openvino.compile import weights_record

        was, now = key["compression"].get("nncf_version"), weights_record(weights)["nncf_version"]
        if was != now:
            return f"its weights compressed by NNCF {was}, this is {now}"
    try:
        installed = version()
    except Exception:  # OpenVINO not importable: no version to compare with
        installed = key["openvino_version"]
    if key["openvino_version"] != installed:
        return f"compiled by OpenVINO {key['openvino_version'].split('-')[0]}, this is {installed.split('-')[0]}"
    if key.get("mmedge_version") != __version__:
        return f"compiled under mmedge {key.get('mmedge_version')}, this is {__version__}"
    return None
