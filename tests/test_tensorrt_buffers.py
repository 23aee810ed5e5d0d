"""The TensorRT backend's GPU memory and streams (``mmedge.runtimes.cuda_buffers``), as far as a machine without a GPU
can show them: the output pool's bookkeeping over a decoder's growing cache (plain integers stand for pointers),
the ``__cuda_array_interface__`` stream field, cuda-python's real error path, and a stubs-only ``tensorrt`` folder.
With a GPU and cuda-python (no TensorRT needed), the stream ordering and the pool run on real memory (``-m gpu``).
"""

from __future__ import annotations

import gc
import itertools
import sys

import numpy as np
import pytest

from mmedge.device import _engine_versions, importable
from mmedge.errors import BackendError, BackendUnavailableError, FeedError
from mmedge.runtimes.cuda_buffers import (
    LEGACY_STREAM,
    PER_THREAD_STREAM,
    CudaRuntime,
    DevicePool,
    DeviceTensor,
    cai_stream,
    check_alignment,
    size_class,
)
from tests.support.battery import api_error, check_error

HAVE_CUDA_PYTHON = importable("cuda.bindings") or importable("cuda.cudart")


class Ledger:
    """malloc / free over integers, recording what is live: the pool must never hand out a live buffer twice."""

    def __init__(self):
        self.next = itertools.count(1 << 20, 1 << 20)
        self.live: dict[int, int] = {}  # pointer -> bytes
        self.freed: list[int] = []

    def malloc(self, nbytes: int) -> int:
        pointer = next(self.next)
        self.live[pointer] = nbytes
        return pointer

    def free(self, pointer: int) -> None:
        assert pointer in self.live, f"free of {pointer:#x}, which is not allocated"
        del self.live[pointer]
        self.freed.append(pointer)


# --- size classes ------------------------------------------------------------------------------------
def test_size_classes_waste_at_most_a_quarter_and_repeat_over_growing_requests():
    for n in [1, 255, 256, 257, 640, 1000, 1024, 1025, 3 * 2**20 + 7, 10**9]:
        c = size_class(n)
        assert c >= n and (c <= 256 or c <= 1.25 * n), (n, c)
    assert size_class(600) == 640 and size_class(1000) == 1024 and size_class(1025) == 1280
    grown = [size_class(32 * 4 * t * 64 * 2) for t in range(33, 513)]  # a cache of 33..512 tokens
    assert len(set(grown)) <= 4 * 4 + 1  # four classes per doubling, four doublings


# --- the pool over a decoder's steps -----------------------------------------------------------------
def decode(pool: DevicePool, steps: range, names: list[str], ledger: Ledger, batch=1, heads=8, head_dim=64):
    """Run ``steps`` like RunnerDecoder: each step's presents [batch, heads, t, head_dim] (fp16) come from the pool,
    the previous step's are dropped after it; logits [batch, 1, 1000] are read and dropped. Returns the number of
    allocations per step."""
    past: list[tuple[str, int, int]] = []
    per_step = []
    for t in steps:
        before = pool.allocations
        present = [(n, *pool.take(n, batch * heads * t * head_dim * 2)) for n in names]
        logits = pool.take("logits", batch * 1000 * 4)
        held = [p for _, p, _ in present] + [logits[0]] + [p for _, p, _ in past]
        assert len(set(held)) == len(held), "a buffer in use was handed out again"
        assert all(p in ledger.live for p in held)
        pool.give_back("logits", *logits)
        for name, pointer, capacity in past:  # the decoder replaces its pasts
            pool.give_back(name, pointer, capacity)
        past = present
        per_step.append(pool.allocations - before)
    for name, pointer, capacity in past:
        pool.give_back(name, pointer, capacity)
    return per_step


def test_steady_state_decode_steps_allocate_nothing():
    ledger = Ledger()
    pool = DevicePool(ledger.malloc, ledger.free)
    names = [f"present.{layer}.{kind}" for layer in range(32) for kind in ("key", "value")]
    per_step = decode(pool, range(40, 300), names, ledger)
    busy = [i for i, n in enumerate(per_step) if n]
    # allocations only on the two steps after the cache crosses into a new size class (two generations are alive:
    # the pasts read and the presents written), and once for the logits
    classes = {size_class(8 * t * 64 * 2) for t in range(40, 300)}
    assert len(busy) <= 2 * len(classes) + 1, busy
    assert sum(per_step) <= 1 + 2 * len(names) * len(classes)
    assert per_step[-1] == 0 and len(busy) < len(per_step) // 8
    # the memory held stays proportional to the cache: outgrown buffers were freed on the way
    largest = size_class(8 * 299 * 64 * 2)
    assert sum(ledger.live.values()) <= 3 * len(names) * largest + 2 * size_class(4000)


