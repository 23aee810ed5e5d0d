"""``--backend-option BACKEND.SETTING=VALUE``: every backend setting of the Python API, from `mmedge run`, `doctor`,
`bench` and `serve` (OpenVINO's device, precision hint and shape cache were reachable from Python only)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmedge
from mmedge.backend_option_args import CliBackendOptions, parse_item
from mmedge.cli import build_parser, main
from mmedge.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
needs_openvino = pytest.mark.skipif(__import__("importlib").util.find_spec("openvino") is None,
                                    reason='the OpenVINO backend needs mmedge[openvino]')


def _copy(folder: Path, tmp_path: Path) -> Path:
    """A copy: OpenVINO caches compiled models in the artifact's engines/, which the session's artifact must not get."""
    return Path(shutil.copytree(folder, tmp_path / folder.name))


# --- reading BACKEND.SETTING=VALUE -------------------------------------------------------------------------------
@pytest.mark.parametrize("item,value", [
    ("onnxruntime.graph_optimization=basic", "basic"),
    ("onnxruntime.device_id=1", 1),
    ("onnxruntime.io_binding=false", False),
    ("onnxruntime.io_binding=none", None),
    ("onnxruntime.memory_arena=off", False),
    ('onnxruntime.config_entries={"session.intra_op.allow_spinning": "0"}', {"session.intra_op.allow_spinning": "0"}),
    ("openvino.device=GPU.1", "GPU.1"),
    ("openvino.shape_cache=0", 0),
    ("openvino.precision_hint=f16", "f16"),
    ("torch.compile=true", True),
    ("torch.compile=inductor", "inductor"),
    ("torch.dtype=bfloat16", "bfloat16"),
    ("torch.max_graphs=4", 4),
])
def test_a_value_is_read_as_its_settings_type(item, value):
    given = parse_item(item)
    assert (f"{given.backend}.{given.setting}", given.value) == (item.split("=")[0], value)
    assert type(given.value) is type(value)


@pytest.mark.parametrize("item,says", [
    ("openvino=GPU", "is not BACKEND.SETTING=VALUE"),
    ("openvino.device", "is not BACKEND.SETTING=VALUE"),
    ("vulkan.device=0", "names backend 'vulkan'"),
    ("auto.device=CPU", "names backend 'auto'"),
    ("tensorrt.precision=fp16", "backend 'tensorrt' takes no settings"),
    ("openvino.threads=2", "'threads' is set by the plan"),
    ("onnxruntime.providers=cuda", "'providers' is set by the plan"),
    ("openvino.devic=GPU", "openvino has no setting 'devic'"),
    ("openvino.shape_cache=lots", "'lots' is not a whole number"),
    ("openvino.shape_cache=-1", "shape_cache"),
    ("onnxruntime.io_binding=maybe", "is not a value of type bool | None"),
    ("onnxruntime.config_entries=x=1", "is not a JSON object"),
    ("onnxruntime.graph_optimization=bogus", "graph_optimization 'bogus'"),
    ("onnxruntime.device_id=-1", "device_id is -1"),
    ("openvino.device=TPU", "OpenVINO device 'TPU'"),
    ("openvino.weights=int3", "int3"),
    ("torch.quantization=int3", "LLM quantization 'int3'"),
    ("torch.dtype=float8", "torch dtype 'float8'"),
    ("torch.device=", "has no value after '='"),
])
def test_a_bad_option_is_refused_in_the_flags_words_before_anything_loads(item, says):
    with pytest.raises(InputError) as caught:
        parse_item(item)
    assert caught.value.message.startswith(f"--backend-option {item}") and says in caught.value.message
    assert caught.value.expected and caught.value.fix


def test_a_setting_given_twice_is_refused():
    args = argparse.Namespace(openvino_weights="int4", llm_quantization=None,
                              backend_option=["openvino.weights=int8"])
    with pytest.raises(InputError, match=r"openvino.weights is set twice \(--openvino-weights int4; "
                                         r"--backend-option openvino.weights=int8\)"):
        CliBackendOptions.from_args(args)
    args = argparse.Namespace(backend_option=["openvino.device=CPU", "openvino.device=GPU"])
    with pytest.raises(InputError, match="set twice"):
        CliBackendOptions.from_args(args)


def test_messages_speak_the_flags_words_and_settings_are_judged_together():
    with pytest.raises(InputError) as caught:
        parse_item("torch.dtype=fp8")
    assert "torch.dtype=float16" in caught.value.fix and "dtype='" not in caught.value.message
    assert caught.value.expected.startswith("none or one of")
    args = argparse.Namespace(backend_option=["openvino.device=GPU", "openvino.shape_cache=64"])
    with pytest.raises(InputError) as caught:  # each is fine alone; a CPU-only setting on a GPU is not
        CliBackendOptions.from_args(args)
    assert caught.value.message.startswith("--backend-option openvino.device=GPU; --backend-option "
                                           "openvino.shape_cache=64: shape_cache=64 would change nothing")
    assert caught.value.fix == "drop --backend-option openvino.shape_cache"


def test_a_gpu_providers_setting_on_the_cpu_provider_is_refused(clip_artifacts, photos, capsys):
    """device_id, workspace_mb, fp16 and engine_cache only reach ONNX Runtime's CUDA / TensorRT providers."""
    code = main(["run", str(clip_artifacts("fused-fp32")), photos[0], "--device", "cpu",
                 "--backend-option", "onnxruntime.device_id=7"])
    err = capsys.readouterr().err
    assert code == 2 and "onnxruntime.device_id=7 would change nothing: it is for ONNX Runtime's cuda or tensorrt " \
        "provider, and the plan runs cpu" in err, err
    with pytest.raises(InputError, match=r"backend_options\['onnxruntime'\]\['fp16'\] would change nothing"):
        mmedge.load(clip_artifacts("fused-fp32"), device="cpu", backend_options={"onnxruntime": {"fp16": True}})


