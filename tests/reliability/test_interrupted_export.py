"""An export killed midway (SIGKILL) leaves no artifact, and an existing one at the same path untouched."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmedge.artifact import Artifact, sha256_file

# Export, but stall inside the staging folder once the first graph is written, so the kill lands midway.
SCRIPT = r"""
import sys, time
import mmedge.export.onnx_export as onnx_export
from mmedge.export import export_model

original = onnx_export.export_spec
def slow_export_spec(spec, path):
    result = original(spec, path)
    print("STAGED", flush=True)
    time.sleep(60)
    return result
onnx_export.export_spec = slow_export_spec
export_model(sys.argv[1], sys.argv[2], progress=False, overwrite=True, precision=sys.argv[3])
"""


def kill_midway(checkpoint: Path, out: Path, precision: str = "fp32", env: dict | None = None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(checkpoint), str(out), precision],
                            stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "STAGED" in line or time.time() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_export_leaves_nothing(tiny_clip_dir, tmp_path):
    """Neither the staging folder nor the scratch of the FP32 graphs being lowered stays: both lie beside the
    output, hidden, and the next export to that path removes them; nothing is left in the system's temporary folder."""
    out, system_tmp = tmp_path / "art", tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "torch-cache")}
    kill_midway(tiny_clip_dir, out, "int8", env)
    assert not out.exists() and not any(system_tmp.iterdir())
    leftovers = list(tmp_path.glob(".art.partial-*"))
    scratch = [p for p in leftovers if "-scratch-" in p.name]
    assert len(leftovers) == 2 and len(scratch) == 1  # hidden, and removed by the next export to this path:
    assert (scratch[0] / "vision.onnx").is_file()  # the FP32 graph to lower
    from mmedge.export import export_model

    export_model(str(tiny_clip_dir), out, progress=False)
    assert not list(tmp_path.glob(".art.partial-*")) and Artifact.open(out)


def test_killed_overwrite_keeps_existing_artifact(clip_artifacts, tiny_clip_dir, tmp_path):
    import shutil

    out = tmp_path / "art"
    shutil.copytree(clip_artifacts("fused-fp32"), out)
    before = {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()}  # (engines/: this device's caches)
    kill_midway(tiny_clip_dir, out)
    assert {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()} == before
    assert Artifact.open(out).component_path("zero_shot")
