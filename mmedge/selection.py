"""Choosing a backend: a pure function of (device probe, manifest, user request) → plan with reasons.

A backend the user names is used or refused with what is missing; never silently swapped. With
``auto`` the best present backend is taken and every step of that choice is recorded in ``reasons``;
where a better backend was absent (TensorRT on a GPU machine without it), ``fallbacks`` says why, and
``log_fallbacks`` logs each such reason once per process.

On an NVIDIA GPU (desktop or Jetson) with TensorRT and cuda-python installed, ``auto`` builds TensorRT
engines for the encoders and for the KV-cached decoder when its graph is FP32 or FP16, a plain causal LM or one
with context inputs (IDEFICS' image mask and cross-attention K/V): ``RunnerDecoder`` runs it with the cache kept
on the GPU. Graphs with ONNX Runtime-only operators stay on ONNX Runtime, with the reason: INT4 weight-only
(``com.microsoft.MatMulNBits``) and dynamic INT8 (``MatMulInteger``, ``DynamicQuantizeLinear``); a named
``--backend tensorrt`` refuses them. ``tensorrt_defaults`` holds the per-device engine settings (FP16; a
conservative workspace on a Jetson).

The torch backend (``mmedge[torch]``; the artifact exported ``--with-pytorch``) under ``auto``:

- never on a CPU (``device=cpu``, no NVIDIA GPU, or a CPU-only torch build such as ``2.4.0+cpu``): ONNX Runtime
  runs the exported, validated graphs there;
- on an NVIDIA GPU, with torch + transformers installed and the artifact carrying PyTorch weights, it takes the
  KV-cached **decoder** (FP16, static cache, CUDA-graph decode steps) when the decoder is a plain causal LM
  (inputs: embeddings, mask, positions, cache; not IDEFICS' image context), ahead of a TensorRT engine;
- it takes the **encoders** TensorRT does not build only when ONNX Runtime has no GPU provider (a CPU-only
  onnxruntime beside a GPU); with onnxruntime-gpu they run the exported graphs on the CUDA / TensorRT providers.

ONNX Runtime components on GPU providers get their provider options from the plan: FP16 and the workspace for the
TensorRT provider from ``tensorrt_defaults``, the device id, and IO binding (outputs left on the GPU).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from mmedge.device import DeviceProbe
from mmedge.errors import BackendUnavailableError, InputError
from mmedge.manifest import decoder_settings
from mmedge.runtimes.kv_decoder import context_inputs
from mmedge.runtimes.openvino.planning import auto_components as openvino_auto
from mmedge.runtimes.openvino.planning import explicit_components as openvino_explicit
from mmedge.runtimes.registry import BACKENDS, require_installed
from mmedge.runtimes.tensorrt_planning import engine_precision, is_kv_decoder, require_gpu, unbuildable_reason

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ComponentPlan:
    backend: str
    providers: tuple[str, ...]
    precision: str
    options: dict = field(default_factory=dict)  # backend settings: TensorRT's precision, workspace, max batch


@dataclass
class Plan:
    components: dict[str, ComponentPlan]
    reasons: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # auto only: a better backend was absent here, and why


@dataclass(frozen=True)
class TensorRTDefaults:
    """Engine settings for a device: the precision of engines built from float graphs, the builder's
    workspace limit, and the largest batch an engine's profile accepts (larger calls are split)."""

    precision: str
    workspace_mb: int
    max_batch: int
    why: str


