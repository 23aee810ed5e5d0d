"""A device with less memory than the work needs (a Jetson Nano's 4 GB, a container's limit): every way mmedge meets
it says so, as an InsufficientMemoryError (exit 4) with what to free or lower. It had been "the file is damaged:
re-export or copy it again" at a load (std::bad_alloc), "check input shapes" in a run, an internal error (a
MemoryError) on the command line, and "a broken install" when the kernel killed bench's measuring process."""

from __future__ import annotations

import subprocess
import sys
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
