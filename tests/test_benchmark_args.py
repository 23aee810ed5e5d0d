"""The CPU benchmark scripts' arguments: a bad count, an unknown name or an option that would do nothing is a usage
error (exit 2, argparse's message, no traceback) before any work; and what the scripts settle up front:
``int4_sensitivity.py``'s ``--only`` keys, ``split_matmuls_cpu.py``'s backends, where ``export_memory.py --smoke``
and ``serve_cpu.py --quick`` write and what they export. Nothing here measures or exports."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

BELOW_1 = "is below 1: expected a whole number of at least 1"
BELOW_0 = "is below 0: expected a whole number of at least 0"
REFUSED = [  # script, arguments, what the usage error says
    ("serve_cpu.py", ["--runs", "0"], f"argument --runs: 0 {BELOW_1}"),
    ("serve_cpu.py", ["--clients", "0"], f"argument --clients: 0 {BELOW_1}"),
    ("serve_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("serve_cpu.py", ["--runs", "many"], "argument --runs: 'many' is not a whole number"),
    ("serve_cpu.py", ["--quick", "--runs", "50"], "--runs does nothing with --quick"),
    ("decoder_cpu.py", ["--reps", "0"], f"argument --reps: 0 {BELOW_1}"),
    ("decoder_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("decoder_cpu.py", ["--variants"], "argument --variants: expected at least one argument"),
    ("load_cpu.py", ["--rounds", "0"], f"argument --rounds: 0 {BELOW_1}"),
    ("load_cpu.py", ["--threads", "-1"], f"argument --threads: -1 {BELOW_1}"),
    ("flamingo_cpu.py", ["--runs", "0"], f"argument --runs: 0 {BELOW_1}"),
    ("flamingo_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("flamingo_cpu.py", ["--quick", "--runs", "5"], "--runs does nothing with --quick"),
    ("demo_fidelity.py", ["--scenes", "0"], f"argument --scenes: 0 {BELOW_1}"),
    ("demo_fidelity.py", ["--idefics-prompts", "0"], f"argument --idefics-prompts: 0 {BELOW_1}"),
    ("soak.py", ["--classify", "0", "--captions", "0"], f"argument --classify: 0 {BELOW_1}"),
    ("soak.py", ["--classify", "-5"], f"argument --classify: -5 {BELOW_1}"),
    ("soak.py", ["--captions", "-1"], f"argument --captions: -1 {BELOW_0}"),
    ("soak.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("soak.py", ["--classify", "5", "--captions", "6"], "--captions 6 exceeds --classify 5"),
    ("train_step.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("caption_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("caption_t5_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("clip_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("flamingo_floor.py", ["--runs", "0"], f"argument --runs: 0 {BELOW_1}"),
    ("flamingo_floor.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("flamingo_ttft_split.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("int4_decoder_cpu.py", ["--rounds", "0"], f"argument --rounds: 0 {BELOW_1}"),
    ("int4_decoder_cpu.py", ["--pasts", "-1"], f"argument --pasts: -1 {BELOW_0}"),
    ("int4_decoder_cpu.py", ["--prompts", "0"], f"argument --prompts: 0 {BELOW_1}"),
    ("int4_decoder_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("spinning_cpu.py", ["--rounds", "0"], f"argument --rounds: 0 {BELOW_1}"),
    ("spinning_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("split_matmuls_cpu.py", ["--rounds", "0"], f"argument --rounds: 0 {BELOW_1}"),
    ("split_matmuls_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--runs", "0"], f"argument --runs: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--rounds", "0"], f"argument --rounds: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--server-threads", "0"], f"argument --server-threads: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--pipeline-instances", "0"], f"argument --pipeline-instances: 0 {BELOW_1}"),
    ("triton_cpu.py", ["--queue-delay-us", "-1"], f"argument --queue-delay-us: -1 {BELOW_0}"),
    ("triton_cpu.py", ["--seconds", "0"], "argument --seconds: 0 is not a duration: expected seconds above 0"),
    ("openvino_shape_cache.py", ["--calls", "0"], f"argument --calls: 0 {BELOW_1}"),
    ("openvino_shape_cache.py", ["--caps", "-1"], f"argument --caps: -1 {BELOW_0}"),
    ("int4_sensitivity.py", ["--prompts", "0"], f"argument --prompts: 0 {BELOW_1}"),
    ("int4_sensitivity.py", ["--threads", "0"], f"argument --threads: 0 {BELOW_1}"),
    ("int4_sensitivity.py", ["--only"], "argument --only: expected at least one argument"),
    # the docstring's command before it named a recipe key: an unknown name ran nothing and printed an empty table
    ("int4_sensitivity.py", ["--only", "head-int8", "--prompts", "2"],
     "--only: no recipe 'head-int8'; the recipes: int8-encoders-only, "),
    ("export_memory.py", ["--only", "blip2", "--case", "fp32"], "--case: no case 'fp32' in blip2; the cases: "),
    # printed the table's header, then "missing ...": an unknown name is refused before anything is printed
    ("decoder_cpu.py", ["--variants", "int16"], "argument --variants: invalid choice: 'int16'"),
    ("slim_wheel.py", ["/nonexistent/in.whl", "out.whl"], "/nonexistent/in.whl: no such file"),  # was a traceback
]


@pytest.mark.parametrize("script,argv,said", REFUSED, ids=[f"{s} {' '.join(a)}" for s, a, _ in REFUSED])
def test_a_bad_argument_is_a_usage_error_before_any_work(script, argv, said, tmp_path):
    env = {**os.environ, "MMEDGE_CACHE": str(tmp_path / "cache")}  # were anything to start, not the real demo cache
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("usage: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"{script}: error: {said}" in done.stderr, done.stderr[-3000:]
    assert done.stdout == ""
    assert not (tmp_path / "cache").exists()


def test_int4_sensitivity_only_takes_each_recipes_key_or_full_name(capsys):
    import argparse

    import int4_sensitivity

    names = list(int4_sensitivity.recipes([], []))
    keys = [int4_sensitivity.recipe_key(name) for name in names]
    assert len(set(keys)) == len(names) and "head-int8-symmetric" in keys
    assert "all-int4-symmetric-the-old-recipe" in keys
    parser = argparse.ArgumentParser()
    assert int4_sensitivity.chosen_recipes(parser, None) is None  # all of them
    assert int4_sensitivity.chosen_recipes(parser, ["head-int8-symmetric", "head fp32"]) == {
        "head int8 (symmetric)", "head fp32"}
    assert "--only head-int8-symmetric" in int4_sensitivity.__doc__  # the docstring's command runs a recipe
    with pytest.raises(SystemExit) as stopped:
        int4_sensitivity.chosen_recipes(parser, ["head fp32", "no-such-recipe"])
    assert stopped.value.code == 2
    assert "no recipe 'no-such-recipe'; the recipes: " + ", ".join(keys) in capsys.readouterr().err


@pytest.fixture
def no_openvino(monkeypatch):
    """OpenVINO reported absent, as ``mmedge.device.importable`` looks for it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] == "openvino"
                        else real(name, *a))


