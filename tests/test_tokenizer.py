"""mmedge.tokenizer.TextTokenizer against the transformers tokenizer of the same checkpoint."""

import json
import threading
import warnings

import numpy as np
import pytest

from mmedge.errors import InputError, ManifestError, ModelLoadError, TokenizerError
from mmedge.tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")
tokenization = pytest.importorskip("mmedge.export.tokenization")

MAX_LENGTH = 77
TEXTS = [
    "a photo of a cat",
    "a photograph of an elephant standing beside a waterfall at sunset",
    "dog",
]
ODD_TEXTS = [
    "",
    "A PHOTO OF A CAT!!!",
    "  extra   spaces\tand\ttabs\nand newlines  ",
    "emoji 🐱🚀 and café, naïve, Zürich — “quotes”",
    "日本語のテキスト and ελληνικά",
    "it's the dog's ball; isn't it? (yes) #1 @home 3.14 $5",
]
LONG_TEXT = " ".join(["photograph"] * 250 + ["cat"] * 250)  # 500 words, far past 77 tokens


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_clip_dir):
    """The checkpoint's tokenizer, loaded the way a real checkpoint is (a local folder: no download)."""
    return transformers.AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def tokenizer_json(hf_tokenizer, tmp_path_factory):
    """tokenizer.json as the exporter writes it."""
    return tokenization.save_tokenizer_json(hf_tokenizer, tmp_path_factory.mktemp("artifact") / "tokenizer.json")


def device_tokenizer(hf_tokenizer, tokenizer_json, padding="longest"):
    """A TextTokenizer built from the exporter's file and settings."""
    settings = tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH, padding=padding)
    return TextTokenizer.from_file(tokenizer_json, json.loads(json.dumps(settings)))


def reference(hf_tokenizer, texts, **kwargs):
    """transformers' input_ids and attention_mask, int64 [batch, tokens]."""
    encoded = hf_tokenizer(texts, return_tensors="np", truncation=True, max_length=MAX_LENGTH, **kwargs)
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def assert_same(ours, theirs):
    """Both (input_ids, attention_mask) pairs are identical, dtype included."""
    for mine, expected in zip(ours, theirs):
        assert mine.dtype == np.int64
        np.testing.assert_array_equal(mine, expected)


# --- host helpers --------------------------------------------------------------------------------
def test_settings_from_hf(hf_tokenizer):
    settings = tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH)
    assert settings == {"file": "tokenizer.json", "max_length": 77, "pad_id": hf_tokenizer.pad_token_id,
                        "padding": "longest"}
    assert settings["pad_id"] == hf_tokenizer.eos_token_id  # CLIP pads with <|endoftext|>
    assert json.loads(json.dumps(settings)) == settings


def test_settings_reject_bad_arguments(hf_tokenizer):
    with pytest.raises(InputError, match="padding"):
        tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH, padding="right")
    with pytest.raises(InputError, match="max_length"):
        tokenization.tokenizer_settings_from_hf(hf_tokenizer, 0)


