"""manifest.json: the only contract between the host that exports and the device that runs.

The schema lives here, as code, and is versioned by ``FORMAT_VERSION``. ``parse_manifest`` checks
every field the device relies on and raises a ``ManifestError`` naming the field; nothing is guessed
at load time. Writers build the same dict shape (see ``mmedge.export.artifact_writer``).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from mmedge.errors import ManifestError, UnsafePathError, UnsupportedFormatError
from mmedge.families import FAMILIES
from mmedge.preprocess import ImagePreprocessor

FORMAT_NAME = "mmedge.artifact"
# The contract's version. An export writes it; a reader refuses a newer one ("upgrade mmedge on this device") and
# reads every older one. Raise it whenever an export needs a newer reader than the last version's, and say why here:
#   1  (2026-11-28) the first artifacts.
#   2  (2026-12-08) a reader of 1 older than 2026-12-06 ran these wrong or refused them as damaged (advising a
#      re-export that wrote the same): decoders take logits_positions (an old loop fed none: every caption failed),
#      IDEFICS' fused image_context component, the blip2_t5 family. Readers of 2 read 1's artifacts as before.
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
# The exporter's default recipes, named: changed whenever a default changes what an export writes, and recorded in
# each manifest (``export.recipe_revision``), so a cache (``mmedge demo``'s, the benchmarks') can tell an artifact
# made with an older default. 2026-12-06.1: INT4 LLMs' 8-bit nodes in blocks of up to 256 weights. 2026-12-06.2:
# decoders take logits_positions and run the LM head on those rows only (older decoders still run). 2026-12-06.3: FP32
# image graphs' long-inner MatMuls split in two (mmedge.export.graph_rewrites). 2026-12-07.1: CLIP's static INT8 text
# graph calibrated on other labels' prompts than its fidelity prompts (so its held-out fidelity is held out).
# 2026-12-08.1: graphs over 32 MiB keep their weights in <graph>.onnx.data (a smaller heap at load).
RECIPE_REVISION = "2026-12-08.1"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB (a fused 1000-label bank: well under 1 MB)
MAX_FILE_NAME_BYTES = 255  # the longest file name Linux, macOS and Windows file systems accept

DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
IMAGE_INPUT = "pixel_values"  # the input every image graph takes, its last two dims [height, width]
# CLIP's logit scale multiplies cosines in float32: past this, a difference of two logits overflows to inf (CLIP itself
# clamps it at 100)
MAX_LOGIT_SCALE = 1e38
# per CLIP task, the sets of components that serve it (any one set will do): the fused graph has the label bank baked in
CLIP_TASK_COMPONENTS = {"zero-shot": (("zero_shot",), ("vision", "text")), "embed": (("vision", "text"),)}

def family_section(manifest: Mapping) -> Mapping:
    """The family's own section of a (checked) manifest (``manifest["blip2"]``, ...), or ``{}`` when it has none."""
    family = manifest.get("family")
    section = manifest.get(family) if isinstance(family, str) else None
    return section if isinstance(section, Mapping) else {}


def embeddings_entry(manifest: Mapping) -> tuple[Mapping, str]:
    """(the token-embedding table's entry, its field name for messages) of a checked captioning manifest."""
    return family_section(manifest)["embeddings"], f"{manifest['family']}.embeddings.file"


def decoder_settings(manifest: Mapping) -> Mapping:
    """The family section's ``decoder`` entry (``kv_cache``, ``max_positions``, ...) of a manifest, or ``{}`` when it
    has none (an encoder-only family, or a manifest not parsed yet)."""
    decoder = family_section(manifest).get("decoder")
    return decoder if isinstance(decoder, Mapping) else {}


