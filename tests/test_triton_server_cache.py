"""The Triton test server's venvs (about 400 MB each, one per checkout) do not pile up: one whose checkout is gone
and that no run used for two days is removed; a checkout another container sees (CI's), used lately, is kept."""

from __future__ import annotations

import json
import os
import time

from tests.support.triton_server import ABANDONED_AFTER_S, remove_abandoned


def _venv(cache, name, root, idle_s):
    folder = cache / name
    folder.mkdir(parents=True)
    ready = folder / "ready.json"
    ready.write_text(json.dumps({"root": str(root)}))
    stamp = time.time() - idle_s
    os.utime(ready, (stamp, stamp))
    return folder


def test_only_a_gone_checkout_s_venv_unused_for_two_days_is_removed(tmp_path):
    cache, here = tmp_path / "triton-server", tmp_path / "checkout"
    here.mkdir()
    stale = _venv(cache, "py311-a", tmp_path / "fresh-clone-gone", ABANDONED_AFTER_S + 60)
    recent = _venv(cache, "py311-b", tmp_path / "other-container", 3600)
    present = _venv(cache, "py311-c", here, ABANDONED_AFTER_S + 60)
    malformed = _venv(cache, "py311-d", "x", ABANDONED_AFTER_S + 60)
    (malformed / "ready.json").write_text("{not json")
    building = cache / ".py311-e.partial-123"  # a venv being built has no ready.json yet
    building.mkdir()
    assert remove_abandoned(cache) == [stale]
    assert not stale.exists() and recent.is_dir() and present.is_dir() and malformed.is_dir() and building.is_dir()
