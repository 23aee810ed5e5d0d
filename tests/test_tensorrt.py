"""The TensorRT backend: everything decided without TensorRT (profiles, precisions, engine keys, stale and
foreign engines, memory checks, selection over described devices, error messages), and, where TensorRT
is installed, real engines built from real artifacts.

No engine is faked: tests without TensorRT write engine *files* with foreign keys and show they are
refused and rebuilt without ever being deserialized; every test that needs an engine skips without TensorRT.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from mmedge.artifact import Artifact
from mmedge.device import DeviceProbe, GpuInfo, importable
from mmedge.errors import BackendError, BackendUnavailableError, InputError, InsufficientMemoryError, StaleEngineError
from mmedge.runtimes.engine_cache import EngineCache, EngineKey
from mmedge.runtimes.tensorrt import (
    BUILD_SETTINGS,
    EngineSettings,
    build_artifact,
    describe_engines,
    engine_key,
    load_build_settings,
    obtain_plan,
    resolve_settings,
    save_build_settings,
    timing_cache_path,
)
from mmedge.runtimes.tensorrt_planning import (
    MIB,
    MemoryNeed,
    ProfileLimits,
    check_memory,
    derive_profile,
    engine_bytes,
    engine_precision,
    is_qdq,
    key_precision,
    kv_cache_bytes,
    network_typing,
    provider_fp16,
    refuse_max_sequence,
    tensorrt_defaults,
    unbuildable_reason,
)
from mmedge.selection import log_fallbacks, plan
from tests.support.battery import api_error, cli_error

HAVE_TENSORRT = importable("tensorrt")  # not a stubs-only namespace folder
NO_TENSORRT = "TensorRT is not installed on this machine (not installable here; runs on a Jetson / CUDA host)"
needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason=NO_TENSORRT)
without_tensorrt = pytest.mark.skipif(HAVE_TENSORRT,
                                      reason="TensorRT is installed: the absent-TensorRT path cannot be shown")

SHA = "ab" * 32


# --- described devices ---------------------------------------------------------------------------
def device(**overrides) -> DeviceProbe:
    base = dict(machine="x86_64", system="Linux", cpu_cores=8, cpu_flags=["avx2"], memory_total_mb=16000, gpus=[],
                jetson=None, engines={"onnxruntime": "1.20", "tensorrt": None, "torch": None, "cuda-python": None},
                ort_providers=["cpu"], memory_available_mb=12000)
    return DeviceProbe(**{**base, **overrides})


WITH_TRT = {"onnxruntime": "1.20", "tensorrt": "10.3.0", "cuda-python": "12.6.0", "torch": None}
CPU_BOX = device()
CPU_BOX_WITH_TRT = device(engines=WITH_TRT)
RTX_4090 = device(gpus=[GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24564, 23000)], engines=WITH_TRT,
                  ort_providers=["cpu", "cuda", "tensorrt"])
RTX_NO_TRT = device(gpus=[GpuInfo("NVIDIA GeForce RTX 4090", "8.9", 24564, 23000)],
                    ort_providers=["cpu", "cuda", "tensorrt"])
GTX_1080 = device(gpus=[GpuInfo("NVIDIA GeForce GTX 1080", "6.1", 8192, 7000)], engines=WITH_TRT,
                  ort_providers=["cpu", "cuda"])
ORIN = {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "36.3.0", "unified_memory": True}
JETSON_ORIN = device(machine="aarch64", cpu_cores=12, memory_total_mb=30000, memory_available_mb=24000, jetson=ORIN,
                     engines=WITH_TRT, ort_providers=["cpu", "cuda"])
ORIN_NANO = device(machine="aarch64", cpu_cores=6, memory_total_mb=7600, memory_available_mb=1500,
                   jetson={**ORIN, "model": "NVIDIA Jetson Orin Nano Developer Kit"}, engines=WITH_TRT,
                   ort_providers=["cpu", "cuda"])


# --- manifests shaped like the exporters write them ----------------------------------------------
def tensor(dtype, *shape):
    return {"dtype": dtype, "shape": list(shape)}


def component(inputs, outputs, precision="fp32", quantization=None, **extra):
    return {"file": "x.onnx", "sha256": SHA, "precision": precision, "quantization": quantization,
            "inputs": inputs, "outputs": outputs, "parity": {}, **extra}


QDQ = {"method": "int8-static-qdq", "format": "QDQ"}
DYNAMIC = {"method": "int8-dynamic"}
INT4 = {"method": "int4-weight-only", "format": "MatMulNBits"}


def clip_manifest(padding="max_length", precision="fp32", quantization=None):
    return {"family": "clip",
            "tokenizer": {"file": "tokenizer.json", "max_length": 77, "padding": padding, "pad_id": 0},
            "components": {
                "vision": component({"pixel_values": tensor("float32", "batch", 3, 224, 224)},
                                    {"image_embeds": tensor("float32", "batch", 512)}, precision, quantization),
                "text": component({"input_ids": tensor("int64", "batch", "sequence"),
                                   "attention_mask": tensor("int64", "batch", "sequence")},
                                  {"text_embeds": tensor("float32", "batch", 512)}, precision, quantization)}}


KV = {"layers": 2, "heads": 4, "head_dim": 16, "past": "past_key_values.%d.%s", "present": "present.%d.%s"}


def blip2_manifest(max_positions=2048, llm_precision="fp32", llm_quantization=None):
    past = {f"past_key_values.{i}.{k}": tensor("float32", "batch", 4, "past_sequence",
                                               16) for i in range(2) for k in ("key", "value")}
    present = {f"present.{i}.{k}": tensor("float32", "batch", 4, "total_sequence",
                                          16) for i in range(2) for k in ("key", "value")}
    return {"family": "blip2",
            "tokenizer": {"file": "tokenizer.json", "max_length": 512, "padding": "longest", "pad_id": 1},
            "blip2": {"decoder": {"component": "decoder", "max_positions": max_positions, "kv_cache": KV}},
            "components": {
                "prefix": component({"pixel_values": tensor("float32", "batch", 3, 224, 224)},
                                    {"prefix_embeds": tensor("float32", "batch", 32, 64)}),
                "decoder": component({"inputs_embeds": tensor("float32", "batch", "sequence", 64),
                                      "attention_mask": tensor("int64", "batch", "total_sequence"),
                                      "logits_positions": tensor("int64", "batch", "logits_sequence"), **past},
                                     {"logits": tensor("float32", "batch", "logits_sequence", 100), **present},
                                     llm_precision, llm_quantization)}}


def idefics_manifest():
    return {"family": "idefics", "components": {
        "vision": component({"pixel_values": tensor("float32", "images", 3, 224, 224)},
                            {"image_features": tensor("float32", "images", 257, 32)}),
        "resampler": component({"image_features": tensor("float32", "images", 257, 32)},
                               {"visual_tokens": tensor("float32", "images", 64, 32)}),
        "cross_kv": component({"visual_tokens": tensor("float32", "batch", "image_tokens", 32)},
                              {"cross_key_values.0.key": tensor("float32", "batch", 4, "image_tokens", 8)})}}


# --- optimization profiles ------------------------------------------------------------------------
def test_vision_profile_spans_batch_limits_with_fixed_image_size():
    profile = derive_profile(clip_manifest(), "vision", ProfileLimits(max_batch=8))
    assert profile == {"pixel_values": ((1, 3, 224, 224), (1, 3, 224, 224), (8, 3, 224, 224))}
    tuned = derive_profile(clip_manifest(), "vision", ProfileLimits(max_batch=16, opt_batch=4))
    assert tuned["pixel_values"][1] == (4, 3, 224, 224) and tuned["pixel_values"][2][0] == 16


def test_text_profile_follows_the_tokenizer():
    """A tokenizer that pads to max_length always sends 77 tokens: the sequence axis is pinned, whatever the
    user's limit; with 'longest' padding it ranges up to max_length, tuned for short prompts."""
    fixed = derive_profile(clip_manifest("max_length"), "text", ProfileLimits(max_batch=4, max_sequence=16))
    assert fixed["input_ids"] == ((1, 77), (1, 77), (4, 77)) and fixed["attention_mask"] == fixed["input_ids"]
    free = derive_profile(clip_manifest("longest"), "text", ProfileLimits(max_batch=4))
    assert free["input_ids"] == ((1, 1), (1, 32), (4, 77))
    capped = derive_profile(clip_manifest("longest"), "text", ProfileLimits(max_batch=4, max_sequence=16))
    assert capped["input_ids"] == ((1, 1), (1, 16), (4, 16))
    # the tokenizer never emits more than max_length: a longer limit read back from an earlier build's build.json is
    # capped (its engines stay loadable); `mmedge build` refuses it when given (test_max_sequence_fits_...)
    longer = derive_profile(clip_manifest("longest"), "text", ProfileLimits(max_batch=4, max_sequence=500))
    assert longer["input_ids"][2] == (4, 77)
    api_error(lambda: refuse_max_sequence(clip_manifest("longest"), ["text"], ProfileLimits(max_sequence=500)),
              InputError, "--max-sequence 500 is more than the 77 tokens the tokenizer sends at most (its max_length)",
              "a value from 1 to 77")
    refuse_max_sequence(clip_manifest("longest"), ["text"], ProfileLimits(max_sequence=77))


