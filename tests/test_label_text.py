"""Label text as the text encoder reads it: a labels file's byte order mark is not part of a label, and labels the
text encoder cannot tell apart (the same tokens, the same once cut to its length, a special token written in a label)
are refused the same way at run time, at export (baked labels) and by `mmedge serve`."""

import json
import re

import pytest

import mmedge
from mmedge.cli import main
from mmedge.errors import InputError
from mmedge.export import export_model

BOM = b"\xef\xbb\xbf"
LONG = "red " * 80  # past the tiny CLIP's 77 tokens in any template


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def classifier(clip_artifacts):
    with mmedge.load(clip_artifacts("fp32")) as zs:
        yield zs


# --- a labels file saved with a byte order mark ------------------------------------------------
def test_run_reads_a_labels_file_with_a_byte_order_mark(capsys, clip_artifacts, photos, tmp_path):
    (tmp_path / "bom.txt").write_bytes(BOM + b"red circle\r\nblue square\r\n")
    (tmp_path / "plain.txt").write_bytes(b"red circle\nblue square\n")
    answers = {}
    for name in ("bom.txt", "plain.txt"):
        code, out, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--labels-file", tmp_path / name,
                                 "--json")
        assert code == 0, err
        answers[name] = {p["label"]: p["score"] for p in json.loads(out)["predictions"]}
    assert set(answers["bom.txt"]) == {"red circle", "blue square"}
    assert answers["bom.txt"] == answers["plain.txt"]  # the first label is tokenized without the mark, too


def test_run_names_the_offset_of_a_bad_byte_after_a_byte_order_mark(capsys, clip_artifacts, photos, tmp_path):
    (tmp_path / "bad.txt").write_bytes(BOM + b"cat\n\xffdog\n")
    code, _, err = run_cli(capsys, "run", clip_artifacts("fp32"), photos[0], "--labels-file", tmp_path / "bad.txt")
    assert code == 2 and "is not UTF-8 text (its byte 7 cannot start a character)" in err


def test_export_bakes_a_labels_file_with_a_byte_order_mark(capsys, tiny_clip_dir, tmp_path):
    (tmp_path / "bom.txt").write_bytes(BOM + b"red circle\r\nblue square\r\n")
    code, _, err = run_cli(capsys, "export", tiny_clip_dir, tmp_path / "out", "--labels-file", tmp_path / "bom.txt",
                           "--quiet")
    assert code == 0, err
    baked = json.loads((tmp_path / "out" / "manifest.json").read_text())["zero_shot"]["labels"]
    assert baked == ["red circle", "blue square"]


# --- labels the text encoder cannot tell apart ---------------------------------------------------
def test_export_refuses_labels_that_are_the_same_tokens(tiny_clip_dir, tmp_path):
    """CLIP's tokenizer lowercases and squeezes spaces: the run-time rule, applied before anything is written."""
    with pytest.raises(InputError, match="labels 'red circle' and 'Red  circle' are the same tokens to this model's "
                                         "tokenizer"):
        export_model(str(tiny_clip_dir), tmp_path / "out", labels=["red circle", "Red  circle", "blue square"],
                     progress=False)
    assert not (tmp_path / "out").exists()


def test_run_refuses_labels_that_are_the_same_once_cut(classifier, photos):
    max_length = classifier.tokenizer.max_length
    assert len(classifier.tokenizer.encode_all(f"a photo of a {LONG}circle.")) > max_length
    with pytest.raises(InputError, match=rf"labels 'red red .*red circle' and 'red red .*red square' are the same "
                                         rf"tokens .* once each prompt is cut at {max_length} tokens"):
        classifier(photos[0], labels=[LONG + "circle", LONG + "square"])
    with pytest.raises(InputError, match="cut at"):
        classifier(photos[0], labels=[LONG + "circle", LONG + "square"], templates=["{}", "a {}"])


def test_labels_cut_alike_under_one_template_but_not_all_are_kept(classifier, photos):
    """A template that pushes the label past the cut makes every label alike there; another template tells them
    apart, so the bank's average still does."""
    hiding = "a photo of " * 40 + "{}"
    with pytest.raises(InputError, match="'cat' and 'dog' are the same tokens .* cut at"):
        classifier(photos[0], labels=["cat", "dog"], templates=[hiding])
    with pytest.warns(UserWarning, match="truncated"):
        ranked = classifier(photos[0], labels=["cat", "dog"], templates=[hiding, "a photo of a {}."])
    assert {r["label"] for r in ranked} == {"cat", "dog"}
    with pytest.warns(UserWarning, match="truncated"):  # long labels that differ before the cut are kept
        assert len(classifier(photos[0], labels=["circle " + LONG, "square " + LONG])) == 2


def test_export_refuses_labels_that_are_the_same_once_cut(tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match="are the same tokens .* once each prompt is cut at 77 tokens"):
        export_model(str(tiny_clip_dir), tmp_path / "out", labels=[LONG + "circle", LONG + "square"], progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", ["cat<|endoftext|>", "<|startoftext|> dog", "a <|endoftext|> b"])
def test_run_refuses_a_special_token_in_a_label(classifier, photos, label):
    token = "<|endoftext|>" if "end" in label else "<|startoftext|>"
    with pytest.raises(InputError, match=re.escape(f"label {label!r} holds the tokenizer's special token '{token}'")):
        classifier(photos[0], labels=["bird", label])


def test_export_refuses_a_special_token_in_a_label(tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match=r"special token '<\|endoftext\|>'"):
        export_model(str(tiny_clip_dir), tmp_path / "out", labels=["cat<|endoftext|>", "dog"], progress=False)
    assert not (tmp_path / "out").exists()


def test_serve_answers_400_for_labels_the_text_encoder_cannot_tell_apart(clip_artifacts, photos):
    from starlette.testclient import TestClient

    from mmedge.serve.app import create_app
    from mmedge.serve.models import load_models
    from mmedge.serve.options import ServeOptions
    from tests.support.serve import data_uri

    options = ServeOptions(artifacts=(clip_artifacts("fp32"),), threads=1)
    models = load_models(options)
    try:
        with TestClient(create_app(options, models)) as client:
            for labels, fragment in ((["cat<|endoftext|>", "dog"], "special token '<|endoftext|>'"),
                                     (["Cat", "cat"], "labels 'Cat' and 'cat' are the same tokens")):
                answer = client.post("/v1/classify", json={"model": next(iter(models)), "images": [data_uri(photos[0])],
                                                           "labels": labels})
                error = answer.json()["error"]
                assert answer.status_code == 400 and error["code"] == "invalid_value", answer.text
                assert fragment in error["message"]
    finally:
        for model in models.values():
            model.close()
