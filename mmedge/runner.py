"""The runner interface: one component of an artifact on one backend.

``infer`` checks the feeds against the component's declared inputs (names, dtypes, ranks, fixed
dimensions) and then calls the backend's ``_infer_impl``. Host arrays are cast (same kind) and made contiguous; a
device array (a ``DeviceArray`` or anything with ``__cuda_array_interface__``) is checked without a copy and handed
to the backend's ``_device_feed``, which binds it where it is or copies it to the host. Backends live in
``mmedge.runtimes`` and import their engines lazily.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mmedge.errors import FeedError, IntegrityError


@dataclass(frozen=True)
class TensorMeta:
    """A declared tensor: dtype name and shape, with None for a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    axis_names: tuple[str | None, ...]

    @classmethod
    def from_manifest(cls, name: str, spec: dict) -> "TensorMeta":
        shape = tuple(d if isinstance(d, int) else None for d in spec["shape"])
        axes = tuple(d if isinstance(d, str) else None for d in spec["shape"])
        return cls(name, spec["dtype"], shape, axes)


class DeviceArray(abc.ABC):
    """A stage output a backend left in its own memory (e.g. on the GPU) for the next stage.

    Subclasses set ``shape``, ``ndim``, ``dtype`` and implement ``numpy()`` (a host copy) and
    ``device_name()``; ``np.asarray`` works on any of them.
    """

    shape: tuple[int, ...]
    dtype: np.dtype

    @abc.abstractmethod
    def numpy(self) -> np.ndarray:
        """A host copy."""

    @abc.abstractmethod
    def device_name(self) -> str:
        """Where the data lives ("cuda", "cpu", ...)."""

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array.astype(dtype) if dtype is not None else array

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, device={self.device_name()})"


def is_device_array(value: Any) -> bool:
    """A ``DeviceArray`` or another library's GPU array (``__cuda_array_interface__``), not a numpy array."""
    return not isinstance(value, np.ndarray) and (isinstance(value, DeviceArray)
                                                  or hasattr(value, "__cuda_array_interface__"))


def device_layout(value: Any) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, C-contiguous) of a device array, read without touching its data."""
    interface = getattr(value, "__cuda_array_interface__", None)
    if interface is None:  # a DeviceArray in host memory
        return tuple(value.shape), np.dtype(value.dtype), True
    shape, dtype = tuple(interface["shape"]), np.dtype(interface["typestr"])
    strides = interface.get("strides")
    return shape, dtype, strides is None or tuple(strides) == contiguous_strides(shape, dtype)


def contiguous_strides(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """The strides (bytes) of a C-contiguous array of ``shape`` and ``dtype``."""
    strides, step = [], dtype.itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= int(dim)
    return tuple(reversed(strides))


def _tensor_matches(dtype: Any, dims: Sequence | None, meta: TensorMeta) -> bool:
    """``Runner._check_graph_tensors``' test of one tensor."""
    if dtype is None or np.dtype(dtype) != np.dtype(meta.dtype):
        return False
    if dims is None:  # a graph of dynamic rank: its runs are checked against the manifest's rank
        return True
    dims = list(dims)
    return len(dims) == len(meta.shape) and all(not isinstance(dim, int) or want is None or dim == want
                                                for dim, want in zip(dims, meta.shape))


