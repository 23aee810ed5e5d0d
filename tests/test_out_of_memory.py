"""A device with less memory than the work needs (a Jetson Nano's 4 GB, a container's limit): every way mmedge meets
it says so, as an InsufficientMemoryError (exit 4) with what to free or lower. It had been "the file is damaged:
re-export or copy it again" at a load (std::bad_alloc), "check input shapes" in a run, an internal error (a
MemoryError) on the command line, and "a broken install" when the kernel killed bench's measuring process."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mmedge.errors import InsufficientMemoryError
from mmedge.runtimes.registry import create_runner
from tests.support.battery import check_error

LOAD_WITH_LITTLE_ROOM = r"""
import resource, sys
from mmedge.errors import InsufficientMemoryError
from mmedge.runtimes.ort_session import OrtOptions, session_from_path
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 64 * 2**20, resource.RLIM_INFINITY))  # 64 MiB more address space
try:
    session_from_path(sys.argv[1], OrtOptions(threads=1), "component 'big'")
except InsufficientMemoryError as error:
    print(error.exit_code, error)
"""


def _graph(path: Path, nodes, inputs, outputs, initializers=(), external=False) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data")
    return path


def test_a_graph_too_large_to_load_is_a_memory_error_not_a_damaged_file(tmp_path):
    """256 MiB of weights with 64 MiB of address space to spare (an intact file: re-exporting it would not help)."""
    shape = [64, 1024, 1024]  # 256 MiB of float32
    path = _graph(tmp_path / "big.onnx", [helper.make_node("Add", ["x", "w"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                  [numpy_helper.from_array(np.ones(shape, np.float32), "w")], external=True)
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_LITTLE_ROOM, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.stdout.startswith("4 ONNX Runtime ran out of memory loading component 'big' from 'big.onnx' "
                                  "(256 MiB on disk)"), done.stdout + done.stderr
    assert "fix: close other processes or pipelines" in done.stdout and "re-export" not in done.stdout


def test_a_run_that_cannot_allocate_its_outputs_is_a_memory_error_not_a_bad_feed(tmp_path):
    path = _graph(tmp_path / "alloc.onnx",
                  [helper.make_node("ConstantOfShape", ["n"], ["y"],
                                    value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))],
                  [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["size"])])
    component = {"file": path.name, "inputs": {"n": {"dtype": "int64", "shape": [1]}},
                 "outputs": {"y": {"dtype": "float32", "shape": ["size"]}}}
    with create_runner("onnxruntime", path, "alloc", component) as runner:
        assert runner.infer({"n": np.array([3], np.int64)})["y"].tolist() == [1.0, 1.0, 1.0]
        with pytest.raises(InsufficientMemoryError) as raised:
            runner.infer({"n": np.array([2**40], np.int64)})  # 4 TiB
        check_error(raised.value, InsufficientMemoryError, "ONNX Runtime ran out of memory running component 'alloc'",
                    "fix: pass fewer images or texts per call")
        assert runner.infer({"n": np.array([2], np.int64)})["y"].tolist() == [1.0, 1.0]  # and it keeps running


def test_a_memory_error_on_the_command_line_is_one_line_and_exit_4(monkeypatch, capsys):
    from mmedge import cli

    def exhausted(args):
        raise MemoryError()

    monkeypatch.setattr(cli, "cmd_doctor", exhausted)
    assert cli.main(["doctor"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("mmedge: error: mmedge ran out of memory") and "internal error" not in err
    assert err.count("\n") == 1


def test_bench_says_a_measuring_process_killed_by_sigkill_most_likely_ran_out_of_memory(demo_run, tmp_path,
                                                                                        monkeypatch, capsys):
    """The kernel's OOM killer sends SIGKILL; the measuring process here sends it to itself as it starts."""
    from mmedge.cli import main

    shadow = tmp_path / "shadow" / "mmedge"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    assert main(["bench", str(demo_run[0] / "clip-int8"), "--runs", "1", "--batch", "1"]) == 4
    err = capsys.readouterr().err
    assert "was killed (SIGKILL), most likely by the kernel's out-of-memory killer" in err, err


