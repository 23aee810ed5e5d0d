"""The PyTorch backend (``mmedge[torch]``): artifacts exported ``--with-pytorch``, the encoder runner, the static-cache
decoder, bitsandbytes INT8/NF4 LLM weights, selection over described devices, and ONNX Runtime's GPU provider
options and IO binding. Parity with the ONNX Runtime reference lives in ``tests/test_conformance.py``.

CUDA-only paths (graph capture and replay, outputs left on the GPU) are in the ``gpu``-marked tests at the end; they
skip here with the reason and run on a GPU machine through ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.artifact import Artifact, sha256_file
from mmedge.device import DeviceProbe, GpuInfo
from mmedge.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    FeedError,
    InputError,
    IntegrityError,
    ManifestError,
    ModelLoadError,
    UnsafePathError,
)
from mmedge.manifest import dump_manifest, parse_manifest
from mmedge.metrics import cosine_rows
from mmedge.selection import plan
from tests.support.battery import api_error, cli_error
from tests.support.blocked_imports import blocking
from tests.support.torch_cases import blip2_decoder_pair, load_quietly, prompt

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
NO_BNB = "bitsandbytes is not installed here (pip install bitsandbytes; its CPU build runs INT8/NF4)"
CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU visible to torch here (run with -m gpu on a GPU machine: benchmarks/gpu_check.sh)"


# --- export --with-pytorch and the manifest ----------------------------------------------------------
def test_export_writes_hashed_safetensors_weights(pytorch_artifacts):
    artifact = Artifact.open(pytorch_artifacts("blip2"))
    entry = artifact.manifest["pytorch"]
    assert entry["folder"] == "pytorch" and entry["format"] == "transformers-safetensors"
    assert entry["model_class"] == "Blip2ForConditionalGeneration" and entry["dtype"] == "float32"
    assert {"config.json", "model.safetensors"} <= set(entry["files"])
    for name, info in entry["files"].items():
        assert sha256_file(artifact.root / "pytorch" / name) == info["sha256"]
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl"))
    assert artifact.has_pytorch_weights and artifact.pytorch_folder() == artifact.root / "pytorch"
    assert list(artifact.manifest)[-2:] == ["pytorch", "validation"]
    fused = Artifact.open(pytorch_artifacts("clip-fused")).manifest["pytorch"]
    assert fused["reference_tensors"] == "reference_tensors.safetensors"
    assert "reference_tensors.safetensors" in fused["files"]


def test_export_without_the_flag_writes_no_weights(clip_artifacts):
    artifact = Artifact.open(clip_artifacts("fp32"))
    assert "pytorch" not in artifact.manifest and not (artifact.root / "pytorch").exists()
    assert not artifact.has_pytorch_weights


@pytest.mark.parametrize("change,kind,words", [
    (lambda e: e["files"].update({"weights.bin": {"sha256": "ab" * 32}}), UnsafePathError, "pickle"),
    (lambda e: e["files"].update({"../model.safetensors": {"sha256": "ab" * 32}}), UnsafePathError, "plain file name"),
    (lambda e: e.update(folder="/etc"), UnsafePathError, "plain file name"),
    (lambda e: e["files"].pop("config.json"), ManifestError, "config.json and at least one .safetensors"),
    (lambda e: e["files"]["config.json"].update(sha256="xyz"), ManifestError, "64 lowercase hex"),
    (lambda e: e.update(format="pickle"), ManifestError, "transformers-safetensors"),
])
def test_manifest_refuses_unsafe_pytorch_entries(pytorch_artifacts, change, kind, words):
    manifest = json.loads((pytorch_artifacts("clip") / "manifest.json").read_text())
    change(manifest["pytorch"])
    with pytest.raises(kind, match=words):
        parse_manifest(json.dumps(manifest))
    assert parse_manifest(dump_manifest(json.loads((pytorch_artifacts("clip") / "manifest.json").read_text())))


def test_tampered_or_missing_weights_are_refused(pytorch_artifacts, tmp_path):
    copy = tmp_path / "clip"
    shutil.copytree(pytorch_artifacts("clip"), copy)
    weights = copy / "pytorch" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    api_error(lambda: load_quietly(copy, backend="torch"), IntegrityError, "model.safetensors", "sha256")
    shutil.rmtree(copy / "pytorch")
    api_error(lambda: load_quietly(copy, backend="torch"), ArtifactNotFoundError, "'pytorch'", "is missing")
    assert load_quietly(copy).plan.components["vision"].backend == "onnxruntime"  # auto: the graphs are all it needs


def test_named_torch_backend_without_weights(capsys, clip_artifacts, photos):
    api_error(lambda: load_quietly(clip_artifacts("fp32"), backend="torch"), BackendUnavailableError, "--with-pytorch")
    cli_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels", "cat", "--backend", "torch"],
              BackendUnavailableError, "exported without them")


def test_checkpoint_folder_instead_of_the_artifacts_weights(clip_artifacts, tiny_clip_dir, photos):
    classifier = load_quietly(clip_artifacts("fp32"), backend="torch",
                              backend_options={"torch": {"checkpoint": str(tiny_clip_dir)}})
    reference = load_quietly(clip_artifacts("fp32"))
    got, want = classifier(photos[0], labels=["cat", "dog"]), reference(photos[0], labels=["cat", "dog"])
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-4)
    classifier.close()


def test_without_torch_the_backend_names_its_install_command(pytorch_artifacts):
    """A fresh interpreter where torch cannot be imported: the backend module imports, using it says what to install."""
    script = blocking("torch", "transformers") + f"""
