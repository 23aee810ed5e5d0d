"""`mmedge validate`: re-measure an artifact's parity on this device, with this backend.

The artifact carries ``validation.npz``: real inputs per component and the PyTorch FP32 outputs for
them, recorded at export. Here every component runs on the chosen backend and its outputs are
compared with that reference, so drift from a device, driver or engine shows up as a number. A decoder is also run as
generation runs it, KV-cached, and compared with its own graph run without a cache (``mmedge.generation_check``).
"""

from __future__ import annotations

import re

import numpy as np

from mmedge.artifact import Artifact, read_arrays
from mmedge.errors import ArtifactError, InputError, IntegrityError, ParityError
from mmedge.generation_check import CachedRun, judged, run_cached, sample_prompt, uncached_feeds
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


def validate(artifact: Artifact, runners: dict, precisions: dict[str, str] | None = None,
             samples: dict[str, dict[str, dict[str, np.ndarray]]] | None = None) -> dict[str, dict]:
    """Per component: measured metrics vs the torch reference, the export-time figures, and pass/fail.
    ``precisions``: the precision the plan runs each component at (``ComponentPlan.precision``; default: the
    graph's): what the report shows, its floor the looser of that precision's and the graph's. ``samples``: the
    artifact's validation samples where the caller read them already."""
    samples = samples or load_validation_samples(artifact)
    report: dict[str, dict] = {}
    for name, runner in runners.items():
        comp = artifact.component(name)
        sample = component_sample(samples, name)
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


def component_sample(samples: dict[str, dict[str, dict[str, np.ndarray]]], name: str) -> dict[str, dict]:
    """Component ``name``'s validation sample ({"inputs": ..., "reference": ...}); ArtifactError where it has none."""
    if name not in samples:
        raise ArtifactError(f"validation samples lack component '{name}'", "samples for every component",
                            "re-export the artifact")
    return samples[name]


def validate_artifact(path, backend: str = "auto", device: str = "auto", threads: int | None = None,
                      backend_options: dict | None = None) -> dict[str, dict]:
    """Open an artifact, run every component (decoders as plain graphs) on the chosen backend with the user's
    ``backend_options`` (as ``mmedge.load`` takes them), report. A decoder is also opened as ``mmedge.load`` opens it
    for generation (KV-cached, with the artifact's embedding table) and checked against its plain graph
    (``mmedge.generation_check``): ``report["decoder"]["generation"]``. Every file's sha256 is checked again, whatever
    this device's record of earlier checks says (``mmedge.file_checks``). Decoder-only settings (OpenVINO's
    ``weights``, torch's ``quantization``) are refused: they change the decoder generation runs, so that it no longer
    matches the graph measured here."""
    from mmedge.api import (
        _checked_backend_options,
        _refuse_idle_backend_options,
        check_threads,
        open_runners,
        plan_for,
    )
    from mmedge.memory import warn_if_it_may_not_fit
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
    chosen = plan_for(artifact, backend, device, backend_options=backend_options,
                      threads=threads)  # the plan mmedge.load follows
    _refuse_idle_backend_options(backend_options or {}, chosen)
    warn_if_it_may_not_fit(artifact, chosen, backend_options)
    samples = load_validation_samples(artifact)
    generation = None
    if "decoder" in chosen.components:  # opened and closed before the graphs: never both in memory at once
        generation = _cached_generation(artifact, chosen, component_sample(samples, "decoder"), threads,
                                        backend_options or {})
    runners = open_runners(artifact, chosen, threads=threads, backend_options=backend_options)
    try:
        report = validate(artifact, runners, {name: c.precision for name, c in chosen.components.items()}, samples)
        if generation is not None:
            report["decoder"]["generation"] = _judged_generation(artifact, generation, runners["decoder"],
                                                                 component_sample(samples, "decoder"),
                                                                 report["decoder"]["precision"])
        return report
    finally:
        for runner in runners.values():
            runner.close()


def raise_on_failure(report: dict[str, dict]) -> None:
    for name, entry in report.items():
        for output, metrics in entry["outputs"].items():
            if not metrics["ok"]:
                raise ParityError(name, output, "cosine", metrics["cosine"], metrics["min_cosine"],
                                  "this device drifts from the export; try another backend or precision")
        generation = entry.get("generation")
        if generation and not generation["ok"]:
            raise ParityError(name, "generation", "cosine", generation["cosine"], generation["min_cosine"],
                              f"the KV-cached decoder mmedge.load opens on {entry['backend']} does not match its own "
                              "graph run without a cache (generation would read a broken cache: captions would be "
                              "garbage); try another backend, or another release of its engine")


def _cached_generation(artifact: Artifact, chosen, sample: dict, threads: int | None,
                       backend_options: dict) -> CachedRun:
    """The decoder ``mmedge.load`` opens for this plan (its backend, the user's settings for it, the artifact's
    embedding table), run on the decoder's sample for a short greedy generation (``generation_check.run_cached``);
    closed again."""
    from mmedge.api import _decoder

    decoder, table = _decoder(artifact, chosen, threads, backend_options)
    try:
        return run_cached(decoder, sample_prompt(artifact.manifest, sample["inputs"]), table)
    finally:
        decoder.close()


def _judged_generation(artifact: Artifact, run: CachedRun, runner, sample: dict, runs_at: str) -> dict:
    """``run`` against the plain decoder graph (``runner``) over the same tokens with an empty past; the floor is the
    precision's slack below agreement (the same graph on the same device)."""
    logits = runner.infer(uncached_feeds(artifact.manifest, sample["inputs"], run))["logits"]
    return judged(run, logits, generation_floor(artifact.component("decoder"), runs_at))


# A dynamic-INT8 decoder quantizes its activations with one scale per tensor, measured on the rows of each call: a
# token alone (a cached step) and the same token among the prompt's (one pass) are quantized differently, the more so
# with a model's outlier features. Its floor is the export's own logits gate (min_logits_cosine's default): a cache
# that is not carried gives cosines far below it.
PER_TENSOR_ACTIVATIONS_FLOOR = 0.95


def generation_floor(decoder: dict, runs_at: str) -> float:
    """The cosine the cached decoder's logits must keep against its graph run without a cache: agreement but for
    the precision's slack (``cosine_slack``), or ``PER_TENSOR_ACTIVATIONS_FLOOR`` for a graph whose activations are
    quantized per call (dynamic INT8)."""
    floor = 1.0 - cosine_slack(decoder["precision"], runs_at)
    if (decoder.get("quantization") or {}).get("method") == "int8-dynamic":
        return min(floor, PER_TENSOR_ACTIVATIONS_FLOOR)
    return floor
