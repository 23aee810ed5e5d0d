"""Fuzzing (hypothesis): the manifest parser and the image entry point raise nothing but mmedge's typed errors.

Targets:
- manifest text: random bytes and text, random JSON documents, and real CLIP / BLIP-2 manifests with
  1-3 fields deleted, replaced or added (values drawn from JSON and from known-hostile values); each
  goes through everything ``mmedge.load`` reads from a manifest before it opens a file: ``parse_manifest``,
  the preprocessing config, the tokenizer settings, the tensor metadata, and for BLIP-2 the generation
  settings and the KV-cache layout.
- images: small real images in 12 encodings with 0-4 byte-level mutations (flips, truncation, insertions,
  deletions, 16/32-bit integers written over header fields such as width and height), fed to the
  preprocessor as bytes; numpy arrays of any dtype and shape; PIL images of every mode, any size, and
  random ``transparency`` info.

CI runs each target with 150 examples (derandomized, so CI is repeatable). The benchmark-style run:

    MMEDGE_FUZZ_EXAMPLES=20000 python -m pytest -q -p no:cacheprovider tests/reliability/test_fuzz.py

(random seeds; counts and time are written to benchmarks/out/fuzz.json; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tokenizers import Tokenizer

from mmedge.errors import MmedgeError
from mmedge.generation import GenerationConfig
from mmedge.generation.kv_layout import checked_layout
from mmedge.images import load_image
from mmedge.manifest import parse_manifest
from mmedge.preprocess import ImagePreprocessor
from mmedge.runner import TensorMeta
from mmedge.tokenizer import TextTokenizer

EXAMPLES = int(os.environ.get("MMEDGE_FUZZ_EXAMPLES", "150"))
BENCHMARK = "MMEDGE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not BENCHMARK,
                suppress_health_check=list(HealthCheck))
OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "out" / "fuzz.json"
CALLS: Counter = Counter()  # inputs tried per target
OUTCOMES: Counter = Counter()  # (target, accepted | error class name)


@pytest.fixture(scope="module", autouse=True)
def report():
    start = time.perf_counter()
    yield
    if BENCHMARK:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"examples_setting": EXAMPLES, "inputs": dict(CALLS),
                                   "total_inputs": sum(CALLS.values()),
                                   "outcomes": {f"{t}: {o}": n for (t, o), n in sorted(OUTCOMES.items())},
                                   "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")


def only_typed_errors(target: str, call) -> None:
    """Run ``call``; anything raised other than an MmedgeError fails the property."""
    CALLS[target] += 1
    try:
        call()
    except MmedgeError as exc:
        assert exc.what and exc.expected and exc.fix
        OUTCOMES[(target, type(exc).__name__)] += 1
    else:
        OUTCOMES[(target, "accepted")] += 1


# --- the manifest ----------------------------------------------------------------------------------
HOSTILE = ["../vision.onnx", "/etc/passwd", "C:\\x.onnx", "vision.onnx", "tokenizer.json", "", ".", "..", "a" * 300,
           "\ud800", "x\x00y", "%d.%s", "past_key_values.%d.%s", "fp16", "int4", "clip", "blip2", "caption",
           "zero-shot",
           10**400, -(10**400), 2**63, -1, 0, 1, 1.5, 1e308, float("inf"), float("nan"), True, None, [], {},
           [1, 2, 3], [-1, "batch"], {"shortest_edge": 0}, {"height": 10**9, "width": 10**9}, "0" * 64]
JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
               | st.sampled_from(HOSTILE).map(copy.deepcopy))  # a copy: mutations must not reach HOSTILE
JSON_VALUES = st.recursive(JSON_LEAVES, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


def node_paths(node, prefix=()):
    """Every path (a tuple of keys / indexes) to a node of a JSON document, the root included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from node_paths(child, prefix + (key,))


@pytest.fixture(scope="module")
def manifests(clip_artifacts, blip2_artifact) -> dict[str, dict]:
    return {name: json.loads((folder / "manifest.json").read_text())
            for name, folder in {"clip": clip_artifacts("fp32"), "fused": clip_artifacts("fused-fp32"),
                                 "blip2": blip2_artifact}.items()}


@pytest.fixture(scope="module")
def tokenizers(clip_artifacts, blip2_artifact) -> dict[str, Tokenizer]:
    return {"clip": Tokenizer.from_file(str(clip_artifacts("fp32") / "tokenizer.json")),
            "blip2": Tokenizer.from_file(str(blip2_artifact / "tokenizer.json"))}


