"""manifest.json parsing: every field the device relies on is checked, with the field named."""

import copy
import json

import pytest

from mmedge.errors import ManifestError, UnsafePathError, UnsupportedFormatError
from mmedge.manifest import FORMAT_VERSION, dump_manifest, parse_manifest

SHA = "0" * 64
VALID = {
    "format": "mmedge.artifact",
    "format_version": FORMAT_VERSION,
    "mmedge_version": "0.1.0",
    "family": "clip",
    "tasks": ["zero-shot", "embed"],
    "source": {"model": "tiny", "config_sha256": SHA, "random_weights": True},
    "preprocess": {"resize": {"shortest_edge": 32}, "resample": "bicubic", "center_crop": [32, 32],
                   "rescale_factor": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "tokenizer": {"file": "tokenizer.json"},
    "clip": {"logit_scale": 100.0, "projection_dim": 16},
    "components": {
        "vision": {
            "file": "vision.onnx", "sha256": SHA, "precision": "fp32", "quantization": None,
            "inputs": {"pixel_values": {"dtype": "float32", "shape": ["batch", 3, 32, 32]}},
            "outputs": {"image_embeds": {"dtype": "float32", "shape": ["batch", 16]}},
            "parity": {"reference": "torch-fp32"},
        },
        "text": {
            "file": "text.onnx", "sha256": SHA, "precision": "fp32", "quantization": None,
            "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "sequence"]},
                       "attention_mask": {"dtype": "int64", "shape": ["batch", "sequence"]}},
            "outputs": {"text_embeds": {"dtype": "float32", "shape": ["batch", 16]}},
            "parity": {"reference": "torch-fp32"},
        },
    },
}


def edited(**changes):
    data = copy.deepcopy(VALID)
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return json.dumps(data)


def test_valid_manifest_round_trips():
    assert parse_manifest(dump_manifest(VALID)) == VALID


@pytest.mark.parametrize("text", ["", "{", "not json", "\x00\x01", '{"a": 1'])
def test_not_json(text):
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(text)


@pytest.mark.parametrize("text", ["[]", "3", '"x"', "null"])
def test_not_an_object(text):
    with pytest.raises(ManifestError):
        parse_manifest(text)


def test_newer_format_version_is_refused_with_upgrade_hint():
    with pytest.raises(UnsupportedFormatError, match="newer than this mmedge reads.*pip install -U mmedge"):
        parse_manifest(edited(format_version=FORMAT_VERSION + 1, mmedge_version="9.0.0"))


def test_every_older_format_version_is_read():
    """Artifacts exported before a format change still load on an upgraded device (2: mmedge 0.2.0)."""
    assert FORMAT_VERSION == 2
    for version in range(1, FORMAT_VERSION + 1):
        assert parse_manifest(edited(format_version=version))["format_version"] == version


def test_other_format_is_refused():
    with pytest.raises(UnsupportedFormatError, match="not an mmedge artifact"):
        parse_manifest(edited(format="onnx.model"))


@pytest.mark.parametrize("field", ["family", "tasks", "source", "components", "format_version", "preprocess",
                                   "components__vision__sha256", "components__vision__inputs",
                                   "components__vision__parity", "source__random_weights"])
def test_missing_field_is_named(field):
    with pytest.raises(ManifestError, match=field.replace("__", ".") + "' is missing"):
        parse_manifest(edited(**{field: KeyError}))


@pytest.mark.parametrize("field,value", [
    ("format_version", "1"), ("format_version", True), ("tasks", "zero-shot"), ("components", []),
    ("components__vision__sha256", 5), ("components__vision__precision", "int3"),
    ("components__vision__inputs__pixel_values__dtype", "complex64"),
    ("components__vision__inputs__pixel_values__shape", [-1, 3]),
    ("components__vision__inputs__pixel_values__shape", [1.5]),
    ("components__vision__sha256", "xyz"), ("family", "gpt"), ("tasks", ["caption"]), ("tasks", []),
    ("source__random_weights", "no"), ("components__vision__outputs", {}),
])
def test_wrong_type_or_value_is_named(field, value):
    with pytest.raises(ManifestError, match=field.split("__")[-1] if "shape" not in field else "shape"):
        parse_manifest(edited(**{field: value}))


