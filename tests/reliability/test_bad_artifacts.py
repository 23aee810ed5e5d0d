"""Battery, artifacts: every damaged or hostile artifact is refused at load with its typed error, from the
API (``mmedge.load``) and from the CLI (``mmedge run``: one line, the error's exit code, no traceback).

Each case copies a real tiny artifact (ONNX Runtime sessions and all), damages it one way, and loads it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import mmedge
from mmedge.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    IntegrityError,
    ManifestError,
    TokenizerError,
    UnsafePathError,
    UnsupportedFormatError,
)
from tests.support.battery import api_error, cli_error, edit_manifest, replace_component_file


@dataclass(frozen=True)
class Case:
    family: str  # which tiny artifact is copied: "clip" or "blip2"
    damage: Callable[[Path], Path | None]  # damages the copy; may return another path to load instead
    error: type
    fragments: tuple[str, ...]


def graph_bytes(folder: Path, component: str) -> bytes:
    return (folder / f"{component}.onnx").read_bytes()


def symlink_out(folder: Path, name: str) -> None:
    outside = folder.parent / f"outside-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)


def set_field(path: str, value) -> Callable[[Path], None]:
    """Damage: set (or with KeyError delete) a manifest field given as 'a.b.c'."""
    def damage(folder: Path) -> None:
        def edit(data):
            *parents, last = path.split(".")
            for key in parents:
                data = data[key]
            if value is KeyError:
                del data[last]
            else:
                data[last] = value
        edit_manifest(folder, edit)
    return damage


def write(name: str, data: bytes) -> Callable[[Path], None]:
    """Damage: overwrite one file of the artifact with ``data``."""
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(data)
    return damage


RANDOM = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
CLIP_CASES = {
    # ONNX graphs
    "onnx-missing": Case("clip", lambda f: (f / "vision.onnx").unlink(), ArtifactNotFoundError,
                         ("vision.onnx", "missing")),
    "onnx-empty": Case("clip", write("vision.onnx", b""), IntegrityError, ("vision.onnx", "empty (0 bytes)")),
    "onnx-empty-rehashed": Case("clip", lambda f: replace_component_file(f, "vision", b"", rehash=True),
                                IntegrityError, ("could not load component 'vision'",)),
    "onnx-truncated": Case("clip", lambda f: write("vision.onnx", graph_bytes(f, "vision")[:2000])(f),
                           IntegrityError, ("vision.onnx", "sha256")),
    "onnx-truncated-rehashed": Case("clip",
                                    lambda f: replace_component_file(f, "vision", graph_bytes(f, "vision")[:2000],
                                                                             rehash=True),
                                    IntegrityError, ("could not load component 'vision'",)),
    "onnx-random-bytes": Case("clip", write("vision.onnx", RANDOM), IntegrityError, ("vision.onnx", "sha256")),
    "onnx-random-bytes-rehashed": Case("clip", lambda f: replace_component_file(f, "vision", RANDOM, rehash=True),
                                       IntegrityError, ("could not load component 'vision'",)),
    "onnx-one-byte-flipped": Case("clip", lambda f: write("vision.onnx", bytes([graph_bytes(f, "vision")[0] ^ 1])
                                                          + graph_bytes(f, "vision")[1:])(f),
                                  IntegrityError, ("vision.onnx", "corrupt or was replaced")),
    "onnx-graph-of-another-component": Case("clip",
                                            lambda f: replace_component_file(f, "vision", graph_bytes(f, "text"),
                                                                                     rehash=True),
                                            IntegrityError, ("do not match", "re-export")),
    # manifest.json
    "manifest-missing": Case("clip", lambda f: (f / "manifest.json").unlink(), ArtifactNotFoundError,
                             ("no manifest.json",)),
    "manifest-empty": Case("clip", write("manifest.json", b""), ManifestError, ("not valid JSON",)),
    "manifest-not-json": Case("clip", write("manifest.json", b"format: mmedge\n"), ManifestError, ("not valid JSON",)),
    "manifest-truncated": Case("clip", lambda f: write("manifest.json", (f / "manifest.json").read_bytes()[:300])(f),
                               ManifestError, ("not valid JSON",)),
    "manifest-binary": Case("clip", write("manifest.json", RANDOM), ManifestError, ("not valid JSON",)),
    "manifest-deeply-nested": Case("clip", write("manifest.json", b"[" * 100_000 + b"]" * 100_000), ManifestError,
                                   ("nested too deeply",)),
    "manifest-huge-integer": Case("clip", write("manifest.json", b'{"format_version": ' + b"9" * 5000 + b"}"),
                                  ManifestError, ("not valid JSON",)),
    "manifest-oversized": Case("clip", write("manifest.json", b" " * (17 << 20)), ManifestError, ("bytes long",)),
    "manifest-a-list": Case("clip", write("manifest.json", b"[]"), ManifestError, ("'(top level)'", "JSON object")),
    "manifest-lacks-components": Case("clip", set_field("components", KeyError), ManifestError,
                                      ("'components' is missing",)),
    "manifest-lacks-sha256": Case("clip", set_field("components.vision.sha256", KeyError), ManifestError,
                                  ("'components.vision.sha256' is missing",)),
    "manifest-version-a-string": Case("clip", set_field("format_version", "1"), ManifestError,
                                      ("'format_version' has the wrong type",)),
    "manifest-tasks-a-string": Case("clip", set_field("tasks", "zero-shot"), ManifestError,
                                    ("'tasks' has the wrong type",)),
    "manifest-dtype-unknown": Case("clip", set_field("components.vision.inputs.pixel_values.dtype", "complex64"),
                                   ManifestError, ("pixel_values.dtype", "complex64")),
    "manifest-preprocess-bad-mean": Case("clip", set_field("preprocess.mean", [0.5, 0.5]), ManifestError,
                                         ("preprocess 'mean'",)),
    "manifest-resample-a-list": Case("clip", set_field("preprocess.resample", []), ManifestError,  # found by fuzzing
                                     ("preprocess 'resample' is []",)),
    "manifest-rescale-overflows-float32": Case("clip", set_field("preprocess.rescale_factor", 1e300), ManifestError,
                                               ("inf or NaN",)),  # found by fuzzing: it was accepted, giving inf pixels
    "manifest-tokenizer-max-length-text": Case("clip", set_field("tokenizer.max_length", "77"), ManifestError,
                                               ("tokenizer.max_length",)),
    "manifest-parent-path": Case("clip", set_field("components.vision.file", "../vision.onnx"), UnsafePathError,
                                 ("'../vision.onnx'", "plain file name")),
    "manifest-absolute-path": Case("clip", set_field("components.vision.file", "/etc/passwd"), UnsafePathError,
                                   ("'/etc/passwd'", "plain file name")),
    "manifest-windows-path": Case("clip", set_field("tokenizer.file", "C:\\tokenizer.json"), UnsafePathError,
                                  ("tokenizer.file", "plain file name")),
    "manifest-overlong-name": Case("clip", set_field("components.vision.file", "v" * 300 + ".onnx"), UnsafePathError,
                                   ("at most 255 bytes",)),
    "manifest-surrogate-name": Case("clip", set_field("components.vision.file", "\ud800.onnx"), UnsafePathError,
                                    ("plain file name",)),
    "symlink-graph-out-of-folder": Case("clip", lambda f: symlink_out(f, "vision.onnx"), UnsafePathError,
                                        ("outside the artifact folder",)),
    "symlink-tokenizer-out-of-folder": Case("clip", lambda f: symlink_out(f, "tokenizer.json"), UnsafePathError,
                                            ("tokenizer.file", "outside the artifact folder")),
    "manifest-newer-format": Case("clip", lambda f: edit_manifest(f, lambda m: m.update(format_version=99,
                                                                                     mmedge_version="9.0.0")),
                                  UnsupportedFormatError,
                                  ("format version 99", "mmedge 9.0.0", "pip install -U mmedge")),
    "manifest-other-format": Case("clip", set_field("format", "onnx.model"), UnsupportedFormatError,
                                  ("not an mmedge artifact",)),
    "manifest-component-the-family-lacks": Case("clip", lambda f: edit_manifest(
        f, lambda m: m["components"].update(decoder=m["components"]["vision"])),
        ManifestError, ("components.decoder", "'clip' family does not have")),
    "manifest-unknown-family": Case("clip", set_field("family", "flamingo"), ManifestError, ("'family'", "flamingo")),
    "manifest-lacks-clip-section": Case("clip", set_field("clip", KeyError), ManifestError, ("'clip' is missing",)),
    "manifest-logit-scale-text": Case("clip", set_field("clip.logit_scale", "33"), ManifestError,
                                      ("'clip.logit_scale' has the wrong type",)),
    # fields that contradict each other or the graphs: refused at open, not later with another diagnosis
    "manifest-lacks-text-encoder": Case("clip", set_field("components.text", KeyError), ManifestError,
                                        ("'components' names ['vision']", "cannot serve the task 'zero-shot'")),
    "manifest-text-encoder-without-tokenizer": Case("clip", set_field("tokenizer", None), ManifestError,
                                                    ("'tokenizer' is missing", "text encoder reads token ids")),
    "manifest-crop-not-the-graph-size": Case("clip", set_field("preprocess.center_crop", [30, 30]), ManifestError,
                                             ("pixel_values.shape' ends in [32, 32]", "makes 30x30 images")),
    "manifest-output-width-not-the-graph's": Case("clip", set_field("components.vision.outputs.image_embeds.shape",
                                                                    ["batch", 99]), IntegrityError,
                                                  ("output 'image_embeds'", "['batch', 16]", "[batch, 99]")),
    "manifest-input-dtype-not-the-graph's": Case("clip", set_field("components.vision.inputs.pixel_values.dtype",
                                                                   "float16"), IntegrityError,
                                                 ("input 'pixel_values' is tensor(float)", "expected float16")),
    "manifest-logit-scale-nan": Case("clip", set_field("clip.logit_scale", float("nan")), ManifestError,
                                     ("not valid JSON", "NaN is not finite")),
    "manifest-logit-scale-zero": Case("clip", set_field("clip.logit_scale", 0), ManifestError,
                                      ("'clip.logit_scale' is 0", "above 0")),
    "manifest-validation-sha256-malformed": Case("clip", set_field("validation.sha256", "B" * 70), ManifestError,
                                                 ("'validation.sha256' is 'BBBB", "BBB...;", "64 lowercase hex")),
    # the tokenizer
    "tokenizer-missing": Case("clip", lambda f: (f / "tokenizer.json").unlink(), ArtifactNotFoundError,
                              ("tokenizer.json", "missing")),
    "tokenizer-not-json": Case("clip", write("tokenizer.json", b"{not json"), IntegrityError,
                               ("tokenizer.json", "sha256")),  # the manifest's hash catches it before parsing
    "tokenizer-not-json-unhashed": Case("clip", lambda f: [write("tokenizer.json", b"{not json")(f),
                                                           set_field("tokenizer.sha256", KeyError)(f)] and None,
                                        TokenizerError, ("tokenizer.json", "cannot be read")),  # older manifests
    # the folder itself
    "folder-missing": Case("clip", lambda f: f.parent / "no-such-artifact", ArtifactNotFoundError, ("does not exist",)),
    "folder-is-a-file": Case("clip", lambda f: f / "vision.onnx", ArtifactNotFoundError, ("is a file",)),
}
BLIP2_CASES = {
    "blip2-embedding-table-missing": Case("blip2", lambda f: (f / "embed_tokens.npz").unlink(), ArtifactNotFoundError,
                                          ("embed_tokens.npz", "missing")),
    "blip2-embedding-table-altered": Case("blip2", lambda f: write("embed_tokens.npz", RANDOM)(f), IntegrityError,
                                          ("embed_tokens.npz", "sha256")),
    "blip2-decoder-truncated-rehashed": Case("blip2", lambda f: replace_component_file(
        f, "decoder", graph_bytes(f, "decoder")[:5000], rehash=True), IntegrityError,
        ("could not", "'decoder.onnx'", "re-export")),  # ONNX Runtime's or OpenVINO's words: the plan picks the backend
    "blip2-kv-pattern-wrong": Case("blip2", set_field("blip2.decoder.kv_cache.past", "past.%d"), ManifestError,
                                   ("blip2.decoder.kv_cache.past",)),
    "blip2-lacks-blip2-section": Case("blip2", set_field("blip2", KeyError), ManifestError, ("'blip2' is missing",)),
    "blip2-absurd-default-max-new-tokens": Case("blip2", set_field("generation.max_new_tokens", -5), ManifestError,
                                                ("'generation.max_new_tokens' is -5", "a positive integer")),
    "blip2-generation-eos-text": Case("blip2", set_field("generation.eos_token_id", "2"), ManifestError,
                                      ("'generation.eos_token_id' is '2'",)),
    "blip2-parity-samples-a-list": Case("blip2", set_field("components.decoder.parity.validation_samples", []),
                                        ManifestError, ("parity.validation_samples' has the wrong type",)),
    "blip2-decoder-without-tokenizer": Case("blip2", set_field("tokenizer", None), ManifestError,
                                            ("'tokenizer' is missing", "the decoder reads token ids")),
    "blip2-lacks-decoder": Case("blip2", set_field("components.decoder", KeyError), ManifestError,
                                ("'components' names ['prefix'], without 'decoder'",)),
    "blip2-section-names-an-absent-component": Case("blip2", set_field("blip2.decoder.component", "llm"),
                                                    ManifestError, ("'blip2.decoder.component' names 'llm'",)),
    "blip2-embeddings-sha256-malformed": Case("blip2", set_field("blip2.embeddings.sha256", "x"), ManifestError,
                                              ("'blip2.embeddings.sha256' is 'x'", "64 lowercase hex")),
    "blip2-unknown-generation-setting": Case("blip2", set_field("generation.beams", 3), ManifestError,
                                             ("'generation'", "unknown generation setting")),
}
CASES = {**CLIP_CASES, **BLIP2_CASES}


@pytest.fixture
def damaged(request, clip_artifacts, blip2_artifact, tmp_path):
    """A damaged copy of a tiny artifact for the case named by the test's parameter."""
    case = CASES[request.param]
    source = clip_artifacts("fp32") if case.family == "clip" else blip2_artifact
    folder = tmp_path / "art"
    shutil.copytree(source, folder)
    target = case.damage(folder) or folder
    return case, target


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_api_refuses_damaged_artifact(damaged):
    case, folder = damaged
    api_error(lambda: mmedge.load(folder).close(), case.error, *case.fragments)


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_cli_refuses_damaged_artifact(damaged, capsys, photos):
    case, folder = damaged
    labels = ["--labels", "cat", "dog"] if case.family == "clip" else ["--max-new-tokens", "4"]
    cli_error(capsys, ["run", folder, photos[0], *labels], case.error, *case.fragments)


def test_every_tamper_leaves_the_source_artifact_loadable(clip_artifacts, blip2_artifact, photos):
    """The cases damaged copies only: the originals still load and run."""
    with mmedge.load(clip_artifacts("fp32")) as classifier:
        assert classifier(photos[0], labels=["cat", "dog"])
    with mmedge.load(blip2_artifact) as captioner:
        assert isinstance(captioner.caption(photos[0], max_new_tokens=3), str)


def test_unreadable_file_is_a_typed_error(clip_artifacts, tmp_path):
    """A file the process may not read (not root) or a folder where a graph should be: typed, not OSError."""
    folder = tmp_path / "art"
    shutil.copytree(clip_artifacts("fp32"), folder)
    (folder / "vision.onnx").unlink()
    (folder / "vision.onnx").mkdir()
    api_error(lambda: mmedge.load(folder), ArtifactNotFoundError, "vision.onnx")
    if os.geteuid() != 0:
        (folder / "vision.onnx").rmdir()
        shutil.copy(clip_artifacts("fp32") / "vision.onnx", folder / "vision.onnx")
        (folder / "vision.onnx").chmod(0)
        api_error(lambda: mmedge.load(folder), ArtifactError, "cannot read")
