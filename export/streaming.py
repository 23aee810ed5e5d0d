"""Export for models whose weights do not fit in memory twice (BLIP-2 OPT-2.7B: 15 GB in FP32).

The TorchScript exporter normally copies every weight into the ONNX protobuf (and constant folding
makes transposed copies of every Linear weight), so a graph costs about twice its weights. For large
modules mmedge traces the graph alone (``export_params=False``: weights stay graph inputs, named by
their state-dict keys) and then writes each weight straight from the PyTorch tensor into one
``<name>.onnx.data`` file, one tensor at a time:

- ``Transpose(weight)`` feeding a MatMul is folded here (the exporter's constant folding is off), so
  quantizers still see a constant MatMul weight;
- ``Identity(weight)`` (the exporter's de-duplication of equal weights) is bypassed;
- offsets are aligned to 64 KiB so ONNX Runtime can memory-map the weights instead of copying them.

Once a component's graph and PyTorch reference outputs are written, ``free_weights`` drops the
weights no later component needs (they become ``meta`` tensors), so the ONNX Runtime parity session
does not sit beside the whole PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

ALIGNMENT = 64 * 1024  # Windows' allocation granularity; a multiple of every Linux page size
INLINE_BYTES = 1024  # smaller tensors stay inside the graph, as onnx.save does


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state-dict key, tied weights under every name (as the tracer may pick any)."""
    tensors = dict(module.named_buffers(remove_duplicate=False))
    tensors.update(module.named_parameters(remove_duplicate=False))
    return tensors


def attach_weights(graph: onnx.ModelProto, tensors: dict[str, torch.Tensor], user_inputs,
                   path: Path) -> onnx.ModelProto:
    """Turn the weight inputs of a graph traced with ``export_params=False`` into initializers whose
    data lives in ``<path.name>.data``. Returns ``graph``, changed in place."""
    body = graph.graph
    weights = {i.name for i in body.input if i.name not in user_inputs}
    unknown = weights - set(tensors)
    if unknown:
        raise KeyError(f"graph inputs that are neither declared inputs nor weights: {sorted(unknown)[:5]}")
    aliases = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity" and n.input[0] in weights}
    nodes = [n for n in body.node if n.output[0] not in aliases]
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = aliases.get(name, name)
    transposes = {n.output[0]: n for n in nodes if n.op_type == "Transpose" and n.input[0] in weights}
    kept = [n for n in nodes if n.output[0] not in transposes]
    graph_outputs = {o.name for o in body.output}
    if graph_outputs & (set(aliases) | set(transposes)):
        raise KeyError("a weight is a graph output")
    used = {name for node in kept for name in node.input}
    data_name = path.name + ".data"
    initializers = []
    with open(path.parent / data_name, "wb") as data:
        def add(name: str, array: np.ndarray) -> None:
            array = np.ascontiguousarray(array)
            if array.nbytes < INLINE_BYTES:
                initializers.append(numpy_helper.from_array(array, name))
                return
            offset = -data.tell() % ALIGNMENT
            data.write(b"\0" * offset)
            start = data.tell()
            data.write(memoryview(array).cast("B"))
            tensor = TensorProto(name=name, dims=array.shape,
                                 data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
            for key, value in (("location", data_name), ("offset", start), ("length", array.nbytes)):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = TensorProto.EXTERNAL
            initializers.append(tensor)

        with torch.no_grad():
            for output, node in transposes.items():
                if output not in used:
                    continue
                weight = tensors[node.input[0]]
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                perm = perm or list(range(weight.dim()))[::-1]
                add(output, weight.detach().permute(*perm).contiguous().numpy())
            for name in sorted(weights & used):
                add(name, tensors[name].detach().numpy())
    del body.node[:]
    body.node.extend(kept)
    inputs = [i for i in body.input if i.name not in weights]
    del body.input[:]
    body.input.extend(inputs)
    body.initializer.extend(initializers)
    return graph


def free_weights(done: torch.nn.Module, later: list[torch.nn.Module]) -> int:
    """Replace the weights of ``done`` that no module in ``later`` uses with ``meta`` tensors (shapes kept,
    memory freed). Returns the bytes freed. Tied weights are replaced everywhere they are registered."""
    keep = {id(p) for module in later for p in module.parameters()}
    freed, seen = 0, set()
    for module in done.modules():
        for key, param in list(module._parameters.items()):
            if param is None or id(param) in keep or param.device.type == "meta":
                continue
            if id(param) not in seen:
                seen.add(id(param))
                freed += param.numel() * param.element_size()
            module._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    _return_memory_to_os()
    return freed


def _return_memory_to_os() -> None:
    """glibc keeps freed heap pages (weights under its 32 MB mmap threshold) unless asked to trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): the allocator decides
        pass
