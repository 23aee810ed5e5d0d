"""A graph OpenVINO cannot take: under ``auto`` it runs on ONNX Runtime (one warning per load; nothing is recorded
at a load, as the failure may have been passing), a backend the user named still refuses with a BackendError carrying
OpenVINO's own words, and ``mmedge tune`` records the refusal, times the other graphs, and ``auto`` then plans ONNX
Runtime for that graph.

The graph is the tiny static-QDQ CLIP's vision tower with one operator OpenVINO's ONNX front end has no conversion
for (``Det`` of a constant [[0]], added to an output: ONNX Runtime runs it, the outputs are unchanged), as the
shipped BLIP-2 demo's static-QDQ Q-Former is refused by OpenVINO's CPU compiler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import mmedge
from mmedge.api import plan_for
from mmedge.artifact import Artifact
from mmedge.cli import main
from mmedge.errors import BackendError
from mmedge.runtimes.openvino.tune import tune
from mmedge.tuning import store, timings_path
from mmedge.validate import load_validation_samples
from tests.test_openvino import needs_openvino

needs_x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                               reason="auto gives OpenVINO components only on x86 CPUs")
UNSUPPORTED = "No conversion rule found for operations: Det"  # what OpenVINO says, past its call-stack lines


def _with_det(folder, component: str = "vision") -> None:
    """Add ``output + Det([[0]])`` to the component's first output (same values) and re-record its sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["components"][component]
    path = folder / entry["file"]
    model = onnx.load(path)
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{output}_before_det" if name == output else name for name in node.output]
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1), np.float32), "det_input"))
    graph.node.extend([helper.make_node("Det", ["det_input"], ["det_zero"]),
                       helper.make_node("Add", [f"{output}_before_det", "det_zero"], [output])])
    onnx.save(model, path)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def refused_clip(clip_artifacts, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(clip_artifacts("int8-static"), folder, ignore=shutil.ignore_patterns("engines"))
    _with_det(folder)
    return folder


@needs_openvino
@needs_x86
def test_auto_runs_a_graph_openvino_refuses_on_onnx_runtime(refused_clip, caplog):
    feeds = load_validation_samples(Artifact.open(refused_clip))["vision"]["inputs"]
    assert plan_for(refused_clip).components["vision"].backend == "openvino"  # the rule gives OpenVINO static QDQ
    with caplog.at_level(logging.WARNING, logger="mmedge"), mmedge.load(refused_clip) as auto:
        assert auto.runners["vision"].backend == "onnxruntime"
        assert auto.runners["text"].backend == "openvino"  # the graph OpenVINO takes stays on it
        assert "vision=onnxruntime, text=openvino" in repr(auto)  # what runs, not what was planned
        embeds = auto.runners["vision"].infer(feeds)
    warned = [r.getMessage() for r in caplog.records if "auto runs component 'vision'" in r.getMessage()]
    assert len(warned) == 1 and UNSUPPORTED in warned[0] and "on onnxruntime instead" in warned[0]
    assert "`mmedge tune ARTIFACT` records this" in warned[0]
    with mmedge.load(refused_clip, backend="onnxruntime") as reference:
        expected = reference.runners["vision"].infer(feeds)
    for name, value in expected.items():
        np.testing.assert_array_equal(embeds[name], value)

    assert not list((refused_clip / "engines").glob("*refus*"))  # a passing failure (memory) is not made lasting
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmedge"), mmedge.load(refused_clip) as again:
        assert again.runners["vision"].backend == "onnxruntime"
    assert any(UNSUPPORTED in r.getMessage() for r in caplog.records)  # OpenVINO was asked again


@needs_openvino
@needs_x86
def test_a_graph_openvino_refuses_is_re_planned_on_onnx_runtime_with_the_user_s_settings(refused_clip, caplog):
    record = tune(refused_clip, threads=1, runs=3, progress=False)
    vision, text = record["components"]["vision"], record["components"]["text"]
    # as measured where OpenVINO read the vision graph (the failure was passing) and ONNX Runtime ran text faster
    vision.pop("openvino_failed")
    vision.update(openvino_ms=1.0, onnxruntime_ms=100.0)
    text.update(openvino_ms=100.0, onnxruntime_ms=1.0)
    store(timings_path(Artifact.open(refused_clip)), record)
    planned = plan_for(refused_clip, threads=1).components
    assert (planned["vision"].backend, planned["text"].backend) == ("openvino", "onnxruntime")
    options = {"onnxruntime": {"graph_optimization": "disable"}}  # taken: ONNX Runtime runs text in the plan
    with caplog.at_level(logging.WARNING, logger="mmedge"), \
            mmedge.load(refused_clip, threads=1, backend_options=options) as auto:
        assert auto.plan.components["vision"].backend == "onnxruntime"  # what runs, as /v1/models and bench say
        assert auto.plan.components["vision"].options.get("fallback") is None
        assert auto.runners["vision"].options.graph_optimization == "disable"  # the user's setting reached it
        assert [reason for reason in auto.plan.fallbacks if UNSUPPORTED in reason]
    assert sum("auto runs component 'vision'" in r.getMessage() for r in caplog.records) == 1


@needs_openvino
def test_a_named_openvino_refuses_with_a_backend_error_in_openvino_s_own_words(refused_clip):
    with pytest.raises(BackendError) as info:
        mmedge.load(refused_clip, backend="openvino")
    message = str(info.value)
    assert type(info.value) is BackendError  # the artifact is intact: not an IntegrityError
    assert "OpenVINO could not read component 'vision'" in message and UNSUPPORTED in message
    assert "Exception from src" not in message


@needs_openvino
@needs_x86
def test_tune_records_the_refused_graph_and_times_the_others(refused_clip, capsys):
    assert main(["tune", str(refused_clip), "--threads", "1", "--runs", "3", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "vision: ONNX Runtime" in said and "ms, OpenVINO could not read component 'vision'" in said, said
    assert UNSUPPORTED in said and "-> auto runs it on onnxruntime" in said
    record = tune(refused_clip, threads=1, runs=3, progress=False)
    vision, text = record["components"]["vision"], record["components"]["text"]
    assert vision["openvino_ms"] is None and UNSUPPORTED in vision["openvino_failed"] and vision["onnxruntime_ms"] > 0
    assert text["openvino_ms"] > 0 and "openvino_failed" not in text
    chosen = plan_for(refused_clip, threads=1)
    assert chosen.components["vision"].backend == "onnxruntime"
    assert any("component 'vision'" in r and "OpenVINO could not run it when mmedge tune measured" in r
               for r in chosen.reasons)
