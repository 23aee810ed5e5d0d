"""Every `mmedge export` and `mmedge run` option against every family and task, from one table each: an option that
would change nothing is refused with exit 2 and a one-line reason naming it, before anything is loaded; one that does
something gets through to the export or the run.

The tables are written out here, independently of the rules in ``mmedge.export.option_checks`` and
``mmedge.run_options``: each row is a set of flags and the families (export) or artifacts (run) it works for.
"""

from __future__ import annotations

import json

import pytest

import mmedge
from mmedge.cli import main
from mmedge.errors import MmedgeError

FAMILIES = ("clip", "blip2", "idefics")
GENERATIVE = {"blip2", "idefics"}
EVERY = set(FAMILIES)

EXPORT = [  # flags, the families where they do something
    (["--precision", "fp16"], EVERY),
    (["--with-pytorch"], EVERY),
    (["--llm-precision", "int4"], GENERATIVE),
    (["--llm-precision", "fp16"], GENERATIVE),
    (["--quantization", "static"], set()),  # FP32: nothing to quantize
    (["--quantization", "dynamic"], set()),
    (["--precision", "int8", "--quantization", "static"], EVERY),
    (["--precision", "int8", "--quantization", "dynamic"], EVERY),
    (["--llm-precision", "int8", "--quantization", "dynamic"], GENERATIVE),
    (["--llm-precision", "int8", "--quantization", "static"], set()),  # an INT8 LLM is never calibrated
    (["--int4-block-size", "64"], set()),
    (["--precision", "int8", "--int4-block-size", "64"], set()),
    (["--llm-precision", "int4", "--int4-block-size", "64"], GENERATIVE),
    (["--int4-accuracy-level", "0"], set()),
    (["--llm-precision", "int4", "--int4-accuracy-level", "0"], GENERATIVE),
    (["--int4-head", "fp32"], set()),
    (["--llm-precision", "int8", "--int4-head", "fp32"], set()),
    (["--llm-precision", "int4", "--int4-head", "fp32"], GENERATIVE),
    (["--int4-symmetric"], set()),
    (["--llm-precision", "int4", "--int4-symmetric"], GENERATIVE),
    (["--calibration", "{images}"], set()),
    (["--precision", "int8", "--calibration", "{images}"], set()),  # dynamic INT8 calibrates nothing
    (["--precision", "int8", "--quantization", "static", "--calibration", "{images}"], EVERY),
    (["--calibration-method", "minmax"], set()),
    (["--precision", "int8", "--quantization", "static", "--calibration-method", "minmax"], EVERY),
    (["--fidelity-images", "{images}"], set()),  # FP32 measures no fidelity
    (["--precision", "int8", "--fidelity-images", "{images}"], EVERY),
    (["--llm-precision", "int4", "--fidelity-images", "{images}"], GENERATIVE),
    (["--labels", "cat", "dog"], {"clip"}),
    (["--task", "embed", "--labels", "cat"], set()),
    (["--templates", "a {}."], set()),
    (["--labels", "cat", "--templates", "a {}."], {"clip"}),
    (["--precision", "int8", "--templates", "a {}."], {"clip"}),  # the text graph's calibration and fidelity prompts
    (["--no-split-matmuls"], EVERY),  # every family's FP32 image graph (refused after tracing where its MLPs are
    # too short to split: tests/test_graph_rewrites.py)
    (["--precision", "int8", "--no-split-matmuls"], set()),  # quantized image graphs keep their MatMuls whole
    (["--precision", "fp16", "--no-split-matmuls"], set()),
    (["--llm-precision", "int4", "--no-split-matmuls"], GENERATIVE),  # the image graph stays FP32
    (["--split-prefix"], {"blip2"}),
    (["--fused-attention"], {"blip2"}),
    (["--llm-precision", "int4", "--fused-attention"], {"blip2"}),
    (["--recompute-cross-kv"], {"idefics"}),
    (["--task", "zero-shot"], {"clip"}),
    (["--task", "embed"], {"clip"}),
    (["--task", "caption"], set()),  # a captioning artifact answers captions and questions alike
    (["--task", "vqa"], set()),
    (["--openvino-weights", "int4"], GENERATIVE),  # NNCF compresses the FP32 decoder
    (["--openvino-weights", "int4", "--llm-precision", "int4"], set()),  # the decoder is no longer FP32
    (["--random-weights", "--allow-pickle"], set()),  # random weights load no weights, pickled or not
]


class Reached(MmedgeError):
    """Raised by the stand-ins below: the command got past every check to the export or the run."""

    exit_code = 99


@pytest.fixture
def checkpoints(tiny_clip_dir, tiny_blip2_dir, tiny_idefics_dir):
    return {"clip": tiny_clip_dir, "blip2": tiny_blip2_dir, "idefics": tiny_idefics_dir}


def _stand_in(*args, **kwargs):
    raise Reached("reached", "-", "-")


def _one_refusal_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmedge: error: ") and "Traceback" not in err, err
    return lines[0]


def _check_outcome(code: int, err: str, works: bool, flags: list[str]) -> None:
    """Through to the (stubbed) export or run when the flags work; else one exit-2 line naming one of them."""
    if works:
        assert code == Reached.exit_code, err
        return
    line = _one_refusal_line(err)
    assert code == 2 and "expected" in line and "fix:" in line, line
    assert "would change nothing" in line or "not a" in line, line  # idle option, or a task the family lacks
    assert any(flag in line for flag in flags if flag.startswith("--")) or "task" in line, line


