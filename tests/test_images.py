"""mmedge.images.load_image: every source, every PIL mode, every guard."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmedge.errors import ImageError, InputError
from mmedge.images import MAX_PIXELS, load_image

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    """A real photo, 300x451 RGB uint8."""
    return skimage_data.chelsea()


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """A real gray photo, 512x512 uint8."""
    return skimage_data.camera()


def _encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB, followed by a tiny, broken IDAT."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    broken_data = chunk(b"IDAT", zlib.compress(b"\0" * 64))  # 64 bytes where 400 MB would be needed
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + broken_data + chunk(b"IEND", b"")


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    """RGB pixels in row-major order."""
    return [tuple(int(v) for v in pixel) for pixel in np.asarray(image).reshape(-1, 3)]


# --- sources -------------------------------------------------------------------------------------
def test_every_source_kind_gives_the_same_rgb_pixels(tmp_path, chelsea):
    path = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    data = path.read_bytes()
    in_memory = [data, bytearray(data), memoryview(data), io.BytesIO(data), Image.fromarray(chelsea), chelsea]
    sources = [str(path), path, *in_memory]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (451, 300)
        np.testing.assert_array_equal(np.asarray(image), chelsea)


def test_open_binary_file_object(tmp_path, chelsea):
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(chelsea).save(path, quality=95)
    with open(path, "rb") as stream:
        assert load_image(stream).size == (451, 300)


def test_caller_pil_image_is_not_modified(chelsea):
    rgba = Image.fromarray(chelsea).convert("RGBA")
    load_image(rgba)
    assert rgba.mode == "RGBA"


def test_rgb_pil_image_is_used_as_it_is_and_other_modes_are_converted_copies(chelsea):
    """As transformers' ``convert_rgb``: an RGB image needs no conversion, so no copy of its pixels is made (nothing
    downstream writes to it); any other mode gives a new RGB image and leaves the caller's as it was."""
    rgb = Image.fromarray(chelsea)
    assert load_image(rgb) is rgb
    gray = rgb.convert("L")
    converted = load_image(gray)
    assert converted is not gray and converted.mode == "RGB" and gray.mode == "L"


def test_one_by_one_image_is_legal():
    png = _encoded(Image.new("L", (1, 1), 7), "PNG")
    for source in (Image.new("RGB", (1, 1), (1, 2, 3)), np.zeros((1, 1, 3), np.uint8), png):
        image = load_image(source)
        assert image.size == (1, 1) and image.mode == "RGB"


# --- modes ---------------------------------------------------------------------------------------
def _mode_image(chelsea: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(chelsea[:32, :48]).convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "YCbCr", "F", "RGBX", "HSV"])
def test_modes_without_alpha_convert_like_pil(chelsea, mode):
    source = _mode_image(chelsea, mode)
    image = load_image(source)
    assert image.mode == "RGB" and image.size == source.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_known_colours_of_simple_modes():
    assert load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(Image.new("1", (2, 2), 1)).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 1)) == (77, 77, 77)


def test_alpha_is_composited_onto_white():
    la = Image.merge("LA", (Image.new("L", (2, 1), 100), Image.frombytes("L", (2, 1), bytes([0, 255]))))
    assert _pixels(load_image(la)) == [(255, 255, 255), (100, 100, 100)]
    rgba = Image.frombytes("RGBA", (3, 1), bytes([10, 20, 30, 0, 10, 20, 30, 255, 0, 0, 0, 128]))
    half = round(127 / 255 * 255)  # black at alpha 128 over white
    assert _pixels(load_image(rgba)) == [(255, 255, 255), (10, 20, 30), (half, half, half)]


def test_palette_transparency_is_composited_onto_white(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    palette.info["transparency"] = 0
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)
    for source in (palette, path):
        assert _pixels(load_image(source)) == [(255, 255, 255), (200, 10, 10), (200, 10, 10), (255, 255, 255)]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P-transparency"])
