"""Host memory of an export: each step's measured peak RSS, and an estimate checked before anything is loaded.

- ``MeteredProgress``: the export's progress lines, each step's line ending with its wall time and its own peak
  RSS (``StepPeak``: exact when the step sets the process's new peak, ``VmHWM``; else sampled every 50 ms). The
  figures go into the manifest.
- ``estimate_export``: the peak per step for the requested precisions, from the model's parameter counts (the
  model built on the ``meta`` device from its config: no weights). ``check_memory`` refuses an export whose
  estimate passes the available memory (``MemAvailable``, or ``MMEDGE_EXPORT_MEMORY_LIMIT``), before any
  weight is loaded and before the output folder exists.

The estimate follows what each step holds (measured on the full-size BLIP-2 OPT-2.7B, ``benchmarks/RESULTS.md``):
loading and tracing hold the FP32 PyTorch model (+5% while tracing: activations, the weightless graph); graphs past
the streaming threshold are written tensor by tensor, smaller ones cost about two more copies of the component
(protobuf + constant folding); lowering precision runs after the PyTorch weights are freed and streams weights, so
it holds the quantized graph being written, then the FP32 and lowered ONNX Runtime sessions of the largest lowered
component one after the other for parity and fidelity (static INT8 also calibrates the FP32 encoder graph loaded
whole).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from mmedge.errors import ExportError
from mmedge.progress import Progress

LIMIT_ENV = "MMEDGE_EXPORT_MEMORY_LIMIT"  # bytes, or a number with a MB / MiB / GB / GiB / TB / TiB suffix
BASE_BYTES = 950_000_000  # Python, torch, transformers and ONNX Runtime loaded (measured: load peak - weights)
TRACE_OVERHEAD = 0.06  # tracing: activations and the graph beside the FP32 weights (measured 5.6%)
SESSION_OVERHEAD = 0.15  # an ONNX Runtime session's activations, logits and tables beside its weights
LOWERED_FRACTION = {"fp32": 1.0, "fp16": 0.5, "int8": 0.26, "int4": 0.16}  # graph bytes vs FP32 (scales included)
GB = 1e9


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def lifetime_peak() -> int:
    """The process's peak resident memory so far, in bytes (``VmHWM``; elsewhere ``ru_maxrss``)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class StepPeak:
    """Peak RSS over a window of time, without resetting the kernel's counters (``/usr/bin/time``, ``getrusage`` of
    a parent keep seeing the whole export): when the window sets a new lifetime peak, that peak is exact; otherwise
    it is the highest RSS a sampling thread saw (every ``interval`` s)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.sampled = interval, current_rss()
        self._stop = threading.Event()
        self._before = lifetime_peak()
        self._thread = threading.Thread(target=self._sample, name="mmedge-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, current_rss())
        after = lifetime_peak()
        return after if after > self._before else self.sampled


def parse_bytes(text: str) -> int:
    """``"16GB"``, ``"16 GiB"``, ``"900MB"``, ``"1.5TB"`` or a plain number of bytes: at least one byte (0 or less
    would refuse every export, or turn the check off unsaid)."""
    units = {"tib": 2**40, "tb": 10**12, "gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "": 1}
    raw = text.strip().lower().replace(" ", "")
    unit = next(u for u in sorted(units, key=len, reverse=True) if raw.endswith(u))
    try:
        amount = float(raw[: len(raw) - len(unit)] if unit else raw) * units[unit]
    except ValueError:
        amount = math.nan
    if not 1 <= amount < math.inf:
        what = ("is not an amount of memory" if not math.isfinite(amount)
                else "is zero or negative" if amount <= 0 else "is less than one byte")
        raise ExportError(f"{LIMIT_ENV}={text!r} {what}",
                          "a positive number of bytes, or one with a MB, MiB, GB, GiB, TB or TiB suffix (e.g. 16GB)",
                          f"set {LIMIT_ENV} to e.g. 16GB, or unset it to use the machine's available memory")
    return int(amount)


def available_memory() -> tuple[int, str]:
    """(bytes, where the figure comes from): ``MMEDGE_EXPORT_MEMORY_LIMIT`` if set, else ``MemAvailable``."""
    if os.environ.get(LIMIT_ENV):
        return parse_bytes(os.environ[LIMIT_ENV]), LIMIT_ENV
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


class MeteredProgress(Progress):
    """``Progress`` whose step lines end with the step's peak RSS; ``steps`` keeps the figures for the manifest."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        super().__init__(total_steps, enabled, stream)
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.done += 1
        meter = StepPeak()
        start = time.perf_counter()
        prefix = f"[{self.done}/{self.total}] {text}"
        self._write(prefix + " ...", end="\r" if self._tty() else "\n")
        try:
            yield
        finally:
            peak = meter.stop()
        wall = time.perf_counter() - start
        self.steps.append({"step": text, "wall_s": round(wall, 1), "peak_rss_bytes": peak})
        self._write(f"{prefix} ... done ({wall:.1f} s, peak RSS {peak / GB:.2f} GB)")


