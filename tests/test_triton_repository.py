"""`mmedge triton`: the repository it writes, read back with Triton's own schema.

Every config.pbtxt is parsed with tritonclient's ``model_config_pb2`` (protobuf text format) and compared with the
artifact's manifest: names, dtypes, dims (-1 for named dynamic axes), max_batch_size, dynamic batching for encoders
only, instance groups, the TensorRT accelerator's precision with --gpu. The onnxruntime-platform repository cannot be
served here (the test server has no ONNX Runtime backend), so this is its check; the python-platform repository is
also served for real in tests/test_triton_serving.py.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mmedge.artifact import Artifact, sha256_file
from mmedge.errors import ArtifactError, InputError, IntegrityError
from mmedge.triton import Options, pipeline_models, write_repository
from mmedge.triton.config import ENCODERS, TRITON_DTYPES, batch_axis, component_config, render
from mmedge.triton.protocol import PIPELINES, ROW_PIPELINES
from mmedge.triton.repository import MARKER_FILE
from tests.support.battery import api_error, cli_error

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason='needs tritonclient: pip install "mmedge[triton]"')
from google.protobuf import text_format  # noqa: E402  (tritonclient's dependency)


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def sources(pytorch_artifacts, tmp_path_factory):
    """Artifact folders (symlinks) named as their models will be: clip, clip-fused, blip2, idefics."""
    root = tmp_path_factory.mktemp("triton-sources")
    folders = {"clip": pytorch_artifacts("clip"), "clip-fused": pytorch_artifacts("clip-fused"),
               "blip2": pytorch_artifacts("blip2"), "idefics": pytorch_artifacts("idefics")}
    for name, folder in folders.items():
        (root / name).symlink_to(folder, target_is_directory=True)
    return {name: root / name for name in folders}


def check_tensors(entries, specs, batched):
    assert [e.name for e in entries] == list(specs)
    for entry, spec in zip(entries, specs.values()):
        shape = spec["shape"][1:] if batched else spec["shape"]
        assert list(entry.dims) == [d if isinstance(d, int) else -1 for d in shape]
        assert model_config_pb2.DataType.Name(entry.data_type) == TRITON_DTYPES[spec["dtype"]]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_onnxruntime_repository_matches_every_manifest(sources, tmp_path, gpu):
    repo = tmp_path / "repo"
    written = write_repository(sources.values(), repo, Options(platform="onnxruntime", gpu=gpu, max_batch_size=4))
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(m for ms in written.values() for m in ms)
    assert json.loads((repo / MARKER_FILE).read_text())["models"] == written  # what marks it as mmedge's
    for prefix, folder in sources.items():
        artifact = Artifact.open(folder)
        for name, component in artifact.components.items():
            model = repo / f"{prefix}__{name}"
            config = parse(model)
            assert config.name == model.name and config.backend == "onnxruntime"
            assert config.default_model_filename == component["file"]
            graph = model / "1" / component["file"]
            assert graph.stat().st_ino == (folder / component["file"]).resolve().stat().st_ino  # hard-linked
            assert sha256_file(graph) == component["sha256"]
            batched = batch_axis(component) is not None
            assert config.max_batch_size == (4 if batched else 0)
            check_tensors(config.input, component["inputs"], batched)
            check_tensors(config.output, component["outputs"], batched)
            assert config.HasField("dynamic_batching") == (name in ENCODERS)
            assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == \
                ["KIND_GPU" if gpu else "KIND_CPU"]
            accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
            if gpu:  # FP32 exports: TensorRT in FP16 (INT8 and INT4 below)
                (tensorrt,) = accelerators
                assert tensorrt.name == "tensorrt" and tensorrt.parameters["precision_mode"] == "FP16"
            else:
                assert not accelerators
        for model, (kind, decoupled) in pipeline_models(artifact, prefix).items():
            config = parse(repo / model)
            rows = kind in ROW_PIPELINES  # zero-shot: Triton batches the pipeline's requests (one row each)
            assert config.backend == "python" and config.max_batch_size == (4 if rows else 0)
            assert config.HasField("dynamic_batching") == rows
            assert [i.allow_ragged_batch for i in config.input] == [rows] * len(config.input)
            assert config.model_transaction_policy.decoupled == decoupled
            assert [i.name for i in config.input] == list(PIPELINES[kind]["inputs"])
            assert [o.name for o in config.output] == list(PIPELINES[kind]["outputs"])
            settings = json.loads(config.parameters["mmedge"].string_value)
            assert settings["kind"] == kind and set(settings["components"]) == set(artifact.components)
            assert settings["rows"] == rows and "graphs" not in settings  # onnxruntime: the graphs through BLS
            assert (repo / model / "1" / "model.py").read_text().count("PipelineModel as TritonPythonModel") == 1
            assert (repo / model / "1" / "manifest.json").read_bytes() == (folder / "manifest.json").read_bytes()


@pytest.mark.parametrize("precision, method, expected",
                         [("int8", "int8-static-qdq", "INT8"), ("int8", "int8-dynamic", None),
                          ("int4", "int4-weight-only", None), ("fp16", None, "FP16"), ("fp16", "fp32-islands", "FP32")])
def test_tensorrt_precision_follows_the_quantization_recipe(precision, method, expected):
    """As mmedge's own TensorRT backend: static QDQ graphs build INT8 engines (explicit quantization), ONNX Runtime's
    integer and MatMulNBits graphs stay on its CUDA provider (no accelerator), and an FP16 graph whose export kept
    some nodes FP32 (its range guard) gets no FP16 flag: Triton's accelerator is ONNX Runtime's TensorRT provider,
    whose weakly typed networks would run those nodes at FP16 too (``tensorrt_planning.provider_fp16``)."""
    quantization = ({"method": "fp16", "fp32_nodes": ["/ffn/Add"]} if method == "fp32-islands"
                    else {"method": method} if method else None)
    component = {"file": "g.onnx", "precision": precision, "quantization": quantization,
                 "inputs": {"x": {"dtype": "float32", "shape": ["batch", 4]}},
                 "outputs": {"y": {"dtype": "float32", "shape": ["batch", 2]}}}
    text = render(component_config("m", "vision", component, Options(gpu=True)))
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.parameters["precision_mode"] for a in accelerators] == ([expected] if expected else [])


def test_gpu_keeps_an_fp16_overflowing_llm_at_fp32(sources, tmp_path):
    """A BLIP-2 whose LLM is a T5 (Flan-T5: FP32 activations past FP16's range) gets TensorRT at FP32 for its
    decoder, as mmedge's own TensorRT path builds it (``tensorrt_planning.fp16_overflow``); its vision prefix stays
    FP16."""
    copy = shutil.copytree(sources["blip2"].resolve(), tmp_path / "blip2-t5", ignore=shutil.ignore_patterns("engines"))
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["blip2"]["decoder"]["component"] == "decoder"
    manifest["blip2"]["decoder"]["llm"] = "t5"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    write_repository([copy], tmp_path / "repo", Options(gpu=True))
    precision = {name: parse(tmp_path / "repo" / f"blip2-t5__{name}").optimization.execution_accelerators
                 .gpu_execution_accelerator[0].parameters["precision_mode"] for name in ("prefix", "decoder")}
    assert precision == {"prefix": "FP16", "decoder": "FP32"}


def test_gpu_component_instances_run_on_the_device_triton_gives_them(sources, tmp_path, monkeypatch):
    """Triton places each GPU instance of a model on a device (``model_instance_device_id``); mmedge's runner in a
    python-platform component model is made on that device, not on device 0 for every instance."""
    from mmedge.runtimes import registry
    from mmedge.runtimes.ort_session import OrtOptions
    from mmedge.triton.backend import ComponentModel
    from mmedge.triton.config import PARAMETER

    write_repository([sources["clip"]], tmp_path / "repo", Options(platform="python", gpu=True))
    folder = tmp_path / "repo" / "clip__vision"
    config = parse(folder)
    made = []
    monkeypatch.setattr(registry, "create_runner", lambda *args, **options: made.append(options))
    for kind, device in (("GPU", "3"), ("GPU", "0"), ("CPU", "0")):
        args = {"model_config": json.dumps({"max_batch_size": config.max_batch_size, "parameters": {
                    PARAMETER: {"string_value": config.parameters[PARAMETER].string_value}}}),
                "model_repository": str(folder), "model_version": "1", "model_name": "clip__vision",
                "model_instance_kind": kind, "model_instance_device_id": device}
        ComponentModel().initialize(args)
    assert [(m["providers"], m.get("device_id")) for m in made] == [(("cuda",), 3), (("cuda",), 0), (("cuda",), None)]
    assert OrtOptions(**made[0]).device_id == 3  # options the runner takes as they are


def test_instances_reach_the_component_models_a_pipeline_calls(sources, tmp_path, capsys):
    """--instances sets the component models' instances, with bls, or beside an artifact whose pipelines call them."""
    from mmedge.cli import main

    for artifacts, graphs in ((["clip-fused"], "bls"), (["clip-fused", "blip2"], "auto")):
        out = tmp_path / f"repo-{graphs}"
        assert main(["triton", *(str(sources[a]) for a in artifacts), "--out", str(out), "--platform", "python",
                     "--instances", "3", "--zero-shot-graphs", graphs, "--quiet"]) == 0
        assert parse(out / "clip-fused__zero_shot").instance_group[0].count == 3


def test_gpu_zero_shot_pipeline_running_its_graphs_inline_is_a_gpu_instance(sources, tmp_path):
    """With --gpu the inline zero-shot pipeline runs its graphs on CUDA: its instances are GPU instances, so Triton
    places each on a device and its runner uses that one (not a CPU instance on device 0 whatever the server has);
    the pipelines that only call the component models stay CPU instances."""
    write_repository([sources["clip"]], tmp_path / "repo", Options(platform="python", gpu=True, pipeline_instances=2))
    kinds = {model: [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), g.count)
                     for g in parse(tmp_path / "repo" / model).instance_group] for model in ("clip-zero-shot",
                                                                                              "clip-embed")}
    assert kinds == {"clip-zero-shot": [("KIND_GPU", 2)], "clip-embed": [("KIND_CPU", 2)]}
    write_repository([sources["clip"]], tmp_path / "bls", Options(platform="python", gpu=True,
                                                                  zero_shot_graphs="bls"))
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(
        parse(tmp_path / "bls" / "clip-zero-shot").instance_group[0].kind) == "KIND_CPU"


