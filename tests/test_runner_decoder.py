"""RunnerDecoder: the KV-cached decoder over any runner (how the decoder runs on TensorRT).

Here it runs over the real ONNX Runtime runner on the tiny BLIP-2 and IDEFICS artifacts and must give the tokens
and logits of ``OrtDecoder`` (what ``mmedge.load`` uses on ONNX Runtime), whether the cache comes back as numpy
arrays or stays in the runner's own arrays (IO binding, ``keep_on_device``, as TensorRT's ``DeviceTensor``\\ s do);
its errors are OrtDecoder's; selection over described devices plans the decoder on TensorRT for float graphs and
keeps ONNX Runtime-only graphs (INT4, dynamic INT8) on ONNX Runtime, saying why. Tests that need an engine skip
without TensorRT: no engine is faked.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.artifact import Artifact
from mmedge.errors import BackendError, BackendUnavailableError, FeedError, IntegrityError, ManifestError, MmedgeError
from mmedge.generation import Decoder, GenerationConfig, generate
from mmedge.metrics import cosine_rows
from mmedge.runtimes.onnxruntime import OnnxRuntimeRunner, OrtDeviceArray, OrtOptions
from mmedge.runtimes.runner_decoder import RunnerDecoder
from mmedge.runtimes.tensorrt_planning import ProfileLimits, derive_profile, kv_cache_bytes, kv_cache_need
from mmedge.selection import plan
from tests.support.battery import api_error
from tests.test_generation import Recording  # keeps every logits array a decoder returns
from tests.test_tensorrt import JETSON_ORIN, RTX_4090, WITH_TRT, device, needs_tensorrt, without_tensorrt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # tiny artifacts have random weights
GENERATIONS = [GenerationConfig(max_new_tokens=8), GenerationConfig(max_new_tokens=6, num_beams=3)]
RUNNER_MODES = {"numpy": OrtOptions(), "kept": OrtOptions(io_binding=True, keep_on_device=True)}


@pytest.fixture(scope="module")
def idefics_artifact(tiny_idefics_dir, tmp_path_factory):
    from mmedge.export import export_model

    return export_model(str(tiny_idefics_dir), tmp_path_factory.mktemp("idefics") / "fp32", progress=False)


@pytest.fixture(scope="module", params=["blip2", "idefics"])
def pipeline(request, blip2_artifact, idefics_artifact):
    """The artifact loaded on ONNX Runtime CPU: its decoder is an OrtDecoder, the reference here."""
    path = blip2_artifact if request.param == "blip2" else idefics_artifact
    with mmedge.load(path, backend="onnxruntime", device="cpu") as loaded:
        yield loaded


def prompts(pipeline, photos) -> dict:
    """``{"embeds", "mask", "ids", "context"}`` for two images, as the pipeline builds them (context: IDEFICS only)."""
    if pipeline.interleaved:  # IDEFICS: interleaved prompts, image context beside the cache
        built = pipeline.inputs.build([[Path(photos[0]), "An image of"], [Path(photos[1]), "a", Path(photos[0]), "An"]])
        return {"embeds": built["embeds"], "mask": built["mask"], "ids": built["ids"],
                "context": (built["prefill"], built["step"])}
    built = pipeline.inputs.for_images(photos[:2], "a photo of", 8)
    return {"embeds": built["embeds"], "mask": built["mask"], "ids": built["ids"], "context": None}


def decoder_runner(pipeline, options: OrtOptions = OrtOptions()) -> OnnxRuntimeRunner:
    artifact = pipeline.artifact
    return OnnxRuntimeRunner(artifact.component_path("decoder"), "decoder", artifact.component("decoder"), options)


def runner_decoder(pipeline, options: OrtOptions = OrtOptions()) -> RunnerDecoder:
    return RunnerDecoder.for_artifact(decoder_runner(pipeline, options), pipeline.artifact.manifest,
                                      pipeline.embeddings)


def run(decoder, inputs: dict, config: GenerationConfig) -> tuple[list[list[int]], list[np.ndarray]]:
    if inputs["context"] is not None:
        decoder.set_context(*inputs["context"])
    recording = Recording(decoder)
    return generate(recording, inputs["embeds"], inputs["mask"], config, prompt_ids=inputs["ids"]), recording.logits


# --- the same tokens and logits as OrtDecoder ------------------------------------------------------
@pytest.mark.parametrize("mode", list(RUNNER_MODES))
@pytest.mark.parametrize("config", GENERATIONS, ids=["greedy", "beam3"])
def test_tokens_and_logits_equal_ort_decoders(pipeline, photos, mode, config):
    inputs = prompts(pipeline, photos)
    candidate = runner_decoder(pipeline, RUNNER_MODES[mode])
    try:
        expected, expected_logits = run(pipeline.decoder, inputs, config)
        got, got_logits = run(candidate, inputs, config)
    finally:
        candidate.close()
    assert got == expected and len(got_logits) == len(expected_logits)
    for want, have in zip(expected_logits, got_logits):
        assert have.shape == want.shape and cosine_rows(want, have).min() >= 0.9999


def test_the_cache_comes_back_as_the_runner_left_it(pipeline, photos):
    """Presents are fed back unchanged: the runner's own arrays (here OrtDeviceArray, on the GPU TensorRT's
    DeviceTensor) between steps; a reorder gathers rows on the host, and the next step gives runner arrays again."""
    inputs = prompts(pipeline, photos)
    decoder = runner_decoder(pipeline, RUNNER_MODES["kept"])
    try:
        if inputs["context"] is not None:
            decoder.set_context(*inputs["context"])
        decoder.start(inputs["embeds"], inputs["mask"])
        assert all(isinstance(v,
                              OrtDeviceArray) for v in decoder._past) and decoder.past_length == inputs["mask"].shape[1]
        decoder.reorder(np.array([1, 1, 0]))
        assert all(isinstance(v, np.ndarray) for v in decoder._past)
        logits = decoder.step(np.array([5, 6, 7]), np.ones((3, decoder.past_length + 1), dtype=np.int64))
        assert logits.shape == (3, decoder.vocab_size) and all(isinstance(v, OrtDeviceArray) for v in decoder._past)
        kv = decoder.kv
        assert decoder._past[0].shape == (3, kv["heads"], inputs["mask"].shape[1] + 1, kv["head_dim"])
    finally:
        decoder.close()


def test_the_pipeline_gives_the_same_text_with_a_runner_decoder(pipeline, photos):
    images = [Path(p) for p in photos[:2]] if hasattr(pipeline, "inputs") else photos[:2]
    expected = pipeline.caption(images, max_new_tokens=8, num_beams=2)
    original, pipeline.decoder = pipeline.decoder, runner_decoder(pipeline)
    try:
        assert isinstance(pipeline.decoder, Decoder)
        assert pipeline.caption(images, max_new_tokens=8, num_beams=2) == expected
    finally:
        pipeline.decoder.close()
        pipeline.decoder = original


# --- the same errors as OrtDecoder ------------------------------------------------------------------
def same_error(calls, kind) -> MmedgeError:
    """Each call raises ``kind``, all with the same what / expected / fix."""
    errors = []
    for call in calls:
        with pytest.raises(MmedgeError) as info:
            call()
        errors.append(info.value)
    assert all(isinstance(e, kind) for e in errors), errors
    assert len({(e.what, e.expected, e.fix) for e in errors}) == 1, errors
    return errors[0]


def ort_decoder(pipeline):
    """A fresh OrtDecoder of the pipeline's artifact, as mmedge.load builds it."""
    from mmedge.runtimes.kv_decoder import artifact_decoder
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    layout, options = artifact_decoder(pipeline.artifact.manifest)
    return OrtDecoder(pipeline.artifact.component_path("decoder"), pipeline.embeddings, layout, **options)