def test_save_leaves_out_per_call_state(hf_tokenizer, tokenizer_json):
    hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=MAX_LENGTH)  # sets state on the backend
    saved = json.loads(tokenizer_json.read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    assert saved["model"]["type"] == "BPE"


def test_non_fast_tokenizer_is_refused(tmp_path):
    class SlowTokenizer:
        is_fast = False
        pad_token_id = 0

    with pytest.raises(ModelLoadError, match="not backed by the tokenizers library"):
        tokenization.save_tokenizer_json(SlowTokenizer(), tmp_path / "tokenizer.json")
    with pytest.raises(ModelLoadError):
        tokenization.tokenizer_settings_from_hf(SlowTokenizer(), MAX_LENGTH)


# --- parity with transformers --------------------------------------------------------------------
def test_tiny_tokenizer_splits_words_into_pieces(hf_tokenizer):
    assert len(hf_tokenizer("photograph")["input_ids"]) > 3  # bos, several pieces, eos


def test_single_text(hf_tokenizer, tokenizer_json):
    ours = device_tokenizer(hf_tokenizer, tokenizer_json).encode(TEXTS[1])
    assert ours[0].shape == ours[1].shape == (1, len(hf_tokenizer(TEXTS[1])["input_ids"]))
    assert_same(ours, reference(hf_tokenizer, [TEXTS[1]]))


def test_batch_padded_to_longest(hf_tokenizer, tokenizer_json):
    ours = device_tokenizer(hf_tokenizer, tokenizer_json, "longest").encode(TEXTS)
    assert_same(ours, reference(hf_tokenizer, TEXTS, padding=True))
    assert ours[1].sum(axis=1).tolist() == [len(hf_tokenizer(t)["input_ids"]) for t in TEXTS]


def test_batch_padded_to_max_length(hf_tokenizer, tokenizer_json):
    ours = device_tokenizer(hf_tokenizer, tokenizer_json, "max_length").encode(TEXTS)
    assert ours[0].shape == (len(TEXTS), MAX_LENGTH)
    assert_same(ours, reference(hf_tokenizer, TEXTS, padding="max_length"))


def test_truncation_keeps_end_of_text_last(hf_tokenizer, tokenizer_json):
    tokenizer = device_tokenizer(hf_tokenizer, tokenizer_json)
    with pytest.warns(UserWarning, match="1 of 2 texts") as caught:
        ours = tokenizer.encode([LONG_TEXT, "a cat"])
    assert len(caught) == 1
    assert ours[0].shape == (2, MAX_LENGTH)
    assert ours[0][0, 0] == hf_tokenizer.bos_token_id and ours[0][0, -1] == hf_tokenizer.eos_token_id
    assert_same(ours, reference(hf_tokenizer, [LONG_TEXT, "a cat"], padding=True))


def test_no_warning_without_truncation(hf_tokenizer, tokenizer_json):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device_tokenizer(hf_tokenizer, tokenizer_json).encode(TEXTS)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_unusual_texts(hf_tokenizer, tokenizer_json, text):
    assert_same(device_tokenizer(hf_tokenizer, tokenizer_json).encode(text), reference(hf_tokenizer, [text]))


def test_empty_string_is_just_special_tokens(hf_tokenizer, tokenizer_json):
    input_ids, attention_mask = device_tokenizer(hf_tokenizer, tokenizer_json).encode("")
    assert input_ids.tolist() == [[hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id]]
    assert attention_mask.tolist() == [[1, 1]]


def test_odd_batch_matches_padded(hf_tokenizer, tokenizer_json):
    for padding, hf_padding in (("longest", True), ("max_length", "max_length")):
        with pytest.warns(UserWarning, match="1 of 7 texts"):
            ours = device_tokenizer(hf_tokenizer, tokenizer_json, padding).encode(ODD_TEXTS + [LONG_TEXT])
        assert_same(ours, reference(hf_tokenizer, ODD_TEXTS + [LONG_TEXT], padding=hf_padding))


# --- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS + ODD_TEXTS[1:])
def test_decode_matches_transformers(hf_tokenizer, tokenizer_json, text):
    tokenizer = device_tokenizer(hf_tokenizer, tokenizer_json)
    input_ids, _ = tokenizer.encode(text)
    assert tokenizer.decode(input_ids[0]) == hf_tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=True)
    assert tokenizer.decode(input_ids[0], skip_special_tokens=False) == hf_tokenizer.decode(input_ids[0].tolist())


def test_decode_round_trip(hf_tokenizer, tokenizer_json):
    tokenizer = device_tokenizer(hf_tokenizer, tokenizer_json, "max_length")
    input_ids, _ = tokenizer.encode(["A Photo of a CAT", "two dogs playing in the snow"])
    assert [tokenizer.decode(row) for row in input_ids] == ["a photo of a cat", "two dogs playing in the snow"]


def test_decode_rejects_a_batch(hf_tokenizer, tokenizer_json):
    tokenizer = device_tokenizer(hf_tokenizer, tokenizer_json)
    with pytest.raises(InputError, match="shape"):
        tokenizer.decode(np.zeros((2, 3), dtype=np.int64))


# --- errors --------------------------------------------------------------------------------------
def test_empty_list_is_refused(hf_tokenizer, tokenizer_json):
    with pytest.raises(InputError, match="empty"):
        device_tokenizer(hf_tokenizer, tokenizer_json).encode([])