class Runner(abc.ABC):
    """Base class: validates feeds, then delegates to ``_infer_impl``."""

    backend: str = "abstract"
    # whether a GPU array fed in place must be C-contiguous (the engine reads raw memory)
    device_feeds_contiguous: bool = True

    def __init__(self, component_name: str, component: dict):
        self.component_name = component_name
        self._inputs = {n: TensorMeta.from_manifest(n, s) for n, s in component["inputs"].items()}
        self._outputs = {n: TensorMeta.from_manifest(n, s) for n, s in component["outputs"].items()}

    def _check_graph_tensors(self, graph: Mapping[str, tuple[Any, Sequence | None, str]]) -> None:
        """At load: each declared input and output has the graph's dtype, rank and fixed dims (a hand-edited width
        had run and validated "ok"). ``graph``: per tensor name (each declared one present; the backend checked the
        names), its numpy dtype (None where mmedge has none for the graph's type), its dims (an int for a fixed size,
        anything else for a dynamic one; None where the rank itself is dynamic) and how the backend writes its type
        and shape, for the message. A dim the graph or the manifest leaves dynamic matches any size."""
        for kind, declared in (("input", self._inputs), ("output", self._outputs)):
            for name, meta in declared.items():
                dtype, dims, written = graph[name]
                if not _tensor_matches(dtype, dims, meta):
                    raise IntegrityError(
                        f"component '{self.component_name}' graph {kind} '{name}' is {written}, which does not match "
                        "its manifest entry",
                        f"{meta.dtype} of shape {self._describe(meta)} (a named axis matches any size)",
                        "re-export the artifact; graph and manifest come from different exports",
                    )

    def input_metadata(self) -> dict[str, TensorMeta]:
        return dict(self._inputs)

    def output_metadata(self) -> dict[str, TensorMeta]:
        return dict(self._outputs)

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return self._infer_impl(self._check_feeds(feeds))

    @abc.abstractmethod
    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run the graph on checked feeds; return every declared output by name."""

    def close(self) -> None:
        """Release the engine's resources. Safe to call twice."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- feed checking -----------------------------------------------------------------------
    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        extra = [n for n in feeds if n not in self._inputs]
        if missing or extra:
            raise FeedError(
                f"component '{self.component_name}' got inputs {sorted(feeds)}"
                + (f", missing {missing}" if missing else "")
                + (f", unknown {extra}" if extra else ""),
                f"exactly {sorted(self._inputs)}",
                "pass the inputs named by runner.input_metadata()",
            )
        return {name: self._check_one(self._inputs[name], feeds[name]) for name in self._inputs}

    def _check_one(self, meta: TensorMeta, value: Any) -> Any:
        if is_device_array(value):
            self._check_device_array(meta, value)
            return self._device_feed(meta, value)
        return self._check_host(meta, value)

    # --- device arrays: the backend's hooks ----------------------------------------------------------
    def _feed_dtype(self, meta: TensorMeta) -> np.dtype:
        """The dtype a device array fed as ``meta`` must have (the backend may know better than the manifest)."""
        return np.dtype(meta.dtype)

    def _accepts_device_dtype(self, meta: TensorMeta, dtype: np.dtype) -> bool:
        return dtype == self._feed_dtype(meta)

    def _device_feed(self, meta: TensorMeta, value: Any) -> Any:
        """What the backend runs a checked device array as: by default a host copy."""
        return np.asarray(value)

    def _check_device_array(self, meta: TensorMeta, value: Any) -> tuple[tuple[int, ...], np.dtype]:
        shape, dtype, contiguous = device_layout(value)
        where = f"component '{self.component_name}' input '{meta.name}'"
        if not contiguous and self.device_feeds_contiguous:
            raise FeedError(f"{where} is a non-contiguous GPU array", "a C-contiguous GPU array",
                            "make it contiguous (e.g. .contiguous() / cupy.ascontiguousarray)")
        if not self._accepts_device_dtype(meta, dtype):
            raise FeedError(f"{where} is a device array of dtype {dtype}", f"{self._feed_dtype(meta)}",
                            "convert it on its device before feeding it")
        if len(shape) != len(meta.shape) or any(w is not None and w != g for w, g in zip(meta.shape, shape)):
            raise FeedError(f"{where} is a device array shaped {list(shape)}", f"shape {self._describe(meta)}",
                            "reshape the input to the declared shape")
        return shape, dtype

    # --- host arrays -----------------------------------------------------------------------------------
    def _check_host(self, meta: TensorMeta, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != np.dtype(meta.dtype):
            if not np.can_cast(array.dtype, np.dtype(meta.dtype), casting="same_kind"):
                raise FeedError(
                    f"component '{self.component_name}' input '{meta.name}' has dtype {array.dtype}",
                    f"{meta.dtype}",
                    f"convert it with .astype(np.{meta.dtype})",
                )
            array = array.astype(meta.dtype)
        if array.ndim != len(meta.shape):
            raise FeedError(
                f"component '{self.component_name}' input '{meta.name}' has shape {list(array.shape)}",
                f"rank {len(meta.shape)} shaped {self._describe(meta)}",
                "reshape the input to the declared rank",
            )
        for axis, (want, got) in enumerate(zip(meta.shape, array.shape)):
            if want is not None and want != got:
                raise FeedError(
                    f"component '{self.component_name}' input '{meta.name}' has size {got} on axis {axis}",
                    f"shape {self._describe(meta)}",
                    "resize the input (images go through the artifact's preprocessing)",
                )
        return np.ascontiguousarray(array)

    @staticmethod
    def _describe(meta: TensorMeta) -> str:
        return "[" + ", ".join(str(d) if d is not None else str(a) for d, a in zip(meta.shape, meta.axis_names)) + "]"