def test_max_sequence_fits_the_decoder_s_positions_and_its_shortest_prompt(capsys, blip2_artifact):
    """--max-sequence bounds the decoder's profile: past the model's positions it built for shapes no call has
    ([2, 100000, 64] for a 128-position decoder), and below the image's query rows and BOS it fits no prompt at all.
    Both are refused before TensorRT is imported, naming the range that fits; the ends of the range are taken."""
    manifest = Artifact.open(blip2_artifact).manifest
    positions, queries = manifest["blip2"]["decoder"]["max_positions"], manifest["blip2"]["num_query_tokens"]
    fits = f"a value from {queries + 1} to {positions}"
    cli_error(capsys, ["build", blip2_artifact, "--max-sequence", positions + 1], InputError,
              f"--max-sequence {positions + 1} is more than the decoder's {positions} positions", fits)
    cli_error(capsys, ["build", blip2_artifact, "--max-sequence", queries], InputError,
              f"--max-sequence {queries} is fewer than the {queries + 1} positions every prompt takes (the image's "
              f"{queries} query rows and BOS)", fits)
    for most in (queries + 1, positions):
        refuse_max_sequence(manifest, list(manifest["components"]), ProfileLimits(max_sequence=most))
        assert derive_profile(manifest, "decoder", ProfileLimits(max_sequence=most))["inputs_embeds"][2][1] == most
    # Flan-T5's relative positions have no most
    refuse_max_sequence(t5_manifest(), ["decoder"], ProfileLimits(max_sequence=4096))
    assert derive_profile(t5_manifest(), "decoder", ProfileLimits(max_sequence=4096))["inputs_embeds"][2][1] == 4096