def _has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a C0 / C1 control character (ESC starts a terminal's escape sequences)."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def _fail(field: str, problem: str, expected: str) -> ManifestError:
    return ManifestError(
        f"manifest.json field '{field}' {problem}",
        expected,
        "re-export the artifact with `mmedge export`; do not edit manifest.json by hand",
    )


def _require(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    field = f"{where}.{key}" if where else key
    expected = _kind_name(kind)
    if key not in obj:
        raise _fail(field, "is missing", expected)
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(field, f"has the wrong type (bool {value!r})", expected)
    if not isinstance(value, kind):
        raise _fail(field, f"has the wrong type ({type(value).__name__} {_short(value)})", expected)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    """``kind`` in words with its article: "a string", "an integer or number"."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "JSON object", list: "JSON list", str: "string", int: "integer", float: "number", bool: "boolean"}
    words = " or ".join(names.get(k, k.__name__) for k in kinds)
    return ("an " if words[0] in "aeiou" else "a ") + words


def _require_sha256(obj: dict, where: str) -> str:
    """``obj["sha256"]``: 64 lowercase hex digits (a malformed one would read as a corrupt file)."""
    sha = _require(obj, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise _fail(f"{where}.sha256", f"is {_short(sha)}", "64 lowercase hex digits")
    return sha


def _refuse_non_finite(constant: str) -> float:
    """``json.loads``' hook for NaN, Infinity and -Infinity, and for a number too large for a float (1e400)."""
    raise ValueError(f"the number {_short_text(constant, 40)} is not finite")


def _finite_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _refuse_non_finite(text)


def _short(value: Any) -> str:
    try:
        return _short_text(repr(value), 40)
    except RecursionError:  # a value nested almost as deep as json.loads allows
        return f"<deeply nested {type(value).__name__}>"


def _short_text(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _utf8_length(name: str) -> int:
    """Bytes of ``name`` in UTF-8; -1 when it holds lone surrogates (JSON "\\ud800" escapes), which no
    file system path can carry."""
    try:
        return len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


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
        or not 0 < _utf8_length(name) <= MAX_FILE_NAME_BYTES
    )
    if bad:
        raise UnsafePathError(
            f"manifest.json field '{field}' names the file {_short(name)}, which is not a plain file name inside the "
            "artifact folder",
            "a bare file name such as 'vision.onnx' (no '/', '\\', '..' or absolute path; at most "
            f"{MAX_FILE_NAME_BYTES} bytes)",
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
    if name not in FAMILIES[family].components:
        raise _fail(where, f"names a component the '{family}' family does not have",
                    f"one of {', '.join(FAMILIES[family].components)}")
    if not isinstance(comp, dict):
        raise _fail(where, f"has the wrong type ({type(comp).__name__})", "a JSON object")
    check_plain_file_name(_require(comp, "file", str, where), f"{where}.file")
    external = comp.get("external_data")
    if external is not None:
        if not isinstance(external, dict):
            raise _fail(f"{where}.external_data", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(external, "file", str, f"{where}.external_data"), f"{where}.external_data.file")
        _require_sha256(external, f"{where}.external_data")
    _require_sha256(comp, where)
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
    _parse_parity(_require(comp, "parity", dict, where), f"{where}.parity")
    return comp


def _check_image_size(size: tuple[int, int], components: dict) -> None:
    """Each image graph's fixed [height, width] is the size preprocessing makes (a mismatch failed every image as too
    large or small for the graph, telling the user to resize it)."""
    for name, comp in components.items():
        image = comp["inputs"].get(IMAGE_INPUT)
        fixed = image and [dim for dim in image["shape"][-2:] if isinstance(dim, int)]
        if fixed and len(fixed) == 2 and tuple(fixed) != size:
            raise _fail(f"components.{name}.inputs.{IMAGE_INPUT}.shape",
                        f"ends in [{fixed[0]}, {fixed[1]}], while preprocessing makes {size[0]}x{size[1]} images",
                        "the preprocess center_crop (or resize without a crop) of the graph's [height, width]")


def _parse_parity(parity: dict, where: str) -> None:
    """The export's figures per output that ``mmedge validate`` measures the device against."""
    samples = parity.get("validation_samples")
    if samples is None:
        return
    if not isinstance(samples, dict):
        raise _fail(f"{where}.validation_samples", f"has the wrong type ({type(samples).__name__})",
                    "a JSON object of metrics per output")
    for output, metrics in samples.items():
        field = f"{where}.validation_samples.{output}"
        if not isinstance(metrics, dict):
            raise _fail(field, f"has the wrong type ({type(metrics).__name__})", "a JSON object of metrics")
        if "cosine" in metrics:
            _require(metrics, "cosine", (int, float), field)


def _parse_clip(data: dict) -> None:
    """The fields CLIP's pipelines read: the logit scale, a fused graph's baked labels, and per task its components."""
    scale = _require(_require(data, "clip", dict, ""), "logit_scale", (int, float), "clip")
    if not 0 < scale <= MAX_LOGIT_SCALE:
        raise _fail("clip.logit_scale", f"is {scale!r}", f"a number above 0 and at most {MAX_LOGIT_SCALE:g} (the "
                    "exponentiated scale CLIP multiplies its cosines by; CLIP's own stays at or below 100)")
    if "zero_shot" in data["components"]:
        labels = _require(_require(data, "zero_shot", dict, ""), "labels", list, "zero_shot")
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise _fail("zero_shot.labels", f"is {_short(labels)}", "a non-empty list of label strings")
        controlled = next((label for label in labels if _has_control_characters(label)), None)
        if controlled is not None:  # printed by `mmedge run`: an escape sequence would drive the user's terminal
            raise _fail("zero_shot.labels", f"holds {controlled!r}, with control characters",
                        "labels of printable text")
    for task in data["tasks"]:
        choices = CLIP_TASK_COMPONENTS[task]
        if not any(set(choice) <= set(data["components"]) for choice in choices):
            either = ", or ".join(" and ".join(f"'{name}'" for name in choice) for choice in choices)
            raise _fail("components", f"names {sorted(data['components'])}, which cannot serve the task '{task}'",
                        f"components {either}")
    if "text" in data["components"]:
        _require_tokenizer(data, "the text encoder")


def _require_tokenizer(data: dict, reader: str) -> None:
    if data.get("tokenizer") is None:
        raise _fail("tokenizer", f"is missing, but {reader} reads token ids",
                    "a JSON object naming the tokenizer file (as `mmedge export` writes it)")


def _section_components(section: Any, field: str) -> list[tuple[str, Any]]:
    """(field, name) of every component a family section refers to, at any depth: each entry's ``component`` and each
    ``components`` list (a prefix chain's, IDEFICS' graphs); not a fused graph's ``replaces``, the graphs it is
    instead of."""
    named: list[tuple[str, Any]] = []
    if isinstance(section, dict):
        if section.get("component") is not None:
            named.append((f"{field}.component", section["component"]))
        if isinstance(section.get("components"), list):
            named += [(f"{field}.components", name) for name in section["components"]]
        for key, value in section.items():
            if key != "replaces":
                named += _section_components(value, f"{field}.{key}")
    return named


def _parse_generative(data: dict, family: str) -> None:
    """The fields the captioning runtime reads: decoder KV layout, token ids, embedding table, prompts."""
    section = _require(data, family, dict, "")
    ints, objects = FAMILIES[family].generative.ints, FAMILIES[family].generative.objects
    generation = _require(data, "generation", dict, "")
    if _require(generation, "max_new_tokens", int, "generation") < 1:
        raise _fail("generation.max_new_tokens", f"is {generation['max_new_tokens']}", "a positive integer")
    eos = generation.get("eos_token_id")  # None: an answer ends at max_new_tokens (a checkpoint without an EOS id)
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, (int, list)) or isinstance(eos, list) and (
            not eos or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos))):
        raise _fail("generation.eos_token_id", f"is {_short(eos)}", "a token id, a non-empty list of them, or null")
    for key in ints:
        _require(section, key, int, family)
    for key in objects:
        _require(section, key, dict, family)
    _require_tokenizer(data, "the decoder")
    if "decoder" not in data["components"]:
        raise _fail("components", f"names {sorted(data['components'])}, without 'decoder'",
                    f"the components a {FAMILIES[family].label} artifact runs, 'decoder' among them")
    for field, name in _section_components(section, family):
        if not isinstance(name, str) or name not in data["components"]:
            raise _fail(field, f"names {_short(name)}, which is not a component",
                        f"components among {', '.join(data['components'])}")
    if "prefix" in section:  # the encoders that make the decoder's prefix, in order, and the tensor it is
        chain = _require(section["prefix"], "components", list, f"{family}.prefix")
        output = _require(section["prefix"], "output", str, f"{family}.prefix")
        if not chain or output not in data["components"][chain[-1]]["outputs"]:
            raise _fail(f"{family}.prefix.output", f"is {output!r}", "an output of the last prefix component")
    kv = _require(section["decoder"], "kv_cache", dict, f"{family}.decoder")
    for key in ("layers", "heads", "head_dim"):
        _require(kv, key, int, f"{family}.decoder.kv_cache")
    for key in ("past", "present"):
        pattern = _require(kv, key, str, f"{family}.decoder.kv_cache")
        if pattern.count("%d") != 1 or pattern.count("%s") != 1:
            raise _fail(f"{family}.decoder.kv_cache.{key}", f"is {pattern!r}",
                        "a pattern with one %d (layer) and one %s (key/value)")
    table = section["embeddings"]
    check_plain_file_name(_require(table, "file", str, f"{family}.embeddings"), f"{family}.embeddings.file")
    _require_sha256(table, f"{family}.embeddings")
    _require(table, "storage", str, f"{family}.embeddings")
    _require(table, "shape", list, f"{family}.embeddings")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PYTORCH_FORMAT = "transformers-safetensors"


