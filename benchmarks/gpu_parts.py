"""Pieces the GPU benchmark's sections share (``benchmarks/gpu_bench.py``): the time budget, one measurement that
records its failure instead of stopping the run, the card's copy bandwidth, torch.compile counters and a profile of
one call's kernels."""

from __future__ import annotations

import gc
import sys
import time
import traceback
from typing import Any, Callable


class Skip(Exception):
    """A variant that cannot run here (with the reason)."""


class Budget:
    """Seconds left for measuring; a variant that would start past it is recorded as skipped."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def attempt(results: dict, name: str, budget: Budget, fn: Callable[[], dict],
            save: Callable[[], Any] = lambda: None) -> None:
    """Run one measurement into ``results[name]``; an exception or a spent budget is recorded, the others go on.
    ``save()`` runs after it (the JSON is rewritten after every variant: an outer time-out loses nothing measured)."""
    if budget.left() <= 0:
        results[name] = {"skipped": "time budget spent"}
        print(f"gpu_bench: {name}: skipped (time budget spent)", file=sys.stderr)
        save()
        return
    print(f"gpu_bench: {name} ... ({budget.left():.0f} s left)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Skip as exc:
        results[name] = {"skipped": str(exc)}
    except Exception as exc:  # recorded with its traceback; the other variants still run
        results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                         "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        print(f"gpu_bench: {name} FAILED: {results[name]['error']}", file=sys.stderr)
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"gpu_bench: {name} done in {results[name]['seconds']} s", file=sys.stderr, flush=True)
    save()


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(torch, device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def weight_bytes(module) -> int:
    """Parameter and buffer bytes, shared tensors once (bitsandbytes keeps quantized weights as uint8/int8 params)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def copy_bandwidth(torch, device, mib: int = 2048, repeats: int = 10) -> dict:
    """The card's device-to-device copy bandwidth, bytes read + written per second (what a decode step's weight reads
    are judged against), from CUDA events over ``repeats`` copies of ``mib`` MiB."""
    source = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del source, target
    torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * (mib << 20) * repeats / seconds, "copy_mib": mib, "repeats": repeats}


def compile_counters() -> dict:
    """torch.compile's counters (frames compiled, graphs, recompiles, inductor's CUDA-graph skips), as plain dicts."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if values}


def counters_since(before: dict) -> dict:
    """What ``compile_counters()`` gained since ``before`` (only the entries that changed)."""
    now, out = compile_counters(), {}
    for group, values in now.items():
        changed = {k: v - before.get(group, {}).get(k, 0) for k, v in values.items()
                   if isinstance(v, (int, float)) and v != before.get(group, {}).get(k, 0)}
        if changed:
            out[group] = changed
    return out


def kernel_profile(torch, fn: Callable[[], Any], top: int = 8) -> dict:
    """The CUDA kernels one call of ``fn`` launches: how many, their summed time, and the ``top`` by time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():  # the runtime's buffers are inference tensors
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels) if kernels and hasattr(kernels[0], "device_time") else \
        sum(e.cuda_time for e in kernels)
    averages = sorted(prof.key_averages(), key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)
    return {"kernels": len(kernels), "kernel_us": round(total_us, 1),
            "top": [{"name": e.key[:90], "calls": e.count, "us": round(getattr(e, "self_device_time_total", 0), 1)}
                    for e in averages[:top]]}


def graph_replay_us(torch, graph, runs: int = 50) -> float:
    """The GPU time of one replay of a captured CUDA graph (CUDA events over ``runs`` replays)."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / runs



if __name__ == "__main__":  # a helper module, imported by gpu_bench.py: nothing to run on its own
    print("gpu_parts.py is a helper module of benchmarks/gpu_bench.py, not a benchmark: run "
          "`python benchmarks/gpu_bench.py --help` (or benchmarks/gpu_check.sh) instead", file=sys.stderr)
    sys.exit(2)
