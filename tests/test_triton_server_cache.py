"""The Triton test server's venvs (about 400 MB each, one per checkout, Python and pins) do not pile up: one this
checkout would not use (its checkout gone, or its pins changed) that no run used for two days is removed, and so is a
killed build's staging folder; a checkout another container sees (CI's), used lately, is kept."""

from __future__ import annotations

import json
import os
import time

from tests.support.triton_server import ABANDONED_AFTER_S, PARTIAL_AFTER_S, ROOT, _python_tag, remove_abandoned


def _venv(cache, name, root, idle_s):
    folder = cache / name
    folder.mkdir(parents=True)
    ready = folder / "ready.json"
    ready.write_text(json.dumps({"root": str(root)}))
    stamp = time.time() - idle_s
    os.utime(ready, (stamp, stamp))
    return folder


def test_a_venv_this_checkout_would_not_use_is_removed_after_two_days_unused(tmp_path):
    cache, here = tmp_path / "triton-server", tmp_path / "checkout"
    here.mkdir()
    old = ABANDONED_AFTER_S + 60
    stale = _venv(cache, "py311-a", tmp_path / "fresh-clone-gone", old)
    recent = _venv(cache, "py311-b", tmp_path / "other-container", 3600)  # CI's checkout, not visible here
    present = _venv(cache, "py311-c", here, old)  # another checkout that still exists: its own to sweep
    malformed = _venv(cache, "py311-d", "x", old)
    (malformed / "ready.json").write_text("{not json")
    mine_now = _venv(cache, f"{_python_tag()}now", ROOT, old)  # the venv this checkout uses now, however idle
    mine_before = _venv(cache, f"{_python_tag()}before", ROOT, old)  # this checkout's, before its pins changed
    other_python = _venv(cache, "py399-before", ROOT, old)  # another Python's run of this checkout may need it
    killed = cache / ".py311-e.partial-123"  # a build killed long ago
    killed.mkdir()
    os.utime(killed, (time.time() - PARTIAL_AFTER_S - 60,) * 2)
    building = cache / ".py311-f.partial-456"  # a build running now
    building.mkdir()
    assert sorted(remove_abandoned(cache, keep=mine_now)) == sorted([stale, mine_before, killed])
    assert all(p.is_dir() for p in (recent, present, malformed, mine_now, other_python, building))