def tensorrt_defaults(probe: DeviceProbe) -> TensorRTDefaults:
    """Jetson: FP16 engines, a workspace of 1/16 of the shared memory capped at 1 GiB (at least 256 MiB), batch 4:
    the GPU shares memory with the CPU, and everything else on the board needs it too. Desktop GPU: FP16 (FP32 on
    compute capability 6.1, which has no fast FP16), a quarter of the free GPU memory capped at 4 GiB, batch 16."""
    if probe.jetson:
        total = probe.memory_total_mb or 8192
        workspace = max(256, min(1024, total // 16))
        return TensorRTDefaults("fp16", workspace, 4, f"Jetson ({total} MiB shared memory): FP16, workspace {workspace} MiB")
    gpu = probe.gpus[0] if probe.gpus else None
    free = (gpu.memory_free_mb or gpu.memory_total_mb) if gpu else None
    workspace = min(4096, max(256, free // 4)) if free else 2048
    precision = "fp32" if gpu and gpu.compute_capability == "6.1" else "fp16"
    name = f"{gpu.name} (sm {gpu.compute_capability})" if gpu else "GPU"
    return TensorRTDefaults(precision, workspace, 16, f"{name}: {precision.upper()}, workspace {workspace} MiB")


def _gpu_backend_unusable(probe: DeviceProbe, device: str, backend: str) -> str | None:
    """Why a GPU backend (its packages checked by ``require_installed``) cannot run here, or None when it can."""
    if device == "cpu":
        return "device=cpu requested"
    if not probe.gpus and not probe.jetson:
        return "no NVIDIA GPU found"
    try:
        require_installed(backend, probe.engines)
    except BackendUnavailableError as exc:
        return f"{exc.what} (fix: {exc.fix})"
    return None


def _tensorrt_unusable(probe: DeviceProbe, device: str) -> str | None:
    """Why auto selection cannot use TensorRT here, or None when it can."""
    return _gpu_backend_unusable(probe, device, "tensorrt")


def _tensorrt_components(probe: DeviceProbe, manifest: dict, explicit: bool, reasons: list[str],
                         leave: tuple[str, ...] = ()) -> dict[str, ComponentPlan]:
    """Every component TensorRT builds (``leave``: those another backend takes first), with the reasons; named
    explicitly, a component it cannot build is refused."""
    defaults = tensorrt_defaults(probe)
    chosen: dict[str, ComponentPlan] = {}
    for name, comp in manifest["components"].items():
        if name in leave:
            reasons.append(f"component '{name}': not a TensorRT engine, torch runs it (see backend torch)")
            continue
        why = unbuildable_reason(name, comp)
        if why:
            if explicit:
                raise BackendUnavailableError(why, "components TensorRT can build: float or static-QDQ INT8 graphs",
                                              "use --backend auto (TensorRT for what it builds, ONNX Runtime for the rest) "
                                              "or --backend onnxruntime")
            reasons.append(f"{why}: ONNX Runtime")
            continue
        precision = engine_precision(name, comp, None, defaults.precision)
        chosen[name] = ComponentPlan("tensorrt", (), precision, {"precision": precision, "workspace_mb": defaults.workspace_mb,
                                                                  "max_batch": defaults.max_batch})
        if name == "decoder" or is_kv_decoder(comp):
            context = decoder_context(manifest) if name == "decoder" else []
            reasons.append(f"component '{name}': the KV-cached decoder as a TensorRT engine ({comp.get('precision')} graph "
                           f"without ONNX Runtime-only operators, built at {precision}; its cache stays on the GPU between "
                           "steps" + (f"; its context {_listed(context)} fed beside the cache" if context else "") + ")")
    if chosen:
        reasons.append(f"backend tensorrt: {'requested' if explicit else 'installed, with an NVIDIA GPU'}; engines built on "
                       f"this device for {', '.join(chosen)} ({defaults.why}; cached under the artifact's engines/)")
    return chosen


def _torch_takes_decoder(probe: DeviceProbe, manifest: dict, device: str, weights: bool) -> bool:
    """auto: whether ``_torch_components`` will take the decoder: torch can run on this GPU with the artifact's
    weights, and the decoder is a plain causal LM."""
    return _torch_auto_unusable(probe, device, weights) is None and torch_decoder_unfit(manifest) is None


_LOGGED: set[str] = set()
_LOG_LOCK = threading.Lock()


def log_fallbacks(chosen: Plan, logger: logging.Logger | None = None) -> list[str]:
    """Log (WARNING) each of the plan's fallback reasons not logged before in this process; return those logged."""
    with _LOG_LOCK:
        new = [reason for reason in dict.fromkeys(chosen.fallbacks) if reason not in _LOGGED]
        _LOGGED.update(new)
    for reason in new:
        (logger or logging.getLogger("mmedge")).warning("mmedge: %s", reason)
    return new


TORCH_OPTIONS_CUDA = {"device": "cuda", "dtype": "float16"}
TORCH_OPTIONS_CPU = {"device": "cpu", "dtype": "float32"}


def _torch_unusable(probe: DeviceProbe, device: str) -> str | None:
    """Why the torch backend cannot run on a GPU here, or None when it can (nothing is imported)."""
    reason = _gpu_backend_unusable(probe, device, "torch")
    if reason:
        return reason
    version = str(probe.engines.get("torch"))
    if "+cpu" in version:
        return f"torch {version} is a CPU-only build"
    return None


NOT_IN_RELEASE = "not in this release"


def _torch_auto_unusable(probe: DeviceProbe, device: str, weights: bool) -> str | None:
    """Why ``auto`` gives the torch backend nothing, or None when it may take components on this GPU."""
    if BACKENDS["torch"].module is None:
        return NOT_IN_RELEASE
    why = _torch_unusable(probe, device)
    if why is None and not weights:
        why = "the artifact has no PyTorch weights (export --with-pytorch)"
    return why


def decoder_context(manifest: dict) -> list[str]:
    """The decoder's inputs beyond embeddings, mask, positions and its cache (IDEFICS: the image mask and the
    cross-attention K/V); [] without a decoder."""
    decoder = manifest["components"].get("decoder")
    if decoder is None:
        return []
    kv = decoder_settings(manifest).get("kv_cache")
    if kv:
        return context_inputs(decoder["inputs"], kv)
    return [name for name in decoder["inputs"] if name not in ("inputs_embeds", "attention_mask", "position_ids")]


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"


def torch_decoder_unfit(manifest: dict) -> str | None:
    """Why the torch backend's KV-cached decoder cannot run this artifact's decoder, or None when it can: it feeds
    embeddings, mask, positions and the cache, nothing else (IDEFICS' decoder also takes image context)."""
    if "decoder" not in manifest["components"]:
        return "the artifact has no decoder"
    context = decoder_context(manifest)
    if context:
        return f"the decoder also takes {_listed(context)}, which the torch decoder does not feed"
    return None


def _torch_components(probe: DeviceProbe, manifest: dict, device: str, weights: bool, taken: dict,
                      reasons: list[str]) -> dict[str, ComponentPlan]:
    """auto: the decoder (and, without an ONNX Runtime GPU provider, the encoders TensorRT left) on torch CUDA."""
    why = _torch_auto_unusable(probe, device, weights)
    if why == NOT_IN_RELEASE:
        reasons.append(f"backend torch: {why}")
        return {}
    if why is not None:
        reasons.append(f"backend torch: {why}" + ("; ONNX Runtime is preferred on a CPU" if not probe.gpus and not probe.jetson else ""))
        return {}
    chosen: dict[str, ComponentPlan] = {}
    decoder_why = torch_decoder_unfit(manifest)
    if decoder_why is None:
        chosen["decoder"] = ComponentPlan("torch", (), "fp16", dict(TORCH_OPTIONS_CUDA))
    gpu_ort = any(p in probe.ort_providers for p in ("tensorrt", "cuda"))
    if not gpu_ort:
        for name in manifest["components"]:
            if name not in taken and name not in chosen and name != "decoder":
                chosen[name] = ComponentPlan("torch", (), "fp16", dict(TORCH_OPTIONS_CUDA))
    parts = []
    if "decoder" in chosen:
        parts.append("the KV-cached decoder (FP16, static cache, CUDA-graph decode steps)")
    elif decoder_why and "decoder" in manifest["components"]:
        parts.append(f"not the decoder ({decoder_why})")
    encoders = [n for n in chosen if n != "decoder"]
    if encoders:
        parts.append(f"{', '.join(encoders)} (FP16, CUDA graphs; this onnxruntime build has no GPU provider)")
    reasons.append("backend torch: installed, with an NVIDIA GPU and the artifact's PyTorch weights: "
                   + ("; ".join(parts) if parts else "nothing to take (ONNX Runtime's GPU providers run the encoders)"))
    return chosen


def _torch_explicit(probe: DeviceProbe, manifest: dict, device: str, weights: bool, reasons: list[str]) -> dict[str, ComponentPlan]:
    """backend='torch': every component on torch, on the GPU when there is one (FP16), else the CPU (FP32)."""
    require_installed("torch", probe.engines)
    if not weights:
        raise BackendUnavailableError("backend 'torch' needs PyTorch weights, and this artifact was exported without them",
                                      "an artifact exported with `mmedge export --with-pytorch` (its pytorch/ folder)",
                                      "re-export with --with-pytorch, or use --backend auto / onnxruntime")
    why = torch_decoder_unfit(manifest) if "decoder" in manifest["components"] else None
    if why:
        raise BackendUnavailableError(f"backend 'torch' cannot run this artifact's decoder: {why}",
                                      "a decoder that is a plain causal LM (BLIP-2)",
                                      "use --backend auto (the decoder then runs on ONNX Runtime)")
    gpu_why = _torch_unusable(probe, device)
    if gpu_why is None:
        options, precision, where = dict(TORCH_OPTIONS_CUDA), "fp16", "on the GPU at FP16 with CUDA graphs"
    elif device == "cuda":
        raise BackendUnavailableError(f"device=cuda was requested for backend 'torch', but {gpu_why}",
                                      "an NVIDIA GPU and a CUDA build of torch",
                                      "install a CUDA build of torch, or pass --device cpu")
    else:
        options, precision, where = dict(TORCH_OPTIONS_CPU), "fp32", f"on the CPU at FP32 ({gpu_why})"
    reasons.append(f"backend torch: every component {where}")
    return {name: ComponentPlan("torch", (), precision, dict(options)) for name in manifest["components"]}


def ort_options(probe: DeviceProbe, providers: tuple[str, ...], component: dict) -> dict:
    """Provider options for one ONNX Runtime component: device id, IO binding on GPU providers (outputs stay on the
    GPU between stages), and for the TensorRT provider FP16 (per ``tensorrt_defaults``; not for INT8 graphs) and the
    builder workspace."""
    if not any(p in providers for p in ("tensorrt", "cuda")):
        return {}
    options = {"device_id": 0, "io_binding": True}
    if "tensorrt" in providers:
        defaults = tensorrt_defaults(probe)
        options.update(fp16=defaults.precision == "fp16" and component.get("precision") in ("fp32", "fp16"),
                       workspace_mb=defaults.workspace_mb)
    return options


def _check_request(backend: str, device: str) -> None:
    """A name that is no backend or device at all is bad input (InputError, exit 2), not an absent backend (exit 4)."""
    if backend != "auto" and (not isinstance(backend, str) or backend not in BACKENDS):
        raise InputError(f"unknown backend '{backend}'", f"'auto' or one of {', '.join(BACKENDS)}",
                         "pass --backend auto to let mmedge choose")
    if not isinstance(device, str) or device not in DEVICES:
        raise InputError(f"unknown device '{device}'", f"one of {', '.join(DEVICES)}", "pass --device auto, cpu or cuda")


def _ort_providers(probe: DeviceProbe, device: str, explicit: bool, reasons: list[str]) -> tuple[str, ...]:
    gpu_providers = [p for p in ("tensorrt", "cuda") if p in probe.ort_providers]
    if device == "cpu":
        reasons.append("device=cpu requested: ONNX Runtime CPU provider")
        return ("cpu",)
    if gpu_providers:
        reasons.append(f"ONNX Runtime offers {', '.join(gpu_providers)}: using them, CPU as fallback for unsupported ops")
        return tuple(gpu_providers)
    if device == "cuda":
        raise BackendUnavailableError(
            f"device=cuda was requested but this onnxruntime build offers only {probe.ort_providers}",
            "onnxruntime-gpu with the CUDA (or TensorRT) execution provider and an NVIDIA GPU",
            "pip uninstall onnxruntime && pip install onnxruntime-gpu, or pass --device cpu",
        )
    why = "no GPU found" if not probe.gpus and not probe.jetson else "this onnxruntime build has no GPU provider"
    reasons.append(f"{why}: ONNX Runtime CPU provider" + ("" if explicit else " (fallback)"))
    return ("cpu",)


def plan(probe: DeviceProbe, manifest: dict, backend: str = "auto", device: str = "auto", *,
         pytorch_weights: bool | None = None) -> Plan:
    """Backend and providers per component, with the reasons, or a BackendUnavailableError.

    ``pytorch_weights``: whether the torch backend has weights to load (None: whether the manifest names them).
    """
    _check_request(backend, device)
    weights = bool(manifest.get("pytorch")) if pytorch_weights is None else bool(pytorch_weights)
    reasons: list[str] = []
    fallbacks: list[str] = []
    components: dict[str, ComponentPlan] = {}
    if backend == "auto":
        why = _tensorrt_unusable(probe, device)
        if why is None:
            torch_decoder = ("decoder",) if _torch_takes_decoder(probe, manifest, device, weights) else ()
            components = _tensorrt_components(probe, manifest, False, reasons, leave=torch_decoder)
        else:
            reasons.append(f"backend tensorrt: {why}")
            if device != "cpu" and (probe.gpus or probe.jetson):
                fallbacks.append(f"TensorRT is not used on this GPU: {why}; ONNX Runtime runs every component instead")
        components.update(_torch_components(probe, manifest, device, weights, components, reasons))
        for name, options in openvino_auto(probe, manifest, device, components, reasons).items():
            components[name] = ComponentPlan("openvino", (), manifest["components"][name]["precision"], options)
        chosen = "onnxruntime"
    else:
        from mmedge.runtimes.registry import import_backend_module

        import_backend_module(backend)  # raises with the install command when absent
        chosen = backend
        reasons.append(f"backend {backend}: requested")
        if backend == "tensorrt":
            require_installed("tensorrt", probe.engines)
            require_gpu(probe, device)
            components = _tensorrt_components(probe, manifest, True, reasons)
        elif backend == "torch":
            components = _torch_explicit(probe, manifest, device, weights, reasons)
        elif backend == "openvino":
            components = {name: ComponentPlan("openvino", (), manifest["components"][name]["precision"], options)
                          for name, options in openvino_explicit(probe, manifest, device, reasons).items()}
    rest = [name for name in manifest["components"] if name not in components]
    if rest:
        if not probe.engines.get("onnxruntime"):
            raise BackendUnavailableError("onnxruntime is not installed", "the onnxruntime package", "pip install onnxruntime")
        providers = _ort_providers(probe, device, backend != "auto", reasons)
        for name in rest:
            component = manifest["components"][name]
            components[name] = ComponentPlan(chosen, providers, component["precision"], ort_options(probe, providers, component))
    ordered = {name: components[name] for name in manifest["components"]}
    return Plan(ordered, reasons, fallbacks)
