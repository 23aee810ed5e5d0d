"""`mmedge validate`: re-measure an artifact's parity on this device, with this backend.

The artifact carries ``validation.npz``: real inputs per component and the PyTorch FP32 outputs for
them, recorded at export. Here every component runs on the chosen backend and its outputs are
compared with that reference, so drift from a device, driver or engine shows up as a number.
"""

from __future__ import annotations

import re

import numpy as np

from mmedge.artifact import Artifact, read_arrays
from mmedge.embeddings import EmbeddingTable
from mmedge.errors import ArtifactError, InputError, IntegrityError, ParityError
from mmedge.metrics import compare_outputs

# How far a device may drift from the cosine the export measured on ONNX Runtime CPU.
COSINE_SLACK = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3, "int8": 1e-2, "int4": 2e-2, "nf4": 2e-2}
INFERENCE_NAMES = {"f32": "fp32", "f16": "fp16"}  # OpenVINO's inference precisions ("int8 (f16 inference)")


def cosine_slack(*precisions: str) -> float:
    """The slack of the loosest precision named in ``precisions`` (the graph's, and the plan's: "bf16" for torch at
    bfloat16, "fp16" for an FP32 graph TensorRT builds at FP16, "int8 (f16 inference)"); 1e-2 for one unknown."""
    names = [INFERENCE_NAMES.get(n, n) for p in precisions for n in re.findall(r"[a-z]+\d+", str(p or ""))]
    return max((COSINE_SLACK.get(name, 1e-2) for name in names), default=1e-2)


def load_validation_samples(artifact: Artifact) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{component: {"inputs": {...}, "reference": {...}}} from validation.npz (no pickles allowed)."""
    info = artifact.manifest.get("validation")
    if not info:
        raise ArtifactError(f"artifact '{artifact.root.name}' has no validation samples",
                            "a 'validation' entry in manifest.json", "re-export with this mmedge version")
    path = artifact.verified_path(info["file"], info["sha256"], "validation.file")
    samples: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in read_arrays(path, "validation samples").items():
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[1] not in ("inputs", "reference"):
            raise IntegrityError(f"validation samples '{info['file']}' hold an array named {key[:60]!r}",
                                 "arrays named component/inputs/NAME or component/reference/NAME",
                                 "re-export the artifact")
        component, kind, name = parts
        samples.setdefault(component, {}).setdefault(kind, {})[name] = value
    return samples


def validate(artifact: Artifact, runners: dict, precisions: dict[str, str] | None = None) -> dict[str, dict]:
    """Per component: measured metrics vs the torch reference, the export-time figures, and pass/fail.
    ``precisions``: the precision the plan runs each component at (``ComponentPlan.precision``; default: the
    graph's): what the report shows, its floor the looser of that precision's and the graph's."""
    samples = load_validation_samples(artifact)
    report: dict[str, dict] = {}
    for name, runner in runners.items():
        comp = artifact.component(name)
        sample = samples.get(name)
        if sample is None:
            raise ArtifactError(f"validation samples lack component '{name}'", "samples for every component",
                                "re-export the artifact")
        measured = compare_outputs(sample["reference"], runner.infer(sample["inputs"]))
        recorded = comp["parity"].get("validation_samples", {})
        runs_at = (precisions or {}).get(name) or comp["precision"]
        slack = cosine_slack(comp["precision"], runs_at)
        outputs = {}
        for output, metrics in measured.items():
            floor = recorded.get(output, {}).get("cosine", 1.0) - slack
            outputs[output] = {**metrics, "export_cosine": recorded.get(output, {}).get("cosine"),
                               "min_cosine": floor, "ok": metrics["cosine"] >= floor}
        report[name] = {"precision": runs_at, "backend": runner.backend, "outputs": outputs}
    return report


def validate_artifact(path, backend: str = "auto", device: str = "auto", threads: int | None = None,
                      backend_options: dict | None = None) -> dict[str, dict]:
    """Open an artifact, run every component (decoders as plain graphs) on the chosen backend with the user's
    ``backend_options`` (as ``mmedge.load`` takes them), report. Every file's sha256 is checked again, whatever this
    device's record of earlier checks says (``mmedge.file_checks``). Decoder-only settings (OpenVINO's ``weights``,
    torch's ``quantization``) are refused: they shape the generation loop's decoder, not the graph measured here."""
    from mmedge.api import (
        _checked_backend_options,
        _refuse_idle_backend_options,
        check_threads,
        open_runners,
        plan_for,
    )
    from mmedge.runtimes.registry import backend as backend_named

    threads = check_threads(threads)
    for name, settings in _checked_backend_options(backend_options).items():  # their shape first, as load's
        decoder_only = [field for field in settings if field in backend_named(name).decoder_only]
        if decoder_only:
            raise InputError(f"backend_options['{name}']['{decoder_only[0]}'] would change nothing in validation",
                             "settings of the graphs validation runs (it measures each graph as exported; "
                             f"{decoder_only[0]} shapes the decoder mmedge.load opens for generation)",
                             f"drop {decoder_only[0]}, and run the model with it to see its answers")
    artifact = Artifact.open(path, recheck=True)
    artifact.check_every_file()  # the files this plan would not open too (another backend's, the tokenizer, ...)
    if "decoder" in artifact.components:
        EmbeddingTable.of_artifact(artifact)  # the generation loop reads it: it must load, not only hash right
    chosen = plan_for(artifact, backend, device, backend_options=backend_options,
                      threads=threads)  # the plan mmedge.load follows
    _refuse_idle_backend_options(backend_options or {}, chosen)
    runners = open_runners(artifact, chosen, threads=threads, backend_options=backend_options)
    try:
        return validate(artifact, runners, {name: c.precision for name, c in chosen.components.items()})
    finally:
        for runner in runners.values():
            runner.close()


def raise_on_failure(report: dict[str, dict]) -> None:
    for name, entry in report.items():
        for output, metrics in entry["outputs"].items():
            if not metrics["ok"]:
                raise ParityError(name, output, "cosine", metrics["cosine"], metrics["min_cosine"],
                                  "this device drifts from the export; try another backend or precision")
