"""Export specs: one class per exported component; a family is a list of specs."""

from mmedge.export.specs.base import ComponentSpec, TensorSpec

__all__ = ["ComponentSpec", "TensorSpec"]
