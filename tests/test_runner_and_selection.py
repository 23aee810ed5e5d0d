"""Runner feed checks, the ONNX Runtime backend's options, backend selection over described devices."""

import os
import stat

import numpy as np
import pytest

from mmedge.artifact import Artifact, atomic_folder
from mmedge.device import DeviceProbe, GpuInfo, _cpu_flags, parse_jetson
from mmedge.errors import ArtifactError, BackendError, BackendUnavailableError, FeedError, InputError
from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner, OrtOptions, _provider_options
from mmedge.selection import plan


@pytest.fixture(scope="module")
def vision_runner(clip_artifacts):
    artifact = Artifact.open(clip_artifacts("fp32"))
    runner = OnnxRuntimeRunner(artifact.component_path("vision"), "vision", artifact.component("vision"),
                               OrtOptions(threads=1))
    yield runner
    runner.close()


def test_input_metadata_names_dynamic_axes(vision_runner):
    meta = vision_runner.input_metadata()["pixel_values"]
    assert meta.dtype == "float32" and meta.shape == (None, 3, 32, 32) and meta.axis_names[0] == "batch"


def test_infer_returns_declared_outputs(vision_runner):
    out = vision_runner.infer({"pixel_values": np.zeros((5, 3, 32, 32), np.float32)})
    assert set(out) == {"image_embeds"} and out["image_embeds"].shape == (5, 16)


def test_float64_feeds_are_cast(vision_runner):
    out = vision_runner.infer({"pixel_values": np.zeros((1, 3, 32, 32))})
    assert out["image_embeds"].dtype == np.float32


@pytest.mark.parametrize("feeds,match", [
    ({}, "missing"),
    ({"pixel_values": np.zeros((1, 3, 32, 32), np.float32), "extra": 1}, "unknown"),
    ({"pixel_values": np.zeros((3, 32, 32), np.float32)}, "rank 4"),
    ({"pixel_values": np.zeros((1, 3, 31, 32), np.float32)}, "axis 2"),
    ({"pixel_values": np.zeros((1, 3, 32, 32), np.complex64)}, "dtype complex64"),
])
def test_bad_feeds(vision_runner, feeds, match):
    with pytest.raises(FeedError, match=match):
        vision_runner.infer(feeds)


