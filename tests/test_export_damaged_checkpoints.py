"""A checkpoint damaged as a user damages one (weights missing, truncated or partly deleted, a tokenizer without its
vocabulary, a processor of another image size) is refused with a typed error naming what is wrong, never exported
with random weights or an empty tokenizer, nor stopped by an internal error."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mmedge.errors import ModelLoadError
from mmedge.export.loading import load_checkpoint
from tests.support.battery import api_error, cli_error


def copy_of(source: Path, dest: Path, *, without: tuple[str, ...] = ()) -> Path:
    """``source``'s checkpoint folder copied to ``dest``, less the files named in ``without``."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*without))
    return dest


def edit_weights(folder: Path, edit) -> None:
    """Rewrite ``folder``'s model.safetensors with ``edit(tensors)`` applied (a dict edited in place)."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# --- 1. missing weights are not filled with random ones ------------------------------------------------------------
def test_deleted_weights_are_refused_naming_them(tiny_clip_dir, tmp_path, capsys):
    """transformers filled the deleted layer with random weights, and the export passed parity against that model."""
    folder = copy_of(tiny_clip_dir, tmp_path / "clip")
    edit_weights(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("text_model.encoder.layers.1.")])
    api_error(lambda: load_checkpoint(str(folder)), ModelLoadError, "lack 16 tensors",
              "text_model.encoder.layers.1.layer_norm1.bias", "and 11 more", "random values", "--random-weights")
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError, "lack 16 tensors")
    assert not (tmp_path / "out").exists()
    assert load_checkpoint(str(folder), random_weights=True).source["random_weights"] is True  # still builds


def test_an_untied_lm_head_missing_is_refused_and_a_tied_one_is_not(tiny_blip2_dir, tmp_path):
    """With tie_word_embeddings false the LM head is a weight of its own: a checkpoint without it loaded with a
    random head. Tied (as saved), the head is the embedding table, absent from the file by design."""
    assert "language_model.lm_head.weight" not in load_file(tiny_blip2_dir / "model.safetensors")
    assert load_checkpoint(str(tiny_blip2_dir)).family == "blip2"  # the tied head is not 'missing'
    folder = copy_of(tiny_blip2_dir, tmp_path / "untied")

    def untie(config):
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False

    edit_json(folder / "config.json", untie)
    api_error(lambda: load_checkpoint(str(folder)), ModelLoadError, "lack 1 tensor", "language_model.lm_head.weight")


def test_a_weight_of_another_shape_is_refused_naming_it_and_both_shapes(tiny_clip_dir, tmp_path, capsys):
    """transformers' own error said "look at the above report", a report --quiet hides: the message names the
    tensor and both shapes itself."""
    import torch

    folder = copy_of(tiny_clip_dir, tmp_path / "clip")
    key = "text_model.final_layer_norm.weight"
    width = load_file(folder / "model.safetensors")[key].shape[0]
    edit_weights(folder, lambda t: t.update({key: torch.ones(width + 1)}))
    api_error(lambda: load_checkpoint(str(folder)), ModelLoadError, "1 tensor has another shape",
              f"{key} is [{width + 1}] in the checkpoint, [{width}] by config.json", "config.json is the checkpoint's")
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              f"{key} is [{width + 1}] in the checkpoint")
    assert not (tmp_path / "out").exists()


def test_weights_the_architecture_does_not_use_are_warned_about(tiny_clip_dir, tmp_path):
    import torch

    folder = copy_of(tiny_clip_dir, tmp_path / "clip")
    edit_weights(folder, lambda t: t.update({"bogus.weight": torch.zeros(2)}))
    with pytest.warns(UserWarning, match=r"hold 1 tensor this CLIPModel does not use \(bogus.weight\)"):
        load_checkpoint(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint as saved: no word
        load_checkpoint(str(tiny_clip_dir))


# --- 3. truncated or corrupt safetensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupt_safetensors_are_a_load_error_not_an_internal_one(damage, tiny_clip_dir, tmp_path, capsys):
    folder = copy_of(tiny_clip_dir, tmp_path / damage)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              "cannot load weights", "SafetensorError", "re-download")
    assert not (tmp_path / "out").exists()


# --- 2. a tokenizer without its vocabulary -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["clip", "blip2"])
def test_a_tokenizer_without_its_vocabulary_is_refused_naming_the_files(family, tiny_clip_dir, tiny_blip2_dir,
                                                                        tmp_path, capsys):
    """Without tokenizer.json a CLIP exported with a two-token tokenizer (labels failed on the device); a BLIP-2 met an
    internal error."""
    source = {"clip": tiny_clip_dir, "blip2": tiny_blip2_dir}[family]
    folder = copy_of(source, tmp_path / family, without=("tokenizer.json", "vocab.json", "merges.txt"))
    assert (folder / "tokenizer_config.json").is_file()
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              "loaded without its vocabulary", "encodes to no ordinary token", "missing tokenizer.json, vocab.json, "
              "merges.txt", "tokenizer.save_pretrained")
    assert not (tmp_path / "out").exists()


def test_an_instructblip_qformer_tokenizer_without_its_vocabulary_is_refused(tiny_instructblip_dir, tmp_path, capsys):
    """Refused before the weights load (an InstructBLIP's are gigabytes): here they could not load at all."""
    folder = copy_of(tiny_instructblip_dir, tmp_path / "instructblip")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # loading them would be a SafetensorError
    (folder / "qformer_tokenizer" / "tokenizer.json").unlink()
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              f"the tokenizer of '{folder / 'qformer_tokenizer'}' (BertTokenizer) loaded without its vocabulary",
              "missing tokenizer.json, vocab.txt")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder / "qformer_tokenizer")  # the whole folder gone: named as such, not a hub id error
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              "has no qformer_tokenizer/ folder for the Q-Former's tokenizer",
              "fix: save the checkpoint's InstructBlipProcessor into the folder")


