"""`mmedge bench` and `mmedge validate` report what runs: the precision the plan runs at (torch's dtype), the files
the chosen backends load, an end-to-end caption rate named as such, --labels for the artifacts that take them, and
measured drift as its own exit code. Real torch on the CPU, tiny artifacts; timings cut short."""

from __future__ import annotations

import json
import shutil

import pytest

from mmedge import bench
from mmedge.errors import InputError, ParityError
from tests.support.battery import api_error, cli_error

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture
def quick(monkeypatch):
    """Timed series of one call: these tests read what is reported, not the timings."""
    for name, value in (("WARMUP_SECONDS", 0.0), ("MIN_SECONDS", 0.0), ("MAX_SECONDS", 0.0)):
        monkeypatch.setattr(bench, name, value)


def _files(folder, *patterns) -> int:
    return sum(f.stat().st_size for pattern in patterns for f in folder.glob(pattern) if f.is_file())


def test_bench_reports_the_precision_and_files_of_what_runs(pytorch_artifacts, quick, photos):
    """torch at bf16 showed precision fp32 and fidelity "reference" (the manifest's), its plot "torch []"; the size
    counted pytorch/ under ONNX Runtime and the graphs under torch."""
    clip = pytorch_artifacts("clip")
    result = bench.measure(str(clip), backend="torch", runs=1, batch=1, images=photos[:1], labels=["cat", "dog"],
                           backend_options={"torch": {"dtype": "bf16"}})
    assert result["precision"] == "bf16" and result["fidelity"] == {"metric": "unmeasured", "value": None}
    assert result["backend"] == {"vision": "torch", "text": "torch"} and result["labels"] == ["cat", "dog"]
    assert bench.format_table([result]).splitlines()[-1].endswith(" unmeasured")  # as README says (it printed "-")
    assert result["size_bytes"] == _files(clip / "pytorch", "*") + _files(clip, "tokenizer.json")
    ort = bench.measure(str(clip), backend="onnxruntime", runs=1, batch=1, images=photos[:1])
    assert ort["precision"] == "fp32" and ort["fidelity"]["metric"] == "reference"
    assert ort["size_bytes"] == _files(clip, "*.onnx", "tokenizer.json")
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the 'plot' extra)")
    from mmedge.bench_plot import figure

    fig = figure([result, ort])
    assert fig._suptitle.get_text() == "mmedge bench: onnxruntime [cpu], torch (torch.dtype=bf16)"
    assert {t.get_text() for t in fig.axes[0].get_xticklabels()} == {"clip\nbf16", "clip\nfp32"}


def test_bench_names_its_caption_rate_end_to_end(pytorch_artifacts, quick, photos):
    """decode_tokens_per_second divided the caption's tokens by the whole call (vision, prefix, prefill, decode)."""
    result = bench.measure(str(pytorch_artifacts("blip2")), backend="onnxruntime", runs=1, batch=1,
                           images=photos[:1])
    assert "decode_tokens_per_second" not in result
    assert result["caption_tokens_per_second"] == pytest.approx(
        result["caption_tokens"] / (result["latency_ms"]["median"] / 1e3), rel=0.05)


def test_labels_go_to_the_artifacts_that_take_them(pytorch_artifacts):
    """--labels was refused when any artifact did not use it, while --backend-option goes to those that use it."""
    two, fused = str(pytorch_artifacts("clip")), str(pytorch_artifacts("clip-fused"))
    assert bench.check_artifacts([two, fused], ["cat", "dog"]) == [two]
    assert bench.check_artifacts([two, fused], None) == []
    api_error(lambda: bench.check_artifacts([fused], ["cat"]), InputError,
              "--labels would change nothing for any artifact given", "labels baked in")


def test_validate_uses_the_precision_the_plan_runs_at(pytorch_artifacts, capsys):
    """validate printed [fp32, torch] for torch.dtype=bf16 and held the bf16 run to the fp32 floor."""
    from mmedge.cli import main
    from mmedge.validate import COSINE_SLACK

    assert main(["validate", str(pytorch_artifacts("clip")), "--backend", "torch", "--json",
                 "--backend-option", "torch.dtype=bf16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {entry["precision"] for entry in report.values()} == {"bf16"}
    floors = [m["min_cosine"] for entry in report.values() for m in entry["outputs"].values()]
    assert floors and all(floor <= 1.0 - COSINE_SLACK["bf16"] + 1e-9 for floor in floors)


def test_drift_in_validate_has_its_own_exit_code(clip_artifacts, tmp_path, capsys):
    """Drift exited 2, a usage error's code."""
    artifact = tmp_path / "drift"
    shutil.copytree(clip_artifacts("fp32"), artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    for output in manifest["components"]["vision"]["parity"]["validation_samples"].values():
        output["cosine"] = 1.5  # a floor no run reaches
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    assert ParityError.exit_code == 5 != InputError.exit_code
    cli_error(capsys, ["validate", artifact, "--backend", "onnxruntime"], ParityError, "failed parity: cosine")
