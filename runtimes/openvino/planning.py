"""Which components OpenVINO takes under ``auto`` on an x86 CPU, and why: a rule per graph recipe backed by the
per-component figures measured in ``benchmarks/RESULTS.md`` (section "OpenVINO backend"). Nothing is imported.

The figures depend on the CPU's INT8 instructions: with VNNI (``avx512_vnni``, ``avx_vnni``, ``amx_int8``)
OpenVINO runs a static-QDQ INT8 graph much faster than ONNX Runtime runs either INT8 recipe; on AVX2 without VNNI
(an AMD EPYC CI machine of an earlier day; the CI's EPYCs vary, some have VNNI and BF16) OpenVINO's INT8 kernels
lose that edge and ONNX Runtime's dynamic INT8 is the fastest CPU recipe. Each rule names the two figures it rests
on, so ``mmedge doctor`` can say why.
"""

from __future__ import annotations

from dataclasses import dataclass

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Figure:
    """One measured pair: ONNX Runtime CPU vs OpenVINO CPU, same graph, same inputs, 2 threads (ms, median)."""

    onnxruntime_ms: float
    openvino_ms: float
    where: str  # the machine and source

    @property
    def faster(self) -> str:
        """OpenVINO only where it is faster by more than ``MARGIN``: a second runtime in the process costs memory
        (1.68x the RSS for the same FP32 decoder, RESULTS.md) and a compile, so a near tie stays on ONNX Runtime."""
        return "openvino" if self.openvino_ms < MARGIN * self.onnxruntime_ms else "onnxruntime"

    def text(self) -> str:
        return f"ONNX Runtime {self.onnxruntime_ms:g} ms vs OpenVINO {self.openvino_ms:g} ms ({self.where})"

    def reason(self) -> str:
        """Why ``faster`` chose what it chose, in words that match the figures (a near tie is not "faster")."""
        if self.faster == "openvino":
            return "openvino is faster by more than the margin"
        if self.onnxruntime_ms <= self.openvino_ms:
            return "onnxruntime is faster"
        return f"onnxruntime kept: OpenVINO is faster by less than the {1 - MARGIN:.0%} margin"


MARGIN = 0.9  # OpenVINO takes a component only when it needs less than this share of ONNX Runtime's time
_ISSUE = "AMD EPYC with avx512_vnni, issue 21"
_XEON = "Intel Xeon with avx512_vnni and AMX, RESULTS.md 'OpenVINO backend', quiet run on a CPU with VNNI"
_HERE = "AMD EPYC AVX2 without VNNI, RESULTS.md 'OpenVINO backend'"
_HERE_DECODE = "AMD EPYC AVX2 without VNNI, decode step in the generation loop, RESULTS.md 'OpenVINO backend'"
_XEON_DECODE = "Intel Xeon with avx512_vnni and AMX, decode step in the generation loop, RESULTS.md 'OpenVINO backend'"
# recipe -> (figure on a CPU with VNNI, figure on a CPU without): CLIP ViT-B/32 image tower, batch 1; the decoder
# rows are one BLIP-2 OPT-125m-shape decode step
FIGURES: dict[str, tuple[Figure, Figure]] = {
    "fp32": (Figure(44.9, 43.4, _XEON), Figure(241.0, 262.6, _HERE)),
    "int8-static-qdq": (Figure(66.5, 11.3, _XEON), Figure(407.8, 294.5, _HERE)),
    "int8-dynamic": (Figure(13.9, 59.0, _XEON), Figure(193.0, 397.1, _HERE)),
    # with VNNI: decode step in the generation loop on the Xeon (caption_cpu.py --quick --openvino, a full-size export
    # beside it; the issue's bare-step figure was 17.4 vs 13.6 ms, the loop measures a tie, as without VNNI)
    "decoder-fp32": (Figure(47.9, 48.5, _XEON_DECODE), Figure(80.4, 131.0, _HERE_DECODE)),
    "decoder-int4": (Figure(4.7, 9.3, _ISSUE), Figure(4.7, 9.3, _ISSUE + "; not measured without VNNI")),
}


