"""The torch backend's settings (``backend_options['torch']``, ``--backend-option torch.X=...``), judged before
anything is loaded: nothing here imports torch, so ``mmedge.load``, ``doctor`` and ``bench``'s parent process check
them on a device without it.

- ``compile``: True, False, None or a ``torch.compile`` backend name: the names torch registers by itself
  (``KNOWN_COMPILE_BACKENDS``), those installed packages register (the ``torch_dynamo_backends`` entry points) and,
  where torch is imported already, ``torch._dynamo.list_backends()``; the runner checks the name once more against
  torch's own list.
- ``CUDA_ONLY``: settings that act only where the torch backend runs on CUDA (refused on a CPU by the plug-in's
  ``idle_settings``, as ONNX Runtime refuses its GPU providers' settings on its CPU provider).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mmedge.errors import InputError
from mmedge.runtimes.torch_bnb import QUANTIZATIONS
from mmedge.runtimes.torch_graphs import DEFAULT_MAX_GRAPHS
from mmedge.setting_checks import check_switch, is_whole

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
PRECISION_OF_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
CUDA_ONLY = {"cuda_graphs": "CUDA graphs are captured on an NVIDIA GPU only",
             "keep_on_device": "outputs stay on the GPU only where they were computed on one",
             "max_graphs": "it limits the CUDA graphs kept per component"}
# torch.compile backends torch registers by itself (torch._dynamo.list_backends(exclude_tags=()), torch 2.4 - 2.13,
# less its testing-only ones); packages register more through the "torch_dynamo_backends" entry points
KNOWN_COMPILE_BACKENDS = ("inductor", "eager", "aot_eager", "aot_eager_decomp_partition",
                          "aot_eager_default_partitioner", "aot_ts", "cudagraphs", "ts", "tvm", "openxla",
                          "openxla_eval", "onnxrt", "pre_dispatch_eager")


def compile_backend_names() -> list[str]:
    """The ``compile`` names accepted before torch is loaded (see the module's docstring)."""
    names = set(KNOWN_COMPILE_BACKENDS)
    try:
        names.update(entry.name for entry in metadata.entry_points(group="torch_dynamo_backends"))
    except Exception:  # a broken distribution's metadata: the names torch registers itself still hold
        pass
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        names.update(dynamo.list_backends(exclude_tags=()))
    return sorted(names)


def check_compile(value) -> None:
    """InputError unless ``value`` is True, False, None or a torch.compile backend name (a name in quotes is
    refused as such: the quotes would be part of it)."""
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, str):
        raise InputError(f"torch compile setting {value!r}", "True, False, None or a torch.compile backend name",
                         "pass compile=True (inductor) or compile=False")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        raise InputError(f"torch compile setting {value!r} holds quotes, which would be part of the backend name",
                         "a torch.compile backend name without quotes (e.g. inductor)",
                         f"pass compile='{value[1:-1]}' (on the command line torch.compile={value[1:-1]}: the "
                         "shell's quotes are enough)")
    names = compile_backend_names()
    if value not in names:
        raise InputError(f"torch compile setting {value!r} is not a torch.compile backend",
                         f"True, False, None (auto: on for CUDA graphs) or one of {', '.join(names)}",
                         "pass compile=True (inductor) or compile=False")


@dataclass
class TorchSettings:
    """How the torch backend runs a component: device ("auto", "cpu", "cuda", "cuda:N"), dtype (None: float16 on
    CUDA, float32 on a CPU), CUDA graphs (None: on for CUDA), torch.compile (None: on where CUDA graphs are; True,
    False or a torch.compile backend name), outputs left on the GPU, the graph limit, INT8/NF4 LLM weights (decoder
    only) and an optional checkpoint folder instead of the artifact's pytorch/ weights (``~`` expanded)."""

    device: str | None = "auto"
    dtype: str | None = None
    cuda_graphs: bool | None = None
    compile: bool | str | None = None
    keep_on_device: bool = False
    max_graphs: int = DEFAULT_MAX_GRAPHS
    quantization: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        """The values a user sets, judged before anything is loaded; the device itself is judged once torch can see
        it, bitsandbytes where the plan gives the decoder to torch (``TorchBackend.settled``)."""
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise InputError(f"torch dtype {self.dtype!r}", f"None or one of {', '.join(DTYPE_NAMES)}",
                             "pass dtype='float16' (CUDA), 'bfloat16' or 'float32'")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise InputError(f"LLM quantization {self.quantization!r}", f"None or one of {', '.join(QUANTIZATIONS)}",
                             "pass quantization='int8' (LLM.int8) or 'nf4'")
        if not is_whole(self.max_graphs, 1):
            raise InputError(f"max_graphs is {self.max_graphs!r}", "a positive integer (CUDA graphs kept per "
                             "component)", f"pass e.g. max_graphs={DEFAULT_MAX_GRAPHS}")
        check_switch("cuda_graphs", self.cuda_graphs, none_means="on for CUDA")
        check_switch("keep_on_device", self.keep_on_device)
        check_compile(self.compile)
        for name in ("device", "checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise InputError(f"{name} is {value!r}", "a string" + (" ('auto', 'cpu', 'cuda', 'cuda:N')"
                                                                     if name == "device" else " (a checkpoint folder)"),
                                 f"pass e.g. {name}='cuda'" if name == "device" else "pass the folder's path")


def runs_on_cpu(device: str | None, planned: str | None) -> bool:
    """Whether the torch backend runs on the CPU: the ``device`` setting, or the plan's where that is absent or
    "auto" (the plan resolved it from the device probe)."""
    chosen = planned if device in (None, "auto") else str(device)
    return str(chosen or "cpu").split(":")[0] == "cpu"


__all__ = ["CUDA_ONLY", "DTYPE_NAMES", "KNOWN_COMPILE_BACKENDS", "PRECISION_OF_DTYPE", "TorchSettings",
           "check_compile", "compile_backend_names", "runs_on_cpu"]