def read_manifest_sections(text, tokenizers: dict[str, Tokenizer]) -> None:
    """What ``mmedge.load`` reads from a manifest before it opens any file."""
    data = parse_manifest(text)
    ImagePreprocessor(data["preprocess"])
    for component in data["components"].values():
        for name, spec in {**component["inputs"], **component["outputs"]}.items():
            TensorMeta.from_manifest(name, spec)
    if data.get("tokenizer"):
        TextTokenizer(tokenizers["blip2" if data["family"] == "blip2" else "clip"], data["tokenizer"])
    if data["family"] == "blip2":
        GenerationConfig.from_dict(data["generation"])
        checked_layout(data["blip2"]["decoder"]["kv_cache"])


def test_real_manifests_pass(manifests, tokenizers):
    for data in manifests.values():
        read_manifest_sections(json.dumps(data), tokenizers)


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_manifest_bytes(tokenizers, data):
    only_typed_errors("manifest: random bytes", lambda: read_manifest_sections(data, tokenizers))


@FUZZ
@given(JSON_VALUES)
def test_fuzz_manifest_json_documents(tokenizers, document):
    only_typed_errors("manifest: random JSON", lambda: read_manifest_sections(json.dumps(document), tokenizers))


@FUZZ
@given(st.data())
def test_fuzz_manifest_field_mutations(manifests, tokenizers, data):
    document = copy.deepcopy(manifests[data.draw(st.sampled_from(sorted(manifests)))])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(node_paths(document))[1:]))
        *parents, last = path
        parent = document
        for key in parents:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[last]
        elif action == "replace":
            parent[last] = data.draw(JSON_VALUES)
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
        else:
            parent.append(data.draw(JSON_VALUES))
    only_typed_errors("manifest: mutated real manifests",
                      lambda: read_manifest_sections(json.dumps(document), tokenizers))


# --- images -----------------------------------------------------------------------------------------
def seed_images() -> dict[str, bytes]:
    """Small valid images in the encodings people hand a device."""
    rgb = Image.radial_gradient("L").resize((24, 16)).convert("RGB")
    rgb.paste((200, 30, 30), (0, 0, 8, 8))
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    exif = Image.Exif()
    exif[0x0112] = 6

    def save(image, fmt, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return {
        "png": save(rgb, "PNG"), "jpeg": save(rgb, "JPEG", quality=80), "gif-animated": save(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=30),
        "bmp": save(rgb, "BMP"), "tiff": save(rgb, "TIFF"), "webp": save(rgb, "WEBP", lossless=True),
        "ico": save(rgb, "ICO", sizes=[(16, 16)]), "ppm": save(rgb, "PPM"),
        "png-16bit": save(Image.fromarray((np.arange(24 * 16, dtype=np.uint16) * 170).reshape(16, 24)), "PNG"),
        "png-palette-transparency": save(palette, "PNG", transparency=0),
        "jpeg-cmyk": save(rgb.convert("CMYK"), "JPEG"), "jpeg-exif-rotated": save(rgb, "JPEG", exif=exif),
    }


SEEDS = seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "int16", "int32"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "int16":
            data[at:at + 2] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
        else:
            data[at:at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 20_000, 100_000]) |
                                                  st.integers(0, 0xFFFFFFFF)))
    return bytes(data)


@pytest.fixture(scope="module")
def preprocessor(manifests) -> ImagePreprocessor:
    return ImagePreprocessor(manifests["clip"]["preprocess"])


def test_seed_images_are_valid(preprocessor):
    for data in SEEDS.values():
        assert preprocessor(data).shape == (1, 3, *preprocessor.output_size)


@FUZZ
@given(mutated_images())
def test_fuzz_encoded_images(preprocessor, data):
    only_typed_errors("images: mutated encoded files", lambda: preprocessor(data))


DTYPES = [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]


@FUZZ
@given(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
def test_fuzz_arrays(preprocessor, array):
    only_typed_errors("images: numpy arrays", lambda: preprocessor(array))


MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16B", "I;16L", "I;16N"]
TRANSPARENCY = st.none() | st.integers(-1, 300) | st.tuples(st.integers(0, 255), st.integers(0, 255),
                                                            st.integers(0, 255)) \
    | st.binary(max_size=8)


@FUZZ
@given(st.sampled_from(MODES), st.integers(0, 6), st.integers(0, 6), st.integers(0, 255), TRANSPARENCY)
def test_fuzz_pil_images(preprocessor, mode, width, height, fill, transparency):
    try:
        image = Image.new(mode, (width, height), fill if mode not in ("LAB", "HSV", "YCbCr", "CMYK") else None)
    except (ValueError, TypeError):
        image = Image.new(mode, (width, height))
    if transparency is not None:
        image.info["transparency"] = transparency
    only_typed_errors("images: PIL images", lambda: preprocessor(image))
    assert image.size == (width, height)  # the caller's image is left as it was


def test_load_image_is_the_entry_point_the_preprocessor_uses(preprocessor):
    """The fuzzers above go through ImagePreprocessor; its images come from load_image."""
    np.testing.assert_array_equal(preprocessor(SEEDS["png"]), preprocessor(load_image(SEEDS["png"])))