# --- 4. an image processor of another size -------------------------------------------------------------------------
def test_a_processor_of_another_image_size_is_refused_before_the_weights_load(tiny_clip_dir, tmp_path, capsys):
    folder = copy_of(tiny_clip_dir, tmp_path / "clip")
    edit_json(folder / "preprocessor_config.json",
              lambda c: c.update(crop_size={"height": 48, "width": 48}, size={"shortest_edge": 48}))
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)  # unreadable: the size is refused before it is read
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              "preprocessor_config.json' makes 48x48 images (crop_size)", "takes 32x32", "vision_config.image_size")
    assert not (tmp_path / "out").exists()


# --- minor: the checkpoint path -------------------------------------------------------------------------------------
def test_a_mistyped_path_inside_a_local_folder_and_a_file_are_named_as_such(tmp_path, monkeypatch):
    """'bad/missing' beside a local 'bad/' is asked of the hub (a hub id may share its owner's name with a local
    folder), and the hub's refusal says it may be a mistyped path; a file was said to 'have no config.json'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "afile").write_text("x")
    api_error(lambda: load_checkpoint("bad/missing"), ModelLoadError, "'bad/missing' is no local folder, though 'bad' "
              "is: a mistyped path?")
    api_error(lambda: load_checkpoint("afile"), ModelLoadError, "'afile' is a file, not a checkpoint folder")


def test_random_weights_from_a_folder_read_its_tokenizer_and_processor(tiny_clip_dir, tmp_path, capsys):
    """The README promised random weights from 'a checkpoint folder's config.json': a folder of config.json alone is
    refused, saying the tokenizer and processor are read from it too and what builds without them."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", folder / "config.json")
    cli_error(capsys, ["export", folder, tmp_path / "out", "--random-weights", "--quiet"], ModelLoadError,
              "cannot load the tokenizer or image processor", "--random-weights too reads them there",
              "pass a bundled config name")
    assert load_checkpoint(str(tiny_clip_dir), random_weights=True).source["random_weights"] is True


def test_a_sentencepiece_only_tokenizer_names_what_reads_it(tiny_blip2_t5_dir, tmp_path, capsys):
    """A T5 checkpoint whose tokenizer is spiece.model alone (older repos): transformers needs sentencepiece to
    convert it and, without it, asked for tiktoken; the refusal names the file and what reads it."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here: transformers converts spiece.model itself")
    folder = copy_of(tiny_blip2_t5_dir, tmp_path / "spiece", without=("tokenizer.json",))
    (folder / "spiece.model").write_bytes(b"\x0a\x00")  # never read: the converter is missing
    cli_error(capsys, ["export", folder, tmp_path / "out", "--quiet"], ModelLoadError,
              "it is stored as a SentencePiece model only (spiece.model, no tokenizer.json)",
              "expected a tokenizer.json beside config.json, or the sentencepiece package",
              "fix: pip install sentencepiece, or save a tokenizer.json")
    assert not (tmp_path / "out").exists()
