"""The zero-shot pipeline model's batch (``mmedge.triton.rows``), run in this process over mmedge's own runners.

Triton's dynamic batcher hands the model every request that queued meanwhile; which requests meet in one batch
depends on timing, so the served tests (tests/test_triton_serving.py) cannot choose a batch's mix. Here one batch
mixes good requests (different images, labels and templates) with bad ones: each good request gets what
``mmedge.load`` gives for it alone, each bad one the message the local pipeline gives for the same mistake, and the
images of all good requests go through the vision graph in one call.
"""

import numpy as np
import pytest

import mmedge
from mmedge.artifact import Artifact
from mmedge.errors import InputError
from mmedge.pipelines import ENSEMBLE_TEMPLATES
from mmedge.runtimes.registry import create_runner
from mmedge.triton.backend import ServedPipeline
from mmedge.triton.protocol import text_tensor, texts_of


class CountingRunner:
    """A real runner that records the batch size of each call."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def infer(self, feeds):
        self.calls.append(len(next(iter(feeds.values()))))
        return self.runner.infer(feeds)

    def close(self):
        self.runner.close()


def served(folder, counted: dict):
    artifact = Artifact.open(folder)

    def make_runner(name):
        runner = CountingRunner(create_runner("onnxruntime", artifact.component_path(name), name,
                                              artifact.component(name),
                                              providers=("cpu",), threads=1))
        counted[name] = runner
        return runner

    return ServedPipeline(artifact, {"kind": "zero-shot", "task": "zero-shot"}, make_runner)


def row(images=None, labels=None, templates=None, rows=1):
    inputs = {}
    if images is not None:
        inputs["images"] = np.array([[open(p, "rb").read() if not isinstance(p, bytes) else p for p in images]] * rows,
                                    dtype=np.object_)
    for name, texts in (("labels", labels), ("templates", templates)):
        if texts is not None:
            inputs[name] = np.stack([text_tensor(texts)] * rows) if texts else np.zeros((rows, 0), dtype=np.object_)
    return inputs


def local_message(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    return str(caught.value)


def test_one_batch_of_good_and_bad_requests(pytorch_artifacts, photos):
    folder = pytorch_artifacts("clip")
    local = mmedge.load(folder)
    runners: dict = {}
    pipeline = served(folder, runners)
    good = [(photos[:2], ["cat", "dog"], None), (photos[2:3], ["car", "rocket", "cat"], list(ENSEMBLE_TEMPLATES)),
            (photos[1:4], ["cat", "dog"], None)]
    batch = [row(*good[0]), row([b"not an image at all"], ["cat", "dog"]), row(*good[1]), row(photos[:1], []),
             row(photos[:1], ["cat"], rows=2), row(*good[2]), row(labels=["cat"])]
    pipeline.pipeline.label_bank(["cat", "dog"])  # banks cached, so the vision calls below are the batch's own
    pipeline.pipeline.label_bank(["car", "rocket", "cat"], list(ENSEMBLE_TEMPLATES))
    runners["vision"].calls.clear()
    answers = pipeline.run_rows(batch)
    assert runners["vision"].calls == [6]  # the 2 + 1 + 3 images of the good requests, one graph call
    for index, (images, labels, templates) in zip((0, 2, 5), good):
        answer = answers[index]
        assert answer["probs"].shape == (1, len(images), len(labels))
        np.testing.assert_allclose(answer["probs"][0], local.probabilities(images, labels, templates), rtol=0,
                                   atol=1e-6)
        assert texts_of("label_names", answer["label_names"][0]) == labels
    expected = {1: local_message(lambda: local.probabilities(b"not an image at all", ["cat", "dog"])),
                3: local_message(lambda: local.probabilities(photos[0], [])),
                4: "input 'images' holds 2 rows",
                6: local_message(lambda: local.probabilities([], ["cat"]))}
    for index, message in expected.items():
        assert isinstance(answers[index], InputError), (index, answers[index])
        assert message in str(answers[index])


def test_fused_graph_batch(pytorch_artifacts, photos):
    folder = pytorch_artifacts("clip-fused")
    local = mmedge.load(folder)
    runners: dict = {}
    pipeline = served(folder, runners)
    answers = pipeline.run_rows([row(photos[:1]), row(photos[1:3]), row(photos[:1], ["not", "baked"])])
    assert runners["zero_shot"].calls == [3]
    np.testing.assert_allclose(answers[0]["probs"][0], local.probabilities(photos[:1]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(answers[1]["probs"][0], local.probabilities(photos[1:3]), rtol=0, atol=1e-6)
    assert str(answers[2]) == local_message(lambda: local.probabilities(photos[0], ["not", "baked"]))
