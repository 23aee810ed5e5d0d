"""Battery, requests: labels, prompts, generation settings, command lines and backends a caller may get
wrong. Refused ones raise their typed error (API) and give one error line with the error's exit code (CLI);
over-long texts are cut with a warning, never refused.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmedge
from mmedge.cli import main
from mmedge.errors import BackendUnavailableError, InputError
from mmedge.pipelines.captioner import vqa_prompt
from mmedge.pipelines.zero_shot import MAX_LABELS
from tests.support.battery import api_error, check_error, cli_error

LABELS = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def classifier(clip_artifacts):
    with mmedge.load(clip_artifacts("fp32"), threads=1) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def captioner(blip2_artifact):
    with mmedge.load(blip2_artifact, threads=1) as pipeline:
        yield pipeline


# --- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,words", [
    ([], "label list is empty"),
    (["cat", "dog", "cat"], "duplicates ('cat')"),
    ([f"thing {i}" for i in range(10_000)], "10,000 labels"),
    (["cat", "  "], "blank"),
    ("cat", "single string"),
])
def test_api_refuses_bad_label_lists(classifier, photos, labels, words):
    error = api_error(lambda: classifier(photos[0], labels=labels), InputError, words)
    if len(labels) == 10_000:
        assert f"at most {MAX_LABELS:,} labels" in str(error)


@pytest.mark.parametrize("labels,words", [
    ([], "no labels"), (["cat", "cat"], "duplicates"), ([f"thing {i}" for i in range(10_000)], "10,000 labels"),
])
def test_cli_refuses_bad_label_lists(capsys, clip_artifacts, photos, tmp_path, labels, words):
    if len(labels) > 100:  # as a file: a command line this long is a test artefact, not a use
        (tmp_path / "labels.txt").write_text("\n".join(labels))
        argv = ["--labels-file", tmp_path / "labels.txt"]
    else:
        argv = ["--labels", *labels]
    cli_error(capsys, ["run", clip_artifacts("fp32"), photos[0], *argv], InputError, words)


def test_cli_missing_labels_file(capsys, clip_artifacts, photos, tmp_path):
    cli_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels-file", tmp_path / "nope.txt"], InputError,
              "labels file", "does not exist")


def test_the_label_limit_itself_is_accepted(classifier, photos):
    labels = [f"thing {i}" for i in range(MAX_LABELS)]
    assert len(classifier(photos[0], labels=labels, top_k=2)) == 2


# --- over-long texts: cut with a warning ------------------------------------------------------------
def test_overlong_label_is_truncated_with_a_warning(capsys, classifier, clip_artifacts, photos):
    long_label = "very " * 200 + "small cat"
    with pytest.warns(UserWarning, match="longer than 77 tokens and were truncated"):
        result = classifier(photos[0], labels=[long_label, "dog"])
    assert {r["label"] for r in result} == {long_label, "dog"}
    with pytest.warns(UserWarning, match="truncated to 77"):
        assert main(["run", str(clip_artifacts("fp32")), photos[0], "--labels", long_label, "dog"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("(") == 2


def test_a_prompt_that_does_not_fit_is_refused_with_the_setting_that_fits(capsys, captioner, blip2_artifact, photos):
    """Cutting a question to fit kept its end ("... cat? Answer:") and, past the room, nothing of it: a caption
    printed as the answer. It is refused, as IDEFICS and Flan-T5 prompts are, with the max_new_tokens that fits."""
    question = "is there " + "a very " * 400 + "cat?"
    with pytest.raises(InputError, match=r"the prompt has \d+ tokens .*expected at most"):
        captioner.ask(photos[0], question, max_new_tokens=4)
    with pytest.raises(InputError, match=r"the prompt has 40,008 characters"):  # refused before tokenizing
        captioner.caption(photos[0], "x" * 40_000 + " a photo", max_new_tokens=4)
    assert main(["run", str(blip2_artifact), photos[0], "--question", question, "--max-new-tokens", "4"]) == 2
    assert capsys.readouterr().out == ""
    positions = captioner.settings["decoder"]["max_positions"]
    queries = captioner.settings["num_query_tokens"]
    question = "what color is the circle?"
    tokens = len(captioner.tokenizer.encode_all(vqa_prompt(captioner.vqa_template, question)))
    most = positions - queries - tokens + 1  # the last new token is never fed back, as in transformers' generate
    with pytest.raises(InputError, match=rf"lower max_new_tokens to {most} or less"):
        captioner.ask(photos[0], question, max_new_tokens=most + 1)
    assert isinstance(captioner.ask(photos[0], question, max_new_tokens=most), str)
    with pytest.raises(InputError, match=rf"prompt length {queries + 1} \+ max_new_tokens.*lower max_new_tokens to "
                                         rf"{positions - queries} "):  # a caption's own advice is right at once
        captioner.caption(photos[0], max_new_tokens=positions)


# --- generation settings ---------------------------------------------------------------------------
ABSURD = [
    ({"max_new_tokens": -1}, "max_new_tokens=-1", "--max-new-tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens=0", "--max-new-tokens"),
    ({"max_new_tokens": 10**6}, "max_new_tokens=1000000", "--max-new-tokens"),
    ({"max_new_tokens": 1000}, "within the decoder's 128 positions", "--max-new-tokens"),
    ({"do_sample": True, "top_p": 1.5}, "top_p=1.5", "--top-p"),
    ({"do_sample": True, "top_p": float("nan")}, "top_p=nan", "--top-p"),
    ({"do_sample": True, "top_p": -0.1}, "top_p=-0.1", "--top-p"),
    ({"do_sample": True, "temperature": 0.0}, "temperature=0.0", "--temperature"),
    ({"num_beams": 0}, "num_beams=0", "--num-beams"),
    ({"do_sample": True, "top_k": -5}, "top_k=-5", "--top-k-tokens"),
    ({"do_sample": True, "num_beams": 3}, "num_beams=3", "--num-beams"),
    ({"do_sample": True, "seed": -1}, "seed=-1", "--seed"),  # a seed without --sample is refused as idle
]


@pytest.mark.parametrize("settings,words,flag", ABSURD, ids=[w for _, w, _ in ABSURD])
def test_api_refuses_absurd_generation_settings(captioner, photos, settings, words, flag):
    error = api_error(lambda: captioner.caption(photos[0], **settings), InputError, words)
    assert "generation setting" in str(error)
    api_error(lambda: next(captioner.stream(photos[0], **settings)), InputError, words)


@pytest.mark.parametrize("settings,words,flag", ABSURD, ids=[w for _, w, _ in ABSURD])
def test_cli_refuses_absurd_generation_settings(capsys, blip2_artifact, photos, settings, words, flag):
    argv = ["run", blip2_artifact, photos[0]]
    for key, value in settings.items():
        if key == "do_sample":
            argv.append("--sample")
        else:
            argv += [{"top_k": "--top-k-tokens"}.get(key, "--" + key.replace("_", "-")), value]
    assert flag in [str(a) for a in argv]
    from mmedge.run_options import generation_flag_words

    cli_error(capsys, argv, InputError, generation_flag_words(words))  # said in the flags' words, before loading


def test_api_refuses_unknown_and_mistyped_settings(captioner, photos):
    api_error(lambda: captioner.caption(photos[0], beams=3), InputError, "unknown generation setting(s) ['beams']")
    api_error(lambda: captioner.caption(photos[0], max_new_tokens="20"), InputError, "max_new_tokens='20'",
              "an integer")
    api_error(lambda: captioner.caption(photos[0], stop_strings="\n"), InputError, "stop_strings", "a list of strings")
    api_error(lambda: captioner.caption(photos[0], length_penalty=10**400), InputError, "length_penalty", "finite")


@pytest.mark.parametrize("argv,words", [
    (["--max-new-tokens", "many"], "invalid int value: 'many'"),
    (["--top-p", "high"], "invalid float value: 'high'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_cli_bad_command_line_is_one_line(capsys, blip2_artifact, photos, argv, words):
    with pytest.raises(SystemExit) as info:
        main(["run", str(blip2_artifact), photos[0], *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("mmedge: error: ") and words in err[0]
    assert "fix: see `mmedge" in err[0] and "--help`" in err[0]


def test_top_k_of_the_classifier(capsys, classifier, clip_artifacts, photos):
    api_error(lambda: classifier(photos[0], labels=LABELS, top_k=0), InputError, "top_k is 0", "positive integer")
    with pytest.raises(SystemExit) as stop:  # refused as the command line is read, before anything loads
        main(["run", str(clip_artifacts("fp32")), photos[0], "--labels", *LABELS, "--top-k", "-3"])
    assert stop.value.code == 2 and "--top-k: -3 is below 1" in capsys.readouterr().err


def test_same_thread_reentry_is_refused_not_deadlocked(captioner, photos):
    stream = captioner.stream(photos[0], max_new_tokens=6)
    next(stream)
    api_error(lambda: captioner.caption(photos[0], max_new_tokens=2), InputError, "stream()", "close()")
    stream.close()
    assert isinstance(captioner.caption(photos[0], max_new_tokens=2), str)  # the lock was released


# --- backends --------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,kind,words", [
    ({"backend": "tensorrt"}, BackendUnavailableError, "backend 'tensorrt' needs the Python package"),  # absent here
    ({"backend": "torch"}, BackendUnavailableError, "backend 'torch'"),  # no PyTorch weights in this artifact
    ({"device": "cuda"}, BackendUnavailableError, "device=cuda was requested"),
    ({"backend": "tvm"}, InputError, "unknown backend 'tvm'"),  # no such backend: bad input, exit 2
    ({"backend": "foo"}, InputError, "unknown backend 'foo'"),
    ({"device": "tpu"}, InputError, "unknown device 'tpu'"),
])
def test_named_backend_that_is_absent_or_unknown(capsys, clip_artifacts, photos, options, kind, words):
    api_error(lambda: mmedge.load(clip_artifacts("fp32"), **options), kind, words)
    if kind is not InputError:  # argparse knows the backends and devices: tests/test_cli.py covers the unknown ones
        flags = [part for key, value in options.items() for part in (f"--{key}", value)]
        cli_error(capsys, ["run", clip_artifacts("fp32"), photos[0], "--labels", "cat", *flags], kind, words)


@pytest.mark.parametrize("call,kind,words", [
    (lambda art: mmedge.load(None), "ArtifactNotFoundError", "the artifact path is a NoneType"),
    (lambda art: mmedge.load(art, threads=0), "InputError", "threads is 0"),
    (lambda art: mmedge.load(art, threads="2"), "InputError", "threads is '2'"),
    (lambda art: mmedge.load(art, backend=["onnxruntime"]), "InputError", "unknown backend"),
    (lambda art: mmedge.load(art, task="caption"), "InputError", "task 'caption' is not one this artifact"),
])
def test_api_misuse_of_load(clip_artifacts, call, kind, words):
    import mmedge.errors

    api_error(lambda: call(clip_artifacts("fp32")), getattr(mmedge.errors, kind), words)


NO_ORT = "import sys; sys.modules['onnxruntime'] = None; from mmedge.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("backend,words",
                         [("onnxruntime", "needs the Python package 'onnxruntime', which is not installed"),
                                           ("auto", "onnxruntime is not installed")])
def test_backend_whose_engine_is_not_installed(clip_artifacts, photos, backend, words):
    """A fresh interpreter in which onnxruntime cannot be imported, as on a device where it is not installed."""
    result = subprocess.run([sys.executable, "-c", NO_ORT, "run", str(clip_artifacts("fp32")), photos[0], "--labels",
                             "cat",
                             "--backend", backend], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == BackendUnavailableError.exit_code, result.stderr
    assert len(lines) == 1 and words in lines[0] and "fix: pip install onnxruntime" in lines[0], result.stderr


def test_unanticipated_failure_is_one_line_too(capsys, clip_artifacts, photos, monkeypatch):
    """A bug (here: a preprocessing step that raises ZeroDivisionError) still gives one line and exit 1."""
    import mmedge.preprocess

    monkeypatch.setattr(mmedge.preprocess.ImagePreprocessor, "__call__", lambda self, images: 1 / 0)
    assert main(["run", str(clip_artifacts("fp32")), photos[0], "--labels", "cat"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmedge: internal error: ZeroDivisionError")
    assert "MMEDGE_DEBUG=1" in err[0]
    monkeypatch.setenv("MMEDGE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["run", str(clip_artifacts("fp32")), photos[0], "--labels", "cat"])


def test_check_error_rejects_untyped_errors():
    """The battery's own check fails on a plain exception or a message without a fix."""
    with pytest.raises(AssertionError):
        check_error(ValueError("x"), InputError)
    with pytest.raises(AssertionError):
        check_error(InputError("x"), InputError)
