"""Manifest fields checked against each other and against the files they describe: a hand-edited manifest is refused
at open (and by `mmedge doctor`) with its own diagnosis, not later with another one."""

import copy
import hashlib
import json
import shutil

import pytest

from mmedge.artifact import Artifact
from mmedge.errors import ArtifactNotFoundError, IntegrityError, ManifestError
from mmedge.manifest import parse_manifest
from tests.support.battery import api_error, edit_manifest, read_manifest
from tests.test_manifest import PYTORCH, VALID, edited, fused_manifest


# --- each task's components, and the tokenizer of a text encoder --------------------------------------------------
@pytest.mark.parametrize("components,task", [(["vision"], "zero-shot"), (["text"], "zero-shot"), (["vision"], "embed")])
def test_a_clip_task_without_its_components_is_refused(components, task):
    data = copy.deepcopy(VALID)
    data.update(tasks=[task], components={name: VALID["components"][name] for name in components})
    with pytest.raises(ManifestError, match=f"cannot serve the task '{task}'"):
        parse_manifest(json.dumps(data))


def test_a_text_encoder_without_a_tokenizer_is_refused_and_a_fused_graph_needs_none():
    with pytest.raises(ManifestError, match="'tokenizer' is missing, but the text encoder reads token ids"):
        parse_manifest(edited(tokenizer=None))
    assert parse_manifest(json.dumps({**fused_manifest(), "zero_shot": {"labels": ["cat", "dog"]}}))
    embed = {**fused_manifest(), "tasks": ["zero-shot", "embed"], "zero_shot": {"labels": ["cat"]}}
    with pytest.raises(ManifestError, match="cannot serve the task 'embed'"):  # it has no text encoder
        parse_manifest(json.dumps(embed))


def test_a_captioning_manifest_needs_its_decoder_its_tokenizer_and_the_components_its_section_names(blip2_artifact):
    data = read_manifest(blip2_artifact)
    assert parse_manifest(json.dumps(data))
    without_decoder = copy.deepcopy(data)
    del without_decoder["components"]["decoder"]
    cases = [({**data, "tokenizer": None}, "'tokenizer' is missing, but the decoder reads token ids"),
             (without_decoder, "without 'decoder'")]
    for field, name in (("decoder", "llm"), ("prefix", None)):
        changed = copy.deepcopy(data)
        if name is None:
            changed["blip2"]["prefix"]["components"] = ["vision"]
            cases.append((changed, "'blip2.prefix.components' names 'vision', which is not a component"))
        else:
            changed["blip2"][field]["component"] = name
            cases.append((changed, f"'blip2.{field}.component' names 'llm', which is not a component"))
    for manifest, match in cases:
        with pytest.raises(ManifestError, match=match):
            parse_manifest(json.dumps(manifest))


# --- the image size preprocessing makes, and the image graphs' ----------------------------------------------------
@pytest.mark.parametrize("preprocess,made", [({"center_crop": [30, 30]}, "30x30"),
                                             ({"center_crop": None, "resize": {"height": 32, "width": 48}}, "32x48")])
def test_preprocessing_that_makes_another_size_than_the_image_graph_takes_is_refused(preprocess, made):
    data = copy.deepcopy(VALID)
    data["preprocess"].update(preprocess)
    match = rf"pixel_values.shape' ends in \[32, 32\], while preprocessing makes {made}"
    with pytest.raises(ManifestError, match=match):
        parse_manifest(json.dumps(data))
    data["components"]["vision"]["inputs"]["pixel_values"]["shape"] = ["batch", 3, "height", "width"]
    assert parse_manifest(json.dumps(data))  # named axes: any size


def test_a_bad_preprocess_is_refused_at_parse():
    with pytest.raises(ManifestError, match="preprocess 'mean'"):
        parse_manifest(edited(preprocess__mean=[0.5]))


# --- numbers: finite everywhere, a logit scale that scores -----------------------------------------------------------
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_non_finite_number_anywhere_is_refused(number):
    text = edited(components__vision__parity__cosine=0.5).replace("0.5", number)
    with pytest.raises(ManifestError, match="not valid JSON.*is not finite"):
        parse_manifest(text)


@pytest.mark.parametrize("scale", [0, -14.3, 1e39])
def test_a_logit_scale_out_of_range_is_refused(scale):
    with pytest.raises(ManifestError, match="'clip.logit_scale' is .*a number above 0"):
        parse_manifest(edited(clip__logit_scale=scale))