def _parse_pytorch(entry: Any) -> dict:
    """``pytorch``: the checkpoint's weights for the torch backend (``export --with-pytorch``), in a subfolder.

    ``{"folder": "pytorch", "format": "transformers-safetensors", "model_class": ..., "dtype": ...,
    "files": {"config.json": {"sha256": ...}, "model.safetensors": {"sha256": ...}, ...}}``: the folder and
    every file are plain names, each file has a sha256, and no file is a pickle (the device never unpickles).
    """
    if not isinstance(entry, dict):
        raise _fail("pytorch", f"has the wrong type ({type(entry).__name__})", "null or a JSON object")
    check_plain_file_name(_require(entry, "folder", str, "pytorch"), "pytorch.folder")
    fmt = _require(entry, "format", str, "pytorch")
    if fmt != PYTORCH_FORMAT:
        raise _fail("pytorch.format", f"is {fmt!r}", f"'{PYTORCH_FORMAT}'")
    files = _require(entry, "files", dict, "pytorch")
    for name, info in files.items():
        check_plain_file_name(name, f"pytorch.files.{name}")
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafePathError(f"manifest.json field 'pytorch.files' names the pickle {_short(name)}",
                                  "weights as .safetensors only (the device never loads pickles)",
                                  "re-export with `mmedge export --with-pytorch`")
        if not isinstance(info, dict):
            raise _fail(f"pytorch.files.{name}", f"has the wrong type ({type(info).__name__})",
                        "a JSON object with 'sha256'")
        _require_sha256(info, f"pytorch.files.{name}")
    if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        raise _fail("pytorch.files", f"names {sorted(files)[:6]}", "config.json and at least one .safetensors file")
    extras = entry.get("reference_tensors")
    if extras is not None:
        if not isinstance(extras, str):
            raise _fail("pytorch.reference_tensors", f"has the wrong type ({type(extras).__name__})",
                        "the name of a .safetensors file in the pytorch folder")
        check_plain_file_name(extras, "pytorch.reference_tensors")
    return entry


