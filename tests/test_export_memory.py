"""Export memory: each step's peak RSS in the progress lines and the manifest, and the up-front refusal of an export
whose estimate passes the available memory (injected here with ``MMEDGE_EXPORT_MEMORY_LIMIT``)."""

import io
import json
import time

import pytest

from mmedge.cli import main
from mmedge.errors import ExportError
from mmedge.export import export_model
from mmedge.export.families import FAMILIES
from mmedge.export.memory import (
    LIMIT_ENV,
    MeteredProgress,
    component_bytes,
    estimate_export,
    lifetime_peak,
    meta_model,
    parse_bytes,
)


def test_refused_up_front_with_the_numbers_one_line_exit_2_and_no_folder(tiny_blip2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "50MB")
    out = tmp_path / "art"
    code = main(["export", str(tiny_blip2_dir), str(out), "--precision", "int8", "--llm-precision", "int4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mmedge: error: exporting ")
    assert "GB at its peak" in err and "0.1 GB is available (MMEDGE_EXPORT_MEMORY_LIMIT)" in err
    assert "fix:" in err and LIMIT_ENV in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing loaded, nothing written


def test_a_limit_above_the_estimate_lets_the_export_run_and_records_peaks(tiny_blip2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "64GB")
    lines = io.StringIO()
    monkeypatch.setattr("sys.stderr", lines)
    out = export_model(str(tiny_blip2_dir), tmp_path / "art", llm_precision="int8")
    memory = json.loads((out / "manifest.json").read_text())["export"]["memory"]
    assert [s["step"].split(" ")[0] for s in memory["steps"]] == ["loading", "building", "tracing", "lowering"]
    assert all(s["peak_rss_bytes"] > 50e6 and s["wall_s"] >= 0 for s in memory["steps"])  # a Python with torch
    assert memory["peak_rss_bytes"] == max(s["peak_rss_bytes"] for s in memory["steps"])
    assert memory["estimate"]["peak_bytes"] > memory["estimate"]["fp32_weights_bytes"] > 0
    done = [line for line in lines.getvalue().splitlines() if "... done (" in line]
    assert len(done) == 5 and all("GB)" in line and "peak RSS" in line for line in done)


def test_a_bad_limit_is_refused_with_what_it_expects(tiny_blip2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(ExportError, match="not an amount of memory"):
        export_model(str(tiny_blip2_dir), tmp_path / "art", progress=False)
    assert parse_bytes("16GB") == 16 * 10**9 and parse_bytes("1.5 GiB") == 3 * 2**29 and parse_bytes("123") == 123


def _touch(megabytes: int) -> bytearray:
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # every page resident
    return block


def test_each_step_reports_its_own_peak_and_the_process_peak_stays_whole():
    progress = MeteredProgress(3, enabled=False)
    with progress.step("allocate"):
        block = _touch(400)
        del block
    with progress.step("quiet"):
        time.sleep(0.2)
    with progress.step("allocate less"):  # under the earlier peak: seen by the sampling thread
        block = _touch(150)
        time.sleep(0.2)
        del block
    first, quiet, less = (s["peak_rss_bytes"] for s in progress.steps)
    assert first - quiet > 350 * 2**20  # the quiet step does not inherit the first one's peak
    assert less - quiet > 120 * 2**20
    assert lifetime_peak() >= first  # the kernel's own high-water mark (what /usr/bin/time reads) is untouched


def test_the_estimate_of_full_size_blip2_from_its_config_alone():
    family = FAMILIES["blip2"]
    sizes = component_bytes(meta_model("Salesforce/blip2-opt-2.7b", True, family), family)
    assert 14.8e9 < sum(sizes.values()) < 15.3e9  # 3.7 B parameters (prefix.onnx.data 4.37 GB + decoder 10.60 GB)
    assert 10.5e9 < sizes["decoder"] < 10.7e9 and 4.3e9 < sizes["prefix"] < 4.45e9
    threshold = 1_800_000_000
    int4 = estimate_export(sizes, {"prefix": "int8", "decoder": "int4"}, static=False, threshold=threshold)
    int8 = estimate_export(sizes, {"prefix": "int8", "decoder": "int8"}, static=False, threshold=threshold)
    fp32 = estimate_export(sizes, {"prefix": "fp32", "decoder": "fp32"}, static=False, threshold=threshold)
    assert "lower precision" not in fp32.steps and fp32.peak_step == "trace"
    assert int4.steps["lower precision"] < int8.steps["lower precision"] < fp32.steps["trace"]
    assert 16e9 < int4.peak < 18e9  # measured 16.2 GB for the FP32 export's tracing


def test_the_refusal_names_the_flag_that_lowers_the_quantization_step(tmp_path, capsys, monkeypatch):
    """Full-size BLIP-2 config (meta device: nothing is allocated), a limit under both tracing and INT8 lowering."""
    monkeypatch.setenv(LIMIT_ENV, "13.5GB")
    out = tmp_path / "b27"
    code = main(["export", "Salesforce/blip2-opt-2.7b", str(out), "--random-weights", "--precision", "int8",
                 "--llm-precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "lower precision 14.3 GB" in err and "FP32 weights 15.0 GB" in err
    assert "pass --llm-precision int4" in err and "loading and tracing hold the FP32 weights" in err