def test_blip2_and_idefics_get_a_streaming_caption_model(sources, tmp_path):
    written = write_repository([sources["blip2"], sources["idefics"]], tmp_path / "repo")
    assert written[str(sources["blip2"])] == ["blip2__prefix", "blip2__decoder", "blip2-caption",
                                              "blip2-caption-stream"]
    assert written[str(sources["idefics"])] == ["idefics__image_context", "idefics__decoder", "idefics-caption",
                                                "idefics-caption-stream"]
    table = Artifact.open(sources["blip2"]).manifest["blip2"]["embeddings"]
    assert sha256_file(tmp_path / "repo" / "blip2-caption" / "1" / table["file"]) == table["sha256"]


def test_python_platform_components_run_mmedges_runner(sources, tmp_path):
    write_repository([sources["clip"]], tmp_path / "repo", Options(platform="python", threads=2))
    config = parse(tmp_path / "repo" / "clip__vision")
    assert config.backend == "python" and not config.default_model_filename
    assert json.loads(config.parameters["mmedge"].string_value) == {"component": "vision", "providers": ["cpu"],
                                                                    "threads": 2}
    version = tmp_path / "repo" / "clip__vision" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["manifest.json", "model.py", "vision.onnx"]
    assert "ComponentModel as TritonPythonModel" in (version / "model.py").read_text()