def test_decoder_axes_keep_past_plus_new_consistent_at_every_point():
    """TensorRT checks the graph's shape constraints (mask = past + new) at the min, opt and max points."""
    profile = derive_profile(blip2_manifest(), "decoder", ProfileLimits(max_batch=2, max_sequence=128))
    assert profile["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (2, 128, 64))  # opt: a decode step
    # no past at the first step
    assert profile["past_key_values.1.value"] == ((1, 4, 0, 16), (1, 4, 64, 16), (2, 4, 127, 16))
    assert profile["attention_mask"] == ((1, 1), (1, 65), (2, 255))
    assert profile["logits_positions"] == ((1, 1), (1, 1), (2, 128))  # the loop asks for 1 row; checks for all
    for point in range(3):
        new, past, total = (profile[n][point] for n in ("inputs_embeds", "past_key_values.0.key", "attention_mask"))
        assert total[1] == past[2] + new[1]
    default = derive_profile(blip2_manifest(max_positions=2048), "decoder", ProfileLimits(max_batch=1))
    assert default["inputs_embeds"][2] == (1, 512, 64) and default["attention_mask"][2] == (1, 1023)  # capped at 512
    EngineKey.create(onnx_sha256=SHA, precision="fp16", profile=profile, tensorrt_version="10.3", gpu_name="g",
                     compute_capability="8.9")  # a min of 0 is a valid key


def test_the_decoder_on_an_engine_takes_the_profile_s_positions(blip2_artifact, photos):
    """The engine's profile caps positions below the model's (S = --max-sequence): the decoder reports S as its
    max_positions, so a request past it is refused before the first step with the limit named, not by a FeedError
    mid-generation. Shown with ``engine_decoder`` over the real decoder graph (ONNX Runtime) and the profile's
    largest shapes, as ``create_decoder`` passes the engine's."""
    import mmedge
    from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner
    from mmedge.runtimes.tensorrt import engine_decoder
    from mmedge.runtimes.tensorrt_planning import engine_positions, usable_positions

    profile = derive_profile(blip2_manifest(max_positions=2048), "decoder", ProfileLimits(max_sequence=512))
    longest = {name: hi for name, (_, _, hi) in profile.items()}
    assert engine_positions(blip2_manifest()["components"]["decoder"], longest) == 512
    assert usable_positions(2048, 512) == 512 and usable_positions(None, 512) == 512  # T5: relative positions
    assert usable_positions(64, 512) == 64 and usable_positions(None, None) is None
    with mmedge.load(blip2_artifact, backend="onnxruntime", device="cpu") as pipeline:
        manifest, artifact = pipeline.artifact.manifest, pipeline.artifact
        assert manifest["blip2"]["decoder"]["max_positions"] > 24
        profile = derive_profile(manifest, "decoder", ProfileLimits(max_sequence=24))
        shapes = {n: hi for n, (_, _, hi) in profile.items()}
        runner = OnnxRuntimeRunner(artifact.component_path("decoder"), "decoder", artifact.component("decoder"))
        expected = pipeline.caption(photos[0], max_new_tokens=8)
        original, pipeline.decoder = pipeline.decoder, engine_decoder(runner, manifest, pipeline.embeddings, shapes)
        try:
            assert pipeline.decoder.max_positions == 24
            assert pipeline.caption(photos[0], max_new_tokens=8) == expected  # within the profile: unchanged
            api_error(lambda: pipeline.caption(photos[0], max_new_tokens=30), InputError,
                      "within the decoder's 24 positions", "its TensorRT engine takes 24 positions",
                      "mmedge build ARTIFACT --max-sequence N")
        finally:
            pipeline.decoder.close()
            pipeline.decoder = original


def test_image_tokens_are_whole_images_of_the_resampler_output():
    manifest = idefics_manifest()
    assert derive_profile(manifest, "vision", ProfileLimits(max_batch=4))["pixel_values"] == (
        (1, 3, 224, 224), (1, 3, 224, 224), (4, 3, 224, 224))
    profile = derive_profile(manifest, "cross_kv", ProfileLimits(max_batch=2, max_images=3))
    assert profile["visual_tokens"] == ((1, 64, 32), (1, 64, 32), (2, 192, 32))


def test_fused_image_graph_declares_its_image_token_unit():
    """IDEFICS' fused image graph has no [images, tokens, width] output; it declares the unit itself."""
    kv = {"cross_key_values.0.key": tensor("float32", "batch", 4, "image_tokens", 8)}
    fused = component({"pixel_values": tensor("float32", "batch", "images", 3, 224, 224)}, kv)
    manifest = {"family": "idefics", "components": {
        "image_context": {**fused, "axis_units": {"image_tokens": 64}},
        "decoder": component({"inputs_embeds": tensor("float32", "batch", "sequence", 32), **kv}, {})}}
    profile = derive_profile(manifest, "image_context", ProfileLimits(max_batch=2, max_images=3))
    assert profile["pixel_values"] == ((1, 1, 3, 224, 224), (1, 1, 3, 224, 224), (2, 3, 3, 224, 224))
    assert derive_profile(manifest, "decoder", ProfileLimits(max_batch=2, max_images=3, max_sequence=16))[
        "cross_key_values.0.key"] == ((1, 4, 64, 8), (1, 4, 64, 8), (2, 4, 192, 8))


def test_fixed_inputs_need_no_profile_and_unknown_axes_are_refused():
    manifest = clip_manifest()
    manifest["components"]["vision"]["inputs"]["pixel_values"]["shape"] = [1, 3, 224, 224]
    assert derive_profile(manifest, "vision") == {}
    manifest["components"]["vision"]["inputs"]["pixel_values"]["shape"] = ["frames", 3, 224, 224]
    api_error(lambda: derive_profile(manifest, "vision"), InputError, "dynamic axis 'frames'",
              "batch, images, sequence")
    no_unit = idefics_manifest()
    del no_unit["components"]["resampler"], no_unit["components"]["vision"]
    api_error(lambda: derive_profile(no_unit, "cross_kv"), InputError, "'image_tokens'")


@pytest.mark.parametrize("limits,words", [(ProfileLimits(max_batch=0), "max_batch is 0"),
                                          (ProfileLimits(max_sequence=-3), "max_sequence is -3"),
                                          (ProfileLimits(max_batch=True), "max_batch is True")])
def test_bad_limits_are_refused(limits, words):
    api_error(lambda: derive_profile(clip_manifest(), "vision", limits), InputError, words)


def test_opt_batch_above_max_is_clamped():
    assert derive_profile(clip_manifest(), "vision", ProfileLimits(max_batch=2, opt_batch=8))["pixel_values"][1][0] == 2


# --- what TensorRT builds, at which precision -----------------------------------------------------
def test_precision_follows_the_export_recipe():
    float_graph, qdq, dynamic = (clip_manifest()["components"]["vision"],
                                 clip_manifest(precision="int8", quantization=QDQ)["components"]["vision"],
                                 clip_manifest(precision="int8", quantization=DYNAMIC)["components"]["vision"])
    assert is_qdq(qdq) and not is_qdq(dynamic) and not is_qdq(float_graph)
    assert engine_precision("vision", float_graph, None) == "fp16"
    assert engine_precision("vision", float_graph, "fp32") == "fp32"
    assert engine_precision("vision", qdq, None) == "int8" == engine_precision("vision", qdq, "int8")
    api_error(lambda: engine_precision("vision", float_graph, "int8"), InputError, "static QDQ",
              "--quantization static")
    api_error(lambda: engine_precision("vision", qdq, "fp16"), InputError, "INT8 QDQ graph")
    api_error(lambda: engine_precision("vision", float_graph, "bf16"), InputError, "one of fp32, fp16, int8")


FP16_ISLANDS = {"method": "fp16", "io": "float32", "weights": "float16", "fp32_nodes": ["/ffn/wo/MatMul"]}


def t5_manifest(llm_precision="fp32", llm_quantization=None):
    """BLIP-2 Flan-T5 as its exporter writes it: the family section names each LLM component's model type."""
    manifest = blip2_manifest(llm_precision=llm_precision, llm_quantization=llm_quantization)
    section = manifest.pop("blip2")
    section["decoder"] = {**section["decoder"], "llm": "t5", "max_positions": None}
    manifest.update(family="blip2_t5", blip2_t5={**section, "encoder": {"component": "encoder", "llm": "t5"}})
    manifest["components"]["encoder"] = component({"inputs_embeds": tensor("float32", "batch", "sequence", 64)},
                                                  {"cross_key_values.0.key": tensor("float32", "batch", 4, "sequence",
                                                                                    16)},
                                                  llm_precision, llm_quantization)
    return manifest


def test_fp16_graphs_are_built_strongly_typed_keeping_their_fp32_islands(clip_artifacts):
    """An FP16 export chose its types (FP32 islands where FP16 overflows): TensorRT must obey them, so the network is
    STRONGLY_TYPED with no FP16 flag (which lets a weakly typed network run any layer at FP16, islands included).
    FP32 graphs at FP16 stay weakly typed with the flag; QDQ graphs strongly typed, no flag."""
    fp16 = blip2_manifest(llm_precision="fp16", llm_quantization=FP16_ISLANDS)["components"]["decoder"]
    assert engine_precision("decoder", fp16, None) == "fp16" == engine_precision("decoder", fp16, None, "fp32")
    assert network_typing("fp16", "fp16") == (True, False)  # strongly typed, no BuilderFlag.FP16
    assert network_typing("fp32", "fp16") == (False, True) and network_typing("fp32", "fp32") == (False, False)
    assert network_typing("fp16", "fp32") == (False, False) and network_typing("int8", "int8") == (True, False)
    # an engine of the FP16 graph cached when it was built weakly typed is stale, never reused
    assert key_precision(fp16, "fp16") == "fp16-strongly-typed" and key_precision(fp16, "fp32") == "fp32"
    assert key_precision(clip_manifest()["components"]["vision"], "fp16") == "fp16"
    real = Artifact.open(clip_artifacts("fp16")).manifest["components"]["vision"]
    assert engine_precision("vision", real, None) == "fp16" and network_typing(real["precision"], "fp16")[0]


def test_fp32_t5_components_build_at_fp32_and_fp16_is_refused(capsys, blip2_t5_artifact):
    """T5's FP32 graphs overflow FP16 (inf, then NaN): the plan builds them at FP32 and says why (the image prefix stays
    FP16); asking for FP16 is refused with the export that makes a safe FP16 graph; the same holds for ONNX
    Runtime's TensorRT provider, whose FP16 flag is withheld from them and from FP16 graphs with FP32 islands."""
    manifest = t5_manifest()
    chosen = plan(RTX_4090, manifest)
    assert {n: c.precision for n, c in chosen.components.items()} == {"prefix": "fp16", "decoder": "fp32",
                                                                      "encoder": "fp32"}
    assert chosen.components["encoder"].options["precision"] == "fp32"
    assert any(r.startswith("component 'encoder' is an FP32 t5 graph") and "built at FP32, not FP16" in r
               and "--llm-precision fp16" in r for r in chosen.reasons)
    api_error(lambda: engine_precision("decoder", manifest["components"]["decoder"], "fp16", manifest=manifest),
              InputError, "FP32 t5 graph", "drop --precision", "--llm-precision fp16")
    assert engine_precision("decoder", manifest["components"]["decoder"], "fp32", manifest=manifest) == "fp32"
    guarded = t5_manifest("fp16", FP16_ISLANDS)
    assert plan(RTX_4090, guarded).components["decoder"].precision == "fp16"  # strongly typed: islands obeyed
    assert provider_fp16(manifest, "prefix", manifest["components"]["prefix"])
    assert not provider_fp16(manifest, "encoder", manifest["components"]["encoder"])
    assert not provider_fp16(guarded, "decoder", guarded["components"]["decoder"])
    cli_error(capsys, ["build", blip2_t5_artifact, "--precision", "fp16"], InputError,
              "component 'encoder' is an FP32 t5 graph", "--llm-precision fp16")  # the real export's manifest


def test_components_tensorrt_cannot_build_say_why():
    assert unbuildable_reason("vision", clip_manifest()["components"]["vision"]) is None
    assert unbuildable_reason("decoder", blip2_manifest()["components"]["decoder"]) is None  # FP32/FP16 decoders build
    int4 = blip2_manifest(llm_precision="int4", llm_quantization=INT4)["components"]["decoder"]
    assert "com.microsoft MatMulNBits" in unbuildable_reason("decoder", int4)
    assert "dynamic INT8" in unbuildable_reason("text",
                                                clip_manifest(precision="int8",
                                                              quantization=DYNAMIC)["components"]["text"])
    assert "MatMulNBits" in unbuildable_reason("x", component({}, {}, "int4", {"method": "int4-weight-only"}))


def test_real_exports_are_classified(clip_artifacts):
    """The manifests the exporter writes: fp32 builds at fp16, static INT8 is QDQ (built as INT8), dynamic INT8 is
    left to ONNX Runtime, and every input gets a profile of its declared rank."""
    from mmedge.artifact import Artifact

    for variant, expected in (("fp32", "fp16"), ("fp16", "fp16"), ("int8-static", "int8")):
        manifest = Artifact.open(clip_artifacts(variant)).manifest
        for name, comp in manifest["components"].items():
            assert unbuildable_reason(name, comp) is None and engine_precision(name, comp, None) == expected
            profile = derive_profile(manifest, name, ProfileLimits(max_batch=4))
            assert set(profile) == set(comp["inputs"])
            for tensor_name, (lo, opt, hi) in profile.items():
                assert len(lo) == len(comp["inputs"][tensor_name]["shape"]) and hi[0] == 4
    dynamic = Artifact.open(clip_artifacts("int8-dynamic")).manifest
    assert all("dynamic INT8" in unbuildable_reason(n, c) for n, c in dynamic["components"].items())


# --- engine keys and the cache ----------------------------------------------------------------------
def key_for(comp=None, **device_fields):
    fields = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
              **device_fields}
    comp = comp or clip_manifest()["components"]["vision"]
    return engine_key(comp, "fp16", derive_profile(clip_manifest(), "vision", ProfileLimits(max_batch=8)), **fields)


