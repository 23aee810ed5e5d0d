"""Load anything that holds a picture into an 8-bit RGB ``PIL.Image``, or fail with an ``ImageError``.

Accepted sources: a path (``str`` / ``os.PathLike``), a base64 data URI string (``data:image/png;base64,...``, as
``transformers.image_utils.load_image`` takes), ``bytes``, a binary file-like object, a
``PIL.Image.Image``, or a numpy array (``[H, W]`` gray, ``[H, W, 1|3|4]`` gray / RGB / RGBA;
``uint8``, any integer dtype with every value in ``0..255``, or floating point in ``[0, 1]``).

The conversion rules follow the Hugging Face image processors (transformers 5), so that what the
device feeds a model is what the model was evaluated with:

* Encoded images (paths, bytes, streams) get their EXIF orientation applied, as
  ``transformers.image_utils.load_image`` does (``ImageOps.exif_transpose``). PIL images and arrays
  are taken as they are, as the processors take them.
* Images with transparency (an ``A`` band, or ``info["transparency"]`` as in ``P``/``L``/``RGB``
  PNGs and GIFs) are composited onto white, exactly as
  ``transformers.image_transforms.convert_to_rgb`` does (PIL ``alpha_composite`` for PIL images,
  its float64 blend + round for RGBA arrays). Plain ``convert("RGB")`` would instead expose whatever
  colour hides under transparent pixels. (HF's ``load_image(path)`` itself drops alpha with
  ``convert("RGB")`` before the processor sees it; mmedge applies the processor's rule to every
  source, so a path and ``Image.open`` of that path get the same transparency handling; their pixels
  still differ where the file has an EXIF orientation other than 1, as in HF, since only the path
  is rotated.)
* 16-bit and 32-bit gray (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) are read as 16-bit
  values (``I`` clipped to ``[0, 65535]``) and mapped to 8 bits by ``round(value / 257)``, so
  65535 becomes 255. PIL's own ``convert`` (and so HF) clips these to 255 instead, which turns
  almost every 16-bit image white. Their ``tRNS`` transparency, if any, is ignored.
  Exception: an ``I`` image whose maximum is at most 255 holds 8-bit values in a 32-bit mode
  (``L.convert("I")``, ``Image.fromarray`` of an int32 array); its values are taken as they are
  (negatives as 0). A true 16-bit image that dark would be black either way (at most 1 after
  ``/ 257``). 16-bit PGM files open as ``I`` scaled to ``0..65535`` by PIL, so they are mapped
  by ``/ 257`` unless the picture itself is that dark.
* Every other mode (``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``, ``F``, ...) uses PIL's ``convert("RGB")``,
  as HF does (``F`` is read on a 0..255 scale by PIL).
* Float arrays in ``[0, 1]`` become ``uint8`` by ``round(value * 255)`` (transformers' processors instead rescale a
  float array by 1/255 a second time, with a warning that it looks rescaled already: their pixels come out near -1.8,
  so mmedge's differ from theirs, on purpose); integer arrays holding
  ``0..255`` (e.g. ``int64`` from arithmetic) become ``uint8`` unchanged, as HF's processors
  take them. Other integer ranges (16-bit data) and ``bool`` arrays are refused.
* Animated files (GIF, APNG, WebP): the first frame.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmedge.errors import ImageError

MAX_PIXELS = 64_000_000
"""Images with more pixels than this are refused before they are decoded (decompression bombs); arrays too."""

ANY_BYTES = ("application/octet-stream",)  # FileReader.readAsDataURL's type for a file it cannot name
ASCII_WHITESPACE = b"\t\n\f\r "  # line breaks of wrapped base64, dropped as WHATWG's forgiving base64 does
BASE64_CHUNK = 1 << 20  # base64 characters decoded per call (~2 ms; a multiple of 4)
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/\s]+=*\s*")  # a string given as a path that is base64 data instead
LONGEST_SHOWN = 200  # characters of a path shown in a message
_WHITE = (255, 255, 255, 255)
_FIX_READABLE = "pass a complete PNG, JPEG, GIF, WebP, BMP or TIFF file, or a PIL image or numpy array"


def load_image(source: Any) -> Image.Image:
    """Return ``source`` as a decoded ``PIL.Image`` in mode ``"RGB"``.

    Raises ``ImageError`` for a missing, empty, unreadable, truncated or oversized file, an
    unsupported object, or an array of the wrong shape, dtype or value range.
    """
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "the PIL image")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, str) and source[:5].lower() == "data:":
        return _decode_bytes(data_uri_bytes(source), "the image data URI")
    if isinstance(source, (str, os.PathLike)):
        path = checked_image_path(source)
        return _decode(path, f"image file '{path}'")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "image data")
    if hasattr(source, "read"):
        name = f"image stream '{getattr(source, 'name', type(source).__name__)}'"
        return _decode_bytes(_read_stream(source, name), name)
    if hasattr(source, "__array__") or hasattr(source, "__dlpack__"):  # a torch / cupy / jax tensor: not a batch
        raise ImageError(f"cannot load an image from a {type(source).__name__}",
                         "a numpy array [H, W] or [H, W, 1|3|4] (channels last), or a path, bytes, a binary file "
                         "object or a PIL.Image.Image", "pass a channels-last numpy array, e.g. "
                         "np.asarray(tensor.cpu()).transpose(1, 2, 0) for a [3, H, W] tensor")
    if isinstance(source, (list, tuple)):  # a batch's item that is a list itself: a batch in a batch, or pixels
        if _holds_numbers(source):
            raise ImageError(f"cannot load an image from a {type(source).__name__} of numbers",
                             "a numpy array [H, W] or [H, W, 1|3|4] for pixels", "pass np.asarray(pixels, np.uint8)")
        raise ImageError(f"cannot load an image from a {type(source).__name__} where one image goes",
                         "one image (a path, bytes, a binary file object, a PIL.Image.Image or a numpy array); a batch "
                         "is one flat list of them", "pass one flat list, e.g. [image for group in groups for image "
                         "in group]")
    if hasattr(source, "__iter__"):  # a generator, set or dict of images where one image (or a list) goes
        raise ImageError(f"cannot load an image from a {type(source).__name__}",
                         "one image (a path, bytes, a binary file object, a PIL.Image.Image or a numpy array), or a "
                         "list of them", "pass a list: list(images)")
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}",
        "a path, bytes, a binary file object, a PIL.Image.Image or a numpy array",
        "pass one of those",
    )


# --- encoded sources -----------------------------------------------------------------------------
def data_uri_bytes(url: str, subject: str = "the image data URI") -> bytes:
    """The bytes of a base64 data URI (RFC 2397), as browsers and ``transformers.image_utils.load_image`` take images
    in text: its media type and ``base64`` in any case; ``image/*``, or
    ``application/octet-stream`` as a browser's FileReader writes for a file of unknown type (the bytes are sniffed
    either way); the base64 possibly line-wrapped (``base64`` without ``-w0``, ``base64.encodebytes``)."""
    header, comma, payload = url.partition(",")
    media = [part.strip().lower() for part in header[len("data:"):].split(";")]
    if not comma or "base64" not in media[1:] or not (media[0].startswith("image/") or media[0] in ANY_BYTES):
        raise ImageError(f"{subject} is not a base64 image data URI ({header[:40]})", "data:image/<format>;base64,"
                         "<data>", "encode the file with base64 and prefix it with that header")
    try:
        data = _base64(payload)
    except (binascii.Error, ValueError):  # UnicodeEncodeError, for a character past ASCII, is a ValueError
        raise ImageError(f"{subject} holds invalid base64 data", "standard base64 (A-Z, a-z, 0-9, +, /, = padding)",
                         "encode the image bytes with base64 (not URL-safe base64)") from None
    if not data:
        raise ImageError(f"{subject} holds an empty image", "the bytes of a PNG, JPEG, WebP, GIF, BMP or TIFF file",
                         "send a non-empty image")
    return data


def _base64(payload: str) -> bytes:
    """Standard base64, possibly line-wrapped, decoded strictly (the alphabet only, '=' padding only at the end).

    Cheap for a large image: a regex stripping whitespace took 0.3 s over a 26 MB data URI, so whitespace is looked
    for first (a fast scan) and only a wrapped payload is copied without it; and the decoding goes in chunks, as
    binascii holds the GIL while it decodes: one call over the whole image stalled the event loop's thread for ~80 ms
    even from a worker thread."""
    data = payload.encode("ascii")  # UnicodeEncodeError (a ValueError) for a character past ASCII
    if any(space in data for space in ASCII_WHITESPACE):
        data = data.translate(None, ASCII_WHITESPACE)
    if data.find(b"=", 0, len(data) - 2) != -1:  # padding before the end: checked here, as a chunk may end there
        raise binascii.Error("padding before the end of the data")
    return b"".join(base64.b64decode(data[start:start + BASE64_CHUNK], validate=True)
                    for start in range(0, len(data), BASE64_CHUNK))


def checked_image_path(source: str | os.PathLike) -> str:
    """Return the path as a string after checking that it names a non-empty file."""
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    shown = _shortened(path)
    if not os.path.exists(path):
        if path.startswith(("http://", "https://")):
            fix = "download the image first; URLs are not fetched"
        elif _looks_like_base64(path):
            fix = ("this looks like base64 image data: pass base64.b64decode(text), or a data URI "
                   "(data:image/png;base64,...)")
        else:
            fix = "check the path"
        raise ImageError(f"image file '{shown}' does not exist", "a path to an existing image file", fix)
    if not os.path.isfile(path):
        raise ImageError(f"'{shown}' is not a file", "a path to an image file", "pass the path of a file, not a folder")
    if os.path.getsize(path) == 0:
        raise ImageError(f"image file '{shown}' is empty (0 bytes)", "an encoded image", "re-save or download it again")
    return path


def _holds_numbers(items) -> bool:
    """Whether a (nested) list's first leaf is a number: pixels as lists (``array.tolist()``)."""
    while isinstance(items, (list, tuple)) and items:
        items = items[0]
    return isinstance(items, (int, float, np.number)) and not isinstance(items, bool)


def _looks_like_base64(text: str) -> bool:
    """A string given as a path that is base64 image data instead: long, of the base64 alphabet only, whole groups
    of four, and not a path of extension-less folders (a JPEG's base64 starts with "/9j/", a PNG's with "iVBOR")."""
    squeezed = "".join(text.split())
    return (len(squeezed) > LONGEST_SHOWN and len(squeezed) % 4 == 0 and BASE64_TEXT.fullmatch(text) is not None
            and (not squeezed.startswith("/") or squeezed.startswith("/9j/")))


def _shortened(text: str) -> str:
    """``text`` up to ``LONGEST_SHOWN`` characters for a message, then how long it is (a 16 KB base64 string given as
    a path filled the message)."""
    if len(text) <= LONGEST_SHOWN:
        return text
    return f"{text[:LONGEST_SHOWN - 40]}... ({len(text):,} characters)"


def _read_stream(stream: Any, name: str) -> bytes:
    """Read a file-like object to its end; it must be open, yield bytes, and not be at its end already."""
    if getattr(stream, "closed", False):
        raise ImageError(f"{name} is closed", "an open binary stream", "open the file again, or pass its path")
    if isinstance(stream, io.TextIOBase):  # reading an image through a text stream fails on its first non-UTF-8 byte
        data = ""
    else:
        data = stream.read()
    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(
            f"{name} returned {type(data).__name__}, not bytes",
            "a binary stream",
            "open the file in binary mode ('rb')",
        )
    if not data and (position := _position(stream)):
        raise ImageError(f"{name} is at its end (position {position:,}): it was read before",
                         "a stream at the start of the image", "call seek(0) on it first, or pass the path")
    return bytes(data)


def _position(stream: Any) -> int:
    """The stream's position (0 where it cannot tell)."""
    try:
        return int(stream.tell())
    except (AttributeError, OSError, ValueError, TypeError):
        return 0


def _decode_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an in-memory encoded image."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes)", "an encoded image", "check where the data came from")
    return _decode(io.BytesIO(data), name)


def _decode(fp: str | io.BytesIO, name: str) -> Image.Image:
    """Open, size-check, fully decode, orient and convert an encoded image."""
    try:
        # the process's warning filters as the caller has them: PIL warns of an image past ~89 MP (an error where
        # the caller makes warnings errors) and raises past ~179 MP, both over MAX_PIXELS and refused alike (a
        # catch_warnings here swapped the process-wide filter list on every decode)
        with Image.open(fp) as opened:
            _check_pixels(opened.size, name)  # from the header, before any pixel is decoded
            opened.load()  # first frame only; raises on truncated or corrupt data
            image = ImageOps.exif_transpose(opened)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(name, str(exc).rstrip(".")) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name} is not an image PIL can read", "an encoded image", _FIX_READABLE) from exc
    except Exception as exc:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(
            f"{name} could not be decoded, it is truncated or corrupt ({type(exc).__name__}: {exc})",
            "a complete, valid image file",
            "re-save or re-download the file",
        ) from exc
    return _to_rgb(image, name)


# --- in-memory sources ---------------------------------------------------------------------------
_LOAD_LOCKS = [threading.Lock() for _ in range(64)]  # by id(image): PIL decodes a lazy image unsafely in parallel


def _pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Decode a caller's PIL image if it is still lazy (``Image.open``: decoded in place, as PIL does, one thread at
    a time per image, so threads may share one) and convert it; its pixels and mode are not changed."""
    if image.width == 0 or image.height == 0:
        size = f"{image.width}x{image.height}"
        raise ImageError(f"{name} has no pixels (size {size})", "at least 1x1 pixels", "pass a non-empty image")
    _check_pixels(image.size, name)
    try:
        with _LOAD_LOCKS[id(image) % len(_LOAD_LOCKS)]:
            image.load()
    except Exception as exc:
        raise ImageError(
            f"{name} could not be decoded ({type(exc).__name__}: {exc})", "a complete, valid image", "re-open the file"
        ) from exc
    return _to_rgb(image, name)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """Convert a checked ``[H, W]`` / ``[H, W, 1|3|4]`` array: integers in 0..255, or floats in [0, 1]."""
    _check_array(array)
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        array = array.astype(np.uint8)  # every value checked to be in 0..255: lossless
    pixels = array if array.ndim == 3 else array[:, :, None]  # [height, width, channels]
    if np.issubdtype(pixels.dtype, np.floating) and pixels.shape[2] != 4:
        pixels = _float_to_uint8(pixels)
    if pixels.shape[2] == 4:
        pixels = _composite_array_on_white(pixels)  # [height, width, 3] uint8
    if pixels.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0])).convert("RGB")  # uint8 [H, W] -> "L"
    return Image.fromarray(np.ascontiguousarray(pixels))  # uint8 [H, W, 3] -> "RGB"


def _check_array(array: np.ndarray) -> None:
    """Refuse arrays whose shape, dtype or values are not an image's."""
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not shape_ok:
        channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4)
        if channels_first:
            fix = "transpose a channels-first array with a.transpose(1, 2, 0)"
        elif array.ndim == 4:
            fix = "a [N, H, W, C] array is a batch of images: pass list(a), one array per image"
        else:
            fix = "reshape the array"
        expected = "[H, W] gray or [H, W, C] with C in 1, 3, 4 (channels last)"
        raise ImageError(f"image array has shape {array.shape}", expected, fix)
    if array.shape[0] == 0 or array.shape[1] == 0:
        what = f"image array has shape {array.shape} with no pixels"
        raise ImageError(what, "height and width of at least 1", "pass a non-empty array")
    height, width = array.shape[:2]
    if width * height > MAX_PIXELS:  # as for every other source, and before the values are scanned
        raise ImageError(f"image array has {width}x{height} = {width * height:,} pixels", f"at most {MAX_PIXELS:,} "
                         "pixels, as for every image source", "downscale the image before passing it")
    if array.dtype == np.uint8:
        return
    if array.dtype == np.bool_:
        raise ImageError(
            "image array has dtype bool",
            "uint8 or integers in 0..255, or floating point in [0, 1]",
            "convert a mask to black and white with a.astype(np.uint8) * 255",
        )
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(np.min(array)), int(np.max(array))
        if low < 0 or high > 255:
            raise ImageError(
                f"image array has dtype {array.dtype} with values in [{low}, {high}]",
                "integers in 0..255 (taken as they are, as uint8), or floating point in [0, 1]",
                "map 16-bit data (0..65535) to 8 bits with (a / 257).round().astype(np.uint8); "
                "scale other ranges to 0..255 first",
            )
        return
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(
            f"image array has dtype {array.dtype}",
            "uint8 or integers in 0..255, or floating point in [0, 1]",
            "convert it to uint8 (0..255) or float (0..1)",
        )
    low, high = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
        raise ImageError(
            f"float image array has values in [{low}, {high}]",
            "finite values in [0, 1]",
            "divide 0..255 data by 255, or pass it as uint8",
        )


def _float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map [0, 1] floats to uint8 by rounding to the nearest level."""
    return np.rint(pixels.astype(np.float64) * 255.0).astype(np.uint8)


def _composite_array_on_white(pixels: np.ndarray) -> np.ndarray:
    """Blend an RGBA array onto white with ``transformers.image_transforms.convert_to_rgb``'s formula."""
    white = 255.0 if pixels.dtype == np.uint8 else 1.0
    alpha = pixels[:, :, 3:4] / white  # [height, width, 1] float64
    composite = alpha * pixels[:, :, :3] + (1.0 - alpha) * white  # [height, width, 3] float64
    if pixels.dtype == np.uint8:
        return np.round(composite).astype(np.uint8)
    return _float_to_uint8(composite)


# --- shared --------------------------------------------------------------------------------------
def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse images over MAX_PIXELS, from the size alone."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise _too_large(name, f"{width}x{height} = {width * height:,} pixels")


def _too_large(name: str, detail: str) -> ImageError:
    """The error for an image too large to decode safely."""
    return ImageError(
        f"{name} is too large to decode safely ({detail}); possible decompression bomb",
        f"at most {MAX_PIXELS:,} pixels",
        "downscale the image before passing it",
    )


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    try:
        if image.mode == "I" or image.mode.startswith("I;16"):
            return _sixteen_bit_to_gray(image).convert("RGB")
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        # already RGB: the image itself (nothing downstream writes to it; a copy costs 0.2 ms per 512x512 photo)
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:  # ValueError for unsupported modes; TypeError for malformed info["transparency"]; ...
        raise ImageError(
            f"{name} has mode '{image.mode}', which PIL cannot convert to RGB ({exc})",
            "a mode such as RGB, RGBA, L, LA, P, CMYK, YCbCr, 1, I;16, I or F",
            "convert the image to RGB first",
        ) from exc


def _has_alpha(image: Image.Image) -> bool:
    """Transparency test of ``transformers.image_transforms.convert_to_rgb``."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    """Map 16-bit (or 32-bit, clipped to 16-bit) gray to 8-bit ``L`` with ``round(v / 257)``; an ``I`` image with
    a maximum of at most 255 holds 8-bit values, taken as they are.

    One uint32 buffer (4 bytes a pixel), worked in place: ``np.clip`` casts into it chunk by chunk.
    """
    values = np.asarray(image)  # [height, width] uint16 (I;16*, either byte order) or int32 (I)
    if image.mode == "I" and values.max() <= 255:  # e.g. L.convert("I"), Image.fromarray(int32 array)
        return Image.fromarray(np.clip(values, 0, 255, out=np.empty(values.shape, np.uint8), casting="unsafe"))
    wide = np.clip(values, 0, 65535, out=np.empty(values.shape, np.uint32), casting="unsafe")  # [height, width]
    wide += 128
    wide //= 257  # (v + 128) // 257 == round(v / 257) for every integer v: v / 257 is never exactly k + 0.5
    return Image.fromarray(wide.astype(np.uint8))  # uint8 [H, W] -> "L"
