"""ZeroShotClassifier and Embedder on exported tiny CLIP artifacts (ONNX Runtime CPU)."""

import numpy as np
import pytest
from PIL import Image

import mmedge
from mmedge.errors import InputError
from mmedge.pipelines import ENSEMBLE_TEMPLATES, Embedder, ZeroShotClassifier

LABELS = ["cat", "dog", "car", "rocket"]


@pytest.fixture(scope="module")
def classifier(clip_artifacts):
    with mmedge.load(clip_artifacts("fp32"), threads=1) as pipeline:
        yield pipeline


def test_load_returns_the_pipeline_the_manifest_names(clip_artifacts):
    assert isinstance(mmedge.load(clip_artifacts("fp32")), ZeroShotClassifier)
    assert isinstance(mmedge.load(clip_artifacts("fp32"), task="embed"), Embedder)
    assert isinstance(mmedge.load(clip_artifacts("fused-fp32")), ZeroShotClassifier)
    with pytest.raises(InputError, match="task 'caption'"):
        mmedge.load(clip_artifacts("fp32"), task="caption")
    with pytest.raises(InputError, match="task '' is not one"):  # not the default task in disguise
        mmedge.load(clip_artifacts("fp32"), task="")
    assert mmedge.load(clip_artifacts("fp32"), task="embed").task == "embed"


def test_predictions_are_sorted_probabilities(classifier, photos):
    result = classifier(photos[0], labels=LABELS)
    assert [set(r) for r in result] == [{"label", "score"}] * 4
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True)
    assert abs(sum(scores) - 1) < 1e-5 and sorted(r["label"] for r in result) == sorted(LABELS)


def test_batch_equals_one_by_one_and_top_k(classifier, photos):
    batch = classifier(photos[:3], labels=LABELS, top_k=2)
    assert len(batch) == 3 and all(len(r) == 2 for r in batch)
    for photo, row in zip(photos[:3], batch):
        single = classifier(photo, labels=LABELS, top_k=2)
        assert [r["label"] for r in single] == [r["label"] for r in row]
        np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in row], atol=1e-6)


def test_label_embeddings_are_computed_once(classifier, photos, monkeypatch):
    classifier(photos[0], labels=LABELS)
    calls = []
    original = classifier.runners["text"].infer
    monkeypatch.setattr(classifier.runners["text"], "infer", lambda feeds: calls.append(1) or original(feeds))
    classifier(photos[1], labels=LABELS)
    assert calls == []
    classifier(photos[1], labels=LABELS + ["bird"])
    assert calls == [1]


def test_template_ensembling_averages_normalized_prompt_embeddings(classifier):
    bank = classifier.label_bank(LABELS, ENSEMBLE_TEMPLATES)
    assert bank.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1, atol=1e-5)
    by_hand = []
    for label in LABELS:
        embeds = classifier._text_embeds([t.format(label) for t in ENSEMBLE_TEMPLATES])
        embeds /= np.linalg.norm(embeds, axis=1, keepdims=True)
        mean = embeds.mean(0)
        by_hand.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(bank, np.stack(by_hand), atol=1e-5)


def test_fused_graph_equals_two_graph_path(clip_artifacts, photos):
    """One baked graph gives the same probabilities as vision + text + cached labels."""
    two = mmedge.load(clip_artifacts("fp32"))
    fused = mmedge.load(clip_artifacts("fused-fp32"))
    assert fused.tokenizer is None and set(fused.runners) == {"zero_shot"}
    np.testing.assert_allclose(fused.probabilities(photos), two.probabilities(photos, LABELS), atol=1e-5)
    assert [r["label"] for r in fused(photos[0])] == [r["label"] for r in two(photos[0], labels=LABELS)]


def test_fused_artifact_refuses_other_labels(clip_artifacts, photos):
    fused = mmedge.load(clip_artifacts("fused-fp32"))
    with pytest.raises(InputError, match="baked into its graph"):
        fused(photos[0], labels=["zebra"])
    assert fused(photos[0], labels=LABELS)  # the baked labels themselves are fine
    with pytest.raises(InputError, match="labels is a int"):  # as the two-graph classifier says it, not a TypeError
        fused(photos[0], labels=5)
    assert [r["label"] for r in fused(photos[0], labels=np.array(LABELS))] == [
        r["label"] for r in fused(photos[0])]