def test_misuse_raises_the_errors_ort_decoder_raises(pipeline, photos):
    inputs = prompts(pipeline, photos)
    both = (ort_decoder(pipeline), runner_decoder(pipeline))
    calls = lambda action: [lambda d=d: action(d) for d in both]  # noqa: E731
    ones = lambda rows, width: np.ones((rows, width), np.int64)  # noqa: E731
    try:
        error = same_error(calls(lambda d: d.step(np.array([5]), ones(1, 1))), FeedError)  # start() not called
        assert "past length" in error.expected and "call start() first" in error.fix
        if inputs["context"] is not None:
            error = same_error(calls(lambda d: d.start(inputs["embeds"], inputs["mask"])), FeedError)
            assert "set_context" in error.fix
            same_error(calls(lambda d: d.set_context({}, inputs["context"][1])), FeedError)
            for decoder in both:
                decoder.set_context(*inputs["context"])
        same_error(calls(lambda d: d.start(inputs["embeds"][0], inputs["mask"][0])), FeedError)
        same_error(calls(lambda d: d.start(inputs["embeds"], inputs["mask"][:, 1:])), FeedError)
        for decoder in both:
            decoder.start(inputs["embeds"], inputs["mask"])
        width = inputs["mask"].shape[1]
        error = same_error(calls(lambda d: d.step(np.array([5, 6]), ones(2, width + 2))), FeedError)  # wrong mask width
        assert f"[2, {width + 1}]" in error.expected
        same_error(calls(lambda d: d.step(np.array([5, 6, 7]), ones(3, width + 1))), FeedError)  # rows not reordered
        error = same_error(calls(lambda d: d.reorder(np.array([0, 2]))), FeedError)  # bad reorder rows
        assert "row indices below 2" in error.expected
        same_error(calls(lambda d: d.reorder(np.array([-1]))), FeedError)
    finally:
        for decoder in both:
            decoder.close()
    for decoder in both:  # the fix names the class to create again
        api_error(lambda: decoder.start(inputs["embeds"], inputs["mask"]), BackendError, "the decoder is closed",
                  f"create a new {type(decoder).__name__}")