def test_key_covers_external_weights_and_mmedge_version():
    import mmedge

    plain = key_for()
    with_data = key_for({**clip_manifest()["components"]["vision"],
                         "external_data": {"file": "x.onnx.data", "sha256": "cd" * 32}})
    assert plain.mmedge_version == mmedge.__version__ and with_data.external_data_sha256 == "cd" * 32
    assert plain.digest() != with_data.digest()
    assert any("external weights" in d for d in plain.differences(with_data))
    older = EngineKey.from_dict({**plain.to_dict(), "mmedge_version": "0.0.1"})
    assert plain.differences(older) == [f"built by mmedge 0.0.1; this is mmedge {mmedge.__version__}"]
    legacy = {k: v for k, v in plain.to_dict().items() if k not in ("external_data_sha256", "mmedge_version")}
    assert EngineKey.from_dict(legacy).differences(plain)  # a record from before these fields is stale, not an error


class Builds:
    """A build function that counts its calls and returns distinct bytes each time."""

    def __init__(self):
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return f"plan built on this device #{self.calls}".encode() * 10


def test_first_use_builds_then_loads(tmp_path):
    cache, key, build = EngineCache(tmp_path / "engines"), key_for(), Builds()
    first = obtain_plan(cache, "vision", key, build)
    assert first.action == "built" and build.calls == 1 and first.path.exists()
    again = obtain_plan(cache, "vision", key, build)
    assert again.action == "loaded" and again.plan == first.plan and build.calls == 1