def parse_manifest(text: str | bytes) -> dict:
    """Parse and check manifest.json text. Returns the dict; raises a ManifestError subclass."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest.json is {len(text):,} bytes long",
            f"at most {MAX_MANIFEST_BYTES:,} bytes (a manifest written by `mmedge export` is a few KB)",
            "re-export the artifact; this file is not an mmedge manifest or was damaged",
        )
    try:
        data = json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors, and so is an integer literal of more
        # than sys.get_int_max_str_digits() digits; nesting deeper than the interpreter's recursion
        # limit raises RecursionError.
        detail = "nested too deeply" if isinstance(exc, RecursionError) else _short_text(str(exc))
        raise ManifestError(
            f"manifest.json is not valid JSON ({detail})",
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
        if task not in FAMILIES[family].tasks:
            raise _fail("tasks", f"contains {task!r}",
                        f"tasks of the '{family}' family: {', '.join(FAMILIES[family].tasks)}")
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
    _check_image_size(ImagePreprocessor(_require(data, "preprocess", dict, "")).output_size, components)
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise _fail("tokenizer", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(tokenizer, "file", str, "tokenizer"), "tokenizer.file")
        if tokenizer.get("sha256") is not None:  # optional: artifacts written before it was recorded lack it
            _require_sha256(tokenizer, "tokenizer")
    if FAMILIES[family].generative is not None:
        _parse_generative(data, family)
    if family == "clip":
        _parse_clip(data)
    if data.get("pytorch") is not None:
        _parse_pytorch(data["pytorch"])
    validation = data.get("validation")
    if validation is not None:
        if not isinstance(validation, dict):
            raise _fail("validation", "has the wrong type", "null or a JSON object")
        check_plain_file_name(_require(validation, "file", str, "validation"), "validation.file")
        _require_sha256(validation, "validation")
    return data


def dump_manifest(data: dict) -> str:
    """Serialize a manifest dict; the result round-trips through ``parse_manifest``."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    parse_manifest(text)
    return text
