"""``mmedge tune``: time each of an artifact's graphs on ONNX Runtime's CPU and on OpenVINO's CPU here, so ``auto``
decides OpenVINO vs ONNX Runtime from this device's measurement instead of the rule
(``mmedge.runtimes.openvino.planning``, figures from two CPUs: an AMD EPYC with VNNI runs the FP32 ViT-B/32 tower
1.28x faster on OpenVINO at batch 1, where the Xeon behind the rule measured a tie).

Every component runs on both backends with the artifact's own validation inputs (a decoder: one decode step after
the validation prompt, what a caption's tokens cost), the two taking turns in blocks (``_in_turns``), median of
``runs``; a graph OpenVINO cannot read or compile here is recorded as such (``openvino_ms`` null,
``openvino_failed`` saying why: ``auto`` then runs it on ONNX Runtime) and the others are timed all the same. The
record goes to ``mmedge.tuning`` (``engines/backend-timings.json``), which ``auto`` and ``mmedge doctor``
read. Nothing here imports torch; the engines are imported by their runners.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmedge.artifact import Artifact, temporary_path
from mmedge.bench import samples_in_turns
from mmedge.errors import ArtifactError, BackendUnavailableError
from mmedge.generation.kv_layout import LOGITS_POSITIONS, cache_names, checked_layout
from mmedge.tuning import check_storable, device_key, store, unwritable

REFERENCE, CHALLENGER = "onnxruntime", "openvino"  # ONNX Runtime runs every graph: where it cannot, tune fails
CANDIDATES = (REFERENCE, CHALLENGER)
MAX_RUNS = 1000  # timed calls per backend per graph


def decode_step_feeds(component: dict, prompt: dict[str, np.ndarray], prefill: dict[str, Any]) -> dict[str, np.ndarray]:
    """One decode step after the prompt: the prompt's last position fed again as the next token, its cache from the
    prefill's present outputs, its mask one column longer (the prompt's padding stays masked). Inputs with a
    ``sequence`` axis keep their last row; context inputs stay."""
    layout = checked_layout(component["kv_cache"])
    past_names, present_names = cache_names(layout, "past"), cache_names(layout, "present")
    feeds: dict[str, np.ndarray] = {}
    for name, spec in component["inputs"].items():
        axes = spec["shape"]
        if name in past_names:
            feeds[name] = np.asarray(prefill[present_names[past_names.index(name)]])
        elif name == "attention_mask":  # [batch, total]: past + prompt, then the new token
            mask = prompt[name]
            feeds[name] = np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1)
        elif name == "position_ids":
            feeds[name] = prompt[name][:, -1:] + 1
        elif name == LOGITS_POSITIONS:
            feeds[name] = np.zeros((prompt[name].shape[0], 1), prompt[name].dtype)
        elif len(axes) > 1 and axes[1] == "sequence":
            feeds[name] = prompt[name][:, -1:]
        else:
            feeds[name] = prompt[name]
    return feeds


BLOCK = 3  # timed calls per backend per turn


def _in_turns(calls: dict[str, Callable[[], Any]], runs: int, block: int = BLOCK, warmup: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms of ``runs`` timed calls per backend. The backends take turns in blocks of ``block`` timed calls, the
    order reversed every round, so a drifting machine favours neither. Each block opens with an untimed call: the
    threads the other backend left busy after its last call (ONNX Runtime's keep spinning after a call in a one-graph
    pipeline) fall on it, so each backend is timed as it runs with the graph to itself, as ``auto`` would deploy it.
    Strict alternation, call by call, timed OpenVINO while ONNX Runtime's threads spun: on a CLIP ViT-B/32 tower
    OpenVINO read 1.00-1.04x ONNX Runtime's time that way and 0.88-0.93x in blocks (RESULTS.md)."""
    timed = samples_in_turns(calls, runs, block=block, hand_over=1, warmup=warmup, clock=clock)
    return {name: statistics.median(values) for name, values in timed.items()}


def _feeds_for(name: str, component: dict, sample: dict, runner) -> tuple[dict, str]:
    """The inputs to time a component with (``runner`` runs a decoder's prefill), and what they are."""
    inputs = sample["inputs"]
    if name == "decoder" and component.get("kv_cache"):
        step = decode_step_feeds(component, inputs, runner.infer(inputs))
        return step, f"a decode step after {step['attention_mask'].shape[1] - 1} cached tokens"
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
    return inputs, f"the validation sample ({shapes})"


