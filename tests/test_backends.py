"""The backend contract (``mmedge.backends``): a new backend plugs in through the registry alone, selection asks the
backends in priority order, unknown options are typed errors, and the core names no backend module."""

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.artifact import Artifact
from mmedge.device import probe
from mmedge.errors import InputError
from mmedge.runtimes import registry
from mmedge.selection import plan
from tests.support.battery import api_error
from tests.support.single_thread_plugin import INFO

ROOT = Path(mmedge.__file__).parent.parent
CORE = ("mmedge/selection.py", "mmedge/api.py", "mmedge/validate.py", "mmedge/backends.py", "mmedge/pipelines")
# what the core may import from mmedge.runtimes: the registry, and backend-neutral helpers
CORE_MAY_IMPORT = ("mmedge.runtimes", "mmedge.runtimes.registry")


@pytest.fixture
def plugged(monkeypatch):
    """The registry with the test plug-in added, exactly as a new backend adds its row."""
    monkeypatch.setitem(registry.BACKENDS, INFO.name, INFO)
    return INFO.name


def load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny artifacts come from random weights
        return mmedge.load(path, **kwargs)


def test_a_plugged_in_backend_is_planned_and_loaded(plugged, clip_artifacts, photos):
    path = clip_artifacts("fp32")
    chosen = plan(probe(), Artifact.open(path).manifest)
    assert chosen.components["text"].backend == plugged and chosen.components["vision"].backend == "onnxruntime"
    assert any(reason.startswith("backend ort-single: text") for reason in chosen.reasons)
    default, plugged_in = load(path, backend="onnxruntime"), load(path)
    assert plugged_in.runners["text"].backend == "onnxruntime"  # the plug-in's runner is a real ORT session
    labels = ["cat", "dog", "car"]
    np.testing.assert_allclose(plugged_in.probabilities(photos[:2], labels), default.probabilities(photos[:2], labels),
                               rtol=1e-4, atol=1e-5)


def test_a_plugged_in_backend_named_explicitly_takes_everything(plugged, clip_artifacts):
    classifier = load(clip_artifacts("fp32"), backend=plugged,
                      backend_options={plugged: {"graph_optimization": "basic"}})
    assert {c.backend for c in classifier.plan.components.values()} == {plugged}
    api_error(lambda: load(clip_artifacts("fp32"), backend=plugged, backend_options={plugged: {"threads": 4}}),
              InputError, "unknown settings ['threads']", "graph_optimization")


def test_priority_order_and_settings_come_from_the_plug_ins():
    assert [b.name for b in registry.backends()] == ["tensorrt", "torch", "openvino", "onnxruntime"]
    assert registry.backend("tensorrt").settings is None
    assert "quantization" in registry.backend("torch").settings_fields()
    assert "threads" not in registry.backend("onnxruntime").settings_fields()  # the plan sets it


def test_backend_options_for_a_backend_without_settings_are_refused(clip_artifacts):
    api_error(lambda: load(clip_artifacts("fp32"), backend_options={"tensorrt": {"precision": "fp16"}}),
              InputError, "backend_options names backend 'tensorrt'", "torch, openvino, onnxruntime")


def test_backend_options_for_a_backend_the_plan_does_not_use_are_refused(clip_artifacts):
    """Under auto, the FP32 CLIP runs on ONNX Runtime here: OpenVINO settings would do nothing and are refused."""
    path = clip_artifacts("fp32")
    assert {c.backend for c in load(path, backend="onnxruntime").plan.components.values()} == {"onnxruntime"}
    api_error(lambda: load(path, backend="onnxruntime", backend_options={"openvino": {"device": "CPU"}}),
              InputError, "settings for openvino, which runs no component here", "pass backend='openvino'")
    load(path, backend="onnxruntime", backend_options={"onnxruntime": {"graph_optimization": "basic"}})


@pytest.mark.parametrize("backend_name,call", [
    ("onnxruntime", lambda a: registry.create_runner("onnxruntime", a.component_path("vision"), "vision",
                                                     a.component("vision"), thread=2)),
    ("tensorrt", lambda a: registry.create_runner("tensorrt", a.component_path("vision"), "vision",
                                                  a.component("vision"), artifact=a, thread=2)),
    ("torch", lambda a: registry.create_runner("torch", None, "vision", a.component("vision"), artifact=a, thread=2)),
])
def test_unknown_runner_options_are_typed_errors(clip_artifacts, backend_name, call):
    """No backend swallows an option it does not know (they used to vanish in **_ignored)."""
    api_error(lambda: call(Artifact.open(clip_artifacts("fp32"))), InputError,
              f"backend '{backend_name}' got unknown options ['thread']")


def test_unknown_torch_decoder_options_are_typed_errors(blip2_artifact):
    from mmedge.runtimes.torch_decoder import create_decoder

    api_error(lambda: create_decoder(Artifact.open(blip2_artifact), max_graphs=2), InputError,
              "backend 'torch' got unknown options ['max_graphs']")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_core_names_no_backend_module():
    """selection, loading, validation and the pipelines reach backends only through the registry."""
    for entry in CORE:
        for path in sorted((ROOT / entry).rglob("*.py")) if (ROOT / entry).is_dir() else [ROOT / entry]:
            for name in _imports(path):
                if name.startswith("mmedge.runtimes"):
                    assert name in CORE_MAY_IMPORT, f"{path.relative_to(ROOT)} imports {name}"


STOP_SPINNING = "session.force_spinning_stop"


def _sessions(pipeline) -> list:
    """Every ONNX Runtime session a loaded pipeline holds: its runners' and its decoder's."""
    sessions = [runner._session for runner in pipeline.runners.values()]
    decoder = getattr(pipeline, "decoder", None)
    return sessions + ([decoder.session] if decoder is not None else [])


def _entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ONNX Runtime's answer for a key the session was not given
        return None


def test_graphs_that_take_turns_on_the_cpu_stop_spinning_after_each_call(blip2_artifact, clip_artifacts):
    """A generation pipeline runs its image graph, then its decoder step after step: every session's CPU threads stop
    spinning when a call returns (the next graph gets the cores), and the plan says why. A user's entries go on top,
    key by key; a one-graph CLIP keeps ONNX Runtime's default (its threads spin on between calls)."""
    with load(blip2_artifact, backend="onnxruntime", device="cpu") as captioner:
        sessions = _sessions(captioner)
        assert len(sessions) == 2 and [_entry(s, STOP_SPINNING) for s in sessions] == ["1", "1"]
        assert any(STOP_SPINNING in reason for reason in captioner.plan.reasons)
    mine = {STOP_SPINNING: "0", "session.intra_op.allow_spinning": "1"}
    with load(blip2_artifact, backend="onnxruntime", device="cpu",
              backend_options={"onnxruntime": {"config_entries": mine}}) as captioner:
        assert [{key: _entry(s, key) for key in mine} for s in _sessions(captioner)] == [mine, mine]
    with load(clip_artifacts("fused-fp32"), backend="onnxruntime", device="cpu") as classifier:
        assert [_entry(s, STOP_SPINNING) for s in _sessions(classifier)] == [None]
        assert not any(STOP_SPINNING in reason for reason in classifier.plan.reasons)