@pytest.mark.parametrize("graphs, inline", [("auto", True), ("bls", False)])
def test_python_platform_zero_shot_runs_its_graphs_inline(sources, tmp_path, graphs, inline):
    """The python platform's zero-shot pipeline runs its graphs in its own process (one Python-backend hop per
    request, not two): its folder holds them, hard-linked, and its settings say how to run them; 'bls' keeps the
    calls to the component models."""
    write_repository([sources["clip"], sources["clip-fused"]], tmp_path / "repo",
                     Options(platform="python", threads=1, zero_shot_graphs=graphs))
    for prefix in ("clip", "clip-fused"):
        folder = tmp_path / "repo" / f"{prefix}-zero-shot"
        settings = json.loads(parse(folder).parameters["mmedge"].string_value)
        artifact = Artifact.open(sources[prefix])
        graphs_here = sorted(c["file"] for c in artifact.components.values() if (folder / "1" / c["file"]).exists())
        if inline:
            assert settings["graphs"] == "inline" and settings["providers"] == ["cpu"] and settings["threads"] == 1
            assert graphs_here == sorted(c["file"] for c in artifact.components.values())
            assert all((folder / "1" / f).stat().st_ino == (sources[prefix] / f).resolve().stat().st_ino
                       for f in graphs_here)
        else:
            assert "graphs" not in settings and not graphs_here
        assert not (tmp_path / "repo" / f"{prefix}-embed" / "1" / "vision.onnx").exists()  # embed: BLS either way
    with pytest.raises(InputError, match="zero_shot_graphs is 'nearby'"):
        write_repository([sources["clip"]], tmp_path / "other", Options(platform="python", zero_shot_graphs="nearby"))