PROBE_BYTES = 64 * 1024  # written (and flushed to disk) before measuring: more than a timings file of many records


def _check_writable(target: Path) -> None:
    """The timings are what ``tune`` is asked for (not an optional cache): engines/ that cannot be written, or whose
    storage is full, is an ArtifactError before minutes of measuring, not after. A real payload is written: an empty
    file is made on a full disk too."""
    temporary = temporary_path(target)
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise ArtifactError(f"cannot write '{target}' ({exc.strerror or exc})", f"a writable engines/ folder for "
                            f"{target.name}, this device's timings", "check the folder's permissions, or tune a "
                            "writable copy of the artifact and copy its engines/backend-timings.json back") from None
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(bytes(max(PROBE_BYTES, 2 * _size(target))))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise unwritable(target, exc) from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tune(path: str | os.PathLike, threads: int | None = None, runs: int = 10, progress: bool = True) -> dict:
    """Time every component of the artifact on ONNX Runtime's CPU and OpenVINO's CPU, store the medians for this
    device in ``engines/backend-timings.json`` and return the record. ``threads``: per graph, as ``mmedge.load``
    will be given (None: all cores)."""
    from mmedge.api import check_threads, open_runners
    from mmedge.device import importable, probe
    from mmedge.errors import InputError
    from mmedge.progress import Progress
    from mmedge.runtimes.openvino.planning import openvino_unusable
    from mmedge.selection import plan
    from mmedge.validate import load_validation_samples

    if isinstance(runs, bool) or not isinstance(runs, int) or not 3 <= runs <= MAX_RUNS:
        raise InputError(f"runs is {runs!r}", f"an integer from 3 (the median of fewer is noise) to {MAX_RUNS} (more "
                         "only takes longer: each graph runs that often on both backends)", "pass e.g. --runs 10")
    threads = check_threads(threads, "pass e.g. --threads 2")
    artifact = Artifact.open(path)
    target = check_storable(artifact)
    _check_writable(target)
    found = probe()
    why = openvino_unusable(found, "cpu", importable("openvino"))
    if why:
        raise BackendUnavailableError(
            f"`mmedge tune` compares ONNX Runtime with OpenVINO on this CPU, and OpenVINO cannot take components "
            f"here: {why}", "an x86 CPU with mmedge[openvino] installed",
            "without OpenVINO, auto runs every CPU component on ONNX Runtime: there is nothing to tune")
    samples = load_validation_samples(artifact)
    names = list(artifact.components)
    steps = Progress(len(names) + 1, enabled=progress)
    runners: dict[str, dict] = {}
    refused: dict[str, str] = {}
    try:
        with steps.step("opening every graph on ONNX Runtime and OpenVINO (OpenVINO compiles once, cached)"):
            runners[REFERENCE] = open_runners(artifact, plan(found, artifact.manifest, REFERENCE, "cpu"),
                                              threads=threads)
            runners[CHALLENGER] = open_runners(artifact, plan(found, artifact.manifest, CHALLENGER, "cpu"),
                                               threads=threads, refused=refused)  # a graph OpenVINO cannot take
        components = {}
        for name in names:
            with steps.step(f"timing {name} on both, {runs} calls each, taking turns"):
                if name not in samples:
                    raise ArtifactError(f"validation samples lack component '{name}'", "samples for every component",
                                        "re-export the artifact")
                # the same feeds for both (a decoder's cache from the first backend's prefill)
                feeds, what = _feeds_for(name, artifact.component(name), samples[name], runners[REFERENCE][name])
                ran = [backend for backend in CANDIDATES if name in runners[backend]]
                medians = _in_turns({backend: (lambda b=backend: runners[b][name].infer(feeds)) for backend in ran},
                                    runs)
                components[name] = {"sha256": artifact.component(name).get("sha256"), "inputs": what,
                                    **{f"{backend}_ms": round(ms, 3) for backend, ms in medians.items()},
                                    **({f"{CHALLENGER}_ms": None, f"{CHALLENGER}_failed": refused[name]}
                                       if name in refused else {})}
    finally:
        for opened in runners.values():
            for runner in opened.values():
                runner.close()
    record = {"device": device_key(found, threads, CANDIDATES), "runs": runs,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "components": components}
    store(target, record)
    return record


__all__ = ["decode_step_feeds", "tune"]
