"""Real configs' structural settings a checkpoint can hold that no export can serve, each refused with what is wrong
before any tracing (they had ended in "internal error: RuntimeError / IndexError / TypeError ... a bug in mmedge"),
and an LLM with few positions, whose default max_new_tokens did not fit them: the export wrote an artifact that
mmedge.load refused, and exporting it again wrote the same. The checkpoints are the tiny ones with one config value
changed, built with random weights from that config (the weights' shapes follow it)."""

from __future__ import annotations

import json
import shutil

import pytest

import mmedge
from mmedge.errors import ModelLoadError
from mmedge.export import export_model


def _edited(source, folder, edit) -> str:
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_blip2_whose_llm_takes_narrower_embeddings_than_the_prefix_is_refused(tiny_blip2_dir, tmp_path):
    """opt-350m's layout (word_embed_proj_dim below hidden_size): transformers' generate drops half of each image
    row without a word; the export said "mat1 and mat2 shapes cannot be multiplied"."""
    def narrower(config):
        text = config["text_config"]
        text["word_embed_proj_dim"] = text["hidden_size"] // 2

    folder = _edited(tiny_blip2_dir, tmp_path / "opt350", narrower)
    with pytest.raises(ModelLoadError, match=r"the image prefix's rows are \d+ wide \(language_projection\) but the "
                                             r"LLM takes \d+-wide input embeddings \(its word_embed_proj_dim\)"):
        export_model(folder, tmp_path / "out", random_weights=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_an_idefics_whose_layers_are_not_a_multiple_of_the_cross_layer_interval_is_refused(tiny_idefics_dir,
                                                                                            tmp_path):
    def five_layers_interval_three(config):
        config.update(num_hidden_layers=5, cross_layer_interval=3)

    folder = _edited(tiny_idefics_dir, tmp_path / "interval3", five_layers_interval_three)
    with pytest.raises(ModelLoadError, match=r"5 layers with cross_layer_interval 3 need 2 gated cross-attention "
                                             r"blocks .* builds 1; expected num_hidden_layers a multiple of"):
        export_model(folder, tmp_path / "out", random_weights=True, progress=False)


def test_a_config_transformers_cannot_build_is_a_model_load_error_not_a_bug_of_mmedge(tiny_idefics_dir, tmp_path):
    """transformers' IDEFICS calls torch.normal with an int size for alpha_initializer="normal" (a TypeError)."""
    def normal_alphas(config):
        config.update(alpha_initializer="normal", alpha_type="float")

    folder = _edited(tiny_idefics_dir, tmp_path / "alphas", normal_alphas)
    with pytest.raises(ModelLoadError, match=r"transformers \S+ could not build IdeficsForVisionText2Text from "
                                             r".*\(TypeError: .*; fix: check the config's values"):
        export_model(folder, tmp_path / "out", random_weights=True, progress=False)


def test_a_default_max_new_tokens_past_the_llm_s_positions_is_lowered_so_the_artifact_loads(tiny_blip2_dir,
                                                                                            tmp_path, photos):
    queries = json.loads((tiny_blip2_dir / "config.json").read_text())["num_query_tokens"]

    def few_positions(config):  # room for 8 new tokens after the image rows and BOS
        config["text_config"]["max_position_embeddings"] = queries + 8

    folder = _edited(tiny_blip2_dir, tmp_path / "short", few_positions)
    said = (rf"the default max_new_tokens 30 does not fit the LLM's {queries + 8} positions after the shortest "
            rf"prompt \({queries + 1}\): the artifact's default is 8")
    with pytest.warns(mmedge.MmedgeWarning, match=said):
        out = export_model(folder, tmp_path / "out", random_weights=True, progress=False)
    assert json.loads((out / "manifest.json").read_text())["generation"]["max_new_tokens"] == 8
    with mmedge.load(out, threads=1) as captioner:  # it was refused: "holds an unusable default"
        stream = captioner.stream(photos[0], eos_token_id=[])
        "".join(stream)
        assert stream.tokens == 8