@pytest.mark.parametrize("flags,works", EXPORT, ids=[" ".join(f) for f, _ in EXPORT])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_options(family, flags, works, checkpoints, tmp_path, capsys, monkeypatch, photos):
    import mmedge.export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_export", _stand_in)  # past the checks nothing is loaded here
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(open(photos[0], "rb").read())
    argv = [a.replace("{images}", str(tmp_path / "images")) for a in flags]
    out = tmp_path / "out"
    code = main(["export", str(checkpoints[family]), str(out), *argv])
    _check_outcome(code, capsys.readouterr().err, family in works, flags)
    assert not out.exists()


CAPTIONING = {"blip2", "idefics"}
TARGETS = ("clip", "clip-fused", "clip-embed", "blip2", "idefics")
RUN = [  # flags, the artifacts where they do something
    (["--json"], set(TARGETS)),
    (["--labels", "cat", "dog"], {"clip"}),
    (["--labels-file", "{labels}"], {"clip"}),
    (["--templates", "a {}."], {"clip"}),
    (["--top-k", "1"], {"clip", "clip-fused"}),
    (["--prompt", "a photo of"], CAPTIONING),
    (["--question", "what is it?"], CAPTIONING),
    (["--prompt", "a", "--question", "what is it?"], set()),  # the question makes the prompt
    (["--interleaved"], {"idefics"}),
    (["--interleaved", "--prompt", "a"], set()),
    (["--stream"], CAPTIONING),
    (["--stream", "--json"], set()),  # JSON prints whole results
    (["--max-new-tokens", "3"], CAPTIONING),
    (["--num-beams", "2"], CAPTIONING),
    (["--stop", "."], CAPTIONING),
    (["--sample"], CAPTIONING),
    (["--temperature", "0.7"], set()),  # without --sample: greedy
    (["--top-p", "0.9"], set()),
    (["--top-k-tokens", "5"], set()),
    (["--seed", "1"], set()),
    (["--sample", "--temperature", "0.7", "--top-p", "0.9", "--top-k-tokens", "5", "--seed", "1"], CAPTIONING),
    # these artifacts hold no PyTorch weights: the plan keeps the decoder on ONNX Runtime, so it is refused before
    # loading; the test below runs it where the decoder is on torch
    (["--llm-quantization", "nf4"], set()),
    (["--openvino-weights", "int4"], set()),  # auto keeps these decoders on ONNX Runtime: refused before loading
]


@pytest.fixture
def artifacts(clip_artifacts, blip2_artifact, pytorch_artifacts):
    clip = clip_artifacts("fp32")
    return {"clip": (clip, []), "clip-fused": (clip_artifacts("fused-fp32"), []),
            "clip-embed": (clip, ["--task", "embed"]),
            "blip2": (blip2_artifact, []), "idefics": (pytorch_artifacts("idefics"), [])}


@pytest.mark.parametrize("flags,works", RUN, ids=[" ".join(f) for f, _ in RUN])
@pytest.mark.parametrize("target", TARGETS)
def test_run_options(target, flags, works, artifacts, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mmedge, "load", _stand_in)  # past the checks nothing is loaded here
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    path, task = artifacts[target]
    if target == "clip" and not {"--labels", "--labels-file"} & set(flags):
        task = [*task, "--labels", "cat", "dog"]  # a two-graph run without labels is refused before it loads
    code = main(["run", str(path), photos[0], *task, *[a.replace("{labels}", str(labels)) for a in flags]])
    _check_outcome(code, capsys.readouterr().err, target in works, flags)


def test_llm_quantization_is_refused_where_the_decoder_is_not_on_torch(pytorch_artifacts, photos, capsys):
    """The one check that needs the plan: BLIP-2 exported --with-pytorch, on ONNX Runtime, then on torch (CPU)."""
    path = pytorch_artifacts("blip2")
    code = main(["run", str(path), photos[0], "--llm-quantization", "int8", "--backend", "onnxruntime"])
    assert code == 2 and "decoder runs on onnxruntime" in _one_refusal_line(capsys.readouterr().err)
    pytest.importorskip("bitsandbytes", reason="the torch backend's INT8 LLM weights need bitsandbytes")
    code = main(["run", str(path), photos[0], "--llm-quantization", "int8", "--backend", "torch", "--max-new-tokens",
                 "2"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith(photos[0]), err


def test_openvino_weights_reach_the_decoder_from_the_command_line(blip2_artifact, photos, capsys, tmp_path):
    """NNCF weights on OpenVINO were reachable from Python only (backend_options), so an IR `mmedge export
    --openvino-weights` wrote could not be run by `mmedge run`. On a copy: the compiled model is cached in the
    artifact's engines/, which other tests' copies of the session's artifact must not inherit."""
    import shutil

    pytest.importorskip("openvino", reason='the OpenVINO backend needs mmedge[openvino]')
    pytest.importorskip("nncf", reason="compressing the decoder's weights at load needs NNCF (mmedge[openvino])")
    blip2_artifact = shutil.copytree(blip2_artifact, tmp_path / "blip2")
    code = main(["run", str(blip2_artifact), photos[0], "--openvino-weights", "int4", "--backend", "onnxruntime"])
    assert code == 2 and "--openvino-weights int4 would change nothing: the decoder runs on onnxruntime" in (
        _one_refusal_line(capsys.readouterr().err))
    code = main(["run", str(blip2_artifact), photos[0], "--openvino-weights", "int4", "--backend", "openvino",
                 "--max-new-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["image"] == photos[0], err