def test_spin_reaches_the_served_runners_and_is_refused_where_it_would_do_nothing(sources, tmp_path):
    """The python platform's runners (component models and the inline zero-shot pipeline) let ONNX Runtime's threads
    spin within a call; by default the spinning stops when the call returns, with --spin it goes on, as a
    one-graph mmedge.load pipeline's does. The onnxruntime platform and GPU instances have no such setting, so --spin
    is refused there rather than ignored."""
    from mmedge.triton.backend import local_runner

    artifact = Artifact.open(sources["clip-fused"])
    for spin in (False, True):
        repo = tmp_path / f"repo-{spin}"
        write_repository([sources["clip-fused"]], repo, Options(platform="python", threads=1, spin=spin))
        for model in ("clip-fused__zero_shot", "clip-fused-zero-shot"):
            settings = json.loads(parse(repo / model).parameters["mmedge"].string_value)
            assert settings.get("spin", False) is spin
            runner = local_runner(artifact, "zero_shot", settings)
            try:
                options = runner._session.get_session_options()
                assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
                if spin:  # --spin: ONNX Runtime's default, the spinning goes on after a call
                    with pytest.raises(RuntimeError, match="does not have configuration"):
                        options.get_session_config_entry("session.force_spinning_stop")
                else:  # the spinning stops when a call returns
                    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
            finally:
                runner.close()
    for options, named in ((Options(spin=True), "'onnxruntime' platform"),
                           (Options(platform="python", gpu=True, spin=True), "GPU")):
        with pytest.raises(InputError, match=f"--spin was given for the {named}"):
            write_repository([sources["clip-fused"]], tmp_path / "refused", options)
        assert not (tmp_path / "refused").exists()


def test_a_tampered_artifact_is_refused_and_nothing_is_written(sources, tmp_path):
    copy = tmp_path / "clip"
    shutil.copytree(sources["clip"].resolve(), copy)
    graph = copy / "vision.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="vision.onnx"):
        write_repository([copy], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(copy), "--out", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "vision.onnx" in result.stderr and "sha256" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "repo").exists()