def test_alpha_modes_match_hugging_face(chelsea, mode):
    transforms = pytest.importorskip("transformers.image_transforms")
    rgba = Image.fromarray(chelsea[:32, :48]).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((48, 32)))
    if mode == "P-transparency":
        source = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        source.info["transparency"] = 3
    else:
        source = rgba.convert(mode)
    expected = transforms.convert_to_rgb(source, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def test_rgba_array_matches_hugging_face_blend(chelsea):
    transforms = pytest.importorskip("transformers.image_transforms")
    alpha = np.linspace(0, 255, 48 * 32).reshape(32, 48, 1).astype(np.uint8)
    rgba = np.concatenate([chelsea[:32, :48], alpha], axis=2)  # [32, 48, 4]
    expected = transforms.convert_to_rgb(rgba, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), expected)


# --- 16-bit --------------------------------------------------------------------------------------
SIXTEEN = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = np.array([[0, 0, 1, 1, 128, 255]], dtype=np.uint8)  # round(v / 257)


def test_sixteen_bit_scales_by_257_not_clips():
    image = Image.fromarray(SIXTEEN)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(load_image(image))[..., 0], SIXTEEN_AS_8)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(SIXTEEN.astype(">u2"))))[..., 0], SIXTEEN_AS_8)


def test_sixteen_bit_png_file(tmp_path, camera):
    path = tmp_path / "camera16.png"
    Image.fromarray(camera.astype(np.uint16) * 257).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    image = load_image(path)
    np.testing.assert_array_equal(np.asarray(image)[..., 1], camera)  # not the all-white of PIL's clip