def test_the_python_api_judges_values_before_loading(clip_artifacts):
    """A bad ONNX Runtime setting reached the session as a KeyError, reported as a damaged graph."""
    with pytest.raises(InputError, match="graph_optimization 'x'"):
        mmedge.load(clip_artifacts("fp32"), backend_options={"onnxruntime": {"graph_optimization": "x"}})


# --- mmedge run, doctor ------------------------------------------------------------------------------------------
def test_run_hands_the_settings_to_load_and_answers_as_without(clip_artifacts, photos, capsys, monkeypatch):
    path = str(clip_artifacts("fused-fp32"))
    assert main(["run", path, photos[0], "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    seen = []
    real_load = mmedge.load
    monkeypatch.setattr(mmedge, "load", lambda *a, **k: seen.append(k["backend_options"]) or real_load(*a, **k))
    assert main(["run", path, photos[0], "--json", "--backend-option", "onnxruntime.graph_optimization=disable",
                 "--backend-option", "onnxruntime.memory_arena=false"]) == 0
    unoptimized = json.loads(capsys.readouterr().out)
    assert seen == [{"onnxruntime": {"graph_optimization": "disable", "memory_arena": False}}]
    assert [p["label"] for p in unoptimized["predictions"]] == [p["label"] for p in plain["predictions"]]
    assert [p["score"] for p in unoptimized["predictions"]] == pytest.approx(
        [p["score"] for p in plain["predictions"]], abs=1e-5)


def test_run_refuses_a_setting_the_plan_leaves_idle(clip_artifacts, blip2_artifact, photos, capsys):
    code = main(["run", str(clip_artifacts("fused-fp32")), photos[0], "--backend", "onnxruntime",
                 "--backend-option", "openvino.shape_cache=64"])
    err = capsys.readouterr().err
    assert code == 2 and ("--backend-option openvino.shape_cache=64 would change nothing: no component runs on "
                          "openvino here (the plan: zero_shot on onnxruntime)") in err
    assert "fix: add --backend openvino, or drop --backend-option openvino.shape_cache" in err
    code = main(["run", str(clip_artifacts("fused-fp32")), photos[0], "--backend-option", "openvino.weights=int8"])
    err = capsys.readouterr().err
    assert code == 2 and "this artifact has no LLM decoder" in err and "fix: drop --backend-option openvino.weights" \
        in err
    code = main(["run", str(blip2_artifact), photos[0], "--backend", "onnxruntime",
                 "--backend-option", "torch.quantization=nf4"])
    assert code == 2 and "the decoder runs on onnxruntime" in capsys.readouterr().err


def test_a_fix_never_suggests_a_backend_that_would_refuse_the_setting_too(pytorch_artifacts, clip_artifacts, photos,
                                                                           capsys):
    """"add --backend X" led to a second refusal where X cannot run the artifact (torch runs no IDEFICS decoder), where
    X cannot run here (no OpenVINO GPU), or where the setting would change nothing under X's plan too (CUDA graphs on
    a CPU); in run, doctor and bench alike."""
    idefics = str(pytorch_artifacts("idefics"))
    assert main(["run", idefics, photos[0], "--backend", "torch"]) != 0
    capsys.readouterr()
    cases = ((["run", idefics, photos[0]], "torch.dtype=bf16", "(--backend torch fails here:"),
             (["run", str(clip_artifacts("fused-fp32")), photos[0], "--backend", "onnxruntime"], "openvino.device=GPU",
              "(--backend openvino fails here:"),
             (["doctor", str(pytorch_artifacts("clip"))], "torch.cuda_graphs=true", "(with --backend torch too:"),
             (["bench", str(pytorch_artifacts("clip")), "--runs", "3"], "torch.cuda_graphs=true",
              "(with --backend torch too:"))
    for command, setting, why in cases:
        assert main([*command, "--backend-option", setting]) == 2
        err = capsys.readouterr().err
        option = setting.split("=")[0]
        assert "add --backend" not in err and f"fix: drop --backend-option {option} {why}" in err, err


def test_run_against_a_server_refuses_local_settings(photos, capsys):
    code = main(["run", "model", photos[0], "--triton", "http://127.0.0.1:1", "--backend-option",
                 "onnxruntime.device_id=0"])
    assert code == 2 and "--backend-option would change nothing with --triton" in capsys.readouterr().err


@needs_openvino
def test_doctor_shows_the_plan_the_settings_make(blip2_artifact, capsys):
    assert main(["doctor", str(blip2_artifact), "--backend", "openvino", "--json",
                 "--backend-option", "openvino.weights=int4"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["decoder"]["precision"] == "fp32+nncf-int4"
    assert all("nncf" not in c["precision"] for name, c in plan.items() if name != "decoder")
    assert main(["doctor", "--backend-option", "openvino.device=CPU"]) == 2
    assert "--backend-option would change nothing without an artifact" in capsys.readouterr().err


# --- several artifacts: serve and bench give each the settings its plan uses -------------------------------------
@needs_openvino
def test_serve_gives_each_artifact_the_settings_its_plan_uses(clip_artifacts, blip2_artifact, tmp_path):
    pytest.importorskip("nncf", reason="compressing the decoder's weights at load needs NNCF (mmedge[openvino])")
    from mmedge.serve.models import load_models
    from mmedge.serve.options import ServeOptions, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    clip, blip2 = _copy(clip_artifacts("fused-fp32"), tmp_path), _copy(blip2_artifact, tmp_path)
    args = parser.parse_args([str(clip), str(blip2), "--backend", "openvino", "--backend-option",
                              "openvino.weights=int8", "--backend-option", "openvino.shape_cache=64"])
    models = load_models(ServeOptions.from_args(args))
    try:
        cards = {model_id: model.card for model_id, model in models.items()}
        assert cards[blip2.name]["plan"]["decoder"]["precision"] == "fp32+nncf-int8"
        assert {c["backend"] for c in cards[clip.name]["plan"].values()} == {"openvino"}
        assert models[blip2.name].captioner.caption(str(ROOT / "mmedge/demo/images/scene-00.png"), max_new_tokens=2)
    finally:
        for model in models.values():
            model.close()
    args = parser.parse_args([str(clip), "--backend", "openvino", "--backend-option", "openvino.weights=int8"])
    with pytest.raises(InputError, match=r"would change nothing for any artifact given \(.*\): this artifact has no "
                                         r"LLM decoder.*fix: drop --backend-option openvino.weights"):
        load_models(ServeOptions.from_args(args))


def test_bench_records_the_settings_beside_its_figures(clip_artifacts):
    command = ["bench", str(clip_artifacts("fused-int8")), "--runs", "2", "--batch", "2", "--json",
               "--backend-option", "onnxruntime.graph_optimization=extended"]
    out = subprocess.run([sys.executable, "-m", "mmedge.cli", *command], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    [result] = json.loads(out.stdout)
    assert result["backend_options"] == {"onnxruntime": {"graph_optimization": "extended"}}
    from mmedge.bench import format_table

    assert "onnxruntime (onnxruntime.graph_optimization=extended)" in format_table([result])


def test_validate_measures_the_graphs_with_the_settings(clip_artifacts, blip2_artifact, capsys, monkeypatch):
    """validate took --backend-option (a runtime flag) and ignored it."""
    from mmedge import validate

    seen = []
    real = validate.validate_artifact
    monkeypatch.setattr(validate, "validate_artifact", lambda *a, **k: seen.append(k["backend_options"]) or
                        real(*a, **k))
    path = str(clip_artifacts("fused-fp32"))
    assert main(["validate", path, "--backend-option", "onnxruntime.graph_optimization=basic"]) == 0, \
        capsys.readouterr().err
    assert seen == [{"onnxruntime": {"graph_optimization": "basic"}}] and "ok" in capsys.readouterr().out
    assert main(["validate", path, "--backend-option", "openvino.device=CPU", "--backend", "onnxruntime"]) == 2
    assert "no component runs on openvino" in capsys.readouterr().err
    assert main(["validate", str(blip2_artifact), "--backend-option", "openvino.weights=int8"]) == 2
    assert "--backend-option openvino.weights=int8 would change nothing in validation" in capsys.readouterr().err
    with pytest.raises(InputError, match="would change nothing in validation"):
        real(blip2_artifact, backend_options={"openvino": {"weights": "int8"}})
    for bad in ({"onnxruntime": None}, ["onnxruntime"], {"bogus": {}}):  # judged as mmedge.load judges them
        with pytest.raises(InputError, match="backend_options"):
            real(blip2_artifact, backend_options=bad)


def test_every_command_with_a_plan_takes_the_flag():
    parser = build_parser()
    for command in (["run", "A", "I"], ["doctor", "A"], ["bench", "A"], ["serve", "A"], ["validate", "A"]):
        args = parser.parse_args([*command, "--backend-option", "openvino.device=CPU"])
        assert args.backend_option == ["openvino.device=CPU"], command