def test_doctor_compares_the_planned_graphs_with_the_memory_available(blip2_artifact, monkeypatch, capsys):
    """doctor knows the graphs' sizes and the device's memory: it says when a load may not fit."""
    import dataclasses
    import json

    from mmedge import cli, device

    assert cli.main(["doctor", str(blip2_artifact), "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    on_disk = sum(p.stat().st_size for p in blip2_artifact.glob("*.onnx*")) / 2**20
    assert memory["graphs_mib"] == pytest.approx(on_disk, abs=0.1) and memory["may_not_fit"] is False
    found = device.probe()
    monkeypatch.setattr(device, "probe", lambda: dataclasses.replace(found, memory_available_mb=0))
    assert cli.main(["doctor", str(blip2_artifact)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: memory: the planned graphs take" in out and "0 MiB available now" in out
    assert "it may not fit; free memory, or export a smaller precision" in out


V1_STAT = "cache 0\ninactive_file 1000\ntotal_inactive_file {inactive}\n"


def _cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_the_memory_available_is_the_lower_of_the_system_s_and_each_cgroup_limit_above_the_process(tmp_path):
    """A container caps its processes below MemAvailable; past the cap the kernel kills without an error. The
    cgroup files as the kernel writes them, v1 and v2: the process's own cgroup and those above it, a limit less
    the usage plus the inactive page cache the kernel reclaims first."""
    from mmedge.memory import CGROUP, SYSTEM, memory_available

    meminfo = "MemTotal:       24683772 kB\nMemAvailable:   20480000 kB\n"  # 20,000 MiB
    mib = 2**20
    v2 = tmp_path / "v2"
    _cgroup(v2, {})  # the host's root cgroup has no memory.max
    _cgroup(v2 / "box", {"memory.max": f"{3000 * mib}\n", "memory.current": f"{1000 * mib}\n",
                         "memory.stat": f"anon 5\ninactive_file {200 * mib}\n"})
    _cgroup(v2 / "box" / "app", {"memory.max": "max\n", "memory.current": f"{900 * mib}\n"})
    found = memory_available(meminfo, v2, "0::/box/app\n")
    assert (found.mib, found.limited_by) == (3000 - 1000 + 200, CGROUP)  # the parent's limit binds
    assert "2,200 MiB available now, per this process's memory cgroup" in found.text()
    assert memory_available(meminfo, v2, "0::/elsewhere\n").limited_by == SYSTEM  # the mount's root sets none

    v1 = tmp_path / "v1"
    _cgroup(v1 / "memory", {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "5\n"})
    _cgroup(v1 / "memory" / "docker" / "abc", {"memory.limit_in_bytes": f"{512 * mib}\n",
                                              "memory.usage_in_bytes": f"{400 * mib}\n",
                                              "memory.stat": V1_STAT.format(inactive=10 * mib)})
    own = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n"
    assert memory_available(meminfo, v1, own) == memory_available(meminfo, v1, own.replace("4:memory", "4:memory,x"))
    assert memory_available(meminfo, v1, own).mib == 512 - 400 + 10
    # inside the container the mount is its own cgroup: the host's path is not under it, the root is read
    _cgroup(tmp_path / "inside" / "memory", {"memory.limit_in_bytes": f"{512 * mib}\n",
                                            "memory.usage_in_bytes": f"{500 * mib}\n"})
    assert memory_available(meminfo, tmp_path / "inside", "4:memory:/docker/abc\n").mib == 12
    # a 32-bit kernel's "no limit" (2 GiB - 4 KiB) on a machine with less memory than that is no limit
    small = "MemTotal:        1048576 kB\nMemAvailable:     524288 kB\n"
    _cgroup(tmp_path / "arm" / "memory", {"memory.limit_in_bytes": "2147479552\n", "memory.usage_in_bytes": "5\n"})
    assert memory_available(small, tmp_path / "arm", "4:memory:/\n").limited_by == SYSTEM
    # v1 without a cgroup namespace: the limit set above the mount is only in memory.stat's hierarchical limit
    _cgroup(tmp_path / "k8s" / "memory", {"memory.limit_in_bytes": "9223372036854771712\n",
                                         "memory.usage_in_bytes": f"{100 * mib}\n",
                                         "memory.stat": f"hierarchical_memory_limit {512 * mib}\n"})
    assert memory_available(meminfo, tmp_path / "k8s", "4:memory:/kubepods/pod1/abc\n").mib == 412
    assert memory_available(meminfo, tmp_path / "none", "0::/\n") == memory_available(meminfo, v2, "0::/\n")
    assert memory_available(meminfo, tmp_path / "none", "0::/\n").mib == 20000
    assert memory_available("", tmp_path / "none", "") is None  # not Linux: unknown


def _own_memory_cgroup() -> Path | None:
    """A new memory cgroup under this process's own, where this machine lets the tests make one (root, cgroup v1 or
    v2 with the memory controller), else None."""
    import uuid

    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = Path("/sys/fs/cgroup") / ("memory" if controllers else "")
        if controllers and "memory" not in controllers.split(","):
            continue
        own = base / path.lstrip("/")
        folder = (own if own.is_dir() else base) / f"mmedge-test-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir()
        except OSError:
            continue
        limit = folder / ("memory.limit_in_bytes" if controllers else "memory.max")
        if limit.is_file():
            return folder
        folder.rmdir()
    return None


MEASURE_IN_CGROUP = r"""
import os, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
from mmedge.memory import memory_available
found = memory_available()
print(found.mib, found.limited_by)
"""


def test_a_process_in_a_real_memory_cgroup_sees_its_limit(tmp_path):
    folder = _own_memory_cgroup()
    if folder is None:
        pytest.skip("this machine does not let the tests make a memory cgroup (needs root and a writable "
                    "/sys/fs/cgroup with the memory controller)")
    try:
        limit = folder / ("memory.max" if (folder / "memory.max").is_file() else "memory.limit_in_bytes")
        limit.write_text(str(1024 * 2**20))
        done = subprocess.run([sys.executable, "-c", MEASURE_IN_CGROUP, str(folder)], capture_output=True,
                              text=True, timeout=60)
        mib, _, limited_by = done.stdout.strip().partition(" ")
        assert limited_by == "this process's memory cgroup (a container's limit)", done.stdout + done.stderr
        assert 0 < int(mib) <= 1024
    finally:
        folder.rmdir()


def test_a_load_that_may_not_fit_warns_before_it_opens_anything(blip2_artifact, monkeypatch):
    """The kernel's out-of-memory killer leaves no message: mmedge.load says first that the load may not fit."""
    import mmedge
    from mmedge import memory
    from mmedge.memory import CGROUP, MemoryAvailable, MemoryWarning

    on_disk = sum(p.stat().st_size for p in blip2_artifact.glob("*.onnx*")) / 2**20
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mmedge.load(blip2_artifact, threads=1).close()
    assert not [w for w in seen if issubclass(w.category, MemoryWarning)]  # this machine has room: nothing said
    monkeypatch.setattr(memory, "memory_available", lambda: MemoryAvailable(int(on_disk), CGROUP))
    with pytest.warns(MemoryWarning) as seen, mmedge.load(blip2_artifact, threads=1) as captioner:
        assert captioner.plan.components["decoder"].backend == "onnxruntime"
    message = str(seen[0].message)
    assert f"loading '{blip2_artifact.name}' may not fit in memory: the planned graphs take {on_disk:,.1f} MiB" \
           in message and "this process's memory cgroup" in message and "export a smaller precision" in message
