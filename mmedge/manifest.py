"""manifest.json: the only contract between the host that exports and the device that runs.

The schema lives here, as code, and is versioned by ``FORMAT_VERSION``. ``parse_manifest`` checks
every field the device relies on and raises a ``ManifestError`` naming the field; nothing is guessed
at load time. Writers build the same dict shape (see ``mmedge.export.artifact_writer``).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from mmedge.errors import ManifestError, UnsafePathError, UnsupportedFormatError

FORMAT_NAME = "mmedge.artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
PRECISIONS = ("fp32", "fp16", "int8", "int4")

# Which components and tasks each family may declare. A new family adds a line here and its specs.
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "clip": {"components": ("vision", "text", "zero_shot"), "tasks": ("zero-shot", "embed")},
    "blip2": {"components": ("vision", "qformer", "prefix", "decoder"), "tasks": ("caption", "vqa")},
}


def _fail(field: str, problem: str, expected: str) -> ManifestError:
    return ManifestError(
        f"manifest.json field '{field}' {problem}",
        expected,
        "re-export the artifact with `mmedge export`; do not edit manifest.json by hand",
    )


def _require(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    field = f"{where}.{key}" if where else key
    if key not in obj:
        raise _fail(field, "is missing", f"a {_kind_name(kind)}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(field, f"has the wrong type (bool {value!r})", f"a {_kind_name(kind)}")
    if not isinstance(value, kind):
        raise _fail(field, f"has the wrong type ({type(value).__name__} {_short(value)})", f"a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "JSON object", list: "JSON list", str: "string", int: "integer", float: "number", bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_plain_file_name(name: str, field: str) -> str:
    """A file named by a manifest must be a plain name inside the artifact folder: no folders, no '..'."""
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    )
    if bad:
        raise UnsafePathError(
            f"manifest.json field '{field}' names the file {name!r}, which is not a plain file name inside the artifact folder",
            "a bare file name such as 'vision.onnx' (no '/', '\\', '..' or absolute path)",
            "re-export the artifact; never point a manifest at files outside its folder",
        )
    return name


def _parse_tensor(spec: Any, field: str) -> dict:
    if not isinstance(spec, dict):
        raise _fail(field, f"has the wrong type ({type(spec).__name__})", "a JSON object with 'dtype' and 'shape'")
    dtype = _require(spec, "dtype", str, field)
    if dtype not in DTYPES:
        raise _fail(f"{field}.dtype", f"is {dtype!r}", f"one of {', '.join(DTYPES)}")
    shape = _require(spec, "shape", list, field)
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim < 0):
            raise _fail(f"{field}.shape[{i}]", f"is {dim!r}", "a non-negative integer or a named dynamic axis (string)")
    return spec


def _parse_component(name: str, comp: Any, family: str) -> dict:
    where = f"components.{name}"
    if name not in FAMILIES[family]["components"]:
        raise _fail(where, f"names a component the '{family}' family does not have",
                    f"one of {', '.join(FAMILIES[family]['components'])}")
    if not isinstance(comp, dict):
        raise _fail(where, f"has the wrong type ({type(comp).__name__})", "a JSON object")
    check_plain_file_name(_require(comp, "file", str, where), f"{where}.file")
    external = comp.get("external_data")
    if external is not None:
        if not isinstance(external, dict):
            raise _fail(f"{where}.external_data", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(external, "file", str, f"{where}.external_data"), f"{where}.external_data.file")
        _require(external, "sha256", str, f"{where}.external_data")
    sha = _require(comp, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _fail(f"{where}.sha256", f"is {_short(sha)}", "64 lowercase hex digits")
    precision = _require(comp, "precision", str, where)
    if precision not in PRECISIONS:
        raise _fail(f"{where}.precision", f"is {precision!r}", f"one of {', '.join(PRECISIONS)}")
    quant = comp.get("quantization")
    if quant is not None and not isinstance(quant, dict):
        raise _fail(f"{where}.quantization", "has the wrong type", "null or a JSON object")
    for io in ("inputs", "outputs"):
        tensors = _require(comp, io, dict, where)
        if not tensors:
            raise _fail(f"{where}.{io}", "is empty", "at least one named tensor")
        for tname, spec in tensors.items():
            _parse_tensor(spec, f"{where}.{io}.{tname}")
    _require(comp, "parity", dict, where)
    return comp


def _parse_blip2(data: dict) -> None:
    """The fields the captioning runtime reads: decoder KV layout, token ids, embedding table, prompts."""
    section = _require(data, "blip2", dict, "")
    _require(data, "generation", dict, "")
    for key in ("bos_token_id", "num_query_tokens"):
        _require(section, key, int, "blip2")
    for key in ("prefix", "decoder", "image_tokens", "prompts", "embeddings"):
        _require(section, key, dict, "blip2")
    kv = _require(section["decoder"], "kv_cache", dict, "blip2.decoder")
    for key in ("layers", "heads", "head_dim"):
        _require(kv, key, int, "blip2.decoder.kv_cache")
    for key in ("past", "present"):
        pattern = _require(kv, key, str, "blip2.decoder.kv_cache")
        if pattern.count("%d") != 1 or pattern.count("%s") != 1:
            raise _fail(f"blip2.decoder.kv_cache.{key}", f"is {pattern!r}", "a pattern with one %d (layer) and one %s (key/value)")
    table = section["embeddings"]
    check_plain_file_name(_require(table, "file", str, "blip2.embeddings"), "blip2.embeddings.file")
    _require(table, "sha256", str, "blip2.embeddings")
    _require(table, "storage", str, "blip2.embeddings")
    _require(table, "shape", list, "blip2.embeddings")


def parse_manifest(text: str | bytes) -> dict:
    """Parse and check manifest.json text. Returns the dict; raises a ManifestError subclass."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"manifest.json is not valid JSON ({exc})",
            "a JSON object written by `mmedge export`",
            "re-export the artifact; the file may be truncated or edited",
        ) from None
    if not isinstance(data, dict):
        raise _fail("(top level)", f"is a {type(data).__name__}", "a JSON object")
    fmt = data.get("format")
    if fmt != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"manifest.json has format {fmt!r}, so it is not an mmedge artifact",
            f"format '{FORMAT_NAME}'",
            "point mmedge at a folder written by `mmedge export`",
        )
    version = _require(data, "format_version", int, "")
    if version > FORMAT_VERSION:
        writer = data.get("mmedge_version", "a newer mmedge")
        raise UnsupportedFormatError(
            f"artifact format version {version} (written by mmedge {writer}) is newer than this mmedge reads",
            f"format_version <= {FORMAT_VERSION}",
            "upgrade mmedge on this device (`pip install -U mmedge`) or re-export with this version",
        )
    if version < 1:
        raise _fail("format_version", f"is {version}", "an integer >= 1")
    _require(data, "mmedge_version", str, "")
    family = _require(data, "family", str, "")
    if family not in FAMILIES:
        raise _fail("family", f"is {family!r}", f"one of {', '.join(FAMILIES)}")
    tasks = _require(data, "tasks", list, "")
    for task in tasks:
        if task not in FAMILIES[family]["tasks"]:
            raise _fail("tasks", f"contains {task!r}", f"tasks of the '{family}' family: {', '.join(FAMILIES[family]['tasks'])}")
    if not tasks:
        raise _fail("tasks", "is empty", "at least one task")
    source = _require(data, "source", dict, "")
    _require(source, "model", str, "source")
    _require(source, "random_weights", bool, "source")
    components = _require(data, "components", dict, "")
    if not components:
        raise _fail("components", "is empty", "at least one component")
    for name, comp in components.items():
        _parse_component(name, comp, family)
    _require(data, "preprocess", dict, "")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise _fail("tokenizer", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(tokenizer, "file", str, "tokenizer"), "tokenizer.file")
    if family == "blip2":
        _parse_blip2(data)
    validation = data.get("validation")
    if validation is not None:
        if not isinstance(validation, dict):
            raise _fail("validation", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(validation, "file", str, "validation"), "validation.file")
        _require(validation, "sha256", str, "validation")
    return data


def dump_manifest(data: dict) -> str:
    """Serialize a manifest dict; the result round-trips through ``parse_manifest``."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    parse_manifest(text)
    return text