@pytest.mark.parametrize("batch", [["a cat", 3], ["a cat", None], [b"bytes"]])
def test_non_string_item_is_refused(hf_tokenizer, tokenizer_json, batch):
    with pytest.raises(InputError, match=r"text \d+ is a"):
        device_tokenizer(hf_tokenizer, tokenizer_json).encode(batch)


def test_non_sequence_is_refused(hf_tokenizer, tokenizer_json):
    with pytest.raises(InputError, match="int cannot be tokenized"):
        device_tokenizer(hf_tokenizer, tokenizer_json).encode(42)


def test_missing_file(tmp_path, hf_tokenizer):
    settings = tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH)
    with pytest.raises(TokenizerError, match="does not exist"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json", settings)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}', ""])
def test_corrupt_file(tmp_path, hf_tokenizer, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match="cannot be read"):
        TextTokenizer.from_file(path, tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH))


@pytest.mark.parametrize(
    "change",
    [{"padding": "left"}, {"max_length": "77"}, {"max_length": 1}, {"pad_id": 10**9}, {"pad_id": None}, {"file": None}],
)
def test_bad_settings(hf_tokenizer, tokenizer_json, change):
    settings = {**tokenization.tokenizer_settings_from_hf(hf_tokenizer, MAX_LENGTH), **change}
    with pytest.raises(ManifestError, match="tokenizer"):
        TextTokenizer.from_file(tokenizer_json, settings)


def test_invalid_unicode_is_a_tokenizer_error(hf_tokenizer, tokenizer_json):
    with pytest.raises(TokenizerError):
        device_tokenizer(hf_tokenizer, tokenizer_json).encode("broken \ud800 surrogate")


# --- concurrency ---------------------------------------------------------------------------------
def test_shared_between_threads(hf_tokenizer, tokenizer_json):
    tokenizer = device_tokenizer(hf_tokenizer, tokenizer_json)
    expected = {text: tokenizer.encode(text)[0].tolist() for text in TEXTS}
    errors = []

    def work(text):
        for _ in range(50):
            if tokenizer.encode(text)[0].tolist() != expected[text]:
                errors.append(text)

    threads = [threading.Thread(target=work, args=(text,)) for text in TEXTS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.mark.parametrize("checkpoint", ["tiny_blip2_t5_dir", "tiny_blip2_dir"])
def test_decode_cleans_up_spaces_as_transformers_does(request, checkpoint, tmp_path):
    """transformers' decode drops spaces before punctuation where the checkpoint's tokenizer sets
    clean_up_tokenization_spaces, for Unigram models such as T5's (transformers 5 skips it for BPE, like OPT's): the
    export records which, and the device decodes alike (it printed "yes , it is n't ." where transformers printed
    "yes, it isn't.")."""
    from transformers import AutoTokenizer

    from mmedge.export.tokenization import save_tokenizer_json, tokenizer_settings_from_hf

    folder = request.getfixturevalue(checkpoint)
    for cleans in (False, True):
        hf = AutoTokenizer.from_pretrained(folder, clean_up_tokenization_spaces=cleans)
        settings = tokenizer_settings_from_hf(hf, max_length=64)
        device = TextTokenizer.from_file(save_tokenizer_json(hf, tmp_path / "tokenizer.json"), settings)
        t5 = checkpoint == "tiny_blip2_t5_dir"
        assert device.cleans_up_spaces == settings.get("clean_up_spaces", False) == (cleans and t5)
        changed = 0
        for text in ("yes , it is n't .", "do ' s ? a ,b !", "they 're here , we 've gone"):
            ids = hf(text, add_special_tokens=False)["input_ids"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = hf.decode(ids, skip_special_tokens=True)
            assert device.decode(ids) == expected, (cleans, text)
            changed += expected != hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert bool(changed) == (cleans and t5)  # the texts do hold spaces a clean-up drops


def test_a_bad_clean_up_setting_is_a_manifest_error(hf_tokenizer, tokenizer_json):
    from mmedge.export.tokenization import tokenizer_settings_from_hf

    settings = {**tokenizer_settings_from_hf(hf_tokenizer, max_length=16), "clean_up_spaces": "yes"}
    with pytest.raises(ManifestError, match="clean_up_spaces"):
        TextTokenizer.from_file(tokenizer_json, settings)
