"""Processes sharing the device-local caches: the demo's cache, TensorRT engines, OpenVINO blobs, the sha256 record,
export staging folders. Each race is made to happen every time: events and hooks order the two sides, never sleeps."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mmedge
import mmedge.tuning
from mmedge import locks
from mmedge.artifact import _make_staging, _remove_abandoned_staging, write_whole
from mmedge.errors import ArtifactError, StaleEngineError
from mmedge.file_checks import CheckRecord
from mmedge.runtimes import engine_cache
from mmedge.runtimes.engine_cache import EngineCache, EngineKey, obtain_plan
from mmedge.runtimes.openvino.cache import BlobCache, OvKey

OLD = time.time() - 2 * locks.ABANDONED_SECONDS


def key(trt="10.0", batch=1, precision="fp16"):
    return EngineKey.create(onnx_sha256="a" * 64, precision=precision, profile={"x": ([1, 3], [batch, 3], [batch, 3])},
                            tensorrt_version=trt, gpu_name="Orin", compute_capability="8.7")


def plan_matches_record(cache, k):
    import hashlib

    plan, record = cache.paths("vision", k)
    return hashlib.sha256(plan.read_bytes()).hexdigest() == json.loads(record.read_text())["plan_sha256"]


# --- 1. two demo runs exporting the same variant --------------------------------------------------------------------
def test_a_demo_run_waits_for_the_export_another_run_holds_then_reuses_it(tmp_path, monkeypatch):
    """Run B found run A's variant still "exporting" and exported it too, removing the artifact A had just finished
    (A then failed: "artifact folder ... does not exist"). Now B waits for A's lock and reuses A's export."""
    import mmedge.export
    from mmedge import demo

    variant = demo.variants()[0]
    folder, key_ = tmp_path / variant.name, "k" * 64
    stamp = demo._stamp(folder)
    monkeypatch.setattr(demo, "cached", lambda f, k: demo._stamp(f).is_file() and demo._stamp(f).read_text().strip()
                        == k and (f / "manifest.json").is_file())
    exports = []
    monkeypatch.setattr(mmedge.export, "export_model", lambda *a, **k: exports.append(a))
    outcome = {}
    with locks.locked(stamp):  # run A, mid-export
        stamp.write_text(demo.EXPORTING + "\n")
        run_b = threading.Thread(target=lambda: outcome.update(reused=demo.export_variant(variant, folder, key_)))
        run_b.start()
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")  # A's export completes...
        stamp.write_text(key_ + "\n")  # ...and is stamped, under its lock
    run_b.join()
    assert outcome == {"reused": True} and not exports  # B exported nothing and removed nothing
    assert (folder / "manifest.json").is_file()


# --- 2. stale engines removed by several processes at once ----------------------------------------------------------
def test_stale_engines_another_process_removed_are_no_error(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    cache.store("vision", key("9.0"), b"old engine")
    assert cache.lookup("vision", key("10.0")).status == "stale"
    real_unlink = Path.unlink

    def raced(path, missing_ok=False):
        real_unlink(path, missing_ok=True)  # the other process was first
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", raced)
    assert cache.remove_stale("vision", key("10.0")) == []
    assert list(tmp_path.glob("vision-*")) == []


def test_an_engine_removed_while_it_is_read_is_stale_not_an_oserror(tmp_path, monkeypatch):
    cache, k = EngineCache(tmp_path), key()
    cache.store("vision", k, b"engine")
    fresh = cache.lookup("vision", k)
    cache.paths("vision", k)[0].unlink()  # removed by another process after the lookup
    monkeypatch.setattr(EngineCache, "lookup", lambda self, c, kk, **kw: fresh)
    with pytest.raises(StaleEngineError, match="removed while they were read"):
        cache.load("vision", k)
    monkeypatch.undo()
    cache.store("vision", k, b"engine")

    def vanished(path):
        raise FileNotFoundError(errno.ENOENT, "gone", str(path))

    monkeypatch.setattr(engine_cache, "_sha256", vanished)
    assert cache.lookup("vision", k).reasons == [f"{cache.paths('vision', k)[0].name}: {engine_cache._VANISHED}"]


# --- 3. one build per component at a time ---------------------------------------------------------------------------
def test_a_second_process_waits_for_the_build_then_loads_it(tmp_path, monkeypatch):
    """Three services starting at once each built the engine (out of memory on a Jetson) and their writes
    interleaved (a plan that did not match its record). B reaches the lock (or, unlocked, its lookup) while A
    builds; only then is A's build let finish."""
    cache, k = EngineCache(tmp_path), key()
    building, b_there, go = threading.Event(), threading.Event(), threading.Event()
    builds = []

    def build():
        builds.append(threading.current_thread().name)
        if len(builds) == 1:
            building.set()
            go.wait()
        return os.urandom(1000)  # TensorRT builds differ byte for byte

    real_hold, real_lookup = locks.hold, EngineCache.lookup

    def hold(handle, **kw):
        if threading.current_thread().name == "B" and kw.get("wait", True):
            b_there.set()  # B is about to wait for the lock
        return real_hold(handle, **kw)

    def lookup(self, *a, **kw):
        found = real_lookup(self, *a, **kw)
        if threading.current_thread().name == "B":
            b_there.set()  # B looked without the lock
        return found

    monkeypatch.setattr(locks, "hold", hold)
    monkeypatch.setattr(EngineCache, "lookup", lookup)
    actions = {}

    def run():
        actions[threading.current_thread().name] = obtain_plan(cache, "vision", k, build).action

    a = threading.Thread(target=run, name="A")
    a.start()
    building.wait()
    b = threading.Thread(target=run, name="B")
    b.start()
    b_there.wait()
    go.set()
    a.join()
    b.join()
    assert actions == {"A": "built", "B": "loaded"} and builds == ["A"]
    assert plan_matches_record(cache, k)


