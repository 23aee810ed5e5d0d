"""Battery, images: files that are not usable pictures are refused with an ImageError naming the file and
what to do; odd but valid pictures (1x1, animated, 16-bit, CMYK, palette with transparency) are classified
exactly as their plain-RGB equivalent. Both through ``ZeroShotClassifier`` and ``mmedge run``.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmedge
from mmedge.cli import main
from mmedge.errors import ImageError
from tests.support.battery import api_error, cli_error

LABELS = ["cat", "dog", "car"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with a tiny broken data chunk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT",
                                                                 zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = Path(__file__).resolve().parents[2] / "export" / "data" / "images" / "holdout-chelsea.jpg"


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """A small real photo, 48x32 RGB."""
    with Image.open(PHOTO) as opened:
        return opened.convert("RGB").resize((48, 32))


@pytest.fixture(scope="module")
def classifier(clip_artifacts):
    with mmedge.load(clip_artifacts("fp32"), threads=1) as pipeline:
        yield pipeline


# --- refused: name -> (file bytes or a maker of the path, words the error must hold) --------------
def refused_files(picture: Image.Image) -> dict[str, bytes]:
    jpeg, png = encoded(picture, "JPEG", quality=90), encoded(picture, "PNG")
    return {
        "text.jpg": b"this is a shopping list, not a picture\n" * 10,
        "zero-bytes.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "random-bytes.png": np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "gif-header-only.gif": b"GIF89a",
        "bomb-20000x20000.png": png_header_only(20_000, 20_000),
        "bomb-9000x9000.png": png_header_only(9_000, 9_000),
        "aspect-1x100000.png": encoded(Image.new("L", (1, 100_000), 128), "PNG"),
    }


REFUSED = {
    "text.jpg": "is not an image PIL can read",
    "zero-bytes.png": "is empty (0 bytes)",
    "truncated.jpg": "truncated or corrupt",
    "truncated.png": "truncated or corrupt",
    "random-bytes.png": "is not an image PIL can read",
    "gif-header-only.gif": "is not an image PIL can read",
    "bomb-20000x20000.png": "decompression bomb",
    "bomb-9000x9000.png": "decompression bomb",
    "aspect-1x100000.png": "aspect ratio",
}


@pytest.fixture(scope="module")
def refused_dir(picture, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refused")
    for name, data in refused_files(picture).items():
        (folder / name).write_bytes(data)
    (folder / "a-folder.jpg").mkdir()
    return folder


@pytest.mark.parametrize("name", list(REFUSED))
def test_api_refuses_bad_image_file(classifier, refused_dir, name):
    path = refused_dir / name
    api_error(lambda: classifier(path, labels=LABELS), ImageError, name, REFUSED[name])
    # the same bytes in memory
    api_error(lambda: classifier(path.read_bytes(), labels=LABELS), ImageError, REFUSED[name])


@pytest.mark.parametrize("name", list(REFUSED))
def test_cli_refuses_bad_image_file(capsys, clip_artifacts, refused_dir, name):
    cli_error(capsys, ["run", clip_artifacts("fp32"), refused_dir / name, "--labels", *LABELS], ImageError, name,
              REFUSED[name])


@pytest.mark.parametrize("source,words", [
    ("a-folder.jpg", "is not a file"), ("missing.jpg", "does not exist"),
    ("https://example.com/cat.jpg", "URLs are not fetched"),
])
def test_paths_that_are_not_image_files(capsys, classifier, clip_artifacts, refused_dir, source, words):
    path = source if source.startswith("http") else refused_dir / source
    api_error(lambda: classifier(path, labels=LABELS), ImageError, words)
    cli_error(capsys, ["run", clip_artifacts("fp32"), path, "--labels", *LABELS], ImageError, words)


@pytest.mark.parametrize("source,words", [
    (np.zeros((3, 32, 48), np.uint8), "transpose"),
    (np.full((32, 48, 3), 256, np.uint16), "dtype uint16"),
    (np.full((32, 48, 3), 255.0, np.float32), "[0, 1]"),
    (np.zeros((0, 48, 3), np.uint8), "no pixels"),
    (b"", "is empty"),
    (io.StringIO("not binary"), "binary mode"),
    (12345, "cannot load an image from a int"),
])
def test_in_memory_sources_that_are_not_images(classifier, source, words):
    api_error(lambda: classifier(source, labels=LABELS), ImageError, words)


def test_one_bad_image_in_a_batch_names_it(classifier, refused_dir, photos):
    api_error(lambda: classifier([photos[0], refused_dir / "text.jpg"], labels=LABELS), ImageError, "text.jpg")


# --- odd but valid: classified like their plain RGB equivalent -----------------------------------
def handled_files(picture: Image.Image) -> dict[str, tuple[bytes, Image.Image]]:
    """name -> (encoded file, the RGB image it must be classified as)."""
    gray = picture.convert("L")
    frames = [picture, Image.new("RGB", picture.size, (255, 0, 0)), Image.new("RGB", picture.size, (0, 0, 255))]
    cmyk = encoded(picture.convert("CMYK"), "JPEG", quality=95)
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.getpixel((0, 0))
    rgba_pixels = np.asarray(palette.convert("RGBA")).copy()  # [height, width, 4]
    rgba_pixels[np.asarray(palette) == transparent] = 0
    rgba = Image.fromarray(rgba_pixels, "RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", picture.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return {
        "one-pixel.png": (encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
                          Image.new("RGB", (1, 1), (200, 30, 30))),
        "animated.gif": (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40),
                         Image.open(io.BytesIO(encoded(frames[0], "GIF"))).convert("RGB")),
        "sixteen-bit.png": (encoded(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"),
                            gray.convert("RGB")),
        "cmyk.jpg": (cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")),
        "palette-transparency.png": (encoded(palette, "PNG", transparency=transparent), on_white),
    }


@pytest.fixture(scope="module")
def handled(picture, tmp_path_factory) -> dict[str, tuple[Path, Image.Image]]:
    folder = tmp_path_factory.mktemp("handled")
    out = {}
    for name, (data, expected) in handled_files(picture).items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, expected)
    return out


@pytest.mark.parametrize("name",
                         ["one-pixel.png", "animated.gif", "sixteen-bit.png", "cmyk.jpg", "palette-transparency.png"])
def test_odd_but_valid_images_are_classified_as_their_rgb_equivalent(capsys, classifier, clip_artifacts, handled, name):
    path, expected = handled[name]
    got = classifier.probabilities(path, labels=LABELS)
    np.testing.assert_allclose(got, classifier.probabilities(expected, labels=LABELS), rtol=0, atol=1e-6)
    assert main(["run", str(clip_artifacts("fp32")), str(path), "--labels", *LABELS]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ") and out.count("(") == len(LABELS) and not err
