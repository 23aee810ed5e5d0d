"""Processes forked from an mmedge command: OpenVINO's telemetry sender (importing openvino starts one, sending
anonymous usage events to Intel unless the user opted out) and multiprocessing's workers inherit the command's
SIGTERM handler. They had printed a `mmedge.cli.Terminated` traceback into the command's output when the command,
ending, terminated them; doctor says whether OpenVINO's telemetry is on and how to turn it off."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.test_openvino import needs_openvino

FORK_THEN_TERMINATE = r"""
import multiprocessing, os, signal, time
from mmedge.cli import terminated_in
signal.signal(signal.SIGTERM, terminated_in(os.getpid()))
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
child.start()
time.sleep(0.5)
child.terminate()  # what multiprocessing does to a daemon child when the command exits
child.join(10)
print("child exit", child.exitcode)
try:
    os.kill(os.getpid(), signal.SIGTERM)
except BaseException as exc:  # the command itself still unwinds as before
    print("parent", type(exc).__name__)
"""


def test_a_forked_child_ends_quietly_on_sigterm_while_the_command_unwinds():
    done = subprocess.run([sys.executable, "-c", FORK_THEN_TERMINATE], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["child exit -15", "parent Terminated"], done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@needs_openvino
def test_doctor_says_whether_openvino_sends_telemetry_and_how_to_opt_out(tmp_path):
    """openvino-telemetry reads its consent file under $HOME/intel: none recorded is on (its default)."""
    environ = {**os.environ, "HOME": str(tmp_path)}
    environ.pop("CI", None)  # a CI environment turns it off
    check = [sys.executable, "-c",
             "from mmedge.runtimes.openvino.doctor import telemetry_state; print(telemetry_state())"]
    said = subprocess.run(check, capture_output=True, text=True, timeout=60, env=environ).stdout
    assert said.startswith("ON (on by default: no choice recorded)") and "opt_in_out --opt_out" in said, said
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("0")  # what `opt_in_out --opt_out` writes
    said = subprocess.run(check, capture_output=True, text=True, timeout=60, env=environ).stdout
    assert said.startswith("off (opted out"), said
    said = subprocess.run(check, capture_output=True, text=True, timeout=60, env={**environ, "CI": "true"}).stdout
    assert said.startswith("off"), said