# --- the estimate ------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Estimated peak bytes per step, and what dominates it."""

    steps: dict[str, int] = field(default_factory=dict)
    weights_bytes: int = 0  # the FP32 PyTorch model
    components: dict[str, int] = field(default_factory=dict)  # FP32 bytes per exported part

    @property
    def peak(self) -> int:
        return max(self.steps.values())

    @property
    def peak_step(self) -> str:
        return max(self.steps, key=self.steps.get)

    def as_manifest(self) -> dict:
        return {"peak_bytes": self.peak, "steps": dict(self.steps), "fp32_weights_bytes": self.weights_bytes}


def component_bytes(model, family) -> dict[str, int]:
    """FP32 bytes of each part the family exports, from a model whose weights may be on ``meta``."""
    def size(module) -> int:
        return sum(p.numel() * 4 for p in module.parameters()) if module is not None else 0

    llm = getattr(model, "language_model", None)
    if llm is not None and getattr(model, "qformer", None) is not None:  # BLIP-2, InstructBLIP: prefix + LLM
        prefix = size(model) - size(llm)
        encoder = getattr(llm, "encoder", None)
        if encoder is not None:  # an encoder-decoder LLM (T5): the encoder graph takes embeddings, not the table
            encoder_bytes = size(encoder) - size(getattr(encoder, "embed_tokens", None))
            return {"prefix": prefix, "encoder": encoder_bytes, "decoder": size(llm) - encoder_bytes}
        return {"decoder": size(llm), "prefix": prefix}
    if family.name == "idefics":
        vision = size(getattr(model.model, "vision_model",
                              None)) + size(getattr(model.model, "perceiver_resampler", None))
        return {"decoder": size(model) - vision, "vision": vision}
    return {"vision": size(getattr(model, "vision_model", None)), "text": size(getattr(model, "text_model", None))}


def estimate_export(sizes: dict[str, int], precisions: dict[str, str], *, static: bool,
                    threshold: int) -> MemoryEstimate:
    """Peak bytes per export step for components of FP32 ``sizes`` lowered to ``precisions`` (name → precision)."""
    weights = sum(sizes.values())
    largest = max(sizes.items(), key=lambda item: item[1])
    in_memory = max((b for b in sizes.values() if b <= threshold), default=0)  # traced with weights inside
    steps = {"load": BASE_BYTES + weights,
             "trace": BASE_BYTES + int(weights * (1 + TRACE_OVERHEAD)) + 2 * in_memory}
    lowered = {n: p for n, p in precisions.items() if p != "fp32" and n in sizes}
    if lowered:
        torch_left = 0 if largest[1] > threshold else weights  # large models free the PyTorch weights first
        worst = 0
        for name, precision in lowered.items():
            fp32, small = sizes[name], int(sizes[name] * LOWERED_FRACTION[precision])
            quantizer = small if fp32 > threshold else fp32 + small  # streamed, or ORT's in-memory quantizer
            if static and precision == "int8" and name != "decoder":
                quantizer += 2 * fp32  # calibration: the FP32 graph loaded whole, and its ORT session
            # fidelity (INT8/INT4) and FP16's range check: the FP32 session; then parity: the lowered one; one after
            # the other, each with its activations, logits and embedding tables (SESSION_OVERHEAD)
            sessions = int(fp32 * (1 + SESSION_OVERHEAD))
            worst = max(worst, quantizer, sessions)
        steps["lower precision"] = BASE_BYTES + torch_left + worst
    return MemoryEstimate(steps, weights, dict(sizes))