# --- every sha256 is 64 lowercase hex digits ----------------------------------------------------------------------
@pytest.mark.parametrize("changes,field", [
    ({"validation": {"file": "validation.npz", "sha256": "ABC"}}, "validation.sha256"),
    ({"components__vision__external_data": {"file": "vision.onnx.data", "sha256": "A" * 64}},
     "components.vision.external_data.sha256"),
])
def test_a_malformed_sha256_is_a_manifest_error(changes, field):
    with pytest.raises(ManifestError, match=f"'{field}' is .*64 lowercase hex digits"):
        parse_manifest(edited(**changes))


# --- the words of errors ------------------------------------------------------------------------------------------
def test_a_shortened_value_keeps_its_ellipsis_and_kinds_take_their_article():
    with pytest.raises(ManifestError) as info:
        parse_manifest(edited(components__vision__sha256="BEE702CF07D0C751EBFF1D00892EDFD77290" * 3))
    assert "is 'BEE702CF07D0C751EBFF1D00892EDFD77290...; expected 64" in str(info.value)
    with pytest.raises(ManifestError, match="expected an integer;"):
        parse_manifest(edited(format_version="1"))
    with pytest.raises(ManifestError, match="expected a JSON object;"):
        parse_manifest(edited(clip="x"))


# --- files under pytorch/ are named by their path in the artifact ---------------------------------------------------
def test_files_of_the_pytorch_folder_are_named_with_the_folder(clip_artifacts, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), folder)
    (folder / "pytorch").mkdir()
    (folder / "pytorch" / "model.safetensors").write_bytes(b"weights")
    edit_manifest(folder, lambda m: m.update(pytorch=PYTORCH))
    api_error(lambda: Artifact.open(folder).pytorch_folder(), ArtifactNotFoundError,
              "artifact file 'pytorch/config.json' (manifest field 'pytorch.files.config.json') is missing")
    (folder / "pytorch" / "config.json").write_text("{}")
    api_error(lambda: Artifact.open(folder).pytorch_folder(), IntegrityError, "artifact file 'pytorch/config.json' in")


# --- a graph's external weight file, and what its values may be ------------------------------------------------------
def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_external_weights(source, folder):
    """A copy of ``source`` whose vision graph keeps its weights in vision.onnx.data, named in the manifest's
    ``external_data`` with its sha256 (and the graph's sha256 updated)."""
    import onnx

    shutil.copytree(source, folder)
    graph = onnx.load(folder / "vision.onnx")
    onnx.save_model(graph, folder / "vision.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.onnx.data", size_threshold=0)

    def edit(manifest):
        vision = manifest["components"]["vision"]
        vision["sha256"] = sha256_of(folder / "vision.onnx")
        vision["external_data"] = {"file": "vision.onnx.data", "sha256": sha256_of(folder / "vision.onnx.data")}
    edit_manifest(folder, edit)
    return folder


def test_a_declared_external_weight_file_loads(clip_artifacts, tmp_path, photos):
    import mmedge

    named = with_external_weights(clip_artifacts("fp32"), tmp_path / "named")
    with mmedge.load(named) as classifier:
        assert classifier(photos[0], labels=["cat", "dog"])
    Artifact.open(named).check_every_file()


def test_non_finite_outputs_are_a_backend_error_not_nan_scores(clip_artifacts, tmp_path, photos):
    """Weights of NaN whose sha256 the manifest records (so every check passes): the pipelines refuse the outputs."""
    import numpy as np

    import mmedge
    from mmedge.errors import BackendError

    folder = with_external_weights(clip_artifacts("fp32"), tmp_path / "nan")
    weights = folder / "vision.onnx.data"
    weights.write_bytes(np.full(weights.stat().st_size // 4, np.nan, dtype=np.float32).tobytes())
    edit_manifest(folder, lambda m: m["components"]["vision"]["external_data"].update(sha256=sha256_of(weights)))
    fragments = ("component 'vision' output 'image_embeds' holds NaN or infinite values", "mmedge doctor")
    with mmedge.load(folder) as classifier:
        api_error(lambda: classifier(photos[0], labels=["cat", "dog"]), BackendError, *fragments)
    with mmedge.load(folder, task="embed") as embedder:
        api_error(lambda: embedder.embed_images(photos[0]), BackendError, *fragments)