# --- 4. other services' profiles and precisions are kept ------------------------------------------------------------
def test_engines_of_other_profiles_and_precisions_are_kept_obsolete_ones_removed(tmp_path):
    cache = EngineCache(tmp_path)
    for k in (key(batch=1), key(batch=8), key(precision="int8"), key("9.0")):
        cache.store("vision", k, b"engine " + k.digest().encode())
    batch4 = obtain_plan(cache, "vision", key(batch=4), lambda: b"batch 4")
    old = cache.paths("vision", key("9.0"))[0].name
    assert batch4.action == "rebuilt" and all(r.startswith(old) for r in batch4.reasons)
    assert any("built with TensorRT 9.0" in r for r in batch4.reasons)
    assert not cache.paths("vision", key("9.0"))[0].exists()
    for k in (key(batch=1), key(batch=8), key(precision="int8")):
        assert obtain_plan(cache, "vision", k, lambda: pytest.fail("rebuilt")).action == "loaded"
    assert len(list(tmp_path.glob("*.plan"))) == 4


# --- 5. an export's staging folder is judged by its lock, not its PID ----------------------------------------------
def test_a_staging_folder_is_kept_while_its_lock_is_held_whatever_its_pid(tmp_path):
    """Another container's export (its PID unknown here) holds its staging folder's lock: kept. A folder whose PID
    is alive here (reused) but whose lock is free: removed, with its scratch folder."""
    foreign = tmp_path / f".out.partial-{2 ** 22 + 7}-abcdefgh"  # no such PID here
    foreign.mkdir()
    (tmp_path / f".out.partial-{2 ** 22 + 7}-scratch-x").mkdir()
    handle = os.open(foreign, os.O_RDONLY)
    assert locks.hold(handle)
    reused = tmp_path / f".out.partial-{os.getppid()}-ijklmnop"  # a PID alive here, its writer was killed
    reused.mkdir()
    (tmp_path / f".out.partial-{os.getppid()}-scratch-y").mkdir()
    ours, held = _make_staging(tmp_path, "out")
    try:
        _remove_abandoned_staging(tmp_path, "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [foreign.name, f".out.partial-{2 ** 22 + 7}-scratch-x", ours.name])
    finally:
        os.close(held)
        os.close(handle)
    _remove_abandoned_staging(tmp_path, "out")  # both writers gone
    assert list(tmp_path.iterdir()) == []


# --- 6. temporary files of killed writers ---------------------------------------------------------------------------
KILLED_WRITER = """
import os, sys
from pathlib import Path
from mmedge.artifact import write_whole
def stuck(fd):
    print("writing", flush=True)
    sys.stdin.read()
os.fsync = stuck
write_whole(Path(sys.argv[1]), b"x" * 100000)
"""


def test_a_writer_killed_mid_write_leaves_a_temporary_file_the_next_store_removes(tmp_path):
    blob = tmp_path / "zero_shot-openvino-0123456789abcdef.blob"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(blob)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    (live,) = list(tmp_path.glob(".*.tmp"))
    assert locks.remove_abandoned_temporaries(tmp_path) == []  # its writer holds it
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    legacy = tmp_path / ".sha256-checks.x1y2z3w4"  # mkstemp's name, from an earlier mmedge (no lock)
    legacy.write_text("{")
    os.utime(legacy, (OLD, OLD))
    young = tmp_path / f".{blob.name}.x1y2z3w4"  # an earlier mmedge may be writing it still
    young.write_text("")
    lock = tmp_path / ".vision.engine.lock"
    lock.write_text("")
    os.utime(lock, (OLD, OLD))
    BlobCache(tmp_path).store("zero_shot", ov_key(), b"blob")
    assert not live.exists() and not legacy.exists() and young.exists() and lock.exists()


def test_a_temporary_file_swept_before_its_writer_locked_it_is_made_again(tmp_path, monkeypatch):
    real, tries = locks.hold_new, []

    def swept_first(handle, path):
        tries.append(path)
        if len(tries) == 1:
            locks.remove_abandoned_temporaries(tmp_path)  # another process's sweep, in the instant before the lock
        return real(handle, path)

    monkeypatch.setattr(locks, "hold_new", swept_first)
    write_whole(tmp_path / "a.plan", b"plan")
    assert len(tries) == 2 and [p.name for p in tmp_path.iterdir()] == ["a.plan"]


def test_every_cache_store_sweeps(tmp_path):
    def orphan():
        path = tmp_path / ".x.plan.1-deadbeef.tmp"
        path.write_text("x")
        return path

    for store in (lambda: EngineCache(tmp_path).store("vision", key(), b"plan"),
                  lambda: CheckRecord(tmp_path).remember("a.onnx", "b" * 64, [1, 2, 3, 0, 0]),
                  lambda: mmedge.tuning.store(tmp_path / "backend-timings.json", {"device": {}})):
        path = orphan()
        store()
        assert not path.exists()


# --- 7. OpenVINO blobs of older versions ----------------------------------------------------------------------------
def ov_key(**fields):
    base = dict(onnx_sha256="a" * 64, external_data_sha256="", precision="fp32", device="CPU", device_full_name="x86",
                openvino_version="2025.1.0", mmedge_version="0.1.0", inference_precision="default", ir_sha256="",
                compression={})
    return OvKey(**{**base, **fields})


def test_blobs_of_older_versions_are_removed_others_kept(tmp_path):
    cache = BlobCache(tmp_path)
    older = [ov_key(openvino_version="2025.0.0"), ov_key(mmedge_version="0.0.9"),
             ov_key(compression={"method": "m", "nncf_version": "2.0"})]
    kept = [ov_key(device="GPU.0"), ov_key(precision="int8"),
            ov_key(compression={"method": "m", "nncf_version": "2.1"})]
    for k in older + kept:
        cache.store("zero_shot", k, b"blob")
    assert not cache.paths("zero_shot", older[2])[0].exists()  # its NNCF was upgraded by kept[2]
    cache.store("zero_shot", ov_key(), b"new")
    assert sorted(tmp_path.glob("*.blob")) == sorted(cache.paths("zero_shot", k)[0] for k in [ov_key(), *kept])
    # a load that finds its own blob removes nothing: two services of different versions sharing the artifact (a
    # rolling upgrade) would otherwise delete each other's blob at every start
    write_whole(cache.paths("zero_shot", older[0])[0], b"blob")
    record = cache.paths("zero_shot", ov_key())[1].read_text().replace("2025.1.0", "2025.0.0")
    write_whole(cache.paths("zero_shot", older[0])[1], record.encode())
    assert cache.load("zero_shot", ov_key()) == (b"new", [])
    assert cache.paths("zero_shot", older[0])[0].exists()


def test_a_blob_an_older_mmedge_stored_under_a_shorter_key_is_removed_when_its_successor_is_stored(tmp_path):
    """A key written before ir_sha256 and compression were added names the same compiled model (an ONNX graph
    compiled as it is): storing this release's blob removes it (it had stayed beside, a second copy of every
    compiled model after an upgrade); one for another graph stays."""
    import dataclasses

    cache = BlobCache(tmp_path)
    for tag, changes in (("same", {}), ("other-graph", {"onnx_sha256": "b" * 64})):
        old = {k: v for k, v in dataclasses.asdict(ov_key(**changes)).items() if k not in ("ir_sha256", "compression")}
        write_whole(tmp_path / f"zero_shot-openvino-{tag}.blob", b"old")
        write_whole(tmp_path / f"zero_shot-openvino-{tag}.record",
                    json.dumps({"component": "zero_shot", "key": old}).encode())
    cache.store("zero_shot", ov_key(), b"new")
    assert not (tmp_path / "zero_shot-openvino-same.blob").exists()
    assert (tmp_path / "zero_shot-openvino-other-graph.blob").exists()


# --- 8. full disks and modes ----------------------------------------------------------------------------------------
def test_tune_checks_for_space_before_measuring_and_says_to_free_some(tmp_path, monkeypatch):
    from mmedge.runtimes.openvino import tune

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the first write that reaches the disk fails
    with pytest.raises(ArtifactError) as error:
        tune._check_writable(tmp_path / "backend-timings.json")
    assert "no space left" in error.value.what and "free some space" in error.value.fix
    with pytest.raises(ArtifactError) as error:
        mmedge.tuning.store(tmp_path / "backend-timings.json", {"device": {}})
    assert "free some space" in error.value.fix and "permissions" not in error.value.fix
    assert list(tmp_path.iterdir()) == [tmp_path / ".backend-timings.json.lock"]  # no temporary file left


def test_cache_files_are_readable_by_other_users_as_a_plain_write_makes_them(tmp_path):
    mask = os.umask(0o022)
    try:
        EngineCache(tmp_path).store("vision", key(), b"plan")
        BlobCache(tmp_path).store("zero_shot", ov_key(), b"blob")
        CheckRecord(tmp_path).remember("a.onnx", "b" * 64, [1, 2, 3, 0, 0])
    finally:
        os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert set(modes.values()) == {"0o644"} and len(modes) == 5, modes
