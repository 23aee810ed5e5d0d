"""Battery, engines: an engine built on another GPU, with another TensorRT version, from another graph,
precision or shape profile, or damaged on disk, is reported stale and never loaded (StaleEngineError)."""

from __future__ import annotations

import json

import pytest

from mmedge.errors import BackendError, InputError, StaleEngineError
from mmedge.runtimes.engine_cache import EngineCache, EngineKey
from tests.support.battery import api_error

SHA = "ab" * 32
PROFILE = {"pixel_values": ([1, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224])}
HERE = dict(onnx_sha256=SHA, precision="fp16", profile=PROFILE, tensorrt_version="10.3.0",
            gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9")
PLAN = b"serialized engine " * 100


def key(**changes) -> EngineKey:
    return EngineKey.create(**{**HERE, **changes})


@pytest.fixture
def cache(tmp_path) -> EngineCache:
    return EngineCache(tmp_path / "engines")


def test_fresh_engine_round_trips(cache):
    assert cache.lookup("vision", key()).status == "missing"
    cache.store("vision", key(), PLAN)
    found = cache.lookup("vision", key())
    assert found.fresh and found.plan.name.startswith("vision-") and cache.load("vision", key()) == PLAN
    assert key(profile={"pixel_values": PROFILE["pixel_values"]}) == key()  # the key is a value
    assert not list(cache.folder.glob(".*"))  # no temporary files left behind


FOREIGN = {
    "another-gpu": ({"gpu_name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"},
                    "built for GPU 'NVIDIA Jetson AGX Orin' (sm 8.7); this device has 'NVIDIA GeForce RTX "
                    "4090' (sm 8.9)"),
    "same-gpu-name-other-arch": ({"compute_capability": "8.6"}, "(sm 8.6)"),
    "another-tensorrt": ({"tensorrt_version": "8.6.1"}, "built with TensorRT 8.6.1; this device has TensorRT 10.3.0"),
    "another-graph": ({"onnx_sha256": "cd" * 32}, "built from another graph"),
}
# engines of this device and graph for another precision or shape profile: another service's, kept (test_cache_races)
OTHER_USE = {
    "another-precision": {"precision": "int8"},
    "another-profile": {"profile": {"pixel_values": ([1, 3, 224, 224], [1, 3, 224, 224], [1, 3, 224, 224])}},
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_engine_is_stale_never_loaded(cache, name):
    built_for, words = FOREIGN[name]
    cache.store("vision", key(**built_for), PLAN)  # e.g. an engines/ folder copied from another device
    found = cache.lookup("vision", key())
    assert found.status == "stale" and found.plan is None and words in " ".join(found.reasons)
    error = api_error(lambda: cache.load("vision", key()), StaleEngineError, "component 'vision'", words,
                      "never copy it between devices")
    assert isinstance(error, BackendError)
    assert cache.remove_stale("vision", key()) and cache.lookup("vision", key()).status == "missing"


@pytest.mark.parametrize("name", list(OTHER_USE))
def test_an_engine_of_another_use_is_neither_loaded_nor_removed(cache, name):
    """Another precision or shape profile on this device and graph is another service's engine: this key finds none
    (it builds its own), and removing stale engines leaves that one."""
    other = key(**OTHER_USE[name])
    cache.store("vision", other, PLAN)
    assert cache.lookup("vision", key()).status == "missing"
    cache.remove_stale("vision", key())
    assert cache.lookup("vision", other).fresh


def test_foreign_engine_renamed_to_this_devices_name_is_stale(cache):
    """Renaming a foreign engine's files to the name this device expects does not get it loaded."""
    plan, record = cache.paths("vision", key(gpu_name="Orin", compute_capability="8.7"))
    cache.store("vision", key(gpu_name="Orin", compute_capability="8.7"), PLAN)
    my_plan, my_record = cache.paths("vision", key())
    plan.rename(my_plan)
    record.rename(my_record)
    api_error(lambda: cache.load("vision", key()), StaleEngineError, "built for GPU 'Orin' (sm 8.7)")


@pytest.mark.parametrize("damage,words", [
    (lambda plan, record: plan.write_bytes(PLAN[:100]), "truncated or replaced"),
    (lambda plan, record: plan.write_bytes(PLAN[::-1]), "truncated or replaced"),
    (lambda plan, record: record.unlink(), "no record of what it was built for"),
    (lambda plan, record: plan.unlink(), "plan file that is missing"),
    (lambda plan, record: record.write_text("{not json"), "record is unreadable"),
    (lambda plan, record: record.write_text(json.dumps({**json.loads(record.read_text()), "format_version": 2})),
     "version 2"),
])
def test_damaged_engine_is_stale(cache, damage, words):
    cache.store("vision", key(), PLAN)
    damage(*cache.paths("vision", key()))
    assert cache.lookup("vision", key()).status == "stale"
    api_error(lambda: cache.load("vision", key()), StaleEngineError, words)


def test_an_engine_shipped_with_the_artifact_is_not_used(cache, tmp_path, monkeypatch):
    """An engine is code TensorRT runs as it finds it; its record (key, sha256) is whatever the artifact's author
    wrote. Only one mmedge built on this device (its record signed with this device's key) is used."""
    monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / "author"))
    cache.store("vision", key(), PLAN)  # on the author's machine, for this very GPU and TensorRT
    monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / "this-device"))
    assert cache.lookup("vision", key()).status == "stale"
    api_error(lambda: cache.load("vision", key()), StaleEngineError, "it was not built by mmedge on this device")
    cache.store("vision", key(), PLAN)  # built here: used
    assert cache.load("vision", key()) == PLAN


def test_missing_engine(cache):
    api_error(lambda: cache.load("text", key()), StaleEngineError, "no engine for component 'text' has been built")


@pytest.mark.parametrize("changes,words", [
    ({"onnx_sha256": "xyz"}, "64 lowercase hex digits"),
    ({"gpu_name": ""}, "gpu_name"),
    ({"profile": {"ids": ([1, 8], [1, 4], [1, 16])}}, "min <= opt <= max"),
    ({"profile": {"ids": ([1, 8], [1, 8, 1], [1, 16])}}, "equal rank"),
    ({"profile": [("ids", [1], [1], [1])]}, "shape profile is a list"),
])
def test_bad_keys_are_refused(changes, words):
    api_error(lambda: key(**changes), InputError, words)


def test_bad_component_names_and_plans_are_refused(cache):
    api_error(lambda: cache.paths("../vision", key()), InputError, "cannot name an engine file")
    api_error(lambda: cache.store("vision", key(), b""), InputError, "empty or not bytes")