def test_each_file_is_hashed_once_when_linked_and_a_bad_copy_is_refused(sources, tmp_path, monkeypatch):
    """A hard link is the artifact's own verified bytes: each file is hashed once however many models hold it (the
    inline zero-shot pipeline holds the CLIP graphs too). Across file systems the copy is hashed again, and a copy that
    differs is refused with nothing written."""
    import mmedge.artifact
    import mmedge.triton.placing as placing

    hashed = []
    real_sha256 = mmedge.artifact.sha256_file

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real_sha256(path, *args, **kwargs)

    monkeypatch.setattr(mmedge.artifact, "sha256_file", counting)
    monkeypatch.setattr(placing, "sha256_file", counting)
    write_repository([sources["clip"]], tmp_path / "linked", Options(platform="python"))
    manifest = Artifact.open(sources["clip"]).manifest
    assert sorted(hashed) == sorted([c["file"] for c in manifest["components"].values()] +
                                    [manifest["tokenizer"]["file"]])
    assert (tmp_path / "linked" / "clip-zero-shot" / "1" / "vision.onnx").stat().st_nlink > 1  # inline: linked too

    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(placing.os, "link", no_links)
    hashed.clear()
    write_repository([sources["clip"]], tmp_path / "copied", Options(platform="python"))
    assert len(hashed) > len(manifest["components"]) + 1  # the artifact's files, then each copy
    assert (tmp_path / "copied" / "clip__vision" / "1" / "vision.onnx").stat().st_nlink == 1

    def bad_copy(source, target):
        data = bytearray(Path(source).read_bytes())
        data[len(data) // 2] ^= 0xFF
        Path(target).write_bytes(bytes(data))

    monkeypatch.setattr(placing.shutil, "copyfile", bad_copy)
    with pytest.raises(IntegrityError, match="the copy of '.*' in the repository does not match"):
        write_repository([sources["clip"]], tmp_path / "bad", Options(platform="python"))
    assert not (tmp_path / "bad").exists()


def test_cli_writes_the_repository_and_refuses_bad_options(sources, tmp_path):
    out = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(sources["clip-fused"]), "--out",
                             str(out), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {str(sources["clip-fused"]): ["clip-fused__zero_shot", "clip-fused-zero-shot"]}
    lines = result.stderr.splitlines()  # progress: the artifact's step, its start and end, and each component
    assert re.fullmatch(r"\[1/1\] clip-fused: checking the sha256 of its \d+\.\d MB and placing its files \.\.\.",
                        lines[0])
    assert lines[1] == "    component 1/1" and lines[2].startswith(lines[0] + " done (") and len(lines) == 3
    again = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(sources["clip-fused"]), "--out",
                            str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "[1/1]" not in again.stderr  # before work
    quiet = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(sources["clip-fused"]), "--out",
                            str(tmp_path / "q"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith(f"wrote {tmp_path / 'q'}")
    bad = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(sources["clip"]), "--out",
                          str(tmp_path / "b"),
                          "--max-batch-size", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument --max-batch-size: 0 is below 1" in bad.stderr
    inline = subprocess.run([sys.executable, "-m", "mmedge.cli", "triton", str(sources["clip-fused"]), "--out",
                             str(tmp_path / "i"),
                             "--zero-shot-graphs", "inline"], capture_output=True, text=True, timeout=120)
    # the onnxruntime platform, its zero-shot graph in the pipeline's process
    assert inline.returncode == 0, inline.stderr
    settings = parse(tmp_path / "i" / "clip-fused-zero-shot").parameters["mmedge"].string_value
    assert json.loads(settings)["graphs"] == "inline"


def test_the_client_without_tritonclient_names_the_install_command():
    probe = ("import sys; sys.modules['tritonclient'] = None\n"
             "from mmedge.errors import ServerError\n"
             "from mmedge.triton_client import connect\n"
             "try:\n    connect('grpc://127.0.0.1:1', 'clip')\n"
             "except ServerError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'pip install "mmedge[triton]"' in result.stdout and "tritonclient" in result.stdout


def test_a_served_model_writes_no_record_of_its_checks_into_the_repository(sources, tmp_path, monkeypatch):
    """A model repository may be polled by Triton for changes or mounted read-only: the models hash their files at
    each server start and write nothing (unlike mmedge.load, which records its checks in the artifact's engines/)."""
    from mmedge import file_checks
    from mmedge.triton.backend import open_model_folder
    from mmedge.triton.config import PARAMETER

    monkeypatch.setattr(file_checks, "RACY_SECONDS", 0.0)  # the linked files are new: would be recorded at once
    write_repository([sources["clip"]], tmp_path / "repo", Options(platform="python"))
    folder = tmp_path / "repo" / "clip__vision"
    args = {"model_config": json.dumps({"parameters": {PARAMETER: {"string_value": "{}"}}}),
            "model_repository": str(folder), "model_version": "1"}
    artifact = open_model_folder(args)[2]
    assert artifact.component_path("vision") == (folder / "1" / "vision.onnx").resolve()
    assert list((tmp_path / "repo").rglob("*.record")) == [] and not (folder / "1" / "engines").exists()
    checked = Artifact.open(sources["clip"])  # the artifact itself: its checks are recorded
    checked.component_path("vision")
    assert (sources["clip"] / "engines" / file_checks.RECORD_FILE).is_file()


def test_overwrite_replaces_only_a_repository_mmedge_wrote(clip_artifacts, tmp_path, monkeypatch, capsys):
    """--overwrite never turns a file into a folder, empties a folder mmedge did not write, the current directory or
    an artifact being read; it is refused before any artifact is read (a missing one is not even noticed)."""
    artifact = tmp_path / "clip"
    artifact.symlink_to(clip_artifacts("fp32"), target_is_directory=True)
    image = tmp_path / "img.png"
    image.write_bytes(b"png")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    missing = tmp_path / "missing-artifact"
    api_error(lambda: write_repository([missing], image, overwrite=True), ArtifactError, "is a file, not a folder")
    api_error(lambda: write_repository([missing], foreign, overwrite=True), ArtifactError,
              "is not empty and is not a Triton repository mmedge wrote")
    api_error(lambda: write_repository([artifact], artifact, overwrite=True), ArtifactError, "is or holds")
    cli_error(capsys, ["triton", artifact, "--out", image, "--overwrite", "--quiet"], ArtifactError, "is a file")
    assert image.read_bytes() == b"png" and (foreign / "notes.txt").read_text() == "precious"
    assert Artifact.open(artifact)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", ".."):
        api_error(lambda: write_repository([artifact], out, overwrite=True), ArtifactError, "the current directory")
    repo = tmp_path / "repo"
    (repo / "empty").mkdir(parents=True)  # a folder holding only an empty folder is not empty: refused
    api_error(lambda: write_repository([artifact], repo, overwrite=True), ArtifactError, "is not empty")
    (repo / "empty").rmdir()  # an empty folder is replaced, and so is a repository mmedge wrote
    assert write_repository([artifact], repo, overwrite=True) == write_repository([artifact], repo, overwrite=True)
    assert json.loads((repo / MARKER_FILE).read_text())["written_by"] == "mmedge triton"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "foreign", "img.png", "repo", "work"]


@pytest.mark.parametrize("artifacts,option,fragment", [
    (["clip-fused"], ["--workers", "4"], "--workers would change nothing for these artifacts"),
    (["blip2"], ["--zero-shot-graphs", "inline"], "--zero-shot-graphs would change nothing for these artifacts"),
])
def test_cli_refuses_pipeline_options_no_artifact_uses(sources, tmp_path, capsys, artifacts, option, fragment):
    """--workers shapes embedding and captioning pipelines, --zero-shot-graphs the zero-shot one: given for artifacts
    that make none, they are refused before anything is written."""
    cli_error(capsys, ["triton", *(sources[a] for a in artifacts), "--out", tmp_path / "repo", *option], InputError,
              fragment)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("field,value", [("threads", 0), ("queue_delay_us", -5), ("workers", 0)])
def test_write_repository_refuses_counts_triton_would_reject(sources, tmp_path, field, value):
    """The library call checks what the CLI's argparse types check (`intra_op_thread_count "-3"` and
    `max_queue_delay_microseconds: -5` were written as given)."""
    with pytest.raises(InputError, match=f"{field} is {value}"):
        write_repository([sources["clip"]], tmp_path / "repo", Options(**{field: value}))


def test_nothing_of_the_artifact_reaches_the_python_code_it_writes(clip_artifacts, tmp_path):
    """A Python-backend model.py named the artifact's folder in its docstring as it was: a folder named with three
    quotes and a line of Python (from a tarball or a colleague's folder: no hash covers a folder's name) ran that
    line when the server imported the model."""
    hostile = tmp_path / 'clip"""\nopen("ran", "w").close()\n"""'  # a file "ran" where the server runs it
    shutil.copytree(clip_artifacts("fp32"), hostile, ignore=shutil.ignore_patterns("engines"))
    write_repository([hostile], tmp_path / "repo", Options(platform="python"))
    written = sorted((tmp_path / "repo").rglob("model.py"))
    assert written
    for path in written:
        assert "open(" not in path.read_text()
        subprocess.run([sys.executable, str(path)], capture_output=True, timeout=60, cwd=tmp_path)  # as imported
    assert not (tmp_path / "ran").exists()
