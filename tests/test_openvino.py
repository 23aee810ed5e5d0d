"""The OpenVINO backend beyond the conformance suite (``tests/test_conformance.py`` runs its FP32 cases): INT8 graphs
under the reduced-precision rule, the compiled-model cache in ``engines/``, NNCF weight compression of the decoder,
selection (``auto`` per component from the measured rule, ``doctor``), the lazy import, and ``mmedge demo`` /
``mmedge bench --backend openvino``.

INT8 outputs are compared with ONNX Runtime running the same graph by cosine (0.999, the suite's reduced-precision
floor), never for equality: OpenVINO's and ONNX Runtime's INT8 kernels round differently on each CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.artifact import Artifact
from mmedge.device import DeviceProbe
from mmedge.errors import BackendUnavailableError, InputError
from mmedge.metrics import cosine_rows
from mmedge.runtimes.registry import create_runner
from mmedge.selection import plan
from mmedge.validate import load_validation_samples

ROOT = Path(__file__).resolve().parent.parent
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO,
                                    reason='openvino is not installed (pip install "mmedge[openvino]")')
REDUCED_PRECISION_COSINE = 0.999


def _min_cosine(reference: dict, actual: dict) -> float:
    return min(float(cosine_rows(ref.reshape(ref.shape[0], -1), np.asarray(actual[k]).reshape(ref.shape[0], -1)).min())
               for k, ref in reference.items())


@needs_openvino
@pytest.mark.parametrize("variant", ["int8-static", "int8-dynamic", "fused-int8"])
def test_int8_graphs_match_onnx_runtime_within_reduced_precision(variant, clip_artifacts):
    """Static QDQ, dynamic INT8 and the fused INT8 graph: OpenVINO vs ONNX Runtime on the same graph and samples."""
    artifact = Artifact.open(clip_artifacts(variant))
    samples = load_validation_samples(artifact)
    for name in artifact.components:
        path, component = artifact.component_path(name), artifact.component(name)
        runner = create_runner("openvino", path, name, component, device="CPU")
        reference = create_runner("onnxruntime", path, name, component, providers=("cpu",))
        try:
            feeds = samples[name]["inputs"]
            assert _min_cosine(reference.infer(feeds), runner.infer(feeds)) >= REDUCED_PRECISION_COSINE
        finally:
            runner.close()
            reference.close()


def _engines(folder: Path) -> list[Path]:
    return sorted((folder / "engines").glob("*-openvino-*.blob")) if (folder / "engines").is_dir() else []


@needs_openvino
def test_compiled_models_are_cached_keyed_and_never_trusted_blindly(clip_artifacts, tmp_path):
    """First load compiles and stores a blob with its key; the second imports it; a blob whose bytes changed is
    recompiled and replaced, never imported."""
    import shutil

    import mmedge

    folder = tmp_path / "clip"
    shutil.copytree(clip_artifacts("fused-fp32"), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mmedge.load(folder, backend="openvino") as first:
            assert first.runners["zero_shot"].source.startswith("compiled")
            expected = first.probabilities(str(ROOT / "export/data/images/holdout-chelsea.jpg"))
        blobs = _engines(folder)
        assert len(blobs) == 1
        record = json.loads(blobs[0].with_suffix(".record").read_text())
        import openvino

        assert record["key"]["onnx_sha256"] == Artifact.open(folder).component("zero_shot")["sha256"]
        assert record["key"]["device"] == "CPU" and record["key"]["openvino_version"] == openvino.get_version()
        assert record["key"]["precision"] == "fp32"
        from mmedge.runtimes.engine_cache import describe_engines

        assert describe_engines(folder / "engines") == []  # TensorRT's cache does not mistake them for its engines
        with mmedge.load(folder, backend="openvino") as second:
            assert second.runners["zero_shot"].source == "cache"
            np.testing.assert_allclose(second.probabilities(str(ROOT / "export/data/images/holdout-chelsea.jpg")),
                                       expected, atol=1e-6)
        data = bytearray(blobs[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        blobs[0].write_bytes(bytes(data))
        with mmedge.load(folder, backend="openvino") as third:
            assert third.runners["zero_shot"].source.startswith("compiled")
        record = blobs[0].with_suffix(".record")
        kept = record.read_text()
        for damaged in ("[]", '{"format": "mmedge.openvino-blob", "format_version": 1, "key": [1]}'):
            record.write_text(damaged)  # valid JSON, not a record: an internal error, though doctor said "recompiled"
            with mmedge.load(folder, backend="openvino") as fourth:
                assert fourth.runners["zero_shot"].source.startswith("compiled")
            assert json.loads(record.read_text())["key"] == json.loads(kept)["key"]  # written again, whole
    import hashlib

    replaced = blobs[0].read_bytes()
    assert replaced != bytes(data)  # the tampered blob was recompiled and replaced
    recorded = json.loads(blobs[0].with_suffix(".record").read_text())["blob_sha256"]
    assert hashlib.sha256(replaced).hexdigest() == recorded


@needs_openvino
def test_fused_attention_decoder_captions_as_on_onnx_runtime(tiny_blip2_dir, tmp_path):
    """A decoder exported with one com.microsoft.MultiHeadAttention node per layer (``--fused-attention``) runs on
    OpenVINO's ONNX front end: FP32 greedy captions and answers token-identical to ONNX Runtime's."""
    import onnx

    import mmedge
    from mmedge.export import export_model

    folder = export_model(str(tiny_blip2_dir), tmp_path / "fused", progress=False,
                          extra={"fused_attention": True})
    graph = onnx.load(str(folder / "decoder.onnx")).graph
    assert any(node.op_type == "MultiHeadAttention" for node in graph.node)
    photos = [str(ROOT / "export/data/images/holdout-chelsea.jpg"), str(ROOT / "export/data/images/holdout-camera.jpg")]
    answers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("onnxruntime", "openvino"):
            with mmedge.load(folder, backend=backend) as captioner:
                assert (type(captioner.decoder).__name__ == "OpenVinoDecoder") == (backend == "openvino")
                answers[backend] = [captioner.caption(photo, max_new_tokens=8) for photo in photos] + [
                    captioner.ask(photos[0], "what is it?", max_new_tokens=6)]
    assert answers["openvino"] == answers["onnxruntime"]


@needs_openvino
def test_nncf_int4_decoder_generates_close_to_fp32_and_is_recorded(blip2_artifact, tmp_path):
    """weights='int4': NNCF compresses the FP32 decoder at first load; the compression is recorded beside the cached
    blob, the second load imports it, and its prefill logits stay close to FP32's (cosine >= 0.95, the floor
    tests/test_int4.py sets for ONNX Runtime's INT4 MatMulNBits on the tiny random model; measured here 0.976)."""
    import shutil

    import mmedge

    folder = tmp_path / "blip2"
    shutil.copytree(blip2_artifact, folder)
    photo = str(ROOT / "export/data/images/holdout-chelsea.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mmedge.load(folder, backend="openvino") as fp32:
            prefix = fp32.inputs.for_images([photo], None, 4)
        with mmedge.load(folder, backend="openvino", backend_options={"openvino": {"weights": "int4"}}) as int4:
            assert type(int4.decoder).__name__ == "OpenVinoDecoder" and "compiled" in int4.decoder.source
            assert int4.plan.components["decoder"].precision == "fp32+nncf-int4"  # the plan says what runs
            assert int4.plan.components["prefix"].precision == "fp32"  # the weights are the LLM's only
            assert len(int4.caption(photo, max_new_tokens=4)) >= 0
        records = [json.loads(p.read_text()) for p in (folder / "engines").glob("decoder-openvino-*.record")]
        compressed = [r for r in records if r["key"]["precision"] == "fp32+nncf-int4"]
        assert compressed and compressed[0]["weights"]["mode"] == "int4_asym"
        with mmedge.load(folder, backend="openvino", backend_options={"openvino": {"weights": "int4"}}) as again:
            assert again.decoder.source == "cache"
            with mmedge.load(folder, backend="onnxruntime") as reference:
                embeds, mask = prefix["embeds"], prefix["mask"]
                cos = cosine_rows(reference.decoder.start(embeds, mask), again.decoder.start(embeds, mask))
    assert float(cos.min()) >= 0.95


@needs_openvino
def test_export_writes_nncf_weights_with_parity_and_the_device_runs_them(tiny_blip2_dir, tmp_path, monkeypatch):
    """--openvino-weights int8: the export writes the decoder's NNCF-compressed IR beside the FP32 ONNX graph, with
    sha256, NNCF settings and its logits parity vs PyTorch in the manifest; the device reads that IR (NNCF does not
    run there) and its prefill logits equal those of the same compression done at load; a changed .bin is refused."""
    import shutil

    import mmedge
    from mmedge.errors import IntegrityError
    from mmedge.export import export_model
    from mmedge.runtimes.openvino import compile as ov_compile

    out = export_model(str(tiny_blip2_dir), tmp_path / "ovw", openvino_weights="int8", progress=False)
    entry = json.loads((out / "manifest.json").read_text())["components"]["decoder"]["openvino"]["int8"]
    assert entry["compression"]["mode"] == "int8_asym" and entry["weights_file"]["file"] == "decoder.openvino-int8.bin"
    assert entry["parity"]["reference"] == "torch-fp32" and entry["parity"]["logits_cosine_mean"] >= 0.99
    assert (out / entry["file"]).is_file() and (out / "decoder.onnx").is_file()
    photo = str(ROOT / "export/data/images/holdout-chelsea.jpg")
    options = {"openvino": {"weights": "int8"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mmedge.load(out, backend="openvino", backend_options=options) as at_load:
            monkeypatch.setitem(at_load.artifact.component("decoder"), "openvino", {})  # as if the export had none
            at_load.decoder.close()
            at_load.decoder = _openvino_decoder(at_load)
            assert "from the export" not in at_load.decoder.source
            built = at_load.inputs.for_images([photo], None, 4)
            at_load_logits = at_load.decoder.start(built["embeds"], built["mask"])

        def no_nncf(*args, **kwargs):
            raise AssertionError("NNCF ran on the device although the export wrote the compressed weights")

        monkeypatch.setattr(ov_compile, "compress_weights", no_nncf)
        with mmedge.load(out, backend="openvino", backend_options=options) as exported:
            assert "from the export" in exported.decoder.source
            assert exported.plan.components["decoder"].precision == "fp32+nncf-int8-exported"
            logits = exported.decoder.start(built["embeds"], built["mask"])
            assert isinstance(exported.caption(photo, max_new_tokens=4), str)
    assert float(cosine_rows(at_load_logits, logits).min()) >= 0.9999  # the same NNCF weights, read two ways
    data = out / entry["weights_file"]["file"]
    data.write_bytes(data.read_bytes()[:-8] + bytes(8))
    shutil.rmtree(out / "engines", ignore_errors=True)
    with pytest.raises(IntegrityError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mmedge.load(out, backend="openvino", backend_options=options)


@needs_openvino
def test_export_refuses_nncf_weights_that_do_nothing_or_drift(tiny_blip2_dir, tiny_clip_dir, tmp_path):
    """--openvino-weights needs an FP32 LLM (refused before loading otherwise, and for CLIP); weights below the
    logits gate fail the export with ParityError and leave no folder."""
    from mmedge.errors import ParityError
    from mmedge.export import export_model

    for model, options in ((tiny_blip2_dir, {"llm_precision": "int4"}), (tiny_clip_dir, {})):
        with pytest.raises(InputError, match="--openvino-weights"):
            export_model(str(model), tmp_path / "refused", openvino_weights="int8", progress=False, **options)
    with pytest.raises(ParityError, match="OpenVINO"):
        export_model(str(tiny_blip2_dir), tmp_path / "drift", openvino_weights="int4", progress=False,
                     extra={"min_logits_cosine": 0.99999})
    assert not (tmp_path / "refused").exists() and not (tmp_path / "drift").exists()


def _openvino_decoder(captioner):
    """The captioner's decoder opened again on OpenVINO with NNCF INT8 weights (the artifact as the test left it)."""
    from mmedge.runtimes.openvino.core import OvOptions
    from mmedge.runtimes.openvino.decoder import OpenVinoDecoder

    return OpenVinoDecoder.for_artifact(captioner.artifact, captioner.embeddings, OvOptions(weights="int8"))


@needs_openvino
def test_weight_compression_is_refused_for_a_graph_that_is_not_fp32(clip_artifacts):
    from mmedge.runtimes.openvino.compile import compress_weights

    component = Artifact.open(clip_artifacts("int8-dynamic")).component("vision")
    with pytest.raises(InputError, match="already int8"):
        compress_weights(None, "vision", component, "int4")


def test_bad_openvino_options_are_refused():
    from mmedge.runtimes.openvino.core import OvOptions

    for bad in ({"device": "CUDA"}, {"threads": 0}, {"weights": "int3"}, {"precision_hint": "fp8"},
                {"shape_cache": -1}, {"shape_cache": 2.5}, {"device": "GPU", "shape_cache": 8}):
        with pytest.raises(InputError):
            OvOptions(**bad)


# --- selection ---------------------------------------------------------------------------------------------------
def _probe(flags: list[str], openvino: str | None = "2026.4.1", machine: str = "x86_64") -> DeviceProbe:
    return DeviceProbe(machine=machine, system="Linux", cpu_cores=2, cpu_flags=flags, memory_total_mb=24000,
                       engines={"onnxruntime": "1.23", "openvino": openvino}, ort_providers=["cpu"])


def _manifest(**components) -> dict:
    return {"components": {name: {"precision": precision, "quantization": {"method": method} if method else None,
                                  "inputs": {}, "outputs": {}}
                           for name, (precision, method) in components.items()}}


def test_auto_picks_per_component_by_the_measured_rule_and_says_why():
    manifest = _manifest(vision=("int8", "int8-static-qdq"), text=("int8", "int8-dynamic"))
    vnni = plan(_probe(["avx2", "avx512f", "avx512_vnni"]), manifest)
    assert vnni.components["vision"].backend == "openvino" and vnni.components["text"].backend == "onnxruntime"
    assert any("by the rule for CPUs with VNNI: openvino is faster" in reason and "Intel Xeon" in reason
               for reason in vnni.reasons)
    # FP32 on a VNNI CPU: OpenVINO 43.4 vs ONNX Runtime 44.9 ms, a near tie, stays on ONNX Runtime
    tie = plan(_probe(["avx2", "avx512f", "avx512_vnni"]), _manifest(vision=("fp32", None)))
    assert tie.components["vision"].backend == "onnxruntime"
    avx2 = plan(_probe(["avx2", "fma"]), _manifest(vision=("int8", "int8-dynamic")))
    assert avx2.components["vision"].backend == "onnxruntime"
    absent = plan(_probe(["avx2", "avx512_vnni"], openvino=None), manifest)
    assert {c.backend for c in absent.components.values()} == {"onnxruntime"}
    assert any('mmedge[openvino]' in reason for reason in absent.reasons)
    arm = plan(_probe(["asimd"], machine="aarch64"), manifest)
    assert {c.backend for c in arm.components.values()} == {"onnxruntime"}


def test_int8_recipe_is_static_only_where_it_is_as_fast_as_dynamic():
    from mmedge.runtimes.openvino.planning import int8_recipe

    assert int8_recipe(["avx512_vnni"])[0] == "static"
    assert int8_recipe(["avx2"])[0] == "dynamic"


def test_named_openvino_runs_everything_or_refuses_with_the_install_command():
    manifest = _manifest(vision=("fp32", None), decoder=("fp32", None))
    named = plan(_probe(["avx2"]), manifest, backend="openvino")
    assert {c.backend for c in named.components.values()} == {"openvino"}
    with pytest.raises(BackendUnavailableError, match=r'mmedge\[openvino\]'):
        plan(_probe(["avx2"], openvino=None), manifest, backend="openvino")
    with pytest.raises(BackendUnavailableError, match="NVIDIA"):
        plan(_probe(["avx2"]), manifest, backend="openvino", device="cuda")


def test_the_backend_imports_without_openvino_or_torch_and_names_the_install():
    """With openvino and torch made unimportable, the package imports; making a runner names the install command."""
    code = ("import sys; sys.modules['openvino'] = None; sys.modules['torch'] = None\n"
            "import mmedge.runtimes.openvino as ov\n"
            "import mmedge.runtimes.openvino.doctor, mmedge.runtimes.plugins.openvino  # noqa: F401\n"
            "from mmedge.errors import BackendUnavailableError\n"
            "try:\n    ov.create_runner('x.onnx', 'vision', {'inputs': {}, 'outputs': {}})\n"
            "except BackendUnavailableError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert 'pip install "mmedge[openvino]"' in out.stdout


@needs_openvino
def test_a_device_openvino_does_not_find_is_unavailable_not_a_damaged_graph(clip_artifacts):
    """NPU on a machine without one: refused before compiling, naming the devices there (it was an IntegrityError,
    "could not compile component ... (RuntimeError: Exception from src/inference/src/cpp/core.cpp:117:)")."""
    from mmedge.runtimes.openvino.devices import list_devices

    missing = next(name for name in ("NPU", "GPU") if name not in {d.name.split(".")[0] for d in list_devices()})
    with pytest.raises(BackendUnavailableError, match=f"OpenVINO finds no '{missing}' device here.*one of CPU"):
        mmedge.load(clip_artifacts("fp32"), backend="openvino", backend_options={"openvino": {"device": missing}})


# --- the CLI -----------------------------------------------------------------------------------------------------
@needs_openvino
def test_doctor_lists_openvino_devices_and_the_plan(clip_artifacts):
    out = subprocess.run([sys.executable, "-m", "mmedge.cli", "doctor", str(clip_artifacts("int8-static"))],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "openvino devices: CPU" in out.stdout and "INT8 recipe for this CPU" in out.stdout
    assert "backend openvino: installed" in out.stdout


@needs_openvino
def test_bench_runs_on_openvino(clip_artifacts):
    command = ["bench", str(clip_artifacts("fused-int8")), "--backend", "openvino", "--runs", "2", "--batch", "2",
               "--json"]
    out = subprocess.run([sys.executable, "-m", "mmedge.cli", *command], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    results = report if isinstance(report, list) else report.get("results", report)
    assert "openvino" in json.dumps(results)


@needs_openvino
@pytest.mark.slow
def test_demo_runs_on_openvino(tmp_path):
    """`mmedge demo --backend openvino`: the shipped models exported, validated and run on OpenVINO."""
    out = subprocess.run([sys.executable, "-m", "mmedge.cli", "demo", "--cache", str(tmp_path), "--images", "2",
                          "--backend", "openvino", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["artifacts"] and all(a["correct"] >= 1 for a in report["artifacts"].values())


# --- the cache is optional; settings that would do nothing are refused --------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / folder.name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*-openvino-*"))
    return target


@needs_openvino
@pytest.mark.parametrize("failure", ["read-only", "full", "engines/ cannot be made"])
def test_storage_that_cannot_hold_the_cache_runs_uncached_with_one_warning(failure, clip_artifacts, tmp_path,
                                                                          monkeypatch, caplog):
    """Read-only or full storage (a raw PermissionError / OSError 28 from the blob's temporary file), or an engines/
    that cannot be made: the model is compiled and runs, one warning says why and what it costs, nothing is left
    behind. A full disk that takes the blob but not its record leaves no blob either."""
    import errno

    from mmedge.runtimes.openvino import cache

    folder = _copy(clip_artifacts("fp32"), tmp_path)
    failing = {"read-only": errno.EACCES, "full": errno.ENOSPC}.get(failure)
    if failing:
        write = cache.write_whole

        def refused(path, data):
            if failure == "read-only" or path.suffix == ".record":  # full: the blob fits, its record does not
                raise OSError(failing, os.strerror(failing))
            write(path, data)

        monkeypatch.setattr(cache, "write_whole", refused)
    else:
        import shutil

        shutil.rmtree(folder / "engines", ignore_errors=True)
        (folder / "engines").write_text("not a folder")  # mkdir fails, as on a read-only artifact without engines/
    caplog.set_level("WARNING", logger="mmedge")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            with mmedge.load(folder, backend="openvino") as loaded:
                assert all(r.source.endswith("not cached") for r in loaded.runners.values())
                loaded.probabilities(str(ROOT / "export/data/images/holdout-chelsea.jpg"), labels=["cat", "dog"])
    uncached = [r.getMessage() for r in caplog.records if "cannot cache" in r.getMessage()]
    assert len(uncached) == 1 and "compiles it again" in uncached[0], caplog.text
    assert _engines(folder) == [] and not list(folder.glob("engines/.*"))


@needs_openvino
def test_tune_refuses_an_engines_folder_it_cannot_write_before_measuring(clip_artifacts, tmp_path, monkeypatch):
    from mmedge.errors import ArtifactError
    from mmedge.runtimes.openvino import tune

    real_open = os.open

    def refused(path, *args, **kwargs):
        if "backend-timings.json" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    def measured(*args, **kwargs):
        raise AssertionError("tune measured although it cannot store the timings")

    monkeypatch.setattr(tune.os, "open", refused)
    monkeypatch.setattr("mmedge.validate.load_validation_samples", measured)
    with pytest.raises(ArtifactError, match="cannot write .*backend-timings.json.*Permission denied"):
        tune.tune(_copy(clip_artifacts("fp32"), tmp_path), runs=3, progress=False)


def test_decoder_only_settings_are_checked_and_refused_where_no_openvino_decoder_runs():
    """weights on an artifact without a decoder, or with its decoder on another backend, would do nothing: refused
    like torch's quantization; a bad value is refused whatever the plan (it was dropped unseen for the encoders)."""
    from mmedge.api import _refuse_idle_backend_options
    from mmedge.backends import ComponentPlan, Plan
    from mmedge.runtimes.registry import backend

    on = {"prefix": ComponentPlan("openvino", (), "fp32"), "decoder": ComponentPlan("onnxruntime", (), "fp32")}
    clip = {"zero_shot": ComponentPlan("openvino", (), "fp32")}
    with pytest.raises(InputError, match=r"\['weights'\] would change nothing: the decoder runs on onnxruntime"):
        _refuse_idle_backend_options({"openvino": {"weights": "int4"}}, Plan(on))
    with pytest.raises(InputError, match="would change nothing: this artifact has no LLM decoder"):
        _refuse_idle_backend_options({"openvino": {"weights": "int4"}}, Plan(clip))
    for plan_ in (on, clip):
        with pytest.raises(InputError, match="OpenVINO weights 'int2'"):
            _refuse_idle_backend_options({"openvino": {"weights": "int2"}}, Plan(plan_))
    with pytest.raises(InputError, match="OpenVINO weights 'int2'"):
        backend("openvino").runner_settings({"weights": "int2"})
    _refuse_idle_backend_options({"openvino": {"weights": "int4"}},
                                 Plan({**on, "decoder": ComponentPlan("openvino", (), "fp32")}))  # used: accepted


def test_a_setting_the_plan_owns_says_where_to_set_it(clip_artifacts):
    with pytest.raises(InputError, match=r"'threads', which the plan sets.*pass threads= to mmedge.load"):
        mmedge.load(clip_artifacts("fp32"), backend="openvino", backend_options={"openvino": {"threads": 2}})


@needs_openvino
def test_the_compiled_model_key_holds_the_exported_ir_and_nncf_settings():
    """A decoder compiled from the export's IR is keyed by the IR's .xml and .bin sha256 (a replaced IR was served
    from the stale cache); one NNCF compressed here by NNCF's version and arguments."""
    from mmedge.runtimes.openvino.compile import cache_key
    from mmedge.runtimes.openvino.core import OvOptions

    ir = {"sha256": "x" * 64, "weights_file": {"sha256": "b" * 64}}
    component = {"sha256": "a" * 64, "precision": "fp32", "openvino": {"int4": ir}}
    exported = cache_key(component, OvOptions(weights="int4"), exported=True)
    assert exported.ir_sha256 == f"{'x' * 64}+{'b' * 64}" and exported.compression == {}
    replaced = {**component, "openvino": {"int4": {**ir, "weights_file": {"sha256": "c" * 64}}}}
    assert cache_key(replaced, OvOptions(weights="int4"), exported=True).digest() != exported.digest()
    at_load = cache_key(component, OvOptions(weights="int4")).compression
    assert at_load["mode"] == "int4_asym" and at_load["group_size"] == 32 and at_load["ratio"] == 1.0
    assert at_load["nncf_version"] and cache_key(component, OvOptions(weights="int4")).ir_sha256 == ""


@needs_openvino
def test_the_plan_and_doctor_show_the_inference_precision_and_device(clip_artifacts, tmp_path, monkeypatch):
    """precision_hint='f16' runs as bf16 on a CPU with BF16 and no FP16: the plan says what the compiled model
    reports ("fp32 (bf16 inference)"), as do doctor's cache lines; the device named replaces the plan's CPU."""
    from mmedge.runtimes.openvino.doctor import cached_lines
    from mmedge.runtimes.registry import backend

    folder = _copy(clip_artifacts("fp32"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mmedge.load(folder, backend="openvino", backend_options={"openvino": {"precision_hint": "f16"}}) as hint:
            name, runner = next(iter(hint.runners.items()))
            runs = runner._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
            expected = "fp32" if runs == "f32" else f"fp32 ({runs} inference)"
            assert hint.plan.components[name].precision == expected
    assert any(f"({runs} inference)" in line for line in cached_lines(Artifact.open(folder)))
    artifact = Artifact.open(folder)
    planned = plan(_probe(["avx2"]), artifact.manifest, backend="openvino").components[name]
    monkeypatch.setattr("mmedge.runtimes.openvino.compile.require_available", lambda device: None)  # a GPU here
    assert backend("openvino").settled(artifact, name, planned, {"device": "GPU"}).options["device"] == "GPU"


@needs_openvino
def test_nncf_progress_at_load_goes_to_stderr_not_stdout(blip2_artifact, tmp_path, capsys):
    """stdout is the caller's (``mmedge run --json``, pipes): NNCF's progress bar at load goes to stderr."""
    folder = _copy(blip2_artifact, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mmedge.load(folder, backend="openvino", backend_options={"openvino": {"weights": "int8"}}) as loaded:
            assert "compiled" in loaded.decoder.source
    out, err = capsys.readouterr()
    assert out == "" and "Weight Compression" in err


@needs_openvino
def test_a_compiled_model_keeps_a_bounded_number_of_input_shapes(clip_artifacts, tmp_path, monkeypatch):
    """OpenVINO's CPU keeps prepared kernels for up to 5000 input shapes by default: a long-lived CLIP text encoder grew
    by about 1.5 MB per new (batch, length) shape (1.1 GB after 724). The cap (256, or ``shape_cache``) is handed to
    OpenVINO whether the model is compiled here or imported from the cache (a compiled model does not report it back,
    so the calls are watched on their way to the real Core)."""
    import shutil

    from mmedge.runtimes.openvino import compile as ov_compile

    real, handed = ov_compile.core(), []

    class Watched:
        def __getattr__(self, name):
            return getattr(real, name)

        def compile_model(self, model, device, config):
            handed.append(("compiled", config.get("CPU_RUNTIME_CACHE_CAPACITY")))
            return real.compile_model(model, device, config)

        def import_model(self, blob, device, config):
            handed.append(("cache", config.get("CPU_RUNTIME_CACHE_CAPACITY")))
            return real.import_model(blob, device, config)

    monkeypatch.setattr(ov_compile, "core", Watched)
    folder = tmp_path / "clip"
    shutil.copytree(clip_artifacts("fp32"), folder)
    for options in ({}, {"shape_cache": 32}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mmedge.load(folder, backend="openvino", task="embed",
                             backend_options={"openvino": options} if options else None) as embedder:
                assert embedder.embed_texts(["a red circle", "a blue square"]).shape[0] == 2
    assert handed == [("compiled", 256)] * 2 + [("cache", 32)] * 2  # vision and text towers, then from the cache


@needs_openvino
def test_doctor_marks_compiled_models_no_load_will_use_again(clip_artifacts, tmp_path):
    """After an OpenVINO upgrade the old blobs stayed in engines/, listed as if usable."""
    from mmedge.runtimes.openvino.doctor import cached_lines

    folder = _copy(clip_artifacts("fp32"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mmedge.load(folder, backend="openvino").close()
    lines = cached_lines(Artifact.open(folder))
    assert len(lines) > 1 and not any("STALE" in line for line in lines)
    record = next((folder / "engines").glob("*-openvino-*.record"))
    entry = json.loads(record.read_text())
    entry["key"]["openvino_version"] = "2024.0.0-14509-34caeefd078-releases/2024/0"
    record.write_text(json.dumps(entry))
    stale = [line for line in cached_lines(Artifact.open(folder)) if "STALE" in line]
    assert len(stale) == 1 and "compiled by OpenVINO 2024.0.0, this is " in stale[0]
    assert "delete it and its .record to free" in stale[0]


# --- settings refused before anything loads: weights on a compressed decoder, a missing device, a hint that does
# nothing; doctor's cache lines -----------------------------------------------------------------------------------
def _relabelled(folder: Path, tmp_path: Path, precision: str) -> Path:
    """A copy of the artifact whose manifest says its decoder graph is ``precision`` (nothing loads it here)."""
    target = _copy(folder, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["components"]["decoder"]["precision"] = precision
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@needs_openvino
def test_weights_on_a_decoder_that_is_not_fp32_are_refused_before_anything_loads(blip2_artifact, tmp_path,
                                                                                 monkeypatch):
    """doctor planned "int4+nncf-int8" and loading compiled the encoders before NNCF refused the decoder: now the
    idle-settings check refuses it, in the flag's words on the command line."""
    import argparse

    from mmedge.backend_option_args import CliBackendOptions
    from mmedge.runtimes.openvino import compile as ov_compile

    folder = _relabelled(blip2_artifact, tmp_path, "int4")

    def compiled(*args, **kwargs):
        raise AssertionError("a graph was compiled before the setting was refused")

    monkeypatch.setattr(ov_compile, "compiled_model", compiled)
    with pytest.raises(InputError, match=r"\['weights'\] would change nothing: the decoder graph is int4 already"):
        mmedge.load(folder, backend="openvino", backend_options={"openvino": {"weights": "int8"}})
    for given in ({"openvino_weights": "int8", "backend_option": None},
                  {"openvino_weights": None, "backend_option": ["openvino.weights=int4"]}):
        options = CliBackendOptions.from_args(argparse.Namespace(**given))
        with pytest.raises(InputError, match="decoder graph is int4 already") as caught:
            options.check_for(folder, "openvino", "auto", None)
        flag = "--openvino-weights" if given["openvino_weights"] else "--backend-option openvino.weights"
        assert caught.value.what.startswith(flag) and caught.value.fix == f"drop {flag}"


@needs_openvino
def test_doctor_refuses_a_device_openvino_does_not_find_as_run_does(clip_artifacts):
    """doctor printed a plan for openvino.device=GPU on a machine without one (exit 0) where run exits 4."""
    from mmedge.cli import main
    from mmedge.runtimes.openvino.devices import list_devices

    missing = next(name for name in ("GPU", "NPU") if name not in {d.name.split(".")[0] for d in list_devices()})
    assert main(["doctor", str(clip_artifacts("fp32")), "--backend", "openvino", "--backend-option",
                 f"openvino.device={missing}"]) == BackendUnavailableError.exit_code


def test_cpu_settings_that_would_do_nothing_are_refused(monkeypatch):
    """An explicit shape_cache=256 (the default's value) on a GPU was accepted; 'CPU.0' was accepted by the docs'
    '.N' and refused at compile ("finds no 'CPU.0' device"): OpenVINO's CPU takes no index."""
    from mmedge.runtimes.openvino.core import DEFAULT_SHAPE_CACHE, OvOptions

    for bad, words in (({"device": "GPU", "shape_cache": DEFAULT_SHAPE_CACHE}, "would change nothing"),
                       ({"device": "CPU.0"}, "the CPU is one device")):
        with pytest.raises(InputError, match=words):
            OvOptions(**bad)
    assert OvOptions().compile_config()["CPU_RUNTIME_CACHE_CAPACITY"] == DEFAULT_SHAPE_CACHE
    assert "CPU_RUNTIME_CACHE_CAPACITY" not in OvOptions(device="GPU.1").compile_config()


@needs_openvino
def test_a_precision_hint_a_cpu_compiles_at_f32_is_refused(clip_artifacts, monkeypatch):
    """f16 / bf16 on a CPU with neither FP16 nor BF16 compiled at f32 silently (the probe made to answer as such a
    CPU does)."""
    from mmedge.runtimes.openvino import compile as ov_compile
    from mmedge.runtimes.openvino import devices
    from mmedge.runtimes.openvino.devices import OvDevice

    monkeypatch.setattr(ov_compile, "planned_inference_precision", lambda device, hint: "f32")
    monkeypatch.setattr(devices, "list_devices", lambda: [OvDevice("CPU", "a CPU", ("FP32", "INT8"))])
    for hint in ("f16", "bf16"):
        with pytest.raises(InputError, match=f"precision_hint={hint!r} at f32 on this CPU, which has neither FP16 nor "
                                             r"BF16 \(its capabilities: FP32, INT8\)"):
            mmedge.load(clip_artifacts("fp32"), backend="openvino",
                        backend_options={"openvino": {"precision_hint": hint}})


@needs_openvino
def test_doctor_marks_blobs_of_a_replaced_ir_other_weights_or_nncf_stale_and_lists_orphans(clip_artifacts,
                                                                                          tmp_path):
    from mmedge.runtimes.openvino.compile import weights_record
    from mmedge.runtimes.openvino.core import version
    from mmedge.runtimes.openvino.doctor import cached_lines
    from mmedge.runtimes.plugins.tensorrt import BACKEND as TENSORRT

    folder = _copy(clip_artifacts("fp32"), tmp_path)
    (folder / "engines").mkdir(exist_ok=True)
    artifact = Artifact.open(folder)
    name = next(iter(artifact.components))
    graph = artifact.component(name)
    base = {"onnx_sha256": graph["sha256"], "external_data_sha256": "", "precision": "fp32", "device": "CPU",
            "device_full_name": "a CPU", "openvino_version": version(), "mmedge_version": mmedge.__version__,
            "inference_precision": "f32", "ir_sha256": "", "compression": {}}
    nncf = {**weights_record("int4"), "nncf_version": "0.1"}
    older = {k: v for k, v in base.items() if k not in ("ir_sha256", "compression")}  # an older mmedge's key
    keys = {"fresh": base, "data": {**base, "external_data_sha256": "d" * 64}, "older": older,
            "ir": {**base, "precision": "fp32+nncf-int4-exported", "ir_sha256": "x" * 64 + "+" + "y" * 64},
            "nncf": {**base, "precision": "fp32+nncf-int4", "compression": nncf}}
    for tag, key in keys.items():
        stem = folder / "engines" / f"{name}-openvino-{tag}"
        stem.with_suffix(".blob").write_bytes(b"blob")
        stem.with_suffix(".record").write_text(json.dumps({"component": name, "key": key, "blob_bytes": 4}))
    (folder / "engines" / f"{name}-openvino-orphan.blob").write_bytes(b"x" * 2**20)
    lines = cached_lines(Artifact.open(folder))
    by_tag = {tag: next(line for line in lines if f"-openvino-{tag}.blob" in line) for tag in (*keys, "orphan")}
    assert "STALE" not in by_tag["fresh"]
    assert "STALE (its graph's external weights were replaced since)" in by_tag["data"]
    assert "STALE (recorded by an older mmedge (its key lacks ir_sha256, compression): no load here reads it)" \
        in by_tag["older"]
    assert "STALE (compiled from the export's int4 OpenVINO IR, which the artifact no longer has)" in by_tag["ir"]
    assert "STALE (its weights compressed by NNCF 0.1, this is " in by_tag["nncf"]
    assert "no .record beside it, never loaded: delete it to free 1.0 MiB" in by_tag["orphan"]
    assert lines[0] == "engines/: 5 OpenVINO compiled model(s) cached"
    assert TENSORRT.artifact_lines(Artifact.open(folder)) == []  # no "engines/: 0 cached" above it


@needs_openvino
@pytest.mark.parametrize("field, value, fragments", [
    ("outputs.image_embeds.shape", ["batch", 99], ("output 'image_embeds' is f32 of shape [?,16]", "[batch, 99]")),
    ("inputs.pixel_values.dtype", "float16", ("input 'pixel_values' is f32 of shape", "expected float16")),
])
def test_a_manifest_tensor_the_graph_does_not_have_is_refused_on_openvino(field, value, fragments, clip_artifacts,
                                                                           tmp_path):
    """OpenVINO compares each declared input's and output's dtype and fixed dims with the compiled graph, as ONNX
    Runtime does (a hand-edited width had run on it and returned the graph's own width)."""
    from mmedge.errors import IntegrityError
    from tests.support.battery import api_error, edit_manifest

    folder = _copy(clip_artifacts("fp32"), tmp_path)

    def edit(data):
        *parents, last = field.split(".")
        spec = data["components"]["vision"]
        for key in parents:
            spec = spec[key]
        spec[last] = value
    edit_manifest(folder, edit)
    api_error(lambda: mmedge.load(folder, backend="openvino").close(), IntegrityError,
              "component 'vision' graph", *fragments, "re-export the artifact")


def test_openvino_weights_without_openvino_are_refused_before_the_export_loads(tiny_blip2_dir, tmp_path):
    """--openvino-weights where openvino / nncf are not installed: BackendUnavailableError naming the install
    command before anything loads (it came after tracing, as a graph OpenVINO could not read, advising --backend)."""
    from tests.support.blocked_imports import hiding

    script = hiding("openvino", "nncf") + r"""
import sys, time
from mmedge.errors import BackendUnavailableError
from mmedge.export import export_model
started = time.monotonic()
try:
    export_model(sys.argv[1], sys.argv[2], openvino_weights="int4", progress=False)
except BackendUnavailableError as error:
    print(type(error).__name__, error.exit_code, error)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tiny_blip2_dir), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.stdout.startswith("BackendUnavailableError 4 --openvino-weights needs the Python package(s) "
                                  "openvino, nncf, which are not installed"), done.stdout + done.stderr
    assert 'fix: pip install "mmedge[openvino]", or drop --openvino-weights' in done.stdout
    assert "--backend" not in done.stdout and not (tmp_path / "out").exists()


@needs_openvino
def test_a_compiled_model_shipped_with_the_artifact_is_compiled_again(clip_artifacts, tmp_path, caplog,
                                                                       monkeypatch):
    """A blob in engines/ that no mmedge on this device compiled (shipped with the artifact, its record naming the
    right graph hash and bytes, as its author can write them) is code OpenVINO would run as found: compiled again.
    One this device compiled is imported wherever the folder is copied here (its record is signed with this
    device's key, mmedge.device_key)."""
    import logging
    import shutil

    monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / "this-device"))
    folder = tmp_path / "clip"
    shutil.copytree(clip_artifacts("fused-fp32"), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mmedge.load(folder, backend="openvino").close()
        shutil.copytree(folder, tmp_path / "copied")  # engines/ travels with it
        with mmedge.load(tmp_path / "copied", backend="openvino") as copied:
            assert copied.runners["zero_shot"].source == "cache"  # this device's own: imported
        monkeypatch.setenv("MMEDGE_CACHE", str(tmp_path / "another-device"))  # the artifact arrives elsewhere
        with caplog.at_level(logging.INFO, logger="mmedge"), mmedge.load(folder, backend="openvino") as shipped:
            assert shipped.runners["zero_shot"].source.startswith("compiled")
    assert any("not compiled by mmedge on this device" in r.getMessage() for r in caplog.records), caplog.text
    assert (tmp_path / "another-device" / "device-key").stat().st_mode & 0o777 == 0o600
