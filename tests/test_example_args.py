"""The demo training script's counts are usage errors (exit 2, no traceback) before any work: `--batch 0` raised a
RuntimeError from torch, `--test-scenes 0` a ValueError, after minutes of rendering scenes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--test-scenes", "0"), ("--threads", "-1"),
                                        ("--clip-steps", "zero"), ("--demo-images", "-1"),
                                        ("--idefics-budget-seconds", "0"), ("--t5-budget-seconds", "nan")])
def test_a_bad_count_is_a_usage_error(flag, value, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_demo_models.py"), "--out",
                             str(tmp_path / "models"), flag, value], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and f"argument {flag}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "models").exists()