FOREIGN = {
    "jetson-engine": ({"gpu_name": "Orin", "compute_capability": "8.7"}, "built for GPU 'Orin' (sm 8.7)"),
    "older-tensorrt": ({"tensorrt_version": "10.0.1"}, "built with TensorRT 10.0.1; this device has TensorRT 10.3.0"),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_foreign_engine_file_is_rebuilt_never_returned(tmp_path, name):
    """An engines/ folder copied from another device: its plan bytes never come back (so never reach TensorRT);
    a new engine is built and the foreign files are removed."""
    fields, words = FOREIGN[name]
    cache = EngineCache(tmp_path / "engines")
    foreign_bytes = b"engine from another device " * 50
    cache.store("vision", key_for(**fields), foreign_bytes)
    build = Builds()
    outcome = obtain_plan(cache, "vision", key_for(), build)
    assert outcome.action == "rebuilt" and build.calls == 1 and outcome.plan != foreign_bytes
    assert any(words in r for r in outcome.reasons)
    plans = list(cache.folder.glob("*.plan"))
    assert plans == [outcome.path] and foreign_bytes not in plans[0].read_bytes()


def test_foreign_engine_renamed_to_this_key_and_tampered_plans_are_rebuilt(tmp_path):
    cache, key = EngineCache(tmp_path / "engines"), key_for()
    foreign = key_for(gpu_name="Orin", compute_capability="8.7")
    cache.store("vision", foreign, b"foreign" * 20)
    for src, dst in zip(cache.paths("vision", foreign), cache.paths("vision", key)):
        src.rename(dst)
    outcome = obtain_plan(cache, "vision", key, Builds())
    assert outcome.action == "rebuilt" and outcome.plan != b"foreign" * 20
    cache.paths("vision", key)[0].write_bytes(b"x" * len(outcome.plan))  # same size, other bytes
    again = obtain_plan(cache, "vision", key, Builds())
    assert again.action == "rebuilt" and any("truncated or replaced" in r for r in again.reasons)


def test_without_building_a_stale_engine_is_an_error(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    cache.store("vision", key_for(gpu_name="Orin", compute_capability="8.7"), b"foreign" * 20)
    build = Builds()
    api_error(lambda: obtain_plan(cache, "vision", key_for(), build, allow_build=False), StaleEngineError,
              "built for GPU 'Orin'", "never copy it between devices")
    assert build.calls == 0


def test_force_rebuilds_a_fresh_engine(tmp_path):
    cache, key = EngineCache(tmp_path / "engines"), key_for()
    first = obtain_plan(cache, "vision", key, Builds())
    forced = obtain_plan(cache, "vision", key, Builds(), force=True)
    assert forced.action == "rebuilt" and "a rebuild was requested" in forced.reasons
    assert obtain_plan(cache, "vision", key, Builds()).plan == forced.plan == first.plan  # same counter, same bytes


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path):
    a = timing_cache_path(tmp_path, "10.3.0", "NVIDIA GeForce RTX 4090", "8.9")
    assert a == timing_cache_path(tmp_path, "10.3.0", "NVIDIA GeForce RTX 4090", "8.9")
    assert len({a, timing_cache_path(tmp_path, "10.4.0", "NVIDIA GeForce RTX 4090", "8.9"),
                timing_cache_path(tmp_path, "10.3.0", "Orin", "8.7")}) == 3


class TimingCaches:
    """``create_timing_cache`` / ``set_timing_cache`` as callables over what TensorRT returns for a cache: an object,
    None for bytes it cannot read, False from ``set_timing_cache`` for a cache it will not take. Records the calls."""

    def __init__(self, unreadable=(), refused=()):
        self.unreadable, self.refused, self.created, self.attached = set(unreadable), set(refused), [], []

    def create(self, data: bytes):
        self.created.append(data)
        if data in self.unreadable:
            return None
        return ("cache", data)

    def attach(self, cache) -> bool:
        self.attached.append(cache)
        return cache[1] not in self.refused


@pytest.mark.parametrize("problem", ["unreadable", "refused"])
def test_a_timing_cache_tensorrt_rejects_is_replaced_by_a_fresh_one(tmp_path, caplog, problem):
    """create_timing_cache returns None for bytes it cannot read (it does not raise), set_timing_cache returns False for
    a cache it will not take: either way the build starts an empty cache and says so."""
    from mmedge.runtimes.tensorrt_build import open_timing_cache

    stale = b"timings from a build that crashed mid-write"
    caches = TimingCaches(**{problem: [stale]})
    with caplog.at_level(logging.WARNING, logger="mmedge"):
        made = open_timing_cache(caches.create, caches.attach, stale, tmp_path / "timing.cache")
    assert made == ("cache", b"") and caches.attached[-1] == made
    assert any("timing.cache was not used" in r.getMessage() and "starting a fresh one" in r.getMessage()
               for r in caplog.records)
    good = TimingCaches()
    assert open_timing_cache(good.create, good.attach, b"good", None) == ("cache", b"good")
    assert good.created == [b"good"]
    empty = TimingCaches(unreadable=[b"", stale])
    api_error(lambda: open_timing_cache(empty.create, empty.attach, stale), BackendError,
              "could not start an empty timing cache")


def test_build_settings_round_trip_and_precedence(tmp_path):
    settings = EngineSettings(None, ProfileLimits(max_batch=16, max_sequence=64), workspace_mb=2048)
    save_build_settings(tmp_path, settings)
    saved = load_build_settings(tmp_path)
    assert saved == {"precision": None, "max_batch": 16, "opt_batch": 1, "max_sequence": 64, "max_images": None,
                     "workspace_mb": 2048}
    defaults = {"precision": "fp16", "max_batch": 4, "workspace_mb": 512}
    resolved = resolve_settings({}, saved, defaults)
    assert resolved.limits.max_batch == 16 and resolved.workspace_mb == 2048 and resolved.precision is None
    explicit = resolve_settings({"max_batch": 2, "precision": "fp32"}, saved, defaults)
    assert explicit.limits.max_batch == 2 and explicit.precision == "fp32" and explicit.limits.max_sequence == 64
    assert resolve_settings({}, {},
                            defaults).limits.max_batch == 4 and resolve_settings({}, {}, defaults).precision == "fp16"
    (tmp_path / BUILD_SETTINGS).write_text('{"format": "mmedge.engine-settings", "format_version": 1, "max_batch": -1}')
    assert "max_batch" not in load_build_settings(tmp_path)
    (tmp_path / BUILD_SETTINGS).write_text("{broken")
    assert load_build_settings(tmp_path) == {}


# --- memory -----------------------------------------------------------------------------------------
def test_engine_size_estimate_scales_weights_to_the_engine_precision():
    fp32 = clip_manifest()["components"]["vision"]
    qdq = clip_manifest(precision="int8", quantization=QDQ)["components"]["vision"]
    assert engine_bytes(fp32, 400 * MIB, "fp16") == 200 * MIB and engine_bytes(fp32, 400 * MIB, "fp32") == 400 * MIB
    assert engine_bytes(qdq, 100 * MIB, "int8") == 100 * MIB


def test_kv_cache_estimate():
    # layers 2 x (key, value) x batch 2 x heads 4 x 128 tokens x head_dim 16 x float32
    assert kv_cache_bytes(blip2_manifest(),
                          ProfileLimits(max_batch=2, max_sequence=128)) == 2 * 2 * 2 * 4 * 128 * 16 * 4
    assert kv_cache_bytes(clip_manifest(), ProfileLimits()) == 0


def test_jetson_memory_check_refuses_what_does_not_fit():
    need = MemoryNeed({"vision": 600 * MIB, "text": 300 * MIB}, workspace=256 * MIB, kv_cache=200 * MIB)
    error = api_error(lambda: check_memory(ORIN_NANO, need), InsufficientMemoryError, "this Jetson has 1,500 MiB",
                      "KV cache 200 MiB", "engines 900 MiB", "--max-batch")
    assert error.exit_code == 4 and isinstance(error, BackendUnavailableError)
    assert "available unified memory" in check_memory(JETSON_ORIN, need)
    assert "free memory on GPU 0" in check_memory(RTX_4090, need)
    assert "skipped" in check_memory(device(gpus=[GpuInfo("NVIDIA A2", "8.6")], engines=WITH_TRT), need)
    api_error(lambda: check_memory(device(gpus=[GpuInfo("NVIDIA T4", "7.5", 15000, 1000)]), need),
              InsufficientMemoryError, "GPU 0 has 1,000 MiB")


# --- selection over described devices ----------------------------------------------------------------
def test_jetson_defaults_are_fp16_with_a_conservative_workspace():
    orin, nano = tensorrt_defaults(JETSON_ORIN), tensorrt_defaults(ORIN_NANO)
    assert (orin.precision, orin.workspace_mb, orin.max_batch) == ("fp16", 1024, 4)
    assert (nano.precision, nano.workspace_mb) == ("fp16", 475)  # 1/16 of 7,600 MiB
    desktop = tensorrt_defaults(RTX_4090)
    assert (desktop.precision, desktop.workspace_mb, desktop.max_batch) == ("fp16", 4096, 16)


def test_gpus_below_sm_70_leave_every_component_to_onnxruntime(capsys, clip_artifacts, monkeypatch):
    """TensorRT 10 supports sm 7.0 and newer: on a GTX 1080 (sm 6.1) auto plans ONNX Runtime's CUDA provider and says
    why once; a V100 (sm 7.0) is the oldest GPU TensorRT engines are planned for."""
    from mmedge import device as device_module
    from mmedge.cli import main

    chosen = plan(GTX_1080, clip_manifest())
    assert {(c.backend, c.providers) for c in chosen.components.values()} == {("onnxruntime", ("cuda",))}
    assert any("compute capability 6.1, below the sm 7.0 TensorRT 10 supports" in r for r in chosen.reasons)
    assert len(chosen.fallbacks) == 1 and "compute capability 6.1" in chosen.fallbacks[0]
    assert tensorrt_defaults(GTX_1080).precision == "fp32"  # for ONNX Runtime's TensorRT provider: no fast FP16
    volta = device(gpus=[GpuInfo("Tesla V100-SXM2-16GB", "7.0", 16384, 16000)], engines=WITH_TRT)
    assert {(c.backend, c.precision) for c in plan(volta, clip_manifest()).components.values()} == {
        ("tensorrt", "fp16")}
    monkeypatch.setattr(device_module, "probe", lambda: GTX_1080)
    assert main(["doctor", str(clip_artifacts("fp32"))]) == 0
    assert "tensorrt: not usable, GPU 0 (NVIDIA GeForce GTX 1080) has compute capability 6.1" in capsys.readouterr().out


def test_auto_on_jetson_builds_encoders_and_the_float_decoder_keeps_int4_on_onnxruntime():
    chosen = plan(JETSON_ORIN, blip2_manifest())
    assert chosen.components["prefix"].backend == "tensorrt" and chosen.components["prefix"].precision == "fp16"
    assert chosen.components["prefix"].options == {"precision": "fp16", "workspace_mb": 1024, "max_batch": 4}
    assert chosen.components["decoder"].backend == "tensorrt" and chosen.components["decoder"].precision == "fp16"
    assert any("the KV-cached decoder as a TensorRT engine" in r for r in chosen.reasons) and not chosen.fallbacks
    assert list(chosen.components) == ["prefix", "decoder"]
    int4 = plan(JETSON_ORIN, blip2_manifest(llm_precision="int4", llm_quantization=INT4))
    assert int4.components["decoder"].backend == "onnxruntime" and int4.components["decoder"].providers == ("cuda",)
    assert any("MatMulNBits" in r and r.endswith(": ONNX Runtime") for r in int4.reasons)


def test_auto_on_desktop_rtx_uses_tensorrt_for_float_and_qdq_encoders():
    for manifest, precision in ((clip_manifest(), "fp16"), (clip_manifest(precision="int8", quantization=QDQ), "int8")):
        chosen = plan(RTX_4090, manifest)
        assert {(c.backend, c.precision) for c in chosen.components.values()} == {("tensorrt", precision)}
    dynamic = plan(RTX_4090, clip_manifest(precision="int8", quantization=DYNAMIC))
    assert {c.backend for c in dynamic.components.values()} == {"onnxruntime"}
    assert plan(RTX_4090, clip_manifest(), device="cpu").components["vision"].providers == ("cpu",)


def test_auto_without_tensorrt_falls_back_with_the_reason_logged_once(caplog):
    chosen = plan(RTX_NO_TRT, clip_manifest())
    assert chosen.components["vision"].backend == "onnxruntime"
    assert chosen.components["vision"].providers == ("tensorrt", "cuda")
    assert len(chosen.fallbacks) == 1 and 'pip install "mmedge[tensorrt]"' in chosen.fallbacks[0]
    logger = logging.getLogger("mmedge.test-fallback")
    with caplog.at_level(logging.WARNING, logger="mmedge.test-fallback"):
        first = log_fallbacks(chosen, logger)
        second = log_fallbacks(plan(RTX_NO_TRT, clip_manifest()), logger)
    assert first == chosen.fallbacks and second == []
    assert [r.getMessage() for r in caplog.records
            if r.name == "mmedge.test-fallback"] == [f"mmedge: {chosen.fallbacks[0]}"]
    assert plan(CPU_BOX, clip_manifest()).fallbacks == []  # no GPU: nothing was given up
    assert plan(CPU_BOX_WITH_TRT, clip_manifest()).components["vision"].backend == "onnxruntime"


@pytest.mark.parametrize("probe,manifest,kwargs,words", [
    (RTX_NO_TRT, clip_manifest(), {}, ("backend 'tensorrt' needs the Python packages 'tensorrt' and 'cuda-python'",
                                       'pip install "mmedge[tensorrt]"', "python3-libnvinfer")),
    (CPU_BOX_WITH_TRT, clip_manifest(), {}, ("needs an NVIDIA GPU",)),
    (RTX_4090, clip_manifest(), {"device": "cpu"}, ("device=cpu",)),
    (JETSON_ORIN, blip2_manifest(llm_precision="int4", llm_quantization=INT4), {}, ("MatMulNBits", "--backend auto")),
    (RTX_4090, clip_manifest(precision="int8", quantization=DYNAMIC), {}, ("dynamic INT8",)),
    (GTX_1080, clip_manifest(), {}, ("compute capability 6.1", "sm 7.0", "--backend onnxruntime")),
])
def test_named_tensorrt_is_refused_with_what_is_missing(probe, manifest, kwargs, words):
    api_error(lambda: plan(probe, manifest, backend="tensorrt", **kwargs), BackendUnavailableError, *words)


def test_named_tensorrt_where_it_can_run():
    t4 = device(gpus=[GpuInfo("Tesla T4", "7.5", 15360, 15000)], engines=WITH_TRT, ort_providers=["cpu", "cuda"])
    chosen = plan(t4, clip_manifest(), backend="tensorrt")
    assert {(c.backend, c.precision) for c in chosen.components.values()} == {("tensorrt", "fp16")}
    assert "backend tensorrt: requested" in chosen.reasons


# --- the absent-TensorRT paths of the runtime ----------------------------------------------------------
@without_tensorrt
def test_runner_without_tensorrt_names_the_install_command(clip_artifacts):
    from mmedge.artifact import Artifact
    from mmedge.runtimes.registry import create_runner

    artifact = Artifact.open(clip_artifacts("fp32"))
    api_error(lambda: create_runner("tensorrt", artifact.component_path("vision"), "vision",
                                    artifact.component("vision"),
                                    artifact=artifact), BackendUnavailableError, "'tensorrt'",
              'pip install "mmedge[tensorrt]"',
              "python3-libnvinfer")


def test_int4_decoder_runner_is_refused_before_any_engine_work(tmp_path):
    from mmedge.runtimes.tensorrt import create_runner

    int4 = blip2_manifest(llm_precision="int4", llm_quantization=INT4)["components"]["decoder"]
    api_error(lambda: create_runner(tmp_path / "decoder.onnx", "decoder", int4), BackendError, "MatMulNBits",
              "backend='auto'")


@without_tensorrt
def test_load_routes_encoders_to_tensorrt_on_a_described_gpu(clip_artifacts, monkeypatch):
    """On a device that reports TensorRT and a GPU, mmedge.load asks the TensorRT backend for the encoders;
    here the package is absent, so that request fails with the install command instead of running elsewhere."""
    import mmedge
    from mmedge import device as device_module

    monkeypatch.setattr(device_module, "probe", lambda: RTX_4090)
    api_error(lambda: mmedge.load(clip_artifacts("fp32")), BackendUnavailableError, "'tensorrt'",
              'pip install "mmedge[tensorrt]"')


@without_tensorrt
def test_build_without_tensorrt_fails_with_one_line(capsys, clip_artifacts):
    cli_error(capsys, ["build", clip_artifacts("fp32")], BackendUnavailableError, "backend 'tensorrt'",
              'pip install "mmedge[tensorrt]"')


@pytest.mark.parametrize("argv,kind,words", [
    (["--precision", "int8"], InputError, ("static QDQ",)),
    (["--components", "nope"], InputError, ("no component 'nope'",)),
    (["--components", "vision", "--max-sequence", "8"], InputError, ("--max-sequence would change nothing",)),
    (["--max-sequence", "500"], InputError, ("--max-sequence 500 is more than the", "tokenizer sends at most")),
])  # --max-batch 0: a usage error before the artifact is opened (tests/test_cli_values.py)
def test_bad_build_requests_fail_the_same_way_everywhere(capsys, clip_artifacts, argv, kind, words):
    """Checked before TensorRT is imported: the same error on a laptop and on the Jetson."""
    cli_error(capsys, ["build", clip_artifacts("fp32"), *argv], kind, *words)


def test_build_of_an_artifact_with_nothing_to_build(clip_artifacts):
    api_error(lambda: build_artifact(clip_artifacts("int8-dynamic")), BackendUnavailableError,
              "no component", "can be built by TensorRT", "dynamic INT8")


def test_doctor_on_a_jetson_shows_the_plan_and_cached_engines(capsys, clip_artifacts, tmp_path, monkeypatch):
    import shutil

    from mmedge import device as device_module
    from mmedge.cli import main

    art = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), art)
    EngineCache(art / "engines").store("vision", key_for(gpu_name="Orin", compute_capability="8.7"), b"plan" * 64)
    monkeypatch.setattr(device_module, "probe", lambda: JETSON_ORIN)
    assert main(["doctor", str(art)]) == 0
    out = capsys.readouterr().out
    assert "tensorrt defaults: Jetson (30000 MiB shared memory): FP16, workspace 1024 MiB, max batch 4" in out
    assert 'plan: vision -> tensorrt {"precision": "fp16", "workspace_mb": 1024, "max_batch": 4} fp16' in out
    assert "engines/: 1 cached" in out and "GPU 'Orin' (sm 8.7), TensorRT 10.3.0" in out
    assert describe_engines(art / "engines")[0].startswith("vision-")