def test_a_graph_that_does_not_match_the_layout_is_refused(pipeline):
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    layout = pipeline.decoder.kv
    path, table = pipeline.artifact.component_path("decoder"), pipeline.embeddings
    context = pipeline.decoder._context_names
    narrow = np.zeros((10, 3), np.float32)  # [vocab, not the hidden size]
    for bad, embeddings, kind in (({**layout, "layers": layout["layers"] + 1}, table, IntegrityError),
                                  ({"layers": 2}, table, ManifestError),
                                  ({**layout, "past": "past_key_values"}, table, ManifestError),
                                  (layout, narrow, FeedError)):
        runner = decoder_runner(pipeline)
        try:
            same_error([lambda: OrtDecoder(path, embeddings, bad, context_inputs=context),
                        lambda: RunnerDecoder(runner, embeddings, bad, context_inputs=context)], kind)
        finally:
            runner.close()


# --- selection and engine planning over described devices --------------------------------------------
def manifest_of(path) -> dict:
    return copy.deepcopy(Artifact.open(path).manifest)


def with_decoder(manifest: dict, precision: str, quantization: dict | None) -> dict:
    manifest["components"]["decoder"].update(precision=precision, quantization=quantization)
    return manifest


INT4 = {"method": "int4-weight-only", "format": "MatMulNBits", "bits": 4}
DYNAMIC = {"method": "int8-dynamic", "op_types": ["MatMul"]}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["auto", "tensorrt"])
def test_float_decoders_are_planned_on_tensorrt(blip2_artifact, idefics_artifact, precision, backend):
    for path in (blip2_artifact, idefics_artifact):
        manifest = with_decoder(manifest_of(path), precision, {"method": "fp16"} if precision == "fp16" else None)
        chosen = plan(RTX_4090, manifest, backend=backend)
        decoder = chosen.components["decoder"]
        assert (decoder.backend, decoder.precision) == ("tensorrt", "fp16")
        why = next(r for r in chosen.reasons if "the KV-cached decoder as a TensorRT engine" in r)
        assert f"{precision} graph without ONNX Runtime-only operators" in why
        if manifest["family"] == "idefics":
            assert "image_attention_mask" in why  # context inputs are fed beside the cache


@pytest.mark.parametrize("recipe,words", [(("int4", INT4), "com.microsoft MatMulNBits"),
                                          (("int8", DYNAMIC), "MatMulInteger, DynamicQuantizeLinear")],
                         ids=["int4", "int8-dynamic"])
def test_onnxruntime_only_decoders_stay_on_onnxruntime_with_the_reason(blip2_artifact, recipe, words):
    manifest = with_decoder(manifest_of(blip2_artifact), *recipe)
    for probe in (RTX_4090, JETSON_ORIN):
        chosen = plan(probe, manifest)
        assert chosen.components["decoder"].backend == "onnxruntime"
        assert chosen.components["prefix"].backend == "tensorrt"
        assert any(words in r and "component 'decoder'" in r and r.endswith(": ONNX Runtime") for r in chosen.reasons)
    api_error(lambda: plan(RTX_4090, manifest, backend="tensorrt"), BackendUnavailableError, words, "--backend auto")


def test_torch_keeps_a_plain_decoder_it_has_weights_for(blip2_artifact, idefics_artifact):
    with_torch = device(gpus=RTX_4090.gpus, engines={**WITH_TRT, "torch": "2.11.0", "transformers": "5.2.0"},
                        ort_providers=["cpu", "cuda", "tensorrt"])
    blip2 = plan(with_torch, manifest_of(blip2_artifact), pytorch_weights=True)
    assert blip2.components["decoder"].backend == "torch"
    assert any("component 'decoder': not a TensorRT engine, torch runs it" in r for r in blip2.reasons)
    idefics = plan(with_torch, manifest_of(idefics_artifact), pytorch_weights=True)  # image context: not torch's
    assert idefics.components["decoder"].backend == "tensorrt"


