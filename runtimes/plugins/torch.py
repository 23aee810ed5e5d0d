"""The torch backend's plug-in (``mmedge[torch]``; an artifact exported ``--with-pytorch``). Under ``auto``:

- never on a CPU (``device=cpu``, no NVIDIA GPU, or a CPU-only torch build such as ``2.4.0+cpu``): ONNX Runtime
  runs the exported, validated graphs there;
- on an NVIDIA GPU, with torch + transformers installed and the artifact carrying PyTorch weights, it claims the
  KV-cached **decoder** (FP16, static cache, CUDA-graph decode steps) when the decoder is a plain causal LM
  (inputs: embeddings, mask, positions, cache; not IDEFICS' image context), ahead of a TensorRT engine;
- it takes the **encoders** TensorRT does not build only when ONNX Runtime has no GPU provider (a CPU-only
  onnxruntime beside a GPU); with onnxruntime-gpu they run the exported graphs on the CUDA / TensorRT providers.

Named explicitly it runs every component, on the GPU at FP16 when there is one, else on the CPU at FP32 (``dtype``
sets another; the plan's precision says which). Its CUDA-only settings are refused where it runs on the CPU
(``idle_settings``), and INT8/NF4 LLM weights where bitsandbytes is not installed (``settled``), before anything loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

from mmedge.backends import Backend, ComponentPlan, PlanRequest, listed
from mmedge.errors import BackendUnavailableError
from mmedge.generation.kv_layout import decoder_context
from mmedge.runtimes.registry import BACKENDS

OPTIONS_CUDA = {"device": "cuda", "dtype": "float16"}
OPTIONS_CPU = {"device": "cpu", "dtype": "float32"}
RUNNER_ONLY = ("keep_on_device", "max_graphs")  # TorchSettings the decoder does not take


def torch_decoder_unfit(manifest: dict) -> str | None:
    """Why the torch backend's KV-cached decoder cannot run this artifact's decoder, or None when it can: it feeds
    embeddings, mask, positions and the cache, nothing else (IDEFICS' decoder also takes image context)."""
    if "decoder" not in manifest["components"]:
        return "the artifact has no decoder"
    context = decoder_context(manifest)
    if context:
        return f"the decoder also takes {listed(context)}, which the torch decoder does not feed"
    return None


class TorchBackend(Backend):
    runner_module = "mmedge.runtimes.torch_backend"
    decoder_only = ("quantization",)  # INT8/NF4 applies to the LLM, which only the decoder runs

    @property
    def settings(self):  # TorchSettings imports no torch (mmedge.runtimes.torch_settings)
        from mmedge.runtimes.torch_settings import TorchSettings

        return TorchSettings

    def idle_settings(self, settings: dict, plans: list[ComponentPlan]) -> dict[str, str]:
        """``cuda_graphs``, ``keep_on_device`` and ``max_graphs`` act on CUDA only: where the torch backend runs on
        the CPU (the plan's device, or the ``device`` setting) they would change nothing (the runner dropped them)."""
        from mmedge.runtimes.torch_settings import CUDA_ONLY, runs_on_cpu

        planned = next((plan.options.get("device") for plan in plans), None)
        if not runs_on_cpu(settings.get("device"), planned):
            return {}
        where = (f"device={settings['device']}" if settings.get("device") not in (None, "auto")
                 else "the plan's device")
        return {name: f"it acts on CUDA only ({why}), and the torch backend runs on the CPU here ({where})"
                for name, why in CUDA_ONLY.items() if name in settings}

    def _gpu_unusable(self, request: PlanRequest) -> str | None:
        """Why the torch backend cannot run on a GPU here, or None when it can (nothing is imported)."""
        reason = self.gpu_unusable(request)
        if reason:
            return reason
        version = str(request.probe.engines.get("torch"))
        if "+cpu" in version:
            return f"torch {version} is a CPU-only build"
        return None

    def unusable(self, request: PlanRequest) -> str | None:
        why = self._gpu_unusable(request)
        if why is None and not request.weights:
            why = "the artifact has no PyTorch weights (export --with-pytorch)"
        return why

    def declined(self, request: PlanRequest, why: str, taken: dict[str, ComponentPlan]) -> None:
        request.reasons.append(f"backend torch: {why}" + ("; ONNX Runtime is preferred on a CPU"
                                                          if not request.has_gpu else ""))

    def claims(self, request: PlanRequest) -> tuple[str, ...]:
        """The decoder, ahead of a TensorRT engine, when torch can run here and the decoder is a plain causal LM."""
        return ("decoder",) if self.unusable(request) is None and torch_decoder_unfit(request.manifest) is None else ()

    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        return self._explicit(request) if request.explicit else self._auto(request, taken)

    def _auto(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        """The decoder (and, without an ONNX Runtime GPU provider, the encoders TensorRT left) on torch CUDA."""
        manifest, probe = request.manifest, request.probe
        chosen: dict[str, ComponentPlan] = {}
        decoder_why = torch_decoder_unfit(manifest)
        if decoder_why is None:
            chosen["decoder"] = ComponentPlan(self.name, (), "fp16", dict(OPTIONS_CUDA))
        gpu_ort = any(p in probe.ort_providers for p in ("tensorrt", "cuda"))
        if not gpu_ort:
            for name in manifest["components"]:
                if name not in taken and name not in chosen and name != "decoder":
                    chosen[name] = ComponentPlan(self.name, (), "fp16", dict(OPTIONS_CUDA))
        parts = []
        if "decoder" in chosen:
            parts.append("the KV-cached decoder (FP16, static cache, CUDA-graph decode steps)")
        elif decoder_why and "decoder" in manifest["components"]:
            parts.append(f"not the decoder ({decoder_why})")
        encoders = [n for n in chosen if n != "decoder"]
        if encoders:
            parts.append(f"{', '.join(encoders)} (FP16, CUDA graphs; this onnxruntime build has no GPU provider)")
        request.reasons.append("backend torch: installed, with an NVIDIA GPU and the artifact's PyTorch weights: "
                               + ("; ".join(parts) if parts
                                  else "nothing to take (ONNX Runtime's GPU providers run the encoders)"))
        return chosen

    def _explicit(self, request: PlanRequest) -> dict[str, ComponentPlan]:
        """backend='torch': every component on torch, on the GPU when there is one (FP16), else the CPU (FP32)."""
        manifest, device = request.manifest, request.device
        self.require_installed(request.probe.engines)
        if not request.weights:
            raise BackendUnavailableError("backend 'torch' needs PyTorch weights, and this artifact was "
                                          "exported without "
                                          "them", "an artifact exported with `mmedge export --with-pytorch` (its "
                                          "pytorch/ folder)", "re-export with --with-pytorch, or use --backend auto / "
                                          "onnxruntime")
        why = torch_decoder_unfit(manifest) if "decoder" in manifest["components"] else None
        if why:
            raise BackendUnavailableError(f"backend 'torch' cannot run this artifact's decoder: {why}",
                                          "a decoder that is a plain causal LM (BLIP-2)",
                                          "use --backend auto (the decoder then runs on ONNX Runtime)")
        gpu_why = self._gpu_unusable(request)
        if gpu_why is None:
            options, precision, where = dict(OPTIONS_CUDA), "fp16", "on the GPU with CUDA graphs"
        elif device == "cuda":
            raise BackendUnavailableError(f"device=cuda was requested for backend 'torch', but {gpu_why}",
                                          "an NVIDIA GPU and a CUDA build of torch",
                                          "install a CUDA build of torch, or pass --device cpu")
        else:
            options, precision, where = dict(OPTIONS_CPU), "fp32", f"on the CPU ({gpu_why})"
        request.reasons.append(f"backend torch: every component {where}, at {precision.upper()} unless torch.dtype "
                               "sets another (the precision shown is what runs)")
        return {name: ComponentPlan(self.name, (), precision, dict(options)) for name in manifest["components"]}

    def settled(self, artifact, name: str, plan: ComponentPlan, settings: dict) -> ComponentPlan:
        """As ``Backend``'s; ``dtype`` sets the precision ("bf16"), and the decoder's LLM ``quantization`` is added
        to it ("fp16+nf4"), bitsandbytes checked for it here, before anything loads. A dtype name torch does not
        take is left for the runner to refuse."""
        from mmedge.runtimes.torch_settings import DTYPE_NAMES, PRECISION_OF_DTYPE

        dtype = DTYPE_NAMES.get(str(settings.get("dtype")))
        precision = PRECISION_OF_DTYPE[dtype] if dtype else plan.precision
        options = {**plan.options, "dtype": dtype} if dtype else plan.options
        quantization = settings.get("quantization") if name == "decoder" else None
        if quantization and not bitsandbytes_installed():
            from mmedge.runtimes.torch_bnb import BNB_INSTALL

            raise BackendUnavailableError(
                f"LLM quantization '{quantization}' on the torch backend needs the Python package 'bitsandbytes', "
                "which is not installed", "bitsandbytes importable beside torch (CUDA, or its CPU build)",
                f"{BNB_INSTALL}, or drop the quantization setting")
        return replace(plan, precision=f"{precision}+{quantization}" if quantization else precision, options=options)

    def supplies_weights(self, settings: dict | None) -> bool:
        return bool((settings or {}).get("checkpoint"))  # from_pretrained of that folder

    def open_runner(self, artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False):
        """The family's reference module from the artifact's PyTorch weights (no graph file)."""
        _use_threads(threads)
        options = {"artifact": artifact, **plan.options, **self.runner_settings(settings)}
        if keep_on_device:
            options["keep_on_device"] = True
        return self.import_runner_module().create_runner(None, name, artifact.component(name), **options)

    def open_decoder(self, artifact, plan: ComponentPlan, table, *, threads: int | None = None,
                     settings: dict | None = None):
        from mmedge.runtimes.torch_decoder import create_decoder

        _use_threads(threads)
        decoder_settings = {k: v for k, v in (settings or {}).items() if k not in RUNNER_ONLY}
        return create_decoder(artifact, **{**plan.options, **decoder_settings})

    def hands_over_on_gpu(self, plan: ComponentPlan) -> bool:
        return plan.options.get("device") == "cuda"


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes can be found (not imported: that loads its native libraries)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _use_threads(threads: int | None) -> None:
    """``threads``: torch's intra-op threads, for the whole process (torch has no per-module setting; it was
    dropped, so `--backend torch --threads 1` ran on every core)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


BACKEND = TorchBackend(BACKENDS["torch"])