# --- with TensorRT: real engines ------------------------------------------------------------------------
@pytest.fixture
def trt_artifact(clip_artifacts, tmp_path):
    if not HAVE_TENSORRT:
        pytest.skip(NO_TENSORRT)
    if not (importable("cuda.bindings") or importable("cuda.cudart")):
        pytest.skip("cuda-python is not installed (pip install cuda-python)")
    import shutil

    def copy(variant):
        dest = tmp_path / variant
        shutil.copytree(clip_artifacts(variant), dest)
        return dest

    return copy


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("variant,precision,floor",
                         [("fp32", "fp32", 0.9999), ("fp32", "fp16", 0.999), ("int8-static", "int8", 0.99)])
def test_engine_matches_onnxruntime(trt_artifact, variant, precision, floor):
    from mmedge.artifact import Artifact
    from mmedge.metrics import cosine_rows
    from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner
    from mmedge.runtimes.tensorrt import create_runner

    artifact = Artifact.open(trt_artifact(variant))
    pixels = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)  # > max_batch: split
    reference = OnnxRuntimeRunner(artifact.component_path("vision"), "vision", artifact.component("vision"))
    with create_runner(artifact.component_path("vision"), "vision", artifact.component("vision"), artifact=artifact,
                       precision=None if precision == "int8" else precision, max_batch=4) as runner:
        got = runner.infer({"pixel_values": pixels})["image_embeds"]
    want = reference.infer({"pixel_values": pixels})["image_embeds"]
    assert got.shape == want.shape and cosine_rows(want, got).min() > floor