def test_split_matmuls_drops_an_absent_openvino_from_the_default_with_a_note(no_openvino, capsys):
    import argparse

    import split_matmuls_cpu

    assert split_matmuls_cpu.chosen_backends(argparse.ArgumentParser(), None) == ["onnxruntime"]
    assert "note: openvino is not installed here" in capsys.readouterr().err
    assert split_matmuls_cpu.chosen_backends(argparse.ArgumentParser(), ["onnxruntime"]) == ["onnxruntime"]


def test_split_matmuls_refuses_an_absent_openvino_named_before_measuring(no_openvino, capsys):
    import argparse

    import split_matmuls_cpu

    with pytest.raises(SystemExit) as stopped:
        split_matmuls_cpu.chosen_backends(argparse.ArgumentParser(), ["onnxruntime", "openvino"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--backends openvino: openvino is not installed here" in err and 'pip install "mmedge[openvino]"' in err


def test_export_memory_smoke_exports_only_small_stand_ins_and_not_over_the_tracked_results(capsys):
    """--smoke swapped BLIP-2 for its small config but went on to export blip2-flan-t5-xl and idefics-9b, and
    wrote its figures over the tracked benchmarks/results/export_memory.json. A full run writes into the git-ignored
    benchmarks/out too: the tracked figures in benchmarks/results are copied there on purpose, never overwritten."""
    import export_memory

    full = export_memory.parse_args([])
    assert full.json == export_memory.RESULTS and full.json.parent == ROOT / "benchmarks" / "out"
    assert {f: m for f, (m, _) in full.cases.items()} == {f: m for f, (m, _) in export_memory.CASES.items()}
    smoke = export_memory.parse_args(["--smoke"])
    assert smoke.json == export_memory.SMOKE_RESULTS != export_memory.RESULTS
    assert smoke.json.parent == ROOT / "benchmarks" / "out"  # git-ignored
    assert {f: m for f, (m, _) in smoke.cases.items()} == export_memory.SMOKE == {"blip2": "mmedge/blip2-vitb-opt125m"}
    out = capsys.readouterr().out
    for family in set(export_memory.CASES) - set(export_memory.SMOKE):
        assert f"--smoke: skipping {family} ({export_memory.CASES[family][0]}): no small stand-in" in out
    assert export_memory.parse_args(["--smoke", "--json", "x.json"]).json == Path("x.json")


def test_export_memory_smoke_with_only_full_size_families_is_refused(capsys):
    import export_memory

    with pytest.raises(SystemExit) as stopped:
        export_memory.parse_args(["--smoke", "--only", "idefics"])
    assert stopped.value.code == 2
    assert "--smoke: no small stand-in for idefics: nothing to run" in capsys.readouterr().err


def test_serve_cpu_quick_writes_its_own_file_not_the_full_runs():
    import serve_cpu

    assert serve_cpu.parse_args([]).json == serve_cpu.OUT
    assert serve_cpu.parse_args(["--quick"]).json == serve_cpu.QUICK_OUT != serve_cpu.OUT
    assert serve_cpu.parse_args(["--quick", "--json", "q.json"]).json == Path("q.json")


def test_soak_takes_zero_captions_and_then_captions_nothing():
    import soak

    args = soak.parse_args(["--classify", "3", "--captions", "0"])
    assert (args.classify, args.captions) == (3, 0)
    assert soak.caption_every(3, 0) > 3  # was classify // captions: ZeroDivisionError after the exports
    assert soak.caption_every(10_000, 1_000) == 10 and soak.caption_every(5, 5) == 1


def test_openvino_shape_cache_passes_on_the_measuring_process_message(tmp_path):
    """Without the demo CLIP the child says what to run; that reached the user as a bare CalledProcessError."""
    env = {**os.environ, "MMEDGE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "openvino_shape_cache.py"), "--caps", "0", "--calls", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr
    assert "shape_cache 0: the measuring process exited 1:" in done.stderr
    assert "clip-two-graph is missing: run `mmedge demo` first" in done.stderr


def test_slim_wheel_refuses_a_keep_tag_the_wheel_does_not_have(tmp_path):
    """``--keep typo`` dropped every accelerator library without a word."""
    import zipfile

    wheel = tmp_path / "bnb-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        for tag in ("cuda118", "cuda130", "rocm63"):
            whl.writestr(f"bnb/libbitsandbytes_{tag}.so", b"")
        whl.writestr("bnb-1.0.dist-info/RECORD", "")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "slim_wheel.py"), str(wheel), str(tmp_path / "out.whl"),
                           "--keep", "typo"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--keep typo: no accelerator library" in done.stderr and "cuda118, cuda130, rocm63" in done.stderr
    assert not (tmp_path / "out.whl").exists()
    done = subprocess.run([sys.executable, str(BENCHMARKS / "slim_wheel.py"), str(wheel), str(tmp_path / "out.whl"),
                           "--keep", "cuda13"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert zipfile.ZipFile(tmp_path / "out.whl").namelist() == ["bnb/libbitsandbytes_cuda130.so",
                                                               "bnb-1.0.dist-info/RECORD"]


@pytest.mark.parametrize("script", ["gpu_blip2.py", "gpu_parts.py"])
def test_the_gpu_helper_modules_say_what_they_are_when_run(script):
    """Run (or asked for --help) they printed nothing and exited 0."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert f"{script} is a helper module of benchmarks/gpu_bench.py" in done.stderr


def test_soak_warm_up_covers_every_request_kind_before_the_baseline():
    """A fixed 5% (10 of 200 classifications, one caption) left caption modes and the bad inputs to first allocate
    after the baseline: a false +5.3% RSS growth."""
    import soak

    assert soak.warmup_calls(10_000, 1_000) == (500, 500)  # the full soak: 5%, as before
    assert soak.warmup_calls(200, 20) == (100, 100)  # 5 caption modes by call 50, the bad inputs at call 100
    assert soak.warmup_calls(50, 5) == (25, 50)  # too short: at most half the run, and reported as not judged
    assert not soak.judged({"warmup": {"covers_every_request_kind": False}})


def test_clip_quick_run_reports_timed_targets_without_a_verdict():
    import clip_cpu

    timed = {"median_ms": 1.0}
    hf = {"encoder_b1": {"median_ms": 100.0}, "zero_shot_real_length": {"median_ms": 100.0}}
    engines = {"fp32": {"folder_bytes": 100}, "int8-dynamic": {"encoder_b1": timed, "folder_bytes": 20},
               "fused-int8-dynamic": {"zero_shot": timed}}
    rss = {"ratio": 0.1}
    quick = clip_cpu.check_targets(hf, engines, rss, "dynamic", quick=True)
    assert {k: t["result"] for k, t in quick.items()} == {"zero_shot": "n/a (quick)", "encoder_int8_b1": "n/a (quick)",
                                                         "int8_size": "PASS", "device_rss": "n/a (quick)"}
    assert {t["result"] for t in clip_cpu.check_targets(hf, engines, rss, "dynamic").values()} == {"PASS"}


def test_caption_targets_judge_the_default_int4_export_not_an_opt_in_variant():
    import caption_cpu

    def engine(tok_s, llm_bytes):
        return {"title": "t", "decode_tok_s": {"median": tok_s}, "llm_bytes": llm_bytes, "bandwidth_use": 0.6}

    hf = {"decode_tok_s": {"median": 10.0}}
    engines = {"fp32": engine(20.0, 100), "int4": engine(30.0, 15), "int4-fused-attention": engine(50.0, 15)}
    targets = caption_cpu.check_targets(hf, engines)
    assert targets["int4_decode"]["measured"] == 3.0 and targets["int4_decode"]["result"] == "MISS"
