"""``benchmarks/gpu_check.sh --tiny``: the GPU check's whole path (install step, GPU-marked tests, measurements,
JSON and markdown) on this machine's CPU with the tiny test models, in about 20 seconds. The full mode needs a CUDA
GPU and is run by hand there (its figures go to benchmarks/RESULTS.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_tiny_mode_runs_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "MMEDGE_GPU_CHECK_OUT": str(out), "MMEDGE_GPU_CHECK_LIMIT_S": "240"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True,
                            text=True,
                            env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "tiny" and data["device"]["name"] == "CPU (tiny mode)"
    assert "exit 0" in data["gpu_tests"] and "skipped" in data["gpu_tests"]  # the GPU tests skip here, with reasons
    variants = data["blip2"]["variants"]
    for name in ("hf_eager", "hf_static", "mmedge_fp16"):
        assert variants[name]["decode_tok_s"]["median"] > 0, (name, variants[name])
        assert len(variants[name]["tokens"]) == 16, (name, variants[name])
    assert variants["mmedge_fp16"]["common_prefix_with_hf_eager"] == 1.0  # FP32: the same greedy tokens as HF
    for name in ("mmedge_nf4", "mmedge_int8"):  # measured when bitsandbytes imports, else skipped with the reason
        assert "decode_tok_s" in variants[name] or "bitsandbytes" in variants[name].get("skipped", ""), variants[name]
    assert data["clip"]["batch_1"]["mmedge"]["cosine_vs_hf_eager"] > 0.9999
    assert all(target["met"] is None for target in data["targets"].values())  # targets are judged on a GPU only
    assert out.with_suffix(".md").read_text().startswith("## torch backend on CPU (tiny mode)")
    assert (tmp_path / "gpu_check-tests.txt").is_file()