import warnings; warnings.simplefilter("ignore")
import mmedge, mmedge.runtimes.torch_backend, mmedge.runtimes.torch_decoder
from mmedge.errors import BackendUnavailableError
try:
    mmedge.load({str(pytorch_artifacts("clip"))!r}, backend="torch")
except BackendUnavailableError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(mmedge.__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "needs the Python package 'torch'" in result.stdout and 'pip install "mmedge[torch]"' in result.stdout


def test_cuda_asked_of_a_machine_without_one():
    from mmedge.runtimes.torch_backend import resolve_device

    if CUDA:
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


# --- the encoder runner ------------------------------------------------------------------------------
def test_runner_takes_torch_tensors_and_checks_them(pytorch_artifacts):
    from mmedge.runtimes.torch_backend import create_runner
    from mmedge.validate import load_validation_samples

    artifact = Artifact.open(pytorch_artifacts("clip"))
    runner = create_runner(None, "vision", artifact.component("vision"), artifact=artifact, device="cpu")
    pixels = load_validation_samples(artifact)["vision"]["inputs"]["pixel_values"]
    from_numpy = runner.infer({"pixel_values": pixels})["image_embeds"]
    from_torch = runner.infer({"pixel_values": torch.from_numpy(pixels)})["image_embeds"]
    assert isinstance(from_torch, np.ndarray) and from_torch.dtype == np.float32
    np.testing.assert_array_equal(from_numpy, from_torch)
    with pytest.raises(FeedError, match="dtype torch.int64"):
        runner.infer({"pixel_values": torch.zeros(pixels.shape, dtype=torch.int64)})
    with pytest.raises(FeedError, match="shape"):
        runner.infer({"pixel_values": torch.zeros((1, 3, 7, 7))})
    assert runner.graph_report() == {"cuda_graphs": False, "compile": "off"} and runner.precision == "fp32"
    read_only = np.array(pixels)
    read_only.flags.writeable = False  # e.g. a memory-mapped or np.broadcast_to array: torch warned of sharing it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(runner.infer({"pixel_values": read_only})["image_embeds"], from_numpy)
    runner.close()
    runner.close()


def test_runners_and_decoder_of_one_artifact_share_one_model(pytorch_artifacts):
    from mmedge.runtimes import torch_backend

    captioner = load_quietly(pytorch_artifacts("blip2-split"), backend="torch")
    shared = [e for e in torch_backend._MODELS.values() if e.users == 3]  # vision, qformer, decoder
    assert len(shared) == 1 and shared[0].decoders == 1
    captioner.close()
    assert not any(e is shared[0] for e in torch_backend._MODELS.values())


# --- the static-cache decoder --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blip2_decoders(pytorch_artifacts):
    reference, decoder = blip2_decoder_pair(pytorch_artifacts("blip2"))
    yield reference, decoder
    reference.close()
    decoder.close()


def test_cache_grows_past_its_blocks_and_matches_the_graph(blip2_decoders, photos):
    from mmedge.generation import GenerationConfig, generate

    reference, decoder = blip2_decoders
    embeds, mask = prompt(reference, photos)
    config = GenerationConfig(max_new_tokens=30, min_new_tokens=30)
    want = generate(reference.decoder, embeds, mask, config)
    decoder.cache_block = 8
    decoder._reserved = None
    logits = decoder.start(embeds, mask)  # no reserve(): capacity = prompt + half a block, rounded up to blocks
    first = decoder._state
    assert first.capacity % 8 == 0 and first.capacity >= embeds.shape[1] + 4
    got = generate(decoder, embeds, mask, config)  # reserve() sizes the cache for the 30 tokens at once
    assert got == want and decoder._state.capacity >= embeds.shape[1] + 30
    np.testing.assert_allclose(logits, reference.decoder.start(embeds, mask), atol=1e-4)
    decoder.reserve(embeds.shape[1] + 1)  # one row (new buffers), too small: the cache grows block by block
    tokens = [int(np.argmax(decoder.start(embeds[:1], mask[:1])[0]))]
    capacities = {decoder._state.capacity}
    step_mask = mask[:1]
    for _ in range(20):
        step_mask = np.concatenate([step_mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        tokens.append(int(np.argmax(decoder.step(np.array([tokens[-1]]), step_mask)[0])))
        capacities.add(decoder._state.capacity)
    assert len(capacities) >= 3 and tokens == want[0][:21]


def test_buffers_are_reused_across_generations(blip2_decoders, photos):
    from mmedge.generation import GenerationConfig, generate

    reference, decoder = blip2_decoders
    embeds, mask = prompt(reference, photos)
    config = GenerationConfig(max_new_tokens=6)
    generate(decoder, embeds, mask, config)
    state = decoder._state
    generate(decoder, embeds, mask, config)
    assert decoder._state is state  # same batch, capacity fits: the buffers (and on CUDA the graph) are kept


def test_beam_search_reorders_the_cache_on_the_device(blip2_decoders, photos):
    from mmedge.generation import GenerationConfig, generate

    reference, decoder = blip2_decoders
    embeds, mask = prompt(reference, photos)
    config = GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.6)
    assert generate(decoder, embeds, mask, config) == generate(reference.decoder, embeds, mask, config)
    assert decoder._state.batch == 6


def test_the_step_a_cuda_graph_captures_is_idempotent(blip2_decoders, photos):
    """What makes warm-up and capture safe on CUDA, checked here: the step reads and writes only the state's static
    buffers, and running it again on the same buffers writes the same keys/values to the same slot and gives the
    same logits."""
    reference, decoder = blip2_decoders
    embeds, mask = prompt(reference, photos)
    decoder.start(embeds, mask)
    step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    first = decoder.step(np.array([5, 9]), step_mask)
    state = decoder._state
    cache = [t.clone() for t in (*state.keys, *state.values)]
    with torch.inference_mode():
        decoder._step_core(state)
        decoder._step_core(state)
    np.testing.assert_array_equal(state.logits.numpy(), first)
    assert all(torch.equal(a, b) for a, b in zip(cache, (*state.keys, *state.values)))
    assert int(state.step_slot) == mask.shape[1] and decoder.past_length == mask.shape[1] + 1


def test_decoder_refuses_bad_steps(blip2_decoders, photos):
    reference, decoder = blip2_decoders
    embeds, mask = prompt(reference, photos)
    decoder.start(embeds, mask)
    with pytest.raises(FeedError, match="decode step got 3 token ids"):
        decoder.step(np.zeros(3, dtype=np.int64), np.ones((3, mask.shape[1] + 1), dtype=np.int64))
    with pytest.raises(FeedError, match="reorder got rows"):
        decoder.reorder(np.array([0, 5]))
    with pytest.raises(FeedError, match="prefill got"):
        decoder.start(embeds, mask[:, :-1])


def test_decoder_of_an_idefics_artifact_is_refused(pytorch_artifacts):
    from mmedge.errors import BackendError
    from mmedge.runtimes.torch_decoder import create_decoder

    with pytest.raises(BackendError, match="does not run idefics decoders"):
        create_decoder(Artifact.open(pytorch_artifacts("idefics")), device="cpu")
    api_error(lambda: load_quietly(pytorch_artifacts("idefics"), backend="torch"), BackendUnavailableError,
              "cannot run this artifact's decoder", "image_attention_mask")


# --- bitsandbytes INT8 / NF4 ---------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_BNB, reason=NO_BNB)
@pytest.mark.parametrize("method,floor", [("int8", 0.995), ("nf4", 0.95)])
def test_llm_weights_in_int8_and_nf4_on_the_cpu(pytorch_artifacts, photos, method, floor):
    """The LLM's Linear layers become bitsandbytes layers (not its output head); logits stay close to FP32:
    LLM.int8 >= 0.995, NF4 >= 0.95 (the export's own floor for a quantized decoder's logits)."""
    import bitsandbytes as bnb

    path = pytorch_artifacts("blip2")
    fp32 = load_quietly(path, backend="torch")
    quantized = load_quietly(path, backend="torch", backend_options={"torch": {"quantization": method}})
    layer = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[method]
    llm = quantized.decoder.model
    assert quantized.decoder.precision == method and quantized.decoder.quantization["kept_float"] == ["lm_head"]
    assert type(llm.get_output_embeddings()) is torch.nn.Linear
    assert sum(isinstance(m, layer) for m in llm.modules()) == quantized.decoder.quantization["replaced_layers"] > 0
    assert not any(isinstance(m, layer) for m in fp32.decoder.model.modules())  # the FP32 model is not touched
    embeds, mask = prompt(fp32, photos, rows=1)
    cosine = float(cosine_rows(fp32.decoder.start(embeds, mask), quantized.decoder.start(embeds, mask)).min())
    assert cosine >= floor, f"{method}: logits cosine {cosine}"
    assert isinstance(quantized.caption(photos[0], max_new_tokens=4), str)
    fp32.close()
    quantized.close()


def test_unknown_quantization_and_settings_are_refused(pytorch_artifacts):
    from mmedge.errors import InputError

    api_error(lambda: load_quietly(pytorch_artifacts("blip2"), backend="torch",
                                   backend_options={"torch": {"quantization": "int3"}}),
              InputError, "LLM quantization 'int3'")  # judged by TorchSettings before anything loads
    api_error(lambda: load_quietly(pytorch_artifacts("blip2"), backend="torch",
                                   backend_options={"torch": {"precision": "fp16"}}),
              InputError, "unknown settings ['precision']")


@pytest.mark.skipif(not HAVE_BNB, reason=NO_BNB)
def test_cli_export_with_pytorch_and_run_with_nf4(tiny_blip2_dir, tmp_path, photos, capsys):
    from mmedge.cli import main

    out = tmp_path / "b2"
    assert main(["export", str(tiny_blip2_dir), str(out), "--with-pytorch", "--quiet"]) == 0
    assert (out / "pytorch" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["run", str(out), photos[0], "--backend", "torch", "--llm-quantization", "nf4", "--max-new-tokens", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    assert main(["doctor", str(out), "--backend", "torch"]) == 0
    assert "plan: decoder -> torch" in capsys.readouterr().out


# --- selection over described devices ------------------------------------------------------------------
def device(**overrides) -> DeviceProbe:
    base = dict(machine="x86_64", system="Linux", cpu_cores=8, cpu_flags=["avx2"], memory_total_mb=16000, gpus=[],
                jetson=None,
                engines={"onnxruntime": "1.20", "tensorrt": None, "torch": "2.11.0", "transformers": "5.2.0",
                                      "cuda-python": None}, ort_providers=["cpu"], memory_available_mb=12000)
    return DeviceProbe(**{**base, **overrides})


H100 = [GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 81559, 80000)]
WITH_TRT = {"onnxruntime": "1.20", "tensorrt": "10.3.0", "cuda-python": "12.6.0", "torch": "2.11.0",
            "transformers": "5.2.0"}
CPU_BOX = device()
CPU_TORCH_BUILD = device(gpus=H100, engines={"onnxruntime": "1.20", "torch": "2.13.0+cpu", "transformers": "5.2.0"})
GPU_ORT_CPU_ONLY = device(gpus=H100)  # the lent GPU machine: torch CUDA, onnxruntime CPU-only, no TensorRT
GPU_ORT_GPU = device(gpus=H100, ort_providers=["cpu", "cuda", "tensorrt"])
GPU_WITH_TRT = device(gpus=H100, engines=WITH_TRT, ort_providers=["cpu", "cuda", "tensorrt"])
GPU_NO_TORCH = device(gpus=H100, engines={"onnxruntime": "1.20", "torch": None, "transformers": None})
KV = {"layers": 1, "heads": 2, "head_dim": 4, "past": "past_key_values.%d.%s", "present": "present.%d.%s"}
DECODER_INPUTS = {n: {} for n in ("inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key",
                                  "past_key_values.0.value")}
BLIP2 = {"family": "blip2", "blip2": {"decoder": {"kv_cache": KV}}, "pytorch": {"folder": "pytorch"},
         "components": {"prefix": {"precision": "fp32", "inputs": {"pixel_values": {}}},
                        "decoder": {"precision": "fp32", "inputs": DECODER_INPUTS}}}
BLIP2_NO_WEIGHTS = {k: v for k, v in BLIP2.items() if k != "pytorch"}
IDEFICS = {"family": "idefics", "idefics": {"decoder": {"kv_cache": KV}}, "pytorch": {"folder": "pytorch"},
           "components": {"vision": {"precision": "fp32", "inputs": {"pixel_values": {}}},
                          "decoder": {"precision": "fp32", "inputs": {**DECODER_INPUTS, "image_attention_mask": {}}}}}


def backends(chosen) -> dict[str, str]:
    return {name: c.backend for name, c in chosen.components.items()}


def test_auto_never_picks_torch_on_a_cpu():
    for probe in (CPU_BOX, CPU_TORCH_BUILD):
        chosen = plan(probe, BLIP2)
        assert set(backends(chosen).values()) == {"onnxruntime"}
    assert any("no NVIDIA GPU found; ONNX Runtime is preferred on a CPU" in r for r in plan(CPU_BOX, BLIP2).reasons)
    assert any("CPU-only build" in r for r in plan(CPU_TORCH_BUILD, BLIP2).reasons)
    assert backends(plan(GPU_ORT_CPU_ONLY, BLIP2, device="cpu")) == {"prefix": "onnxruntime", "decoder": "onnxruntime"}


def test_auto_on_a_gpu_gives_the_decoder_to_torch():
    chosen = plan(GPU_ORT_GPU, BLIP2)
    assert backends(chosen) == {"prefix": "onnxruntime", "decoder": "torch"}
    assert chosen.components["decoder"].options == {"device": "cuda", "dtype": "float16"}
    assert chosen.components["decoder"].precision == "fp16"
    assert any("the KV-cached decoder (FP16, static cache, CUDA-graph decode steps)" in r for r in chosen.reasons)
    assert backends(plan(GPU_WITH_TRT, BLIP2)) == {"prefix": "tensorrt", "decoder": "torch"}


def test_auto_gives_torch_the_encoders_when_onnxruntime_has_no_gpu_provider():
    chosen = plan(GPU_ORT_CPU_ONLY, BLIP2)
    assert backends(chosen) == {"prefix": "torch", "decoder": "torch"}
    assert any("this onnxruntime build has no GPU provider" in r for r in chosen.reasons)


def test_auto_keeps_onnxruntime_without_weights_torch_or_a_plain_decoder():
    assert "torch" not in backends(plan(GPU_ORT_GPU, BLIP2_NO_WEIGHTS)).values()
    assert "torch" not in backends(plan(GPU_ORT_GPU, BLIP2, pytorch_weights=False)).values()
    assert any("has no PyTorch weights" in r for r in plan(GPU_ORT_GPU, BLIP2_NO_WEIGHTS).reasons)
    assert "torch" not in backends(plan(GPU_NO_TORCH, BLIP2)).values()
    chosen = plan(GPU_ORT_GPU, IDEFICS)
    assert backends(chosen) == {"vision": "onnxruntime", "decoder": "onnxruntime"}
    assert any("not the decoder (the decoder also takes image_attention_mask" in r for r in chosen.reasons)


def test_doctor_shows_the_plan_load_follows_on_a_device_copy_without_weights(pytorch_artifacts, tmp_path, capsys,
                                                                            monkeypatch):
    """A device copy may leave pytorch/ out. On a GPU box, ``auto`` then keeps the decoder off torch, and ``mmedge
    doctor`` shows that plan, not the one the manifest alone would give (it once planned from the manifest)."""
    from mmedge import device as device_module
    from mmedge.api import plan_for
    from mmedge.cli import main

    copy = tmp_path / "blip2"
    shutil.copytree(pytorch_artifacts("blip2"), copy)
    monkeypatch.setattr(device_module, "probe", lambda: GPU_ORT_GPU)
    assert plan_for(pytorch_artifacts("blip2")).components["decoder"].backend == "torch"  # the weights are there
    shutil.rmtree(copy / "pytorch")
    load_plan = plan_for(copy)
    assert backends(load_plan) == {"prefix": "onnxruntime", "decoder": "onnxruntime"}
    capsys.readouterr()
    assert main(["doctor", str(copy), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {name: c["backend"] for name, c in shown["plan"].items()} == backends(load_plan)
    assert any("has no PyTorch weights" in reason for reason in shown["reasons"])


def test_named_torch_backend():
    cpu = plan(CPU_BOX, BLIP2, backend="torch")
    assert backends(cpu) == {"prefix": "torch", "decoder": "torch"}
    assert cpu.components["decoder"].options == {"device": "cpu", "dtype": "float32"}
    assert plan(GPU_ORT_GPU, BLIP2, backend="torch").components["prefix"].options["device"] == "cuda"
    assert plan(GPU_ORT_GPU, BLIP2, backend="torch", device="cpu").components["prefix"].precision == "fp32"
    with pytest.raises(BackendUnavailableError,
                       match="device=cuda was requested for backend 'torch', but no NVIDIA GPU"):
        plan(CPU_BOX, BLIP2, backend="torch", device="cuda")
    with pytest.raises(BackendUnavailableError, match="exported without them"):
        plan(GPU_ORT_GPU, BLIP2_NO_WEIGHTS, backend="torch")
    with pytest.raises(BackendUnavailableError, match="needs the Python packages 'torch' and 'transformers'"):
        plan(GPU_NO_TORCH, BLIP2, backend="torch")


# --- ONNX Runtime: provider options from the plan, IO binding -------------------------------------------
def test_onnxruntime_provider_options_come_from_the_plan(tmp_path):
    from mmedge.runtimes.onnxruntime import OrtOptions, _provider_options
    from mmedge.runtimes.registry import backend

    class FakeArtifact:
        def engines_dir(self):
            return tmp_path

    manifest = {"components": {"vision": {"precision": "fp32"}, "text": {"precision": "int8"}}}
    gtx = device(gpus=[GpuInfo("NVIDIA GeForce GTX 1080", "6.1", 8192, 7000)],
                 ort_providers=["cpu", "cuda", "tensorrt"])
    chosen = plan(GPU_ORT_GPU, manifest)
    vision = chosen.components["vision"]
    assert vision.providers == ("tensorrt", "cuda")
    assert vision.options == {"device_id": 0, "io_binding": True, "fp16": True, "workspace_mb": 4096}
    assert chosen.components["text"].options["fp16"] is False  # an INT8 graph: no FP16 flag
    old_gpu = plan(gtx, manifest)  # sm 6.1: TensorRT 10 (the provider's too) does not run there
    assert old_gpu.components["vision"].providers == ("cuda",) and "fp16" not in old_gpu.components["vision"].options
    assert any("TensorRT provider left out: GPU 0 (NVIDIA GeForce GTX 1080)" in r for r in old_gpu.reasons)
    t5 = {"family": "blip2_t5", "blip2_t5": {"encoder": {"component": "encoder", "llm": "t5"}},
          "components": {"prefix": {"precision": "fp32"}, "encoder": {"precision": "fp32"},
                         "fp16_islands": {"precision": "fp16", "quantization": {"fp32_nodes": ["/wo/MatMul"]}}}}
    flags = {name: c.options["fp16"] for name, c in plan(GPU_ORT_GPU, t5).components.items()}
    assert flags == {"prefix": True, "encoder": False, "fp16_islands": False}  # T5 overflows; islands obeyed only
    # what runs at FP16 says so (bench reports it, validate's floor follows it: an FP32 floor failed FP16 runs)
    assert vision.precision == "fp32 (fp16 inference)" and chosen.components["text"].precision == "int8"
    from mmedge.validate import cosine_slack

    assert cosine_slack("fp32", vision.precision) == cosine_slack("fp16")
    options = OrtOptions(**backend("onnxruntime").runner_options(FakeArtifact(), vision, threads=2))
    trt = _provider_options("tensorrt", options)
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 0 and trt["trt_max_workspace_size"] == 4096 << 20
    assert trt["trt_engine_cache_path"] == str(tmp_path) and options.io_binding is True
    assert _provider_options("cuda", options) == {"device_id": 0}
    assert plan(CPU_BOX, manifest).components["vision"].options == {}


def test_io_binding_hands_outputs_from_stage_to_stage(pytorch_artifacts, photos):
    """vision → Q-Former with IO binding: the vision output stays an OrtValue that the Q-Former binds as its input
    (on the CPU here; on the GPU the same calls keep it in GPU memory)."""
    from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner, OrtDeviceArray, OrtOptions

    artifact = Artifact.open(pytorch_artifacts("blip2-split"))
    make = lambda name, **kw: OnnxRuntimeRunner(artifact.component_path(name), name, artifact.component(name),  # noqa: E731
                                                OrtOptions(**kw))
    vision, qformer = make("vision", io_binding=True, keep_on_device=True), make("qformer", io_binding=True)
    plain_vision, plain_qformer = make("vision"), make("qformer")
    captioner = load_quietly(artifact.root)
    pixels = captioner.preprocessor(photos[:2])
    embeds = vision.infer({"pixel_values": pixels})["image_embeds"]
    assert isinstance(embeds, OrtDeviceArray) and embeds.device == "cpu" and embeds.shape[0] == 2
    bound = qformer.infer({"image_embeds": embeds})["prefix_embeds"]
    image_embeds = plain_vision.infer({"pixel_values": pixels})["image_embeds"]
    plain = plain_qformer.infer({"image_embeds": image_embeds})["prefix_embeds"]
    np.testing.assert_allclose(bound, plain, atol=1e-6)
    np.testing.assert_allclose(np.asarray(embeds), plain_vision.infer({"pixel_values": pixels})["image_embeds"],
                               atol=1e-6)
    assert not plain_vision.io_binding and vision.io_binding
    with pytest.raises(FeedError, match="device array"):
        qformer.infer({"image_embeds": OrtDeviceArray(_ortvalue(np.zeros((1, 2, 3), np.float32)))})
    captioner.close()


def _ortvalue(array):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


# --- CUDA only ----------------------------------------------------------------------------------------
def _gpuload_quietly(path, **torch_settings):
    return load_quietly(path, backend="torch", device="cuda",
                        backend_options={"torch": torch_settings} if torch_settings else None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_graphs_replay_the_encoders_and_the_decode_step(pytorch_artifacts, photos):
    """FP32 (no reduced-precision near-ties), compilation off: CUDA-graph replays run the very kernels eager runs
    do, so greedy and beam tokens are identical; the greedy choice is made on the GPU (step_greedy)."""
    from mmedge.generation import GenerationConfig, generate
    from mmedge.runtimes.torch_backend import TorchDeviceArray

    path = pytorch_artifacts("blip2-split")
    graphs = _gpuload_quietly(path, dtype="float32", compile=False)
    eager = _gpuload_quietly(path, dtype="float32", compile=False, cuda_graphs=False)
    assert graphs.decoder.cuda_graphs and not eager.decoder.cuda_graphs
    for _ in range(3):  # capture on the first call, replay after
        assert graphs.caption(photos[:2], max_new_tokens=12) == eager.caption(photos[:2], max_new_tokens=12)
    assert graphs.decoder.graph_status == "on" and graphs.decoder._state.graph is not None
    report = graphs.runners["vision"].graph_report()
    assert report["cuda_graphs"] and [[2, 3, 32, 32]] in report["captured"] and not report["failed"]
    pixels = graphs.preprocessor(photos[:1])
    embeds = graphs.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
    assert isinstance(embeds, TorchDeviceArray) and embeds.tensor.is_cuda  # chained: stays on the GPU
    assert isinstance(graphs.runners["qformer"].infer({"image_embeds": embeds})["prefix_embeds"], np.ndarray)
    embeds_np, mask = prompt(graphs, photos)
    beams = GenerationConfig(max_new_tokens=6, num_beams=2)
    assert generate(graphs.decoder, embeds_np, mask, beams) == generate(eager.decoder, embeds_np, mask, beams)
    graphs.close()
    eager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_beam_captions_recapture_nothing(pytorch_artifacts, photos, monkeypatch):
    """Beam search steps B x beams rows after a B-row prefill: both buffer sets keep their graphs, so the second beam
    caption (and a greedy one after it) captures nothing new."""
    from mmedge.runtimes import torch_decoder

    captures = []
    real = torch_decoder.capture
    monkeypatch.setattr(torch_decoder, "capture", lambda *a, **k: captures.append(1) or real(*a, **k))
    captioner = _gpuload_quietly(pytorch_artifacts("blip2"), compile=False)
    first = captioner.caption(photos[:2], max_new_tokens=8, num_beams=3)
    graphs = {key: state.graph for key, state in captioner.decoder._states.items()}
    assert len(captures) == 1 and {batch for batch, _ in graphs} == {2, 6}
    assert captioner.caption(photos[:2], max_new_tokens=8, num_beams=3) == first and len(captures) == 1
    captioner.caption(photos[:2], max_new_tokens=8)  # greedy on B rows: its first capture
    assert len(captures) == 2
    assert all(captioner.decoder._states[key].graph is graph for key, graph in graphs.items() if graph is not None)
    captioner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_fp16_compiled_step_and_encoders(pytorch_artifacts, photos):
    """The default on a GPU: FP16, inductor-compiled components and decode step captured in CUDA graphs; BLIP-2's
    Q-Former stays FP32. Compiled kernels round differently from eager ones, so the check is the logits of every
    step (teacher-forced on the eager tokens) and the encoders' outputs, by cosine, not token identity."""
    from mmedge.runtimes import torch_backend

    path = pytorch_artifacts("blip2")
    compiled = _gpuload_quietly(path)
    eager = _gpuload_quietly(path, compile=False, cuda_graphs=False)
    model = next(e.model for e in torch_backend._MODELS.values() if e.users and e.model.device.type == "cuda")
    assert {p.dtype
            for p in model.qformer.parameters()} == {torch.float32} and model.query_tokens.dtype == torch.float32
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float16}
    pixels = compiled.preprocessor(photos[:2])
    got, want = (c.runners["prefix"].infer({"pixel_values": pixels})["prefix_embeds"] for c in (compiled, eager))
    assert float(cosine_rows(want.reshape(2, -1), got.reshape(2, -1)).min()) >= 0.999
    embeds, mask = prompt(eager, photos)
    tokens = [np.argmax(eager.decoder.start(embeds, mask), axis=-1)]
    compiled.decoder.start(embeds, mask)
    for _ in range(10):
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        want, got = eager.decoder.step(tokens[-1], mask), compiled.decoder.step(tokens[-1], mask)
        assert float(cosine_rows(want, got).min()) >= 0.999
        tokens.append(np.argmax(want, axis=-1))
    assert compiled.decoder.compile_status == "on (inductor)" and compiled.decoder.graph_status == "on"
    assert compiled.runners["prefix"].graph_report()["compile"] == "on (inductor)"
    compiled.close()
    eager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_fp16_compiled_clip_towers(pytorch_artifacts, photos):
    """CLIP's towers under the default (compiled, captured, pinned host buffers) against eager FP16, two batch sizes
    (the second shape recompiles with dynamic shapes at most once)."""
    path = pytorch_artifacts("clip")
    compiled, eager = _gpuload_quietly(path), _gpuload_quietly(path, compile=False, cuda_graphs=False)
    for rows in (1, 2, 1):
        pixels = compiled.preprocessor(photos[:rows])
        want, got = (c.runners["vision"].infer({"pixel_values": pixels})["image_embeds"] for c in (eager, compiled))
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
        assert float(cosine_rows(want, got).min()) >= 0.999
    report = compiled.runners["vision"].graph_report()
    assert report["compile"] == "on (inductor)" and len(report["captured"]) == 2 and not report["failed"]
    compiled.close()
    eager.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_a_capture_in_one_thread_while_another_runs_the_gpu(pytorch_artifacts, photos):
    """Captures are thread-local and serialized process-wide: one thread captures and replays the decode step while
    another runs an encoder's CUDA graph; both give what they give alone."""
    import threading

    captioner = _gpuload_quietly(pytorch_artifacts("blip2-split"), dtype="float32", compile=False)
    pixels = captioner.preprocessor(photos[:1])
    vision = captioner.runners["vision"]
    alone = np.asarray(vision.infer({"pixel_values": pixels})["image_embeds"])
    errors, outputs = [], []

    def encode():
        try:
            for _ in range(50):
                outputs.append(np.asarray(vision.infer({"pixel_values": pixels})["image_embeds"]))
        except Exception as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=encode)
    worker.start()
    text = captioner.caption(photos[1], max_new_tokens=10)
    worker.join()
    assert not errors and len(outputs) == 50 and all(np.array_equal(o, alone) for o in outputs)
    assert text == captioner.caption(photos[1], max_new_tokens=10)
    captioner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.skipif(not HAVE_BNB, reason=NO_BNB)
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_llm_on_the_gpu(pytorch_artifacts, photos, method):
    """NF4 decodes through the CUDA graph (or logs why it cannot and runs without one); LLM.int8 runs eagerly by
    default; neither is compiled by default. The NF4 weights are quantized on the GPU."""
    import bitsandbytes as bnb

    path = pytorch_artifacts("blip2")
    fp16 = _gpuload_quietly(path)
    quantized = _gpuload_quietly(path, quantization=method)
    assert quantized.decoder.cuda_graphs == (method == "nf4") and quantized.decoder.compile_status == "off"
    layer = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[method]
    assert all(p.is_cuda for m in quantized.decoder.model.modules() if isinstance(m, layer) for p in m.parameters())
    embeds, mask = prompt(fp16, photos, rows=1)
    cosine = float(cosine_rows(fp16.decoder.start(embeds, mask), quantized.decoder.start(embeds, mask)).min())
    assert cosine >= (0.99 if method == "int8" else 0.95)
    assert isinstance(quantized.caption(photos[0], max_new_tokens=8), str)
    assert quantized.decoder.graph_status in ("on", "off") or quantized.decoder.graph_status.startswith("eager")
    fp16.close()
    quantized.close()


def test_threads_reach_torch(pytorch_artifacts):
    """`--backend torch --threads 1` ran on every core: the count was dropped. torch's setting is the process's."""
    import torch

    before = torch.get_num_threads()
    try:
        classifier = load_quietly(pytorch_artifacts("clip"), backend="torch", threads=1)
        assert torch.get_num_threads() == 1
        classifier.close()
    finally:
        torch.set_num_threads(before)


def test_llm_quantization_for_an_artifact_without_a_decoder_is_refused(pytorch_artifacts):
    """NF4 for CLIP loaded and ran with no word: there is no LLM to quantize."""
    api_error(lambda: load_quietly(pytorch_artifacts("clip"), backend="torch",
                                   backend_options={"torch": {"quantization": "nf4"}}),
              InputError, "would change nothing: this artifact has no LLM decoder")


def test_the_plan_states_the_dtype_and_llm_quantization_asked_for(pytorch_artifacts):
    """The plan (doctor, /v1/models, pipeline.plan) said fp32 / fp16 whatever dtype and LLM quantization were asked;
    the precision of what runs is the settings'. Planned only: nothing is loaded."""
    from mmedge.api import plan_for

    options = {"torch": {"dtype": "bf16", "quantization": "nf4"}}
    chosen = plan_for(pytorch_artifacts("blip2"), backend="torch", device="cpu", backend_options=options).components
    assert {name: c.precision for name, c in chosen.items()} == {"prefix": "bf16", "decoder": "bf16+nf4"}
    assert chosen["decoder"].options["dtype"] == "bfloat16"
    plain = plan_for(pytorch_artifacts("blip2"), backend="torch", device="cpu").components
    assert {c.precision for c in plain.values()} == {"fp32"}


def test_a_checkpoint_of_another_model_type_is_refused(pytorch_artifacts, tiny_clip_dir):
    """A CLIP checkpoint for a BLIP-2 artifact loaded with every weight random, then failed on a numpy shape."""
    api_error(lambda: load_quietly(pytorch_artifacts("blip2"), backend="torch",
                                   backend_options={"torch": {"checkpoint": str(tiny_clip_dir)}}),
              ModelLoadError, "is a 'clip' model, and this artifact is blip2 ('blip-2')")


def test_a_checkpoint_of_another_size_is_refused_before_the_first_call(pytorch_artifacts):
    """The shipped demo BLIP-2 (64-pixel ViT, 8 queries, a 384 x 128 table) for the tiny BLIP-2's artifact (32 pixels,
    6 queries, 576 x 64) loaded, then the first caption failed on a numpy concatenate ValueError. The encoder runner
    and the decoder (asked for alone) both refuse it, naming each size that differs."""
    from mmedge import demo
    from mmedge.runtimes.torch_decoder import create_decoder

    folder = str(demo.model_path("blip2"))
    artifact = Artifact.open(pytorch_artifacts("blip2"))
    options = {"torch": {"checkpoint": folder}}
    for load in (lambda: load_quietly(artifact.root, backend="torch", backend_options=options),
                 lambda: create_decoder(artifact, device="cpu", checkpoint=folder)):
        error = api_error(load, ModelLoadError, "is another size of blip2 than the artifact")
        assert "image size 64 (the artifact's: 32)" in str(error) and "query tokens 8 (the artifact's: 6)" in str(error)
        assert "token-embedding table [rows, width] [384, 128] (the artifact's: [576, 64])" in str(error)


@pytest.mark.parametrize("kind", ["clip", "blip2", "blip2_t5", "instructblip", "idefics"])
def test_each_familys_own_checkpoint_passes_the_size_check(pytorch_artifacts, kind):
    """The check reads real sizes for every family (none silently compared nothing) and its own checkpoint agrees."""
    from mmedge.runtimes.torch_backend import load_reference_model
    from mmedge.runtimes.torch_checkpoint import sizes_compared

    artifact = Artifact.open(pytorch_artifacts(kind))
    model = load_reference_model(artifact.pytorch_folder(), artifact.manifest["family"], torch.device("cpu"),
                                 torch.float32)
    compared = sizes_compared(artifact.manifest, model)
    assert {what for what, _, _ in compared} >= {"image size", *{
        "clip": ["projection size"], "idefics": ["token-embedding table [rows, width]", "visual tokens per image"],
    }.get(kind, ["query tokens", "token-embedding table [rows, width]"])}
    assert all(ours == theirs for _, ours, theirs in compared), compared
