"""mmedge.preprocess.ImagePreprocessor against transformers' CLIPImageProcessorPil, and its config."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image

from mmedge.errors import ImageError, InputError, ManifestError, ModelLoadError
from mmedge.preprocess import ImagePreprocessor, center_crop

skimage_data = pytest.importorskip("skimage.data")

TOLERANCE = 1e-5
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]  # camera is gray
CLIP = {
    "resize": {"shortest_edge": 224},
    "resample": "bicubic",
    "center_crop": [224, 224],
    "rescale_factor": 1 / 255,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}
HF_SETTINGS = {
    "clip-default": {},
    "160-crop-128": {"size": {"shortest_edge": 160}, "crop_size": {"height": 128, "width": 128}},
    "crop-180x120-bilinear": {
        "size": {"shortest_edge": 200},
        "crop_size": {"height": 180, "width": 120},
        "resample": 2,
    },
    "100x150-lanczos-no-crop": {"size": {"height": 100, "width": 150}, "do_center_crop": False, "resample": 1},
    "crop-larger-than-image": {"size": {"shortest_edge": 100}, "crop_size": {"height": 121, "width": 133}},
    "no-rescale-no-normalize": {"do_rescale": False, "do_normalize": False},
}


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    """Real photos from scikit-image as PIL images (RGB; camera as L)."""
    return {name: Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS}


@pytest.fixture(scope="module")
def hf_clip():
    """``CLIPImageProcessorPil``, the reference; the tests that use it need transformers."""
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessorPil


@pytest.fixture(scope="module")
def from_hf():
    pytest.importorskip("transformers")
    from mmedge.export.preprocessing import preprocess_config_from_hf

    return preprocess_config_from_hf


def _max_abs_vs_hf(hf_processor, from_hf, images) -> float:
    """Run both pipelines on ``images``; return the max abs difference of ``pixel_values``."""
    ours = ImagePreprocessor(from_hf(hf_processor))(images)
    reference = hf_processor(images, return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    return float(np.abs(ours - reference).max())


# --- parity with Hugging Face --------------------------------------------------------------------
@pytest.mark.parametrize("setting", sorted(HF_SETTINGS))
@pytest.mark.parametrize("photo", PHOTOS)
def test_matches_clip_image_processor_pil(photos, hf_clip, from_hf, setting, photo):
    assert _max_abs_vs_hf(hf_clip(**HF_SETTINGS[setting]), from_hf, photos[photo]) <= TOLERANCE


def test_batch_matches_hugging_face(photos, hf_clip, from_hf):
    batch = [photos[name] for name in PHOTOS]
    assert _max_abs_vs_hf(hf_clip(), from_hf, batch) <= TOLERANCE


def test_numpy_rgb_input_matches_hugging_face(hf_clip, from_hf):
    assert _max_abs_vs_hf(hf_clip(), from_hf, skimage_data.rocket()) <= TOLERANCE


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_integer_array_in_eight_bit_range_matches_hugging_face(hf_clip, from_hf, dtype):
    assert _max_abs_vs_hf(hf_clip(), from_hf, skimage_data.rocket().astype(dtype)) <= TOLERANCE


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparency", "RGBA-array", "CMYK", "1"])
def test_other_modes_match_hugging_face(photos, hf_clip, from_hf, mode):
    rgba = photos["chelsea"].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    if mode == "P-transparency":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 5
    elif mode == "RGBA-array":
        image = np.asarray(rgba)
    else:
        image = rgba.convert(mode)
    assert _max_abs_vs_hf(hf_clip(), from_hf, image) <= TOLERANCE


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (5, 2), (224, 224), (223, 225)])
def test_tiny_and_odd_images_match_hugging_face(hf_clip, from_hf, size):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    assert _max_abs_vs_hf(hf_clip(), from_hf, image) <= TOLERANCE


def test_resize_size_rounds_like_hugging_face():
    transforms = pytest.importorskip("transformers.image_transforms")
    preprocessor = ImagePreprocessor({**CLIP, "resize": {"shortest_edge": 97}})
    for height in (1, 2, 96, 97, 98, 301, 1000):
        for width in (1, 3, 97, 100, 451, 640):
            reference = transforms.get_resize_output_image_size(
                np.zeros((height, width, 3)), size=97, default_to_square=False, input_data_format="channels_last"
            )
            assert preprocessor.resize_size(width, height) == tuple(reference)


def test_center_crop_and_padding_like_hugging_face():
    transforms = pytest.importorskip("transformers.image_transforms")
    rng = np.random.default_rng(2)
    for height in (1, 2, 3, 6, 7):
        for width in (1, 4, 5, 8):
            pixels = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3]
            for crop in [(1, 1), (2, 5), (4, 3), (7, 8), (9, 2)]:
                reference = transforms.center_crop(pixels.transpose(2, 0, 1), crop, input_data_format="channels_first")
                np.testing.assert_array_equal(center_crop(pixels, *crop).transpose(2, 0, 1), reference)


# --- behaviour -----------------------------------------------------------------------------------
def test_padding_is_normalized_zero():
    config = {**CLIP, "resize": {"height": 2, "width": 2}, "center_crop": [4, 5]}
    out = ImagePreprocessor(config)(Image.new("RGB", (9, 9), (255, 255, 255)))  # [1, 3, 4, 5]
    zero = (0 - np.float32(CLIP["mean"][0])) / np.float32(CLIP["std"][0])
    white = (np.float32(1.0) - np.float32(CLIP["mean"][0])) / np.float32(CLIP["std"][0])
    assert out.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(out[0, 0, 1:3, 2:4], white)  # pad top 1, left ceil(3 / 2) = 2
    assert out[0, 0, 0, 0] == zero and out[0, 0, 3, 4] == zero and out[0, 0, 1, 1] == zero


def test_batch_of_mixed_sources(tmp_path, photos):
    path = tmp_path / "coffee.png"
    photos["coffee"].save(path)
    preprocessor = ImagePreprocessor(CLIP)
    batch = preprocessor([path, photos["chelsea"], skimage_data.camera()])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocessor(photos["chelsea"])[0])
    assert preprocessor((photos["chelsea"],)).shape == (1, 3, 224, 224)


def test_empty_batch_is_refused():
    with pytest.raises(InputError, match="no images"):
        ImagePreprocessor(CLIP)([])


def test_bad_image_in_batch_raises_image_error(photos):
    with pytest.raises(ImageError, match="not an image"):
        ImagePreprocessor(CLIP)([photos["coffee"], b"not an image"])


def _bad_items(tmp_path) -> dict:
    """One unloadable image of each source kind, with the words of its own error."""
    return {
        "array": (np.zeros((3, 20, 30), np.uint8), "image array has shape (3, 20, 30)"),
        "pil": (Image.new("RGB", (0, 3)), "the PIL image has no pixels"),
        "bytes": (b"not an image", "image data is not an image PIL can read"),
        "path": (tmp_path / "missing.png", f"image file '{tmp_path / 'missing.png'}' does not exist"),
    }


@pytest.mark.parametrize("kind", ["array", "pil", "bytes", "path"])
def test_load_error_in_a_batch_names_the_image_place(tmp_path, photos, kind):
    bad, words = _bad_items(tmp_path)[kind]
    good = photos["coffee"]
    with pytest.raises(ImageError) as info:
        ImagePreprocessor(CLIP)([good, good, bad, good])
    assert type(info.value) is ImageError
    assert str(info.value).startswith(f"image at index 2 of the batch: {words}")
    assert info.value.fix and info.value.expected  # the original advice is kept


@pytest.mark.parametrize("kind", ["array", "pil", "bytes", "path"])
def test_load_error_of_a_single_image_has_no_batch_place(tmp_path, kind):
    bad, words = _bad_items(tmp_path)[kind]
    for images in (bad, [bad]):
        with pytest.raises(ImageError) as info:
            ImagePreprocessor(CLIP)(images)
        assert str(info.value).startswith(words)


def test_resize_refusal_in_a_batch_names_place_and_path(tmp_path, photos):
    path = tmp_path / "strip.png"
    Image.new("RGB", (60_000, 1)).save(path)
    with pytest.raises(ImageError, match="aspect ratio") as info:
        ImagePreprocessor(CLIP)([photos["coffee"], path])
    assert str(info.value).startswith(f"image at index 1 of the batch (image file '{path}') (60000x1)")
    with pytest.raises(ImageError) as info:
        ImagePreprocessor(CLIP)(path)
    assert str(info.value).startswith(f"image file '{path}' (60000x1)")


def test_extreme_aspect_ratio_is_refused_before_resizing():
    with pytest.raises(ImageError, match="aspect ratio"):
        ImagePreprocessor(CLIP)(Image.new("RGB", (60_000, 1)))


def test_output_size():
    assert ImagePreprocessor({**CLIP, "center_crop": [128, 96]}).output_size == (128, 96)
    fixed_resize = {**CLIP, "resize": {"height": 50, "width": 70}, "center_crop": None}
    assert ImagePreprocessor(fixed_resize).output_size == (50, 70)


def test_to_dict_is_json_round_trippable_and_a_copy():
    preprocessor = ImagePreprocessor(CLIP)
    config = preprocessor.to_dict()
    assert ImagePreprocessor(json.loads(json.dumps(config))).to_dict() == config
    config["mean"][0] = 9.0
    config["resize"]["shortest_edge"] = 1
    assert preprocessor.to_dict() == ImagePreprocessor(CLIP).to_dict()


# --- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("resize", {"longest_edge": 224}),
        ("resize", {"shortest_edge": 0}),
        ("resize", {"shortest_edge": True}),
        ("resize", {"height": 224}),
        ("resample", "cubic"),
        ("center_crop", [224]),
        ("center_crop", [0, 224]),
        ("center_crop", "224"),
        ("rescale_factor", 0),
        ("rescale_factor", float("nan")),
        ("rescale_factor", "1/255"),
        ("mean", [0.5, 0.5]),
        ("mean", ["a", 0.5, 0.5]),
        ("std", [0.5, 0.0, 0.5]),
    ],
)
def test_bad_config_value_names_the_key(key, value):
    with pytest.raises(ManifestError, match=f"'{key}'"):
        ImagePreprocessor({**CLIP, key: value})


def test_bad_config_shape():
    with pytest.raises(ManifestError, match="unknown key"):
        ImagePreprocessor({**CLIP, "sizee": 3})
    with pytest.raises(ManifestError, match=r"lacks key\(s\) \['std'\]"):
        ImagePreprocessor({key: value for key, value in CLIP.items() if key != "std"})
    with pytest.raises(ManifestError, match="JSON object"):
        ImagePreprocessor([("resize", 224)])
    with pytest.raises(ManifestError, match="'center_crop' is null"):
        ImagePreprocessor({**CLIP, "center_crop": None})


# --- preprocess_config_from_hf -------------------------------------------------------------------
def test_config_from_default_clip(hf_clip, from_hf):
    config = from_hf(hf_clip())
    assert config == {**CLIP, "rescale_factor": 0.00392156862745098}
    json.dumps(config)


def test_config_from_plain_attributes(from_hf):
    processor = types.SimpleNamespace(
        do_resize=True, size={"height": 64, "width": 80, "shortest_edge": None}, resample=Image.Resampling.BOX,
        do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=np.float64(0.5),
        do_normalize=True, image_mean=0.5, image_std=(0.25, 0.5, 1.0), do_convert_rgb=True,
    )
    config = from_hf(processor)
    assert config["resize"] == {"height": 64, "width": 80} and config["resample"] == "box"
    assert config["mean"] == [0.5, 0.5, 0.5] and type(config["rescale_factor"]) is float
    json.dumps(config)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"do_resize": False}, "do_resize=False"),
        ({"size": {"shortest_edge": 224, "longest_edge": 300}}, "size="),
        ({"do_pad": True}, "do_pad=True"),
        ({"resample": 6}, "resample="),
        ({"crop_size": {"shortest_edge": 3}}, "crop_size="),
        ({"image_std": [1.0, 2.0]}, "image_std="),
        ({"image_std": [1.0, 0.0, 1.0]}, "'std'"),
    ],
)
def test_unrepresentable_hf_settings(hf_clip, from_hf, change, words):
    processor = hf_clip()
    for attribute, value in change.items():
        setattr(processor, attribute, value)
    with pytest.raises(ModelLoadError, match=words.replace("(", r"\(")):
        from_hf(processor)


def test_missing_attribute_is_named(from_hf):
    with pytest.raises(ModelLoadError, match="no attribute 'do_resize'"):
        from_hf(object())