def test_real_decoder_profiles_cover_every_axis_consistently(blip2_artifact, idefics_artifact):
    """Every input of the exported decoders gets a profile of its rank; past + new = total at min, opt and max;
    IDEFICS' cross-attention K/V span whole images of its mask's image axis."""
    for path in (blip2_artifact, idefics_artifact):
        manifest = manifest_of(path)
        component = manifest["components"]["decoder"]
        profile = derive_profile(manifest, "decoder", ProfileLimits(max_batch=4, max_sequence=64, max_images=3))
        dynamic = {n for n, spec in component["inputs"].items() if any(isinstance(d, str) for d in spec["shape"])}
        assert set(profile) == dynamic and all(len(lo) == len(component["inputs"][n]["shape"]) for n,
                                               (lo, _, _) in profile.items())
        past = next(n for n in profile if n.startswith("past_key_values"))
        for point in range(3):
            assert profile["attention_mask"][point][1] == profile[past][point][2] + profile["inputs_embeds"][point][1]
            assert profile["attention_mask"][point][0] == profile[past][point][0] == profile["inputs_embeds"][point][0]
        # the longest prompt; the prefill's past
        assert profile["inputs_embeds"][2][1] == 64 and profile[past][0][2] == 0
        if manifest["family"] == "idefics":
            unit = manifest["idefics"]["cross_kv"]["tokens_per_image"]
            cross = next(n for n in profile if n.startswith("cross_key_values"))
            for point in range(3):
                assert profile[cross][point][2] == unit * profile["image_attention_mask"][point][2]


def test_memory_need_counts_the_cache_tensorrt_holds(blip2_artifact):
    manifest, limits = manifest_of(blip2_artifact), ProfileLimits(max_batch=4, max_sequence=64)
    one = kv_cache_bytes(manifest, limits)
    assert one > 0 and kv_cache_need(manifest, limits, ["prefix"]) == one  # another backend holds one cache
    assert kv_cache_need(manifest, limits, ["prefix", "decoder"]) == 3 * one  # staging buffers, pasts, presents


# --- TensorRT ---------------------------------------------------------------------------------------------
@without_tensorrt
def test_load_asks_tensorrt_for_the_decoder(blip2_artifact):
    """mmedge.load builds a decoder planned on tensorrt through the TensorRT backend; absent, that fails with the
    install command instead of running elsewhere."""
    from mmedge.api import _decoder
    from mmedge.selection import ComponentPlan, Plan

    options = {"precision": "fp16", "workspace_mb": 1024, "max_batch": 4}
    chosen = Plan({"decoder": ComponentPlan("tensorrt", (), "fp16", options)})
    api_error(lambda: _decoder(Artifact.open(blip2_artifact), chosen, None, {}),
              BackendUnavailableError, "'tensorrt'", 'pip install "mmedge[tensorrt]"')


@needs_tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("config", GENERATIONS, ids=["greedy", "beam3"])
def test_tensorrt_decoder_matches_onnxruntime(pipeline, photos, tmp_path, config):
    pytest.importorskip("cuda", reason="cuda-python is not installed (pip install cuda-python)")
    import shutil

    from mmedge.runtimes.tensorrt import DeviceTensor, create_decoder
    from tests.support.token_parity import compare_generation

    copy_path = tmp_path / "artifact"
    shutil.copytree(pipeline.artifact.root, copy_path)
    inputs = prompts(pipeline, photos)
    candidate = create_decoder(Artifact.open(copy_path), pipeline.embeddings, precision="fp32", max_batch=8,
                               max_sequence=96)
    try:
        for decoder in (pipeline.decoder, candidate):
            if inputs["context"] is not None:
                decoder.set_context(*inputs["context"])
        prompt = (inputs["embeds"], inputs["mask"], inputs["ids"])
        report = compare_generation(pipeline.decoder, candidate, prompt, prompt, config)
        assert all(isinstance(v, DeviceTensor) for v in candidate._past)  # the cache stayed on the GPU
    finally:
        candidate.close()
    report.check(0.9999, label="TensorRT FP32 decoder")  # the same tokens up to near-ties within GPU/CPU rounding