def test_labels_from_numpy_are_plain_strings(classifier, photos):
    result = classifier(photos[0], labels=np.array(LABELS))
    assert result == classifier(photos[0], labels=LABELS) and all(type(r["label"]) is str for r in result)


@pytest.mark.parametrize("labels,match", [
    ([], "label list is empty"), (["cat", "cat"], "duplicates"), ("cat", "single string"),
    # one class to CLIP's tokenizer (it lowercases and squeezes spaces): its probability would be split in two
    (["Cat", "dog", "cat"], "labels 'Cat' and 'cat' are the same tokens"), (["cat", " cat  "], "the same tokens"),
    (["cat", ""], "blank"), (["cat", 3], "non-text"), (None, "no labels were given"), (5, "labels is a int"),
    ({"cat", "dog"}, "labels is a set"), ({"cat": 0}, "labels is a dict"), (b"cat", "labels is a bytes"),
    # far past the 77 tokens the text encoder reads: refused before tokenizing (10 M characters took 75 s)
    (["cat", "word " * 1_000_000], "label 1 has 5,000,000 characters"),
])
def test_bad_labels(classifier, photos, labels, match):
    with pytest.raises(InputError, match=match):
        classifier(photos[0], labels=labels)


def test_many_labels(classifier, photos):
    labels = [f"thing {i}" for i in range(600)]
    result = classifier(photos[0], labels=labels, top_k=3)
    assert len(result) == 3 and classifier.label_bank(labels).shape == (600, 16)


@pytest.mark.parametrize("templates,match", [([], "template list is empty"), (["no slot"], "exactly one"),
                                             (["{} and {}"], "exactly one"),
                                             # a dict was read by its keys, while labels as a dict are refused
                                             ({"a {}.": 1}, "templates is a dict"),
                                             ({"a {}.", "an {}."}, "templates is a set"),
                                             (["a {}.", "a {}!", "a {}."], r"templates repeat \('a \{\}.'\)")])
def test_bad_templates(classifier, photos, templates, match):
    with pytest.raises(InputError, match=match):
        classifier(photos[0], labels=LABELS, templates=templates)


@pytest.mark.parametrize("top_k", [0, -1, "2", 1.5, True, np.float64(2.0), np.int64(0)])
def test_bad_top_k(classifier, photos, top_k):
    with pytest.raises(InputError, match="top_k"):
        classifier(photos[0], labels=LABELS, top_k=top_k)


def test_numpy_top_k_is_a_count(classifier, photos):
    """np.int64 (read from an array) is taken as a plain int, as generation settings take one."""
    assert classifier(photos[0], labels=LABELS, top_k=np.int64(2)) == classifier(photos[0], labels=LABELS, top_k=2)


def test_embedder_normalized_and_consistent(clip_artifacts, photos):
    embedder = mmedge.load(clip_artifacts("fp32"), task="embed")
    images = embedder.embed_images(photos[:2] + [Image.open(photos[2])])
    texts = embedder.embed_texts(["a cat", "a dog"])
    assert images.shape == (3, 16) and texts.shape == (2, 16) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(embedder.similarity(photos[:2], ["a cat", "a dog"]), images[:2] @ texts.T, atol=1e-5)
    with pytest.raises(InputError, match="text list is empty"):
        embedder.embed_texts([])
    with pytest.raises(InputError, match="texts is a NoneType"):
        embedder.embed_texts(None)
    with pytest.raises(InputError, match="texts is bytes.*decode it first"):  # not "text 0 is a int (97)"
        embedder.embed_texts(b"abc")
    with pytest.raises(InputError, match="text 1 has 10,000,000 characters"):  # before seconds of tokenizing
        embedder.embed_texts(["a cat", "x " * 5_000_000])
    with pytest.raises(InputError, match="image list is empty"):
        embedder.embed_images([])