def has_vnni(cpu_flags) -> bool:
    return any(flag in cpu_flags for flag in VNNI_FLAGS)


def recipe(name: str, component: dict) -> str:
    """The rule's name for a component's graph: its precision and quantization method."""
    precision = component.get("precision")
    method = (component.get("quantization") or {}).get("method")
    prefix = "decoder-" if name == "decoder" else ""
    if precision == "int8":
        return prefix + ("int8-static-qdq" if method == "int8-static-qdq" else "int8-dynamic")
    return prefix + str(precision)


def figure(name: str, component: dict, cpu_flags) -> Figure | None:
    pair = FIGURES.get(recipe(name, component))
    return None if pair is None else pair[0 if has_vnni(cpu_flags) else 1]


def measured_figure(timing: dict) -> Figure:
    """A ``mmedge tune`` record of one component on this device as a ``Figure``."""
    return Figure(timing["onnxruntime_ms"], timing["openvino_ms"],
                  f"measured here by mmedge tune at {timing.get('measured_at', '?')}: {timing.get('inputs', '?')}")


def faster_backend(name: str, component: dict, cpu_flags, measured: dict | None = None) -> tuple[str, str]:
    """("openvino" or "onnxruntime", the reason) for one component on this CPU: from ``measured`` (this device's
    ``mmedge tune`` timing of this graph) where there is one (ONNX Runtime where OpenVINO failed to run the graph
    then), else from the rule's figure for the CPU class."""
    what = recipe(name, component)
    if measured and measured.get("openvino_failed"):
        return "onnxruntime", (f"component '{name}' ({what}) here: OpenVINO could not run it when mmedge tune measured "
                               f"at {measured.get('measured_at', '?')} ({measured['openvino_failed']})")
    found = measured_figure(measured) if measured else figure(name, component, cpu_flags)
    if found is None:
        return "onnxruntime", f"component '{name}' ({what}): no OpenVINO figure for this recipe, ONNX Runtime"
    if measured:
        return found.faster, f"component '{name}' ({what}) here: {found.reason()} ({found.text()})"
    cpus = "with" if has_vnni(cpu_flags) else "without"
    return found.faster, (f"component '{name}' ({what}) by the rule for CPUs {cpus} VNNI: {found.reason()} "
                          f"(reference figures of a full-size graph, not this one, measured on {found.where}; "
                          "`mmedge tune ARTIFACT` measures this machine's)")


def int8_recipe(cpu_flags) -> tuple[str, str]:
    """The INT8 recipe for CPUs like this one: static QDQ (one graph for TensorRT and CPUs) only where its fastest
    backend is at least as fast as dynamic INT8 on its own fastest backend."""
    pair = 0 if has_vnni(cpu_flags) else 1
    static, dynamic = FIGURES["int8-static-qdq"][pair], FIGURES["int8-dynamic"][pair]
    best_static = min(static.onnxruntime_ms, static.openvino_ms)
    best_dynamic = min(dynamic.onnxruntime_ms, dynamic.openvino_ms)
    chosen = "static" if best_static <= best_dynamic else "dynamic"
    return chosen, (f"static QDQ {best_static:g} ms on {static.faster} vs dynamic {best_dynamic:g} ms on "
                    f"{dynamic.faster} ({static.where})")


X86 = ("x86_64", "amd64", "i686", "x86")


def openvino_unusable(probe, device: str, installed: bool) -> str | None:
    """Why ``auto`` gives OpenVINO nothing here, or None when it may take components (an x86 CPU run)."""
    if not installed:
        return 'not installed (pip install "mmedge[openvino]")'
    if device == "cuda":
        return "device=cuda requested (OpenVINO runs Intel devices, not NVIDIA GPUs)"
    if str(probe.machine).lower() not in X86:
        return f"not an x86 CPU ({probe.machine})"
    if device != "cpu" and (probe.gpus or probe.jetson):
        return "an NVIDIA GPU runs the graphs (TensorRT / ONNX Runtime)"
    return None
