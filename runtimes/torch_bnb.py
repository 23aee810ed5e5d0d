"""bitsandbytes INT8 (LLM.int8) and NF4 weights for the torch backend's language model.

``quantize_linear_layers`` replaces a module's ``nn.Linear`` layers (but its output head, and layers narrower than
one 64-value NF4 block) by bitsandbytes layers in place, as transformers' ``BitsAndBytesConfig`` defaults do:
``Linear8bitLt`` (threshold 6.0, no FP16 copy kept) or ``Linear4bit`` (NF4, compute in the model's dtype, no double
quantization).

- The replacement layers are built on the ``meta`` device (no CPU initialisation of weights that are overwritten
  at once: about 10 s for an OPT-2.7B on the CPU before) and get the original weights as their parameters.
- NF4 quantizes where the weights already are: a CUDA weight is quantized on the GPU, never copied to the host.
  ``Int8Params`` quantizes only on a move from the CPU, so INT8 takes each weight through host memory (FP16).

``bitsandbytes`` is imported on use; without it, BackendUnavailableError names the install command. Its import
never reaches the network: on CPUs with AVX512-BF16 its CPU backend fetches an optional kernel from the Hugging Face
Hub through the ``kernels`` package, which that import does not see (``hub_kernels_hidden``); bitsandbytes then runs
its own CPU kernels.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from mmedge.errors import BackendError, BackendUnavailableError

BNB_INSTALL = 'pip install "mmedge[torch,bitsandbytes]" (bitsandbytes >= 0.45; CUDA, or its CPU build)'
QUANTIZATIONS = ("int8", "nf4")
NF4_MIN_INPUTS = 64  # bitsandbytes' 4-bit kernels want at least one 64-value block per row
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (transformers' default)


def import_bitsandbytes():
    """The ``bitsandbytes`` module, or BackendUnavailableError naming it and how to install it."""
    try:
        with hub_kernels_hidden():
            import bitsandbytes
    except ImportError as exc:
        raise BackendUnavailableError(
            f"INT8/NF4 LLM weights need the Python package 'bitsandbytes', which cannot be imported ({exc})",
            "bitsandbytes importable beside torch", BNB_INSTALL) from None
    return bitsandbytes


HUB_KERNELS = "kernels"  # the Hugging Face package bitsandbytes' CPU backend fetches its gemm_4bit kernel with
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # where it warns that the hub kernel did not load


@contextlib.contextmanager
def hub_kernels_hidden():
    """What runs inside sees no ``kernels`` package, unless the Hugging Face Hub is in offline mode (the user's
    ``HF_HUB_OFFLINE=1``: ``kernels`` then loads only a kernel already in the local cache, without a connection).
    bitsandbytes' warning that the hub kernel did not load is dropped meanwhile: its own CPU kernels run instead."""
    hide = not _hub_offline()
    hidden = sys.modules.get(HUB_KERNELS)
    if hide:
        sys.modules[HUB_KERNELS] = None  # an import of it raises ImportError
    logger = logging.getLogger(BNB_CPU_LOGGER)
    no_hub_warning = _DropHubKernelWarning()
    logger.addFilter(no_hub_warning)
    try:
        yield
    finally:
        logger.removeFilter(no_hub_warning)
        if hide and hidden is None:
            sys.modules.pop(HUB_KERNELS, None)
        elif hide:
            sys.modules[HUB_KERNELS] = hidden


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing can fetch a kernel
        return True
    return bool(constants.HF_HUB_OFFLINE)


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def output_head_names(llm) -> tuple[str, ...]:
    """Names of the LLM's output head (and anything sharing its weight): kept in float, as transformers does."""
    head = llm.get_output_embeddings()
    if head is None:
        return ()
    return tuple(name for name, module in llm.named_modules() if module is head
                 or getattr(module, "weight", None) is head.weight)


def quantize_linear_layers(module, method: str, *, compute_dtype, device, skip: tuple[str, ...] = ()) -> dict:
    """Replace ``module``'s ``nn.Linear`` layers (but those named in ``skip``) by bitsandbytes ``method`` layers
    ("int8" or "nf4") on ``device``, in place. Returns what was replaced and what was kept float."""
    from mmedge.runtimes.torch_backend import import_torch

    torch = import_torch()
    bnb = import_bitsandbytes()
    if method not in QUANTIZATIONS:
        raise BackendUnavailableError(f"LLM quantization '{method}' is not supported",
                                      f"one of {', '.join(QUANTIZATIONS)}",
                                      "pass quantization='int8' (LLM.int8) or 'nf4'")
    replaced, kept = 0, []
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in skip or (method == "nf4" and child.in_features < NF4_MIN_INPUTS):
                kept.append(name)
                continue
            setattr(parent, child_name, _quantized_layer(torch, bnb, child, method, compute_dtype, device))
            replaced += 1
    if not replaced:
        raise BackendError(f"no Linear layer of the LLM could be quantized to {method}",
                           "nn.Linear layers with >= 64 inputs",
                           "load without quantization")
    return {"method": method, "library": f"bitsandbytes {getattr(bnb, '__version__', '?')}",
            "replaced_layers": replaced,
            "kept_float": kept}


def _quantized_layer(torch, bnb, linear, method: str, compute_dtype, device):
    """One bitsandbytes layer holding ``linear``'s weights, quantized as they land on ``device``."""
    weight = linear.weight.data.detach()  # [out, in]
    with torch.device("meta"):  # shapes only: the parameters are replaced below
        if method == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=INT8_THRESHOLD)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4")
    if method == "int8":  # Int8Params quantizes on a move from the host only
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    else:  # Params4bit quantizes on its first move to a device, from wherever the weight is
        layer.weight = bnb.nn.Params4bit(weight.to(dtype=compute_dtype), requires_grad=False, compress_statistics=False,
                                         quant_type="nf4")
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.detach().to(device), requires_grad=False)
    return layer.to(device)  # quantized here


__all__ = ["BNB_INSTALL", "QUANTIZATIONS", "import_bitsandbytes", "output_head_names", "quantize_linear_layers"]