def meta_model(model: str, random_weights: bool, family):
    """The model built from its config on the ``meta`` device (shapes only, no memory)."""
    import torch
    import transformers

    from mmedge.export import loading

    entry = loading._bundled_config(model) if random_weights else None
    if entry is not None:
        config = transformers.AutoConfig.for_model(**entry["config"])
    else:
        config = transformers.AutoConfig.from_pretrained(model, **loading._hub(model))
    with torch.device("meta"):
        return family.model_class()(config)


def check_memory(model: str, options, family) -> MemoryEstimate | None:
    """Refuse, before loading anything, an export whose estimated peak passes the available memory."""
    from mmedge.export.onnx_export import EXTERNAL_DATA_THRESHOLD

    try:
        sizes = component_bytes(meta_model(model, options.random_weights, family), family)
    except Exception:  # noqa: BLE001  an estimate is advice: a config it cannot build is for load_checkpoint to judge
        return None
    precisions = {name: family.precision_of(_Named(name), options) for name in sizes}
    estimate = estimate_export(sizes, precisions, static=options.quantization == "static",
                               threshold=EXTERNAL_DATA_THRESHOLD)
    available, source = available_memory()
    if available and estimate.peak > available:
        raise ExportError(
            f"exporting {model} ({_describe(precisions)}) needs about {estimate.peak / GB:.1f} GB at its peak "
            f"({estimate.peak_step}; {_breakdown(estimate)}), but {available / GB:.1f} GB is available ({source})",
            "an estimated peak under the available memory",
            _lower_it(estimate, precisions, options, family, available),
        )
    return estimate


class _Named:
    def __init__(self, name: str):
        self.name = name


def _describe(precisions: dict[str, str]) -> str:
    return ", ".join(f"{name} {p.upper()}" for name, p in precisions.items())


def _breakdown(estimate: MemoryEstimate) -> str:
    parts = [f"{step} {value / GB:.1f} GB" for step, value in estimate.steps.items()]
    return "steps: " + ", ".join(parts) + f"; FP32 weights {estimate.weights_bytes / GB:.1f} GB"


def _lower_it(estimate: MemoryEstimate, precisions: dict[str, str], options, family, available: int) -> str:
    """The flags that bring a step under the limit (each tried on the estimate), or what holds the memory."""
    from mmedge.export.onnx_export import EXTERNAL_DATA_THRESHOLD

    over = [step for step, value in estimate.steps.items() if value > available]
    candidates = []
    if options.quantization == "static":
        candidates.append(("--quantization dynamic", precisions, False))
    if family.has_llm and precisions.get("decoder") not in (None, "int4"):
        int4 = {name: family.precision_of(_Named(name), replace(options, llm_precision="int4")) for name in precisions}
        candidates.append(("--llm-precision int4", int4, options.quantization == "static"))  # T5: encoder too
    advice = []
    for flag, changed, static in candidates:
        other = estimate_export(estimate.components, changed, static=static, threshold=EXTERNAL_DATA_THRESHOLD)
        if any(other.steps.get(step, 0) < estimate.steps[step] and other.steps.get(step, 0) <= available
               for step in over):
            advice.append(f"pass {flag} (lowers the peak to {other.peak / GB:.1f} GB)")
    if "lower precision" in over and not advice:
        name = max((n for n in estimate.components if precisions.get(n, "fp32") != "fp32"),
                   key=lambda n: estimate.components[n], default="")
        advice.append(f"no flag lowers precision-lowering: parity and fidelity run the FP32 {name} graph "
                      f"({estimate.components.get(name, 0) / GB:.1f} GB) in ONNX Runtime")
    if {"load", "trace"} & set(over):
        advice.append(f"loading and tracing hold the FP32 weights ({estimate.weights_bytes / GB:.1f} GB) and no export "
                      "flag lowers that")
    return ("; ".join(advice) + "; free memory or export on a larger host, or set "
            f"{LIMIT_ENV} to the memory you know the export may use to override the check")
