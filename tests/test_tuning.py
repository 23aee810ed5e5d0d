"""``mmedge tune``: every component timed on ONNX Runtime and OpenVINO on this machine, stored per device and graph,
and ``auto`` deciding those components from the measurement instead of the rule (``mmedge.runtimes.openvino.tune``
measures, ``mmedge.tuning`` stores and matches).

Timings are never asserted against each other (they depend on the CPU); what is asserted is that both backends ran
each graph with the same feeds, that the record is keyed so it is used only where it was measured, and that the plan
follows whichever figure is stored.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmedge.api import plan_for
from mmedge.artifact import Artifact
from mmedge.device import probe
from mmedge.errors import BackendUnavailableError, InputError
from mmedge.metrics import cosine_rows
from mmedge.runtimes.openvino.tune import decode_step_feeds, tune
from mmedge.runtimes.registry import backends, create_runner
from mmedge.tuning import measured_for, timings_path
from mmedge.validate import load_validation_samples
from tests.test_openvino import needs_openvino

ROOT = Path(__file__).resolve().parent.parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_x86 = pytest.mark.skipif(not X86, reason="auto gives OpenVINO components only on x86 CPUs, so tune refuses here")


@pytest.fixture
def clip_copy(clip_artifacts, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(clip_artifacts("int8-static"), folder)
    return folder


def _rewrite(folder: Path, onnxruntime_ms: float, openvino_ms: float, **device) -> None:
    """Set every stored timing (the plan's inputs), and optionally the record's device key."""
    path = timings_path(Artifact.open(folder))
    stored = json.loads(path.read_text())
    for record in stored["records"]:
        record["device"].update(device)
        for timing in record["components"].values():
            timing.update(onnxruntime_ms=onnxruntime_ms, openvino_ms=openvino_ms)
    path.write_text(json.dumps(stored))


@needs_openvino
@needs_x86
def test_tune_times_every_graph_and_auto_follows_the_measurement(clip_copy):
    record = tune(clip_copy, threads=1, runs=3, progress=False)
    artifact = Artifact.open(clip_copy)
    assert set(record["components"]) == set(artifact.components)
    for name, timing in record["components"].items():
        assert timing["onnxruntime_ms"] > 0 and timing["openvino_ms"] > 0
        assert timing["sha256"] == artifact.component(name)["sha256"]
        assert "validation sample" in timing["inputs"]
    assert record["device"]["threads"] == 1 and record["device"]["cpu_model"] == probe().cpu_model
    assert set(measured_for(artifact, probe(), 1)) == set(artifact.components)

    _rewrite(clip_copy, onnxruntime_ms=100.0, openvino_ms=10.0)
    chosen = plan_for(clip_copy, threads=1)
    assert {c.backend for c in chosen.components.values()} == {"openvino"}
    assert any(f"measured here by mmedge tune at {record['measured_at']}" in reason and "OpenVINO 10 ms" in reason
               for reason in chosen.reasons)
    assert all("here: openvino is faster by more than the margin" in r for r in chosen.reasons if "component" in r)
    stored = json.loads(timings_path(artifact).read_text())
    stored["records"][0]["components"][next(iter(artifact.components))].pop("openvino_ms")  # a timing without its
    timings_path(artifact).write_text(json.dumps(stored))  # figure crashed every plan: now the file counts as none
    assert measured_for(artifact, probe(), 1) == {} and plan_for(clip_copy, threads=1).components
    _rewrite(clip_copy, onnxruntime_ms=10.0, openvino_ms=100.0)
    assert {c.backend for c in plan_for(clip_copy, threads=1).components.values()} == {"onnxruntime"}
    # a near tie stays on ONNX Runtime, and the reason says so instead of calling the slower one faster
    _rewrite(clip_copy, onnxruntime_ms=44.9, openvino_ms=43.4)
    near = plan_for(clip_copy, threads=1)
    assert {c.backend for c in near.components.values()} == {"onnxruntime"}
    assert all("onnxruntime kept: OpenVINO is faster by less than the 10% margin" in r
               for r in near.reasons if "component" in r)
    assert not any("onnxruntime is faster" in r for r in near.reasons)
    engines = [line for b in backends() for line in b.artifact_lines(Artifact.open(clip_copy))]
    assert not any("unreadable record" in line for line in engines)  # the timings are not a TensorRT engine

    # measured at 1 thread per graph: a load at 2 threads follows the rule, not these figures
    by_rule = [r for r in plan_for(clip_copy, threads=2).reasons if r.startswith("component")]
    assert by_rule and not any("measured here by mmedge tune" in reason for reason in by_rule)
    # the rule's figures are another machine's, for another graph: not quoted as this component's
    assert all("reference figures of a full-size graph, not this one" in r and "`mmedge tune ARTIFACT`" in r
               and " ms vs " not in r for r in by_rule), by_rule
    # another CPU's record is kept and ignored
    _rewrite(clip_copy, onnxruntime_ms=100.0, openvino_ms=10.0, cpu_model="some other CPU")
    assert measured_for(artifact, probe(), 1) == {}


@needs_openvino
@needs_x86
def test_a_record_for_another_graph_is_ignored_and_a_broken_file_is_a_cache_miss(clip_copy, caplog):
    tune(clip_copy, threads=1, runs=3, progress=False)
    artifact = Artifact.open(clip_copy)
    path = timings_path(artifact)
    stored = json.loads(path.read_text())
    name = next(iter(artifact.components))
    stored["records"][0]["components"][name]["sha256"] = "0" * 64  # measured on a graph that is not this one
    path.write_text(json.dumps(stored))
    assert name not in measured_for(artifact, probe(), 1)
    path.write_text("{not json")
    assert measured_for(artifact, probe(), 1) == {}
    assert "run `mmedge tune`" in caplog.text
    tune(clip_copy, threads=1, runs=3, progress=False)  # writes a readable file again
    assert set(measured_for(artifact, probe(), 1)) == set(artifact.components)


@needs_openvino
@pytest.mark.parametrize("fixture", ["blip2_artifact", "blip2_t5_artifact"])
def test_decode_step_feeds_run_on_both_backends_with_the_same_logits(fixture, request):
    """The decoder is timed on one decode step after the validation prompt: feeds both engines take, giving the same
    FP32 logits, one position wide (an OPT decoder, and a T5 decoder with its encoder's cross K/V as context)."""
    artifact = Artifact.open(request.getfixturevalue(fixture))
    component = artifact.component("decoder")
    prompt = load_validation_samples(artifact)["decoder"]["inputs"]
    path = artifact.component_path("decoder")
    ort = create_runner("onnxruntime", path, "decoder", component, providers=("cpu",))
    ov = create_runner("openvino", path, "decoder", component, device="CPU")
    try:
        step = decode_step_feeds(component, prompt, ort.infer(prompt))
        assert step["inputs_embeds"].shape[1] == 1
        cached = step["past_key_values.0.key"].shape[2]
        assert step["attention_mask"].shape == (prompt["attention_mask"].shape[0], cached + 1)
        expected, actual = ort.infer(step)["logits"], ov.infer(step)["logits"]
        assert expected.shape[1] == 1
        flat = expected.reshape(expected.shape[0], -1)
        assert float(cosine_rows(flat, np.asarray(actual).reshape(flat.shape)).min()) >= 0.9999
    finally:
        ort.close()
        ov.close()


def test_tune_refuses_where_it_would_do_nothing_or_bad_counts(clip_artifacts, monkeypatch):
    with pytest.raises(InputError, match="runs is 1"):
        tune(clip_artifacts("fp32"), runs=1)
    with pytest.raises(InputError, match="threads is 0"):
        tune(clip_artifacts("fp32"), threads=0)
    import mmedge.device

    monkeypatch.setattr(mmedge.device, "importable", lambda module: module != "openvino")
    with pytest.raises(BackendUnavailableError, match=r'nothing to tune.*|mmedge\[openvino\]'):
        tune(clip_artifacts("fp32"), runs=3)


@needs_openvino
@needs_x86
def test_cli_tune_prints_the_figures_and_doctor_gives_the_reason(clip_copy):
    out = subprocess.run([sys.executable, "-m", "mmedge.cli", "tune", str(clip_copy), "--threads", "1", "--runs", "3",
                          "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime" in out.stdout and "OpenVINO" in out.stdout and "-> auto runs it on" in out.stdout
    doctor = subprocess.run([sys.executable, "-m", "mmedge.cli", "doctor", str(clip_copy), "--threads", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert doctor.returncode == 0, doctor.stderr
    assert "measured here by mmedge tune" in doctor.stdout


def test_turns_time_each_backend_after_its_own_hand_over_call():
    """Each backend is timed as it runs with the graph to itself: the first call after the other backend ran (its
    threads still busy) is untimed. A call made right after the other backend costs 50 ms on this model clock, one
    after its own 10 ms; every timed call must be a 10 ms one, and the turns must reach ``runs`` per backend."""
    from mmedge.runtimes.openvino.tune import _in_turns

    now, last, calls = [0.0], [None], []

    def call(name):
        def run():
            now[0] += 0.050 if last[0] not in (None, name) else 0.010
            last[0] = name
            calls.append(name)
        return run

    medians = _in_turns({"onnxruntime": call("onnxruntime"), "openvino": call("openvino")}, runs=7, block=3,
                        warmup=0, clock=lambda: now[0])
    assert medians == {"onnxruntime": pytest.approx(10.0), "openvino": pytest.approx(10.0)}
    assert calls.count("onnxruntime") == calls.count("openvino") == 7 + 3  # 7 timed, one hand-over per block
    assert calls[:8] == ["onnxruntime"] * 4 + ["openvino"] * 4  # the order turns every round
    assert calls[8:12] == ["openvino"] * 4


# --- a damaged record is dropped by itself, and two tunes at once keep both records -----------------------------
def _record(artifact: Artifact, threads: int, **device) -> dict:
    from mmedge.runtimes.openvino.tune import CANDIDATES
    from mmedge.tuning import device_key

    return {"device": {**device_key(probe(), threads, CANDIDATES), **device}, "runs": 3, "measured_at": "2026-01-01",
            "components": {name: {"sha256": artifact.component(name)["sha256"], "inputs": "the validation sample",
                                  "onnxruntime_ms": 100.0, "openvino_ms": 10.0} for name in artifact.components}}


@pytest.mark.parametrize("engines", [{"": None}, 5, True, {"onnxruntime": 1}])
def test_a_malformed_record_is_dropped_alone_with_one_warning_and_tune_replaces_it(engines, clip_copy, caplog):
    """A record whose ``device.engines`` was ``{"": null}`` made every plan of the artifact (run --backend onnxruntime,
    doctor, mmedge.load) exit 1 with "internal error: ValueError: A distribution name is required", and one
    malformed record dropped the whole file (the next tune deleted other devices' records)."""
    from mmedge.tuning import check_storable, store

    artifact = Artifact.open(clip_copy)
    path = check_storable(artifact)
    other = _record(artifact, 1, cpu_model="another CPU")
    bad = _record(artifact, 1)
    bad["device"]["engines"] = engines
    path.write_text(json.dumps({"format": 1, "records": [other, bad, _record(artifact, 2)]}))
    caplog.set_level("WARNING", logger="mmedge")
    assert measured_for(artifact, probe(), 2) and measured_for(artifact, probe(), 1) == {}
    assert plan_for(clip_copy, backend="onnxruntime", threads=1).components
    warned = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warned) == 1 and "1 malformed record(s)" in warned[0] and "mmedge tune" in warned[0]
    store(path, _record(artifact, 1))  # what tune stores after measuring: it replaces the bad one
    stored = json.loads(path.read_text())["records"]
    assert len(stored) == 3 and other in stored and all(isinstance(r["device"]["engines"], dict) for r in stored)
    assert set(measured_for(artifact, probe(), 1)) == set(artifact.components)


def test_two_stores_at_once_keep_both_records(clip_copy, monkeypatch):
    """``store`` reads, then writes: two tunes of the same artifact at once (two CPUs' records, or two thread counts)
    lost one record. The read is slowed so that, without the lock, every writer reads before any writes."""
    import threading
    import time

    from mmedge import tuning

    artifact = Artifact.open(clip_copy)
    path = tuning.check_storable(artifact)
    read = tuning._records

    def slow(where):
        found = read(where)
        time.sleep(0.05)
        return found

    monkeypatch.setattr(tuning, "_records", slow)
    writers = [threading.Thread(target=tuning.store, args=(path, _record(artifact, threads))) for threads in (1, 2, 3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert sorted(r["device"]["threads"] for r in json.loads(path.read_text())["records"]) == [1, 2, 3]
    assert not list(path.parent.glob("*.tmp"))


def test_store_writes_where_there_is_no_fcntl_nor_fchmod_and_as_a_plain_write_would(clip_copy, monkeypatch):
    """Windows before Python 3.13 has neither (store called os.fchmod and failed after the measuring); the file's
    mode is a plain write's (the umask's), and a lock file another user made does not stop the write."""
    import os
    import stat
    import sys

    from mmedge import tuning

    artifact = Artifact.open(clip_copy)
    path = tuning.check_storable(artifact)
    lock = path.with_name(f".{path.name}.lock")
    lock.write_text("")
    lock.chmod(0o444)  # as if another user's (root writes it anyway; another user takes the read-only open)
    tuning.store(path, _record(artifact, 1))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.setitem(sys.modules, "fcntl", None)
    tuning.store(path, _record(artifact, 2))
    assert sorted(r["device"]["threads"] for r in json.loads(path.read_text())["records"]) == [1, 2]
    assert not list(path.parent.glob("*.tmp"))


def test_tune_refuses_more_runs_than_it_caps_before_opening_anything(tmp_path):
    with pytest.raises(InputError, match=r"runs is 1001.*to 1000"):
        tune(tmp_path / "no-such-artifact", runs=1001)


def test_doctor_says_which_loads_use_a_record_and_what_is_ignored(clip_copy):
    """doctor said nothing where a record was ignored (a load at other threads, a graph changed since)."""
    from mmedge.tuning import check_storable, record_lines, store

    artifact = Artifact.open(clip_copy)
    path = check_storable(artifact)
    changed = _record(artifact, 1)
    changed["components"][next(iter(artifact.components))]["sha256"] = "0" * 64
    store(path, changed)
    store(path, _record(artifact, 1, cpu_model="another CPU"))
    lines = record_lines(artifact, probe())
    assert lines[0] == "engines/backend-timings.json: 2 record(s) of mmedge tune, 1 for this CPU"
    assert "used by loads at --threads 1" in lines[1] and "others follow the rule" in lines[1]
    assert f"graphs changed since, ignored for {next(iter(artifact.components))}" in lines[1]
    assert any(line in lines for b in backends() for line in b.artifact_lines(artifact))