def test_a_buffer_is_reused_for_its_own_output_only_and_best_fit():
    ledger = Ledger()
    pool = DevicePool(ledger.malloc, ledger.free)
    small, big = pool.take("a", 1000), pool.take("a", 5000)
    pool.give_back("a", *small)
    pool.give_back("a", *big)
    other = pool.take("b", 500)  # another output: never a's buffers
    assert other[0] not in (small[0], big[0])
    assert pool.take("a", 900) == small  # the smallest that fits
    assert pool.take("a", 4000) == big
    pool.give_back("a", *small)
    grown = pool.take("a", 2000)  # none idle fits: a's outgrown buffer is freed, a new one made
    assert small[0] in ledger.freed and grown[1] == size_class(2000)
    assert pool.allocations == 4 and pool.frees == 1


def test_closing_frees_idle_buffers_and_later_returns():
    ledger = Ledger()
    pool = DevicePool(ledger.malloc, ledger.free)
    kept, idle = pool.take("x", 100), pool.take("x", 100)
    pool.give_back("x", *idle)
    assert pool.idle_bytes() == idle[1]
    pool.close()
    assert list(ledger.live) == [kept[0]]
    pool.give_back("x", *kept)  # a tensor collected after its runner closed
    assert not ledger.live
    api_error(lambda: pool.take("x", 100), BackendError, "after their runner closed")


def test_device_tensors_return_their_buffer_when_collected():
    ledger = Ledger()
    pool = DevicePool(ledger.malloc, ledger.free)
    cuda = object()  # only numpy() and repr() touch CUDA; the pool does the memory
    first = DeviceTensor(cuda, (2, 4, 9, 64), np.float16, pool=pool, name="present.0.key")
    pointer = first.ptr
    assert first.__cuda_array_interface__["data"] == (pointer, False) and first.nbytes == 2 * 4 * 9 * 64 * 2
    second = DeviceTensor(cuda, (2, 4, 9, 64), np.float16, pool=pool, name="present.0.key")
    assert second.ptr != pointer  # first is alive: its buffer is not handed out
    del first
    gc.collect()
    third = DeviceTensor(cuda, (2, 4, 10, 64), np.float16, pool=pool, name="present.0.key")
    assert third.ptr == pointer and pool.allocations == 2  # one token more fits the same size class


# --- the producer's stream of a GPU feed -----------------------------------------------------------
@pytest.mark.parametrize("interface,stream", [({"version": 2}, None), ({"version": 3, "stream": None}, None),
                                              ({"stream": LEGACY_STREAM}, 1), ({"stream": PER_THREAD_STREAM}, 2),
                                              ({"stream": 0x55D0C0FFEE}, 0x55D0C0FFEE)])
def test_cai_stream_names_the_stream_to_wait_for(interface, stream):
    assert cai_stream(interface, "input 'x'") == stream


@pytest.mark.parametrize("value,words", [(0, "disallows"), (-3, "-3"), (True, "True"), ("1", "'1'")])
def test_cai_stream_refuses_what_the_interface_does_not_allow(value, words):
    api_error(lambda: cai_stream({"stream": value}, "component 'vision' input 'x'"), FeedError,
              "component 'vision' input 'x'", words)


# --- addresses TensorRT binds --------------------------------------------------------------------------
def test_gpu_feeds_must_be_256_byte_aligned():
    """TensorRT binds only 256-byte aligned addresses; an offset slice is contiguous but starts mid-allocation: refused
    when fed, before any GPU work, with the fix."""
    assert check_alignment({"data": (0x7F3A_0000_0100, False)}, "input 'x'") == 0x7F3A_0000_0100
    assert check_alignment({"data": (0, False)}, "input 'x'") == 0  # an empty array
    api_error(lambda: check_alignment({"data": (0x7F3A_0000_0100 + 4 * 7, False)}, "component 'vision' input 'x'"),
              FeedError, "component 'vision' input 'x'", "not 256-byte aligned", "28 bytes past", "x.copy()")


def test_an_address_tensorrt_refuses_is_an_error_not_an_unbound_tensor():
    """set_tensor_address returns False (the tensor stays unbound) for an address it will not take: the run must not
    go on. A feed's is a FeedError naming the tensor; an output buffer's, mmedge's own, a BackendError."""
    from mmedge.runtimes.tensorrt import bind_address

    bound: list[tuple[str, int]] = []
    bind_address(lambda name, pointer: bound.append((name, pointer)) or True, "pixel_values", 0x1000, "vision")
    assert bound == [("pixel_values", 0x1000)]
    api_error(lambda: bind_address(lambda name, pointer: False, "pixel_values", 0x1010, "vision"), FeedError,
              "refused address 0x1010 for input 'pixel_values' of component 'vision'", "aligned to 256 bytes",
              "x.copy()")
    api_error(lambda: bind_address(lambda name, pointer: False, "image_embeds", 0x2000, "vision", feed=False),
              BackendError, "output 'image_embeds'")