def test_fused_embedder_has_images_but_no_text(clip_artifacts, photos):
    fused = mmedge.load(clip_artifacts("fused-fp32"), task="zero-shot")
    embeds = Embedder(fused.artifact, fused.runners, fused.preprocessor).embed_images(photos[:2])
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1, atol=1e-5)
    with pytest.raises(InputError, match="no text encoder"):
        Embedder(fused.artifact, fused.runners, fused.preprocessor).embed_texts(["a cat"])


@pytest.mark.parametrize("variant", ["int8-static", "int8-dynamic", "fp16", "fused-int8"])
def test_lower_precision_variants_run_and_agree(clip_artifacts, photos, variant):
    """Embeddings stay within cosine 0.99 of FP32 on real photos; most top-1 labels agree. Not one machine's
    numerics: INT8 (7-bit weights) is exact integer arithmetic on every CPU, and FP16's logit error (about 0.004)
    is 60 times below the reference's narrowest top-2 margin here (0.24)."""
    from mmedge.metrics import cosine_rows, top1_agreement

    labels = None if variant.startswith("fused") else LABELS

    reference, lowered = mmedge.load(clip_artifacts("fp32")), mmedge.load(clip_artifacts(variant))
    ref_embeds = Embedder(reference.artifact, reference.runners, reference.preprocessor).embed_images(photos)
    embeds = Embedder(lowered.artifact, lowered.runners, lowered.preprocessor).embed_images(photos)
    assert cosine_rows(ref_embeds, embeds).min() >= 0.99
    probs = lowered.probabilities(photos, labels)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert top1_agreement(reference.probabilities(photos, LABELS), probs) >= 0.75


def test_threads_asking_for_one_new_label_bank_build_it_once(classifier):
    """Eight threads asking for the same new bank each ran the text tower over every prompt (8x the work); now one
    builds it and the others wait for it, and all get the same bank."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    labels, prompts, lock = [f"object {i}" for i in range(40)], [], threading.Lock()
    embed = classifier._text_embeds

    def counted(texts):
        with lock:
            prompts.extend(texts)
        return embed(texts)

    classifier._text_embeds = counted
    try:
        with ThreadPoolExecutor(8) as pool:
            banks = list(pool.map(lambda _: classifier.label_bank(labels, ["a {}."]), range(8)))
    finally:
        del classifier._text_embeds
    assert len(prompts) == len(labels) and all(np.array_equal(bank, banks[0]) for bank in banks)


def test_a_label_bank_handed_out_is_read_only(classifier, photos):
    """``bank *= -1`` on the array label_bank() returned changed every later classification with those labels."""
    before = classifier(photos[0], labels=LABELS)
    bank = classifier.label_bank(LABELS)
    with pytest.raises(ValueError, match="read-only"):
        bank *= -1
    assert classifier(photos[0], labels=LABELS) == before
    flipped = -classifier.label_bank(LABELS)  # a new array, as numpy gives one
    assert np.array_equal(flipped, -bank)


@pytest.mark.parametrize("texts,match", [
    # CLIP reads a text up to <|endoftext|>: the text was embedded as "a cat" alone
    (["a dog", "a cat<|endoftext|> on a mat"], r"text 1 holds the tokenizer's special token '<\|endoftext\|>'"),
    (["a cat", ""], r"text 1 is blank \(''\)"), ([" "], r"text 0 is blank \(' '\)"),
])
def test_embedder_refuses_what_a_label_may_not_hold(clip_artifacts, texts, match):
    with mmedge.load(clip_artifacts("fp32"), task="embed", threads=1) as embedder:
        with pytest.raises(InputError, match=match):
            embedder.embed_texts(texts)


def test_pipelines_name_their_artifact_family_and_backends(classifier, clip_artifacts):
    assert repr(classifier) == (f"ZeroShotClassifier({str(clip_artifacts('fp32'))!r}, family=clip, task=zero-shot, "
                                "vision=onnxruntime, text=onnxruntime)")
    embedder = mmedge.load(clip_artifacts("fp32"), task="embed", threads=1)
    embedder.close()
    assert repr(embedder).startswith("Embedder(") and repr(embedder).endswith("text=onnxruntime, closed)")
