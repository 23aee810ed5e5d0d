"""The torch backend's settings judged before anything loads, and its weights found where they are: a checkpoint
folder for a fused CLIP (its label bank is the artifact's), ``~`` in ``checkpoint``, CUDA-only settings on a CPU,
``compile`` names, a missing bitsandbytes, and the plan's reason. Real torch on the CPU, tiny artifacts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.api import plan_for
from mmedge.errors import BackendError, BackendUnavailableError, InputError, ModelLoadError
from tests.support.battery import api_error, cli_error
from tests.support.blocked_imports import blocking
from tests.support.torch_cases import load_quietly

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_a_fused_clip_with_a_checkpoint_keeps_the_artifacts_label_bank(pytorch_artifacts, tiny_clip_dir, photos,
                                                                       clip_artifacts, monkeypatch):
    """checkpoint= for a CLIP with baked labels looked for reference_tensors.safetensors in the checkpoint folder
    ("missing reference tensors"); `~` in the folder was not expanded. Without --with-pytorch the message says so."""
    monkeypatch.setenv("HOME", str(tiny_clip_dir.parent))
    options = {"torch": {"checkpoint": f"~/{tiny_clip_dir.name}"}}
    fused = pytorch_artifacts("clip-fused")
    with load_quietly(fused, backend="torch", backend_options=options) as classifier, load_quietly(fused) as reference:
        got, want = classifier(photos[0]), reference(photos[0])
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-4)
    error = api_error(lambda: load_quietly(clip_artifacts("fused-fp32"), backend="torch", backend_options=options),
                      BackendError, "exported without --with-pytorch", "a checkpoint folder does not carry")
    assert "re-export with --with-pytorch" in error.fix


@pytest.mark.parametrize("setting,value", [("cuda_graphs", True), ("keep_on_device", True), ("max_graphs", 2)])
def test_cuda_only_settings_are_refused_on_a_cpu(pytorch_artifacts, setting, value):
    """The runner dropped them off CUDA: an option that did nothing, in mmedge.load and every command."""
    api_error(lambda: load_quietly(pytorch_artifacts("clip"), backend="torch", device="cpu",
                                   backend_options={"torch": {setting: value}}),
              InputError, f"['{setting}'] would change nothing: it acts on CUDA only", "on the CPU here")


def test_cuda_only_settings_on_the_command_line_and_where_they_act(pytorch_artifacts, photos, capsys):
    from mmedge.runtimes.plugins.torch import BACKEND

    cli_error(capsys, ["validate", pytorch_artifacts("clip"), "--backend", "torch", "--backend-option",
                       "torch.cuda_graphs=false"], InputError, "torch.cuda_graphs=false would change nothing",
              "fix: drop --backend-option torch.cuda_graphs")
    cuda = plan_for(pytorch_artifacts("clip"), backend="torch", device="cpu").components["vision"]
    cuda.options["device"] = "cuda"  # the plan on a GPU: they act there, unless device=cpu is set
    assert BACKEND.idle_settings({"cuda_graphs": True, "max_graphs": 2}, [cuda]) == {}
    assert set(BACKEND.idle_settings({"device": "cpu", "keep_on_device": True}, [cuda])) == {"keep_on_device"}


def test_compile_names_are_judged_before_loading(pytorch_artifacts, capsys):
    """A bad name failed after the model loaded (exit 4); a JSON-quoted one was taken with its quotes."""
    from mmedge.runtimes.torch_settings import TorchSettings

    for value in (True, False, None, "inductor", "aot_eager"):
        TorchSettings(compile=value)
    api_error(lambda: TorchSettings(compile="fastest"), InputError, "'fastest' is not a torch.compile backend",
              "inductor")
    cli_error(capsys, ["validate", pytorch_artifacts("clip"), "--backend", "torch", "--backend-option",
                       'torch.compile="inductor"'], InputError, "holds quotes", "torch.compile=inductor")
    script = blocking("torch") + """
from mmedge.runtimes.torch_settings import TorchSettings
TorchSettings(compile="inductor")
try:
    TorchSettings(compile="fastest")
except Exception as exc:
    print(type(exc).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(mmedge.__file__).parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "InputError", done.stderr  # without torch


def test_a_missing_bitsandbytes_is_refused_at_plan_time(pytorch_artifacts, monkeypatch):
    """It was found missing only after the whole model and the prefix runner had loaded."""
    import mmedge.runtimes.plugins.torch as plugin
    import mmedge.runtimes.torch_backend as torch_backend

    monkeypatch.setattr(plugin, "bitsandbytes_installed", lambda: False)
    monkeypatch.setattr(torch_backend, "acquire_model", lambda *a, **k: pytest.fail("a model was loaded"))
    options = {"torch": {"quantization": "nf4"}}
    for call in (lambda: plan_for(pytorch_artifacts("blip2"), backend="torch", backend_options=options),
                 lambda: load_quietly(pytorch_artifacts("blip2"), backend="torch", backend_options=options)):
        api_error(call, BackendUnavailableError, "'nf4' on the torch backend needs the Python package 'bitsandbytes'",
                  "pip install")


def test_the_plans_reason_does_not_contradict_the_dtype(pytorch_artifacts):
    """doctor printed plan bf16 "because ... every component on the CPU at FP32"."""
    chosen = plan_for(pytorch_artifacts("clip"), backend="torch", device="cpu",
                      backend_options={"torch": {"dtype": "bf16"}})
    assert {c.precision for c in chosen.components.values()} == {"bf16"}
    reason = next(r for r in chosen.reasons if "every component" in r)
    assert "on the CPU at FP32" not in reason and "unless torch.dtype sets another" in reason


def test_bad_torch_settings_are_bad_input_not_an_absent_backend(pytorch_artifacts, tmp_path, photos, capsys):
    """A device name torch does not know and a checkpoint folder that is not there exited 4 ("a backend that is
    absent"), as if installing something would help: they are the user's values, exit 2."""
    artifact = pytorch_artifacts("blip2")
    for value, kind, fragment in (("device=tpu", InputError, "torch device 'tpu' is not a device name"),
                                  ("device=meta", InputError, "torch device 'meta' is not supported"),
                                  (f"checkpoint={tmp_path / 'nonexistent'}", ModelLoadError,
                                   "has no config.json with safetensors weights")):
        cli_error(capsys, ["run", artifact, photos[0], "--backend", "torch", "--backend-option", f"torch.{value}"],
                  kind, fragment)
    assert InputError.exit_code == ModelLoadError.exit_code == 2