@needs_tensorrt
@pytest.mark.gpu
def test_build_then_load_reuses_and_foreign_engine_is_rebuilt(trt_artifact):
    from mmedge.runtimes.tensorrt import import_cudart

    import_cudart()
    art = trt_artifact("fp32")
    first = build_artifact(art, EngineSettings("fp16", ProfileLimits(max_batch=2)), progress=False)
    assert {r["action"] for r in first} == {"built"}
    assert {r["action"] for r in build_artifact(art, EngineSettings("fp16", ProfileLimits(max_batch=2)),
                                                progress=False)} == {"loaded"}
    record = next((art / "engines").glob("vision-*.json"))
    entry = json.loads(record.read_text())
    entry["key"]["gpu_name"] = "Some other GPU"
    record.write_text(json.dumps(entry))
    again = build_artifact(art, EngineSettings("fp16", ProfileLimits(max_batch=2)), components=["vision"],
                           progress=False)
    assert again[0]["action"] == "rebuilt" and "Some other GPU" in " ".join(again[0]["reasons"])


@needs_tensorrt
@pytest.mark.gpu
def test_outputs_stay_on_the_gpu_for_the_next_runner(trt_artifact):
    from mmedge.artifact import Artifact
    from mmedge.runtimes.tensorrt import DeviceTensor, create_runner

    artifact = Artifact.open(trt_artifact("fp32"))
    with create_runner(artifact.component_path("vision"), "vision", artifact.component("vision"), artifact=artifact,
                       keep_on_device=True, max_batch=2) as runner:
        out = runner.infer({"pixel_values": np.ones((2, 3, 32, 32), np.float32)})["image_embeds"]
        assert isinstance(out, DeviceTensor) and out.__cuda_array_interface__["shape"] == (2, 16)
        assert np.asarray(out).shape == (2, 16)
