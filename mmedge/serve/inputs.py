"""Reading a request: its JSON body (size-capped), typed fields, and images given as data URIs (or, where the operator
allows a folder, as file paths). Every refusal is an ``ApiError`` naming the field (``param``).

Statuses: a body over the cap is 413; a body that is not JSON, or a value mmedge refuses (an image that does not
decode, too many pixels or images, a number out of range) is 400; a missing field, a field of the wrong JSON type or
an unknown field is 422.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from PIL import Image, UnidentifiedImageError

from mmedge.errors import ImageError
from mmedge.images import data_uri_bytes, load_image
from mmedge.serve.errors import ApiError, invalid
from mmedge.serve.options import ServeOptions

KINDS = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "list": (list,),
         "object": (dict,)}
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # https://, file://, ftp://, in any case
ARTICLE = {"integer": "an integer", "object": "a JSON object", "list": "a JSON list", "boolean": "true or false"}


async def read_body(request, max_bytes: int) -> bytes:
    """The body's bytes; 413 past ``max_bytes`` (from Content-Length, or while reading a chunked body)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(int(length), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    """The body as a JSON object (tens of ms for a body of large images: the server calls this in a worker thread)."""
    if not body.strip():
        raise invalid("the request body is empty", "a JSON object", "send the request as JSON, e.g. {\"model\": ...}",
                      None, code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise invalid(f"the request body is not valid JSON ({detail})", "a JSON object in UTF-8",
                      "check the quoting and commas of the body", None, code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body is {json_kind(data)}", "a JSON object",
                      "send an object such as {\"model\": ..., ...}", None, 422, "invalid_type")
    return data


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: "null", "a JSON list", "a JSON string", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "JSON " + json.dumps(value)
    kinds = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
    return "a JSON " + kinds.get(type(value), type(value).__name__)


def _too_large(size: int, cap: int) -> ApiError:
    return ApiError(413, f"the request body has {size:,} bytes or more",
                    f"at most {cap:,} bytes (this server's --max-body-mb)",
                    "send smaller or fewer images", code="body_too_large")


def check_fields(data: dict, allowed: tuple[str, ...], where: str = "") -> None:
    """422 for a field this endpoint does not know (a misspelt ``max_token`` would otherwise be ignored)."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise invalid(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(repr(where + u) for u in unknown)}",
                      f"fields among {', '.join(allowed)}", "remove or rename them", where + unknown[0], 422,
                      "unknown_field")


def field(data: dict, name: str, kind: str, *, required: bool = False, default: Any = None, where: str = "") -> Any:
    """``data[name]`` checked to be of JSON ``kind`` ('string', 'integer', 'number', 'boolean', 'list', 'object');
    ``default`` when absent or null, 422 when required and absent or of another kind."""
    param = where + name
    value = data.get(name)
    if value is None:
        if required:
            raise invalid(f"field '{param}' is missing", f"{_article(kind)}", f"add \"{name}\" to the request", param,
                          422, "missing_field")
        return default
    return typed(value, kind, param)


def typed(value: Any, kind: str, param: str) -> Any:
    """``value`` if it is of JSON ``kind``, else 422 naming ``param``; a number must be finite (Python's JSON reader
    takes NaN and Infinity, which JSON has not)."""
    if not isinstance(value, KINDS[kind]) or (isinstance(value, bool) and kind != "boolean"):
        shown = f"a JSON {type(value).__name__}" if isinstance(value, (dict, list)) else json.dumps(value)[:40]
        raise invalid(f"field '{param}' is {shown}", _article(kind), f"send {param} as {_article(kind)}", param, 422,
                      "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"field '{param}' is {value}", "a finite number", f"send {param} as a finite number", param)
    return value


def _article(kind: str) -> str:
    return ARTICLE.get(kind, f"a {kind}")


def bounded(data: dict, name: str, kind: str, low: float, high: float, default: Any = None, where: str = "") -> Any:
    """A number field within ``[low, high]`` (400 outside)."""
    value = field(data, name, kind, default=default, where=where)
    if value is not None and not low <= value <= high:
        shown = (lambda bound: f"{bound:g}") if kind == "number" else str
        raise invalid(f"field '{where + name}' is {value}", f"a value from {shown(low)} to {shown(high)}",
                      f"pass {name} within that range", where + name)
    return value


def strings(data: dict, name: str, *, required: bool = False, where: str = "") -> list[str] | None:
    """A field holding a string or a list of strings, as a list."""
    value = data.get(name)
    if isinstance(value, str):
        return [value]
    if value is not None and not isinstance(value, list):
        param = where + name
        shown = "a JSON object" if isinstance(value, dict) else json.dumps(value)[:40]
        raise invalid(f"field '{param}' is {shown}", "a string or a list of strings",
                      f"send {param} as a string or a list of strings", param, 422, "invalid_type")
    items = field(data, name, "list", required=required, where=where)
    for index, item in enumerate(items or []):
        typed(item, "string", f"{where}{name}[{index}]")
    return items


# --- images --------------------------------------------------------------------------------------
class FieldImage(bytes):
    """An image's encoded bytes that remember the request field they came from (``param``)."""

    param: str = ""


def undecodable(images: list) -> str | None:
    """The request field of the first image that does not decode (a pipeline's ImageError names its index in the
    batch, not the field it came in); run on the error path only."""
    for image in images:
        try:
            load_image(bytes(image))
        except ImageError:
            return getattr(image, "param", None)
    return None


def image_bytes(url: Any, param: str, options: ServeOptions) -> FieldImage:
    """An image reference (a data URI; a path or file:// URL inside --allow-images-from) as its encoded bytes,
    checked to be an image PIL can read of at most --max-image-pixels (from its header, before decoding)."""
    if not isinstance(url, str):
        raise invalid(f"field '{param}' is not a string", "a data URI such as data:image/png;base64,...",
                      "send the image as a data URI string", param, 422, "invalid_type")
    scheme = URL_SCHEME.match(url)
    if url[:5].lower() == "data:":
        data = _data_uri(url, param)
    elif scheme and scheme.group(1).lower() != "file":
        raise invalid(f"field '{param}' is a remote URL ({url[:60]})", "a data URI (this server fetches nothing)",
                      "download the image and send it as data:image/...;base64,...", param,
                      code="unsupported_image_url")
    else:
        data = _allowed_file(url, param, options)
    _check_header(data, param, options.max_image_pixels)
    image = FieldImage(data)
    image.param = param
    return image


def _data_uri(url: str, param: str) -> bytes:
    """The bytes of a base64 image data URI (``mmedge.images.data_uri_bytes``), its faults as 400 invalid_image."""
    try:
        return data_uri_bytes(url, f"field '{param}'")
    except ImageError as exc:
        raise invalid(exc.what, exc.expected or "", exc.fix or "", param, code="invalid_image") from None


def _allowed_file(url: str, param: str, options: ServeOptions) -> bytes:
    root = options.allow_images_from
    if root is None:
        raise invalid(f"field '{param}' names a file ({url[:60]})", "a data URI (files are refused unless the server "
                      "was started with --allow-images-from DIR)", "send the image as data:image/...;base64,...", param,
                      code="unsupported_image_url")
    path = _file_url_path(url, param) if url[:5].lower() == "file:" else Path(url).expanduser()
    resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()  # symlinks followed, then checked
    if not resolved.is_relative_to(root):
        raise invalid(f"field '{param}' names a file outside the allowed folder ({url[:60]})",
                      f"a file inside {root}", "copy the image into that folder, or send it as a data URI", param,
                      code="unsupported_image_url")
    if not resolved.is_file():
        raise invalid(f"field '{param}' names no file ({url[:60]})", f"an image file inside {root}", "check the path",
                      param, code="invalid_image")
    if resolved.stat().st_size > options.max_body_bytes:
        raise ApiError(413, f"image file '{url[:60]}' has {resolved.stat().st_size:,} bytes",
                       f"at most {options.max_body_bytes:,} bytes (--max-body-mb)", "downscale it", param=param,
                       code="body_too_large")
    return resolved.read_bytes()


def _file_url_path(url: str, param: str) -> Path:
    """The path of a ``file:`` URL (RFC 8089): on this host (none, or ``localhost``), percent-escapes decoded; a
    '#' or '?' is part of the file's name (a file URL has no fragment or query to the server)."""
    path = url[len("file:"):]
    if path.startswith("//"):
        host, _, rest = path[2:].partition("/")
        if host not in ("", "localhost"):
            raise invalid(f"field '{param}' is a file URL on host '{host[:40]}'", "a file URL on this server: "
                          "file:///absolute/path (three slashes) or file://localhost/absolute/path",
                          "write the URL with three slashes, send a plain path, or send the image as a data URI",
                          param, code="unsupported_image_url")
        path = "/" + rest
    return Path(unquote(path))


def _check_header(data: bytes, param: str, max_pixels: int) -> None:
    """Refuse what PIL cannot identify, and images over ``max_pixels``, from the header alone."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # past PIL's own limit (~89 MP)
        raise _too_many_pixels(param, "more pixels than PIL opens without a decompression-bomb alarm",
                               max_pixels) from None
    except UnidentifiedImageError:
        raise invalid(f"field '{param}' does not decode as an image", "a PNG, JPEG, WebP, GIF, BMP or TIFF file",
                      "check that the data URI holds the image file's bytes", param, code="invalid_image") from None
    except Exception as exc:  # PIL raises SyntaxError, OSError, ValueError... for damaged headers
        raise invalid(f"field '{param}' does not decode as an image ({type(exc).__name__}: {str(exc)[:80]})",
                      "a complete PNG, JPEG, WebP, GIF, BMP or TIFF file", "re-encode the image", param,
                      code="invalid_image") from None
    if width * height > max_pixels:
        raise _too_many_pixels(param, f"{width}x{height} = {width * height:,} pixels", max_pixels)


def _too_many_pixels(param: str, size: str, max_pixels: int) -> ApiError:
    return invalid(f"field '{param}' is an image of {size}", f"at most {max_pixels:,} pixels (this server's "
                   "--max-image-pixels)", "downscale the image before sending it", param, code="image_too_large")
