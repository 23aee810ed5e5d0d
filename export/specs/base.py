"""What every exported component declares: its wrapper module, tensors, dynamic axes and tolerance."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """dtype name and shape; a string in the shape is a named dynamic axis."""

    dtype: str
    shape: tuple[int | str, ...]

    def to_manifest(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


class ComponentSpec(abc.ABC):
    """One exported component. Subclasses set ``name``, ``inputs``, ``outputs`` and build the module."""

    name: str
    opset: int = 17
    max_abs: float = 1e-4  # FP32 export vs PyTorch, on fresh inputs
    min_cosine: float = 0.99999
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The wrapper whose forward takes ``inputs`` in order and returns ``outputs`` in order."""

    def traced_module(self) -> torch.nn.Module:
        """The module traced to ONNX: ``module()`` unless the graph writes some of its maths as other ops (the
        decoder's fused attention); parity is always measured against ``module()``."""
        return self.module()

    @abc.abstractmethod
    def sample_inputs(self, batch: int, sequence: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs for tracing or checking; dynamic axes take the given sizes."""

    def trace_inputs(self) -> dict[str, torch.Tensor]:
        return self.sample_inputs(batch=2, sequence=7, generator=torch.Generator().manual_seed(0))

    def check_inputs(self) -> dict[str, torch.Tensor]:
        """Fresh inputs whose dynamic sizes differ from the traced ones, so a baked-in shape shows up."""
        return self.sample_inputs(batch=3, sequence=11, generator=torch.Generator().manual_seed(1))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        tensors = {**self.inputs, **self.outputs}
        return {name: spec.dynamic_axes() for name, spec in tensors.items() if spec.dynamic_axes()}

    def reference_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the wrapper module holds beyond the checkpoint's weights (e.g. a baked label bank), saved with
        ``export --with-pytorch`` so the device's torch backend can rebuild the module (``Family.reference_module``)."""
        return {}

    def manifest_io(self) -> dict:
        return {
            "inputs": {n: s.to_manifest() for n, s in self.inputs.items()},
            "outputs": {n: s.to_manifest() for n, s in self.outputs.items()},
        }