def test_thirty_two_bit_gray_is_read_as_sixteen_bit_and_clipped():
    values = np.array([[-5, 257, 65535, 70000]], dtype=np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(image))[..., 2], [[0, 1, 255, 255]])


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (64, 48), (257, 513)])
def test_sixteen_bit_mapping_equals_the_int64_formula(shape):
    """The uint32 arithmetic (a third of the int64 version's memory) gives round(v / 257) for every value."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    sixteen = rng.integers(0, 65536, shape, dtype=np.uint16)
    sixteen.flat[-1] = 65535
    thirty_two = rng.integers(-(2**31), 2**31 - 1, shape, dtype=np.int32)
    thirty_two.flat[-1] = 70000  # max > 255: read as 16-bit
    for values in (sixteen, sixteen.astype(">u2"), thirty_two):
        expected = (np.clip(values.astype(np.int64), 0, 65535) + 128) // 257  # the int64 formula it replaced
        np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(values)))[..., 0], expected)


def test_every_sixteen_bit_value_is_rounded():
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.round(every / 257).astype(np.uint8)  # v / 257 never ends in exactly .5
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(every)))[..., 1], expected)


def test_thirty_two_bit_gray_holding_eight_bit_values_is_taken_as_it_is(camera):
    """An "I" image with a maximum of at most 255 is 8-bit data in a 32-bit mode: not mapped by / 257 (black)."""
    expected = np.stack([camera] * 3, axis=2)
    for image in (Image.fromarray(camera).convert("I"), Image.fromarray(camera.astype(np.int32))):
        assert image.mode == "I"
        np.testing.assert_array_equal(np.asarray(load_image(image)), expected)
    negative = Image.fromarray(np.array([[-7, 0, 100, 255]], dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(load_image(negative))[..., 0], [[0, 0, 100, 255]])


def test_thirty_two_bit_tiff_holding_eight_bit_values(tmp_path, camera):
    path = tmp_path / "camera32.tif"
    Image.fromarray(camera).convert("I").save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], camera)


@pytest.mark.parametrize("maxval", [65535, 4095])
def test_sixteen_bit_pgm_file(tmp_path, camera, maxval):
    """PIL opens 16-bit PGM as "I", scaled to 0..65535: still mapped by / 257, not taken as 8-bit."""
    levels = np.round(camera.astype(np.float64) * maxval / 255).astype(">u2")  # [512, 512] big-endian, as PGM
    path = tmp_path / "camera16.pgm"
    path.write_bytes(b"P5\n512 512\n%d\n" % maxval + levels.tobytes())
    with Image.open(path) as opened:
        assert opened.mode == "I" and np.asarray(opened).max() == 65535
    np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], camera)


# --- numpy arrays --------------------------------------------------------------------------------
def test_gray_and_float_arrays(camera):
    np.testing.assert_array_equal(np.asarray(load_image(camera))[..., 0], camera)
    np.testing.assert_array_equal(np.asarray(load_image(camera[:, :, None]))[..., 2], camera)
    floats = np.array([[0.0, 0.5, 1.0, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(floats))[..., 0], [[0, 128, 255, 51]])  # round(v * 255)


def test_float_rgba_array_is_blended_then_rounded():
    rgba = np.array([[[1.0, 0.0, 0.0, 0.5]]], dtype=np.float64)
    assert load_image(rgba).getpixel((0, 0)) == (255, 128, 128)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_integer_arrays_in_eight_bit_range_are_taken_as_uint8(chelsea, dtype):
    """As HF's processors take them: int64 from arithmetic on a photo gives the photo's pixels, not black."""
    top = 127 if dtype == np.int8 else 255
    rgb = np.minimum(chelsea, top)
    np.testing.assert_array_equal(np.asarray(load_image(rgb.astype(dtype))), rgb)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(np.asarray(load_image(gray.astype(dtype)))[..., 1], gray)
    rgba = np.concatenate([rgb[:4, :5], np.full((4, 5, 1), top // 2, np.uint8)], axis=2)  # [4, 5, 4]
    np.testing.assert_array_equal(np.asarray(load_image(rgba.astype(dtype))), np.asarray(load_image(rgba)))


def test_int64_array_matches_hugging_face(chelsea):
    transforms = pytest.importorskip("transformers.image_transforms")
    rgba = np.concatenate([chelsea[:32, :48], np.full((32, 48, 1), 100, np.uint8)], axis=2).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), transforms.convert_to_rgb(rgba, return_numpy=True))


@pytest.mark.parametrize(
    "values, found",
    [(np.array([[0, 65535]], np.uint16), "uint16 with values in [0, 65535]"),
     (np.array([[-1, 200]], np.int64), "int64 with values in [-1, 200]"),
     (np.array([[0, 256]], np.int32), "int32 with values in [0, 256]")],
)
def test_integer_arrays_outside_eight_bit_range_are_refused(values, found):
    with pytest.raises(ImageError, match="image array has dtype") as info:
        load_image(values)
    message = str(info.value)
    assert found in message and "0..255 (taken as they are" in message
    assert "(a / 257).round().astype(np.uint8)" in message


def test_bool_array_is_refused_with_a_fix_for_masks():
    with pytest.raises(ImageError, match="dtype bool") as info:
        load_image(np.ones((4, 4), bool))
    assert "a.astype(np.uint8) * 255" in str(info.value) and "/ 257" not in str(info.value)


def test_non_contiguous_array(chelsea):
    view = chelsea[::2, ::3]
    np.testing.assert_array_equal(np.asarray(load_image(view)), view)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((3, 20, 30), np.uint8), "transpose"),
        (np.zeros((20, 30, 2), np.uint8), "shape"),
        (np.zeros((2, 20, 30, 3), np.uint8), "is a batch of images: pass list(a)"),
        (np.zeros((0, 30, 3), np.uint8), "no pixels"),
        (np.full((20, 30, 3), 256, np.uint16), "dtype uint16"),
        (np.zeros((20, 30), bool), "dtype bool"),
        (np.zeros((20, 30), np.complex64), "dtype complex64"),
        (np.full((20, 30, 3), 2.0, np.float32), "[0, 1]"),
        (np.full((20, 30), np.nan), "[0, 1]"),
    ],
)
def test_bad_arrays_are_refused(array, words):
    with pytest.raises(ImageError, match="image array") as info:
        load_image(array)
    assert words in str(info.value)


# --- animation and orientation -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_first_frame(fmt):
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.n_frames == 3
    assert load_image(data).getpixel((3, 3)) == (255, 0, 0)


def test_exif_orientation_applied_to_files_not_to_pil_images(tmp_path):
    picture = Image.new("RGB", (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    picture.save(path, exif=exif, quality=95)
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        upright = load_image(source)
        assert upright.size == (20, 40)
        assert upright.getpixel((10, 5))[0] > 200  # the red half is on top after rotation
    with Image.open(path) as opened:  # the HF processors take PIL images as they are
        assert load_image(opened).size == (40, 20)


# --- guards --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)


def test_a_base64_data_uri_is_decoded_as_transformers_load_image_does(tmp_path, chelsea):
    import base64

    encoded = base64.b64encode(_encoded(Image.fromarray(chelsea), "PNG")).decode()
    for uri in (f"data:image/png;base64,{encoded}", f"DATA:application/octet-stream;BASE64,{encoded}"):
        np.testing.assert_array_equal(np.asarray(load_image(uri)), chelsea)
    with pytest.raises(ImageError, match=r"the image data URI holds invalid base64 data"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match=r"the image data URI is not a base64 image data URI \(data:text/plain\)"):
        load_image(f"data:text/plain,{encoded}")


def test_base64_text_given_as_a_path_is_named_without_filling_the_message(chelsea):
    import base64

    text = base64.b64encode(_encoded(Image.fromarray(chelsea), "PNG")).decode()  # ~250 KB
    with pytest.raises(ImageError, match="does not exist") as info:
        load_image(text)
    message = str(info.value)
    assert len(message) < 500 and f"({len(text):,} characters)" in message
    assert "looks like base64 image data: pass base64.b64decode(text), or a data URI" in message


def test_a_list_where_one_image_goes_asks_for_one_flat_list_or_an_array(chelsea):
    with pytest.raises(ImageError, match=r"from a list where one image goes; .*a batch is one flat list of them"):
        load_image([chelsea, chelsea])
    with pytest.raises(ImageError, match=r"from a list of numbers; .*fix: pass np.asarray\(pixels, np.uint8\)"):
        load_image(chelsea[:4, :4].tolist())
    with pytest.raises(ImageError, match="does not exist") as info:  # a long path is not taken for base64
        load_image("/data/" + "x" * 300)
    assert "base64" not in str(info.value) and "check the path" in str(info.value)


def test_url_is_not_fetched():
    with pytest.raises(ImageError, match="URLs are not fetched"):
        load_image("https://example.com/cat.jpg")


def test_folder_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)


def test_zero_byte_file_and_empty_bytes(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png' is empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="image data is empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="is empty"):
        load_image(io.BytesIO())


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for source in (text, noise):
        with pytest.raises(ImageError, match="is not an image PIL can read"):
            load_image(source)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_detected_by_full_decode(tmp_path, chelsea, fmt):
    data = _encoded(Image.fromarray(chelsea), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(path)
    assert "cut." in str(info.value)


def test_text_mode_stream_is_refused(tmp_path):
    with pytest.raises(ImageError, match="binary mode"):
        load_image(io.StringIO("abc"))
    path = tmp_path / "scene.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    with open(path) as text_mode, pytest.raises(ImageError, match="binary mode"):  # not a UnicodeDecodeError
        load_image(text_mode)


def test_unsupported_object_type():
    with pytest.raises(ImageError, match="cannot load an image from a int"):
        load_image(123)


def test_image_error_is_an_input_error():
    assert issubclass(ImageError, InputError)


@pytest.mark.parametrize("width, height", [(8_500, 8_500), (10_000, 10_000), (20_000, 20_000)])
def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch, width, height):
    # 72 MP: only mmedge's limit; 100 MP: PIL's DecompressionBombWarning; 400 MP: PIL's DecompressionBombError.
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or Image.Image.load(self))
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    filters_before, limit_before = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    pil_warns = Image.MAX_IMAGE_PIXELS < width * height <= 2 * Image.MAX_IMAGE_PIXELS  # PIL's own, left to the caller
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError, match="decompression bomb") as info, \
                (pytest.warns(Image.DecompressionBombWarning) if pil_warns else contextlib.nullcontext()):
            load_image(source)
        assert f"at most {MAX_PIXELS:,} pixels" in str(info.value)
    assert decoded == []
    assert warnings.filters == filters_before and Image.MAX_IMAGE_PIXELS == limit_before


def test_lazy_pil_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(8_500, 8_500))
    with Image.open(path) as lazy, pytest.raises(ImageError, match="8500x8500 = 72,250,000 pixels"):
        load_image(lazy)


def test_threads_may_share_one_lazily_opened_image(tmp_path):
    """PIL decodes an `Image.open` image on first use, unsafely in parallel: threads sharing one failed about one call
    in nine with "could not be decoded" (a valid image). Every call now gets the same pixels."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path, quality=90)
    expected = np.asarray(load_image(str(path)))
    with ThreadPoolExecutor(8) as pool:
        for _ in range(30):
            shared = Image.open(path)  # lazy: decoded by whichever call comes first
            results = list(pool.map(lambda _: np.asarray(load_image(shared)), range(8)))
            assert all(np.array_equal(result, expected) for result in results)


