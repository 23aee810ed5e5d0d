"""GPU memory and streams for the TensorRT backend, through cuda-python (no torch on the device).

- ``CudaRuntime``: the few CUDA runtime calls the backend makes, each checked (a failure is a BackendError naming
  the call). ``cuda.bindings.runtime`` (cuda-python >= 12.6), else the older ``cuda.cudart``.
- ``DevicePool``: device buffers of a runner's kept-on-device outputs, reused from call to call. ``cudaFree``
  synchronizes the whole device, and a KV-cached decoder returns every present of every layer each step, so a
  ``cudaMalloc`` / ``cudaFree`` per output per step stalled the GPU dozens of times per token. A buffer now goes back
  to its runner's pool when its ``DeviceTensor`` is garbage collected, and the next call takes it for the same
  output if it is large enough. Buffers are rounded up to one of four sizes per power of two, so a cache growing
  a token per step reuses its buffers for many steps: steady-state decode steps allocate nothing, and a new size
  class costs one allocation per output (and frees that output's outgrown buffers).
- ``DeviceTensor``: a contiguous tensor in GPU memory, read by other runners and by CuPy / PyTorch / Numba through
  ``__cuda_array_interface__`` (v3).
- ``cai_stream``: the stream a ``__cuda_array_interface__`` feed was produced on (its v3 ``stream`` key), which the
  runner's stream must wait for before reading it; ``check_alignment``: its address, refused unless 256-byte aligned
  (TensorRT binds no other).

Nothing here imports cuda-python at import time; ``CudaRuntime()`` does.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Mapping

import numpy as np

from mmedge.errors import BackendError, BackendUnavailableError, FeedError
from mmedge.runner import DeviceArray

INSTALL = ('pip install "mmedge[tensorrt]" (TensorRT 10.x and cuda-python); on a Jetson TensorRT comes with JetPack: '
           "sudo apt install python3-libnvinfer, then pip install cuda-python")
LEGACY_STREAM, PER_THREAD_STREAM = 1, 2  # the CAI v3 stream values of CUDA's two default streams (their handles)


def import_cudart():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (cuda-python >= 12.6), else ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend 'tensorrt' needs the Python package 'cuda-python' for GPU buffers, which cannot be "
                f"imported ({exc})",
                "cuda-python importable as 'cuda.bindings.runtime' or 'cuda.cudart'", INSTALL) from None
    return cudart


class CudaRuntime:
    """The few CUDA runtime calls the backend makes, each checked: a failure is a BackendError naming the call."""

    def __init__(self, device_id: int = 0):
        self.rt = import_cudart()
        self.device_id = device_id
        self.use_device()

    def check(self, result: Any, call: str) -> Any:
        values = result if isinstance(result, tuple) else (result,)
        error, rest = values[0], values[1:]
        if error != self.rt.cudaError_t.cudaSuccess:
            try:
                name = self.rt.cudaGetErrorName(error)[1].decode()
            except Exception:  # the error path must not fail on its own description
                name = str(error)
            hint = (" (a cuda-python built for a newer CUDA than the driver's: install the cuda-python whose major "
                    "version matches the CUDA version nvidia-smi shows, e.g. pip install 'cuda-python<13')"
                    if "InsufficientDriver" in name else "")
            raise BackendError(f"CUDA call {call} failed on GPU {self.device_id} ({name})",
                               "a working NVIDIA driver and a free, visible GPU",
                               "check `nvidia-smi` (on a Jetson: `tegrastats`), CUDA_VISIBLE_DEVICES and "
                               "free GPU memory" + hint)
        return rest[0] if len(rest) == 1 else (rest or None)

    def use_device(self) -> None:
        self.check(self.rt.cudaSetDevice(self.device_id), "cudaSetDevice")

    def identity(self) -> tuple[str, str]:
        """(GPU name, compute capability "major.minor") of this device, as the engine key records them."""
        props = self.check(self.rt.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.strip("\x00 "), f"{props.major}.{props.minor}"

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        free, total = self.check(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        self.check(self.rt.cudaFree(pointer), "cudaFree")

    def free_quietly(self, pointer: int) -> None:
        """``free`` for finalizers and cleanup, which must not raise."""
        try:
            self.free(pointer)
        except Exception:  # at interpreter exit the driver may already be gone
            pass

    def stream(self):
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def destroy_stream(self, stream) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event(self):
        """An event for ordering streams (no timing: cheaper to record and wait on)."""
        return self.check(self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")

    def destroy_event(self, event) -> None:
        self.check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def wait_for(self, stream, producer: int, event) -> None:
        """Make ``stream`` wait for the work queued so far on ``producer`` (a stream handle), without blocking the
        host."""
        self.check(self.rt.cudaEventRecord(event, producer), "cudaEventRecord (on the feed's stream)")
        self.check(self.rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def to_device(self, pointer: int, array: np.ndarray, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
                   "cudaMemcpyAsync (to GPU)")

    def to_host(self, array: np.ndarray, pointer: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
                   "cudaMemcpyAsync (to host)")

    def synchronize(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


# --- reused output buffers ---------------------------------------------------------------------------
def size_class(nbytes: int) -> int:
    """Bytes to allocate for ``nbytes``: at least 256, else rounded up to one of four sizes per power of two
    (1.25, 1.5, 1.75 and 2 times the one below), so at most 25% more than asked."""
    n = max(int(nbytes), 1)
    if n <= 256:
        return 256
    step = 1 << ((n - 1).bit_length() - 3)  # a quarter of the power of two below n
    return -(-n // step) * step


class DevicePool:
    """Reusable device buffers of one runner's outputs, per output name.

    ``take(name, nbytes)`` returns ``(pointer, capacity)``: the smallest idle buffer of that output holding
    ``nbytes``, else a new one of ``size_class(nbytes)`` bytes (the output's idle buffers, all too small, are freed:
    its shapes have grown past them). ``give_back`` returns a buffer (a ``DeviceTensor``'s finalizer calls it);
    after ``close`` given-back buffers are freed. Keyed by name and capacity, not by exact shape: a decoder's
    presents grow a token per step, so exact shapes never repeat. ``malloc`` / ``free``: ``CudaRuntime``'s
    ``malloc`` and ``free_quietly``.
    ``allocations`` and ``frees`` count the calls made.
    """

    def __init__(self, malloc: Callable[[int], int], free: Callable[[int], None]):
        self._malloc, self._free = malloc, free
        self._idle: dict[str, list[tuple[int, int]]] = {}  # output name -> [(capacity, pointer)]
        self._lock = threading.RLock()  # reentrant: a finalizer may give a buffer back while this thread holds it
        self._closed = False
        self.allocations = 0
        self.frees = 0

    def take(self, name: str, nbytes: int) -> tuple[int, int]:
        with self._lock:
            if self._closed:
                raise BackendError(f"the output buffers of '{name}' were asked for after their runner closed",
                                   "an open runner", "create a new runner")
            idle = self._idle.setdefault(name, [])
            fitting = [block for block in idle if block[0] >= nbytes]
            if fitting:
                capacity, pointer = min(fitting)
                idle.remove((capacity, pointer))
                return pointer, capacity
            outgrown, idle[:] = list(idle), []
            for _, pointer in outgrown:
                self._release(pointer)
            capacity = size_class(nbytes)
            pointer = self._malloc(capacity)
            self.allocations += 1
            return pointer, capacity

    def give_back(self, name: str, pointer: int, capacity: int) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(name, []).append((capacity, pointer))
                return
            self._release(pointer)

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(capacity for blocks in self._idle.values() for capacity, _ in blocks)

    def close(self) -> None:
        """Free the idle buffers; buffers still held by tensors are freed when those are collected."""
        with self._lock:
            self._closed = True
            blocks, self._idle = [b for blocks in self._idle.values() for b in blocks], {}
            for _, pointer in blocks:
                self._release(pointer)

    def _release(self, pointer: int) -> None:
        self.frees += 1
        self._free(pointer)


class DeviceTensor(DeviceArray):
    """A contiguous tensor in GPU memory, left there by a TensorRT runner for the next stage.

    Feed it to another TensorRT runner (no copy), read it into numpy with ``numpy()`` or ``np.asarray``, or
    hand it to CuPy / PyTorch / Numba through ``__cuda_array_interface__`` (version 3). Its memory comes from its
    runner's ``DevicePool`` (or its own ``cudaMalloc`` without one) and goes back there when the object is garbage
    collected: a consumer on another stream keeps the object alive until its work on it is done.
    """

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: np.dtype, *, pool: DevicePool | None = None,
                 name: str = ""):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._cuda = cuda
        if pool is None:
            self.ptr = cuda.malloc(self.nbytes)
            self._finalizer = weakref.finalize(self, cuda.free_quietly, self.ptr)
        else:
            self.ptr, capacity = pool.take(name, self.nbytes)
            self._finalizer = weakref.finalize(self, pool.give_back, name, self.ptr, capacity)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}  # written and synchronized before it is returned

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        stream = self._cuda.stream()
        try:
            self._cuda.to_host(out, self.ptr, stream)
            self._cuda.synchronize(stream)
        finally:
            self._cuda.destroy_stream(stream)
        return out

    def device_name(self) -> str:
        return "cuda"

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={list(self.shape)}, dtype={self.dtype}, gpu={self._cuda.device_id})"


# --- feeds from other streams -------------------------------------------------------------------------
def cai_stream(interface: Mapping[str, Any], what: str) -> int | None:
    """The stream handle a ``__cuda_array_interface__`` says its data is being written on (v3 ``stream`` key), or None
    when the producer needs no synchronization (no key, or ``None``). 1 and 2 are CUDA's legacy and per-thread default
    streams (the same values as their handles); 0 is disallowed by the interface. ``what`` names the feed in errors."""
    stream = interface.get("stream")
    if stream is None:
        return None
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise FeedError(f"{what} is a GPU array whose __cuda_array_interface__ stream is {stream!r}",
                        "None or a stream handle (an int)", "export the array from its library unchanged")
    if stream == 0:
        raise FeedError(f"{what} is a GPU array whose __cuda_array_interface__ stream is 0, which the interface "
                        "disallows (it cannot tell the legacy from the per-thread default stream)",
                        f"None, {LEGACY_STREAM} (legacy default stream), {PER_THREAD_STREAM} (per-thread "
                        "default stream) "
                        "or a stream handle",
                        "produce the array on a named stream, or export it with the library's own "
                        "__cuda_array_interface__")
    return stream



TENSOR_ALIGNMENT = 256  # bytes: TensorRT binds an input or output only at an address aligned to this


def check_alignment(interface: Mapping[str, Any], what: str) -> int:
    """The device address of a ``__cuda_array_interface__`` feed, or FeedError when it is not aligned to
    ``TENSOR_ALIGNMENT`` bytes, which TensorRT requires (``set_tensor_address`` refuses it): a contiguous slice at an
    offset into a larger allocation (``x[1:]``) passes the contiguity check but starts mid-allocation. ``what``
    names the feed in errors."""
    pointer = int(interface["data"][0])
    if pointer % TENSOR_ALIGNMENT:
        raise FeedError(f"{what} is a GPU array at address {pointer:#x}, which is not {TENSOR_ALIGNMENT}-byte aligned "
                        f"(it starts {pointer % TENSOR_ALIGNMENT} bytes past an aligned address, e.g. a slice at an "
                        "offset into a larger array)",
                        f"a GPU array whose data starts at a multiple of {TENSOR_ALIGNMENT} bytes (TensorRT binds "
                        "no other)",
                        "copy it into its own allocation first (x.copy() in CuPy, x.clone() in PyTorch)")
    return pointer

__all__ = ["CudaRuntime", "DevicePool", "DeviceTensor", "INSTALL", "TENSOR_ALIGNMENT", "cai_stream", "check_alignment",
           "import_cudart", "size_class"]