@pytest.mark.parametrize("changes,match", [
    ({"clip": KeyError}, "'clip' is missing"), ({"clip__logit_scale": "33"}, "'clip.logit_scale' has the wrong type"),
    ({"components__vision__parity__validation_samples": []}, "validation_samples' has the wrong type"),
    ({"components__vision__parity__validation_samples": {"image_embeds": {"cosine": "x"}}},
     "validation_samples.image_embeds.cosine' has the wrong type"),
])
def test_sections_the_pipelines_read_are_checked(changes, match):
    """CLIP's logit scale and the export's parity figures: a damaged one failed later with an internal error."""
    with pytest.raises(ManifestError, match=match):
        parse_manifest(edited(**changes))


def fused_manifest() -> dict:
    """VALID as an export with labels baked in writes it: one zero_shot graph, no text encoder nor tokenizer."""
    data = copy.deepcopy(VALID)
    data.update(tasks=["zero-shot"], tokenizer=None, components={"zero_shot": data["components"]["vision"]})
    return data


def test_a_fused_graph_needs_its_baked_labels():
    data = fused_manifest()
    for section, match in (({}, "'zero_shot' is missing"), ({"zero_shot": {"labels": "abc"}}, "'zero_shot.labels' has"),
                           ({"zero_shot": {"labels": []}}, "non-empty list of label strings")):
        with pytest.raises(ManifestError, match=match):
            parse_manifest(json.dumps({**data, **section}))
    assert parse_manifest(json.dumps({**data, "zero_shot": {"labels": ["cat"]}}))["zero_shot"]["labels"] == ["cat"]


def test_a_captioning_manifest_needs_its_generation_ends(blip2_artifact):
    """``generation: {}`` ran to transformers' default length; an EOS of the wrong type failed in the loop. A
    checkpoint without an EOS id exports ``null``: its answers end at max_new_tokens, and the artifact loads."""
    data = json.loads((blip2_artifact / "manifest.json").read_text())
    for generation, match in (({}, "'generation.max_new_tokens' is missing"),
                              ({"max_new_tokens": 0, "eos_token_id": 2}, "a positive integer"),
                              ({"max_new_tokens": 8, "eos_token_id": []}, "a token id, a non-empty list"),
                              ({"max_new_tokens": 8, "eos_token_id": "2"}, "a token id, a non-empty list")):
        with pytest.raises(ManifestError, match=match):
            parse_manifest(json.dumps({**data, "generation": generation}))
    for eos in ([2, 3], None):
        assert parse_manifest(json.dumps({**data, "generation": {"max_new_tokens": 8, "eos_token_id": eos}}))


def test_component_the_family_lacks():
    data = copy.deepcopy(VALID)
    data["components"]["qformer"] = data["components"]["vision"]
    with pytest.raises(ManifestError, match="'clip' family does not have"):
        parse_manifest(json.dumps(data))


@pytest.mark.parametrize("name", ["../x.onnx", "/etc/passwd", "sub/vision.onnx", "..", ".", "", "C:\\x.onnx",
                                  "a\\b.onnx", "x\x00.onnx"])
def test_file_names_must_be_plain(name):
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        parse_manifest(edited(components__vision__file=name))


def test_tokenizer_file_must_be_plain():
    with pytest.raises(UnsafePathError):
        parse_manifest(edited(tokenizer={"file": "../../tokenizer.json"}))


def test_errors_say_what_to_do():
    with pytest.raises(ManifestError) as info:
        parse_manifest(edited(family=KeyError))
    assert "expected" in str(info.value) and "fix:" in str(info.value)


PYTORCH = {"folder": "pytorch", "format": "transformers-safetensors",
           "files": {"config.json": {"sha256": SHA}, "model.safetensors": {"sha256": SHA}}}


def test_pytorch_reference_tensors_is_a_plain_file_name():
    """Like every file name in a manifest: the torch backend joins it onto the pytorch folder and loads it."""
    ok = parse_manifest(edited(pytorch={**PYTORCH, "reference_tensors": "reference_tensors.safetensors"}))
    assert ok["pytorch"]["reference_tensors"] == "reference_tensors.safetensors"
    for name in ("../../outside.safetensors", "/etc/passwd", "sub/ref.safetensors"):
        with pytest.raises(UnsafePathError, match="pytorch.reference_tensors"):
            parse_manifest(edited(pytorch={**PYTORCH, "reference_tensors": name}))
    with pytest.raises(ManifestError, match="pytorch.reference_tensors"):
        parse_manifest(edited(pytorch={**PYTORCH, "reference_tensors": 3}))