def test_array_over_the_pixel_limit_is_refused_as_every_source_is():
    """An array of 81 MP was taken (a file of that size is refused): the limit holds for arrays too, before their
    values are scanned (a view of one value: no memory)."""
    huge = np.broadcast_to(np.zeros((1, 1), np.uint8), (9_000, 9_000))
    with pytest.raises(ImageError, match=f"9000x9000 = 81,000,000 pixels; expected at most {MAX_PIXELS:,}"):
        load_image(huge)


def test_closed_and_spent_streams_say_so(tmp_path):
    """A closed file raised a bare ValueError ("read of closed file"); one already read to its end was "empty (0
    bytes)"."""
    path = tmp_path / "scene.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    with open(path, "rb") as stream:
        pass
    with pytest.raises(ImageError, match=r"is closed; expected an open binary stream; fix: open the file again"):
        load_image(stream)
    with open(path, "rb") as stream:
        load_image(stream)
        with pytest.raises(ImageError, match=r"is at its end \(position \d+\).*fix: call seek\(0\) on it first"):
            load_image(stream)
        stream.seek(0)
        assert load_image(stream).size == (4, 4)


@pytest.mark.parametrize("images", [(i for i in [np.zeros((2, 2), np.uint8)]), {np.uint8(0)}],
                         ids=["generator", "set"])