def test_closed_runner_refuses(clip_artifacts):
    artifact = Artifact.open(clip_artifacts("fp32"))
    runner = OnnxRuntimeRunner(artifact.component_path("vision"), "vision", artifact.component("vision"))
    runner.close()
    runner.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        runner.infer({"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})


def test_absent_provider_is_refused_with_install_hint(clip_artifacts):
    artifact = Artifact.open(clip_artifacts("fp32"))
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OnnxRuntimeRunner(artifact.component_path("vision"), "vision", artifact.component("vision"),
                          OrtOptions(providers=("cuda",)))


def test_tensorrt_provider_options(tmp_path):
    opts = _provider_options("tensorrt", OrtOptions(fp16=True, engine_cache=tmp_path, device_id=1))
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_engine_cache_enable"] and opts["device_id"] == 1


# --- selection over described devices ----------------------------------------------------------
MANIFEST = {"components": {"vision": {"precision": "int8"}, "text": {"precision": "int8"}}}


def device(**overrides):
    base = dict(machine="x86_64", system="Linux", cpu_cores=8, cpu_flags=["avx2"], memory_total_mb=16000, gpus=[],
                jetson=None, engines={"onnxruntime": "1.20", "tensorrt": None, "torch": None}, ort_providers=["cpu"])
    return DeviceProbe(**{**base, **overrides})


CPU_BOX = device()
DESKTOP_RTX = device(gpus=[GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24564, 23000)],
                     ort_providers=["cpu", "cuda", "tensorrt"], engines={"onnxruntime": "1.20", "tensorrt": "10.3"})
JETSON_ORIN = device(machine="aarch64", cpu_cores=12,
                     jetson={"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "36.3.0",
                                                                "unified_memory": True}, ort_providers=["cpu", "cuda"])


def test_cpu_box_gets_cpu_provider_with_reason():
    chosen = plan(CPU_BOX, MANIFEST)
    assert {c.providers for c in chosen.components.values()} == {("cpu",)}
    assert any("no GPU found" in r for r in chosen.reasons)


def test_desktop_rtx_prefers_tensorrt_then_cuda():
    chosen = plan(DESKTOP_RTX, MANIFEST)
    assert chosen.components["vision"].providers == ("tensorrt", "cuda")
    assert plan(DESKTOP_RTX, MANIFEST, device="cpu").components["vision"].providers == ("cpu",)


def test_jetson_with_cuda_provider():
    assert plan(JETSON_ORIN, MANIFEST).components["text"].providers == ("cuda",)


def test_cuda_requested_on_cpu_box_fails_loudly():
    with pytest.raises(BackendUnavailableError, match="device=cuda.*onnxruntime-gpu"):
        plan(CPU_BOX, MANIFEST, device="cuda")


@pytest.mark.parametrize("backend,match", [("tensorrt", "needs the Python package 'cuda-python'"),
                                           ("torch", "needs the Python packages 'torch' and 'transformers'")])
def test_named_backend_never_silently_replaced(backend, match):
    with pytest.raises(BackendUnavailableError, match=match):
        plan(DESKTOP_RTX, MANIFEST, backend=backend)


def test_thread_counts_past_the_cap_are_refused_before_loading(clip_artifacts, monkeypatch):
    """threads=10000 made 18,000 OS threads and hung the load: a count past 4 per core is refused, up to it loads."""
    import os

    import mmedge
    from mmedge.api import THREADS_PER_CORE_CAP

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(InputError, match=f"threads is {THREADS_PER_CORE_CAP * 2 + 1}; expected at most "
                                         f"{THREADS_PER_CORE_CAP * 2} on this machine"):
        mmedge.load(clip_artifacts("fp32"), threads=THREADS_PER_CORE_CAP * 2 + 1)
    with mmedge.load(clip_artifacts("fp32"), threads=THREADS_PER_CORE_CAP * 2) as pipeline:
        assert pipeline is not None


def test_a_numpy_thread_count_is_a_count(clip_artifacts):
    """np.int64 (a value read from an array) is taken for threads as generation settings take it, and handed on as
    Python's int; a numpy bool or float is not a count."""
    import numpy as np

    import mmedge
    from mmedge.api import check_threads

    assert type(check_threads(np.int64(2))) is int and check_threads(np.int32(1)) == 1
    for bad in (np.bool_(True), np.float64(2.0), np.int64(0)):
        with pytest.raises(InputError, match="threads is"):
            check_threads(bad)
    with mmedge.load(clip_artifacts("fp32"), threads=np.int64(1)) as pipeline:
        assert pipeline is not None


def test_unknown_backend_and_device_are_bad_input():
    """A name that is no backend (or device) at all is a mistyped argument (exit 2), not an absent backend (exit 4)."""
    for request in ({"backend": "tvm"}, {"device": "tpu"}):
        with pytest.raises(InputError, match="unknown (backend|device)") as caught:
            plan(CPU_BOX, MANIFEST, **request)
        assert not isinstance(caught.value, BackendUnavailableError) and caught.value.exit_code == 2


def test_probe_parsers():
    assert _cpu_flags("flags\t: fpu avx2 avx512_vnni sse\n") == ["avx2", "avx512_vnni"]
    assert _cpu_flags("Features\t: fp asimd asimddp i8mm\n") == ["asimd", "asimddp", "i8mm"]
    jetson = parse_jetson("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64",
                          "NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert jetson == {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "36.3.0", "unified_memory": True}
    assert parse_jetson(None, None) is None


# --- atomic writes -----------------------------------------------------------------------------
def test_atomic_folder_appears_only_when_complete(tmp_path):
    dest = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as stage:
            (stage / "half.onnx").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(dest) as stage:
        (stage / "whole.onnx").write_bytes(b"x")
    assert [p.name for p in dest.iterdir()] == ["whole.onnx"]


def test_atomic_folder_leaves_hard_linked_files_as_they_were(tmp_path):
    """`mmedge triton` hard-links an artifact's graphs into its repository: the write's permission pass made the
    artifact's own read-only graph 0644 (and moved its change time, staling the device's record of its sha256)."""
    graph = tmp_path / "vision.onnx"
    graph.write_bytes(b"graph")
    graph.chmod(0o444)
    with atomic_folder(tmp_path / "repo") as stage:
        os.link(graph, stage / "vision.onnx")
        (stage / "config.pbtxt").write_text("x")
        (stage / "config.pbtxt").chmod(0o600)
    assert stat.S_IMODE(graph.stat().st_mode) == 0o444
    assert stat.S_IMODE((tmp_path / "repo" / "config.pbtxt").stat().st_mode) & 0o044 == 0o044  # made ordinary


def test_atomic_overwrite_replaces_only_on_success(tmp_path):
    dest = tmp_path / "art"
    dest.mkdir()
    (dest / "manifest.json").write_text('{"format": "mmedge.artifact"}')  # an artifact: what --overwrite replaces
    with pytest.raises(ArtifactError, match="already exists"):
        with atomic_folder(dest):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(dest, overwrite=True) as stage:
            (stage / "new").write_text("new")
            raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["manifest.json"]
    with atomic_folder(dest, overwrite=True) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_device_arrays_share_host_copy_len_and_repr():
    """OrtDeviceArray (and TorchDeviceArray) get np.asarray, len and repr from mmedge.runner.DeviceArray."""
    import onnxruntime as ort

    from mmedge.runner import DeviceArray
    from mmedge.runtimes.onnxruntime import OrtDeviceArray

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = OrtDeviceArray(ort.OrtValue.ortvalue_from_numpy(values))
    assert isinstance(array, DeviceArray) and len(array) == 2
    np.testing.assert_array_equal(np.asarray(array), values)
    assert np.asarray(array, dtype=np.float64).dtype == np.float64
    assert repr(array) == "OrtDeviceArray(shape=[2, 3], dtype=float32, device=cpu)"
