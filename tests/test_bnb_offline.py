"""The torch backend's INT8 / NF4 LLM weights never reach the network: bitsandbytes' CPU backend (on CPUs with
AVX512-BF16) fetched an optional kernel from the Hugging Face Hub through the ``kernels`` package at import, and
printed "Failed to load CPU gemm_4bit_forward from kernels-community" where it could not. A fresh process with every
connection refused loads NF4 weights, stays silent about the hub, and its logits stay close to FP32. On a CPU
without AVX512-BF16 bitsandbytes never looks for the hub kernel, so there only the NF4 half of this test bites (the
CPU model changes from machine to machine; the AMD EPYC machines with avx512_bf16 run both halves)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None

GUARDED = r'''
import json, socket, sys, warnings
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("no connection on the device side")
socket.getaddrinfo = refuse
socket.socket.connect = lambda self, address: refuse(address)
import mmedge
from mmedge.metrics import cosine_rows
from tests.support.torch_cases import prompt
warnings.simplefilter("ignore")
path = sys.argv[1]
fp32 = mmedge.load(path, backend="torch")
nf4 = mmedge.load(path, backend="torch", backend_options={"torch": {"quantization": "nf4"}})
embeds, mask = prompt(fp32, sys.argv[2:], rows=1)
cosine = float(cosine_rows(fp32.decoder.start(embeds, mask), nf4.decoder.start(embeds, mask)).min())
print(json.dumps({"attempts": attempts, "cosine": cosine, "caption": nf4.caption(sys.argv[2], max_new_tokens=3)}))
'''


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed")
def test_nf4_on_the_cpu_opens_no_connection_and_prints_nothing_of_the_hub(pytorch_artifacts, photos):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", GUARDED, str(pytorch_artifacts("blip2")), photos[0]],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == [], f"connections attempted: {result['attempts']}"
    assert "kernels-community" not in done.stderr and "gemm_4bit" not in done.stderr
    assert result["cosine"] >= 0.95 and isinstance(result["caption"], str)  # the export's floor for quantized logits