@pytest.mark.parametrize("shape", [(2, -1), (-1, 512)])
def test_outputs_with_data_dependent_dims_are_refused_on_every_path(shape):
    """A -1 dim has no size: refused for host and GPU outputs alike (a GPU buffer sized from it would be negative)."""
    from mmedge.runtimes.tensorrt import output_shape

    assert output_shape("image_embeds", "vision", (2, 512)) == (2, 512)
    api_error(lambda: output_shape("boxes", "detector", shape), BackendError,
              f"output 'boxes' of component 'detector' has a data-dependent shape {list(shape)}", "ONNX Runtime")


# --- cuda-python without a GPU, and TensorRT's stubs mistaken for TensorRT ------------------------------
@pytest.mark.skipif(not HAVE_CUDA_PYTHON, reason="cuda-python is not installed (it comes with the test extra on Linux)")
def test_cuda_failures_are_typed_errors_naming_the_call():
    try:
        cuda = CudaRuntime(0)
    except BackendError as exc:
        check_error(exc, BackendError, "CUDA call cudaSetDevice failed on GPU 0", "nvidia-smi")
        return
    cuda.free(0)  # a GPU is here: freeing nothing succeeds, so try a call that must fail
    with pytest.raises(BackendError) as info:
        cuda.malloc(1 << 62)
    check_error(info.value, BackendError, "CUDA call cudaMalloc failed")


def test_a_stubs_only_tensorrt_folder_is_not_tensorrt(tmp_path, monkeypatch):
    """tensorrt-stubs installs tensorrt/__init__.pyi and nothing else: it imports as an empty namespace package."""
    if importable("tensorrt"):
        pytest.skip("TensorRT is installed: a stubs folder would not shadow it")
    from mmedge.runtimes.tensorrt import import_tensorrt

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert not importable("tensorrt") and _engine_versions()["tensorrt"] is None
        api_error(import_tensorrt, BackendUnavailableError, "without TensorRT's bindings", "tensorrt-stubs")
    finally:
        sys.modules.pop("tensorrt", None)  # the namespace import_tensorrt imported, not to be found by later tests


# --- with a GPU: real memory and streams (cuda-python, no TensorRT) ------------------------------------------
@pytest.fixture
def gpu():
    if not HAVE_CUDA_PYTHON:
        pytest.skip("cuda-python is not installed")
    try:
        return CudaRuntime(0)
    except BackendError as exc:
        pytest.skip(f"no usable GPU here ({exc.what})")


@pytest.mark.gpu
def test_a_feed_written_on_another_stream_is_read_after_it(gpu):
    """A producer's copy on its own stream, then the consumer's copy on another: the event makes the consumer wait."""
    producer, consumer, event = gpu.stream(), gpu.stream(), gpu.event()
    data = np.arange(1 << 22, dtype=np.float32)  # [4M], 16 MiB: long enough to still be in flight
    tensor = DeviceTensor(gpu, data.shape, data.dtype)
    out = np.zeros_like(data)
    try:
        gpu.to_device(tensor.ptr, data, producer)
        stream = cai_stream({"stream": int(producer)}, "input 'x'")
        assert stream is not None
        gpu.wait_for(consumer, stream, event)
        gpu.to_host(out, tensor.ptr, consumer)
        gpu.synchronize(consumer)
        np.testing.assert_array_equal(out, data)
    finally:
        gpu.synchronize(producer)
        gpu.destroy_event(event)
        gpu.destroy_stream(producer)
        gpu.destroy_stream(consumer)


@pytest.mark.gpu
def test_the_pool_reuses_real_device_memory(gpu):
    pool = DevicePool(gpu.malloc, gpu.free_quietly)
    values = np.arange(2 * 4 * 9 * 16, dtype=np.float32).reshape(2, 4, 9, 16)
    first = DeviceTensor(gpu, (2, 4, 9, 16), np.float32, pool=pool, name="present.0.key")
    pointer = first.ptr
    del first
    gc.collect()
    second = DeviceTensor(gpu, (2, 4, 9, 16), np.float32, pool=pool, name="present.0.key")
    stream = gpu.stream()
    try:
        gpu.to_device(second.ptr, values, stream)
        gpu.synchronize(stream)
    finally:
        gpu.destroy_stream(stream)
    assert second.ptr == pointer and pool.allocations == 1
    np.testing.assert_array_equal(second.numpy(), values)
    del second
    pool.close()
    assert pool.frees == 1