def test_a_collection_of_images_where_one_goes_asks_for_a_list(images):
    with pytest.raises(ImageError, match=r"from a (generator|set); expected one image .*, or a list of them; "
                                         r"fix: pass a list"):
        load_image(images)


def test_a_tensor_is_not_taken_for_a_batch():
    """A torch / cupy / jax tensor has __iter__ too: "pass a list: list(images)" split a [3, H, W] tensor into its
    channel planes. It is told how to make the channels-last numpy array mmedge takes."""
    class Tensor:  # what torch.Tensor and cupy.ndarray have: __array__ / __dlpack__ and __iter__
        def __array__(self, dtype=None, copy=None):
            return np.zeros((3, 4, 4), np.float32)

        def __iter__(self):
            return iter(np.zeros((3, 4, 4), np.float32))

    with pytest.raises(ImageError, match=r"from a Tensor; expected a numpy array .*channels last.*fix: pass a "
                                         r"channels-last numpy array, e\.g\. np\.asarray"):
        load_image(Tensor())


def test_decoding_leaves_the_process_warning_filters_alone(tmp_path):
    """A filter another thread adds while images decode stays, and an application's once-only warning is shown
    once: a catch_warnings around every decode swapped the process-wide list (filters lost, the once registry
    reset)."""
    path = tmp_path / "small.png"
    Image.new("RGB", (8, 8), "red").save(path)
    stop, added = threading.Event(), []

    def decode():
        while not stop.is_set():
            load_image(path)

    worker = threading.Thread(target=decode)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("once")
        worker.start()
        try:
            for index in range(2000):
                warnings.filterwarnings("ignore", message=f"filter-{index}")
                added.append(f"filter-{index}")
            for _ in range(2000):
                warnings.warn("the application's own warning", UserWarning)
        finally:
            stop.set()
            worker.join()
        kept = {f[1].pattern for f in warnings.filters if f[1] is not None}
    assert set(added) <= kept
    assert [str(w.message) for w in seen] == ["the application's own warning"]
