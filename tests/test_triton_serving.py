"""mmedge on a real Triton Inference Server: served results equal local ones, under load, and through faults.

The server is the ``tritonserver`` 2.51 binary of the nvidia-pytriton wheel, started once for this module on free
loopback ports (tests/support/triton_server.py explains its own numpy<2 environment), serving a ``--platform
python`` repository of the tiny CLIP (two graphs and fused), BLIP-2 and IDEFICS test artifacts. The clients are
``mmedge.triton_client`` over tritonclient's HTTP and gRPC clients; the reference is ``mmedge.load`` in this process.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmedge
from mmedge.errors import InputError, ServerError, ServerInputError
from mmedge.pipelines import ENSEMBLE_TEMPLATES
from mmedge.triton import Options, write_repository

pytest.importorskip("tritonclient.grpc", reason='the client needs tritonclient: pip install "mmedge[triton]"')
from mmedge.triton_client import Connection, connect  # noqa: E402

PROTOCOLS = ["http", "grpc"]
LABELS = ["cat", "dog", "car", "rocket"]
ARTIFACTS = ("clip", "clip-fused", "blip2", "idefics")


class Served:
    def __init__(self, server, sources):
        self.server, self.sources, self._local = server, sources, {}

    def url(self, protocol: str) -> str:
        return f"http://{self.server.http_url}" if protocol == "http" else f"grpc://{self.server.grpc_url}"

    def local(self, name: str, task: str | None = None):
        """The same artifact loaded in this process (one pipeline per artifact and task)."""
        key = (name, task)
        if key not in self._local:
            self._local[key] = mmedge.load(self.sources[name], task=task)
        return self._local[key]


def _server_env():
    from tests.support.triton_server import ServerUnavailable, server_env

    try:
        return server_env()
    except ServerUnavailable as exc:
        pytest.skip(f"no Triton server on this machine: {exc}")


def _repository(sources: dict, out: Path, **options) -> Path:
    # one ONNX Runtime thread per component: the machine's cores go to concurrent requests, as a server would use them
    write_repository([sources[name] for name in sources], out, Options(platform="python", threads=1, **options))
    return out


@pytest.fixture(scope="module")
def served(pytorch_artifacts, tmp_path_factory):
    from tests.support.triton_server import TritonServer

    env = _server_env()
    root = tmp_path_factory.mktemp("triton")
    sources = {}
    for name in ARTIFACTS:  # the folder's name is the models' prefix
        sources[name] = root / name
        sources[name].symlink_to(pytorch_artifacts(name), target_is_directory=True)
    # the encoders wait up to 2 ms for more requests, so the load test's batches do not hang on timing luck
    server = TritonServer(_repository(sources, root / "repo", queue_delay_us=2000), env, root / "server.log").start()
    try:
        yield Served(server, sources)
    finally:
        server.stop()


@pytest.fixture
def images(photos):
    """Paths (JPEG on disk), a PIL image and a uint8 array: each kind the local pipelines take."""
    array = np.asarray(Image.open(photos[1]).convert("RGB").resize((48, 40)))
    return [photos[0], Image.open(photos[2]), array]


# --- served == local ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_zero_shot_probabilities_equal_local(served, images, protocol):
    remote, local = connect(served.url(protocol), "clip"), served.local("clip")
    assert remote.task == "zero-shot"
    for templates in (None, list(ENSEMBLE_TEMPLATES)):
        served_probs = remote.probabilities(images, LABELS, templates)
        np.testing.assert_allclose(served_probs, local.probabilities(images, LABELS, templates), rtol=0, atol=1e-6)
    ranked, expected = remote(images[0], LABELS, top_k=2), local(images[0], LABELS, top_k=2)
    assert [r["label"] for r in ranked] == [e["label"] for e in expected]
    assert [r["score"] for r in ranked] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    fused, local_fused = connect(served.url(protocol), "clip-fused"), served.local("clip-fused")
    np.testing.assert_allclose(fused.probabilities(images), local_fused.probabilities(images), rtol=0, atol=1e-6)
    assert [r["label"] for r in fused(images[1])] == [e["label"] for e in local_fused(images[1])]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embeddings_equal_local(served, images, protocol):
    remote, local = connect(served.url(protocol), "clip", task="embed"), served.local("clip", "embed")
    pairs = [(remote.embed_images(images), local.embed_images(images)),
             (remote.embed_texts(["a photo of a cat", "a red car"]),
              local.embed_texts(["a photo of a cat", "a red car"]))]
    for served_rows, local_rows in pairs:
        assert served_rows.shape == local_rows.shape
        norms = np.linalg.norm(served_rows, axis=1) * np.linalg.norm(local_rows, axis=1)
        cosine = (served_rows * local_rows).sum(axis=1) / norms
        assert cosine.min() >= 0.999999


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_blip2_captions_answers_and_streams_equal_local(served, images, protocol):
    remote, local = connect(served.url(protocol), "blip2"), served.local("blip2")
    assert remote.caption(images) == local.caption(images)  # greedy, the manifest's settings
    beams = {"num_beams": 3, "length_penalty": 0.6, "max_new_tokens": 12}
    assert remote.caption(images[:2], **beams) == local.caption(images[:2], **beams)
    assert remote.caption(images[0], "a photo of") == local.caption(images[0], "a photo of")
    assert remote.ask(images[1], "what color is it?") == local.ask(images[1], "what color is it?")
    pieces = list(remote.stream(images[2], "a photo of"))
    assert pieces == list(local.stream(images[2], "a photo of")) and len(pieces) > 1
    assert "".join(pieces) == local.caption(images[2], "a photo of")
    asked = list(remote.stream(images[0], question="what is it?", max_new_tokens=6))
    assert "".join(asked) == local.ask(images[0], "what is it?", max_new_tokens=6)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_idefics_interleaved_prompts_equal_local(served, images, photos, protocol):
    remote, local = connect(served.url(protocol), "idefics"), served.local("idefics")
    prompt = [Path(photos[0]), "An image of two cats.", images[1], "An image of"]
    assert remote.generate(prompt) == local.generate(prompt)
    assert remote.generate([prompt, [images[2], "A picture of"]], num_beams=2) == \
        local.generate([prompt, [images[2], "A picture of"]], num_beams=2)
    assert remote.caption(images, "An image of") == local.caption(images, "An image of")
    pieces = list(remote.stream(prompt))
    assert pieces == list(local.stream(prompt)) and "".join(pieces) == local.generate(prompt)


# --- load ------------------------------------------------------------------------------------------
def _batched_executions(connection: Connection, model: str) -> dict[int, int]:
    batches = connection.statistics(model).get("batch_stats", [])
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in batches}


def test_eight_clients_fifty_mixed_requests_each(served, photos):
    """8 clients (4 HTTP, 4 gRPC) x 50 requests mixing classification, captions and questions: none lost, each
    answer the serial one, and the encoders' statistics show batches of more than one request."""
    images = [Path(p) for p in photos[:4]]
    classifier, captioner = served.local("clip"), served.local("blip2")
    expected = {}
    for i, image in enumerate(images):
        expected["classify", i] = classifier.probabilities(image, LABELS)
        expected["caption", i] = captioner.caption(image, max_new_tokens=8)
        expected["vqa", i] = captioner.ask(image, "what is it?", max_new_tokens=6)
    stats = Connection(served.url("http"))
    # the zero-shot pipeline is batched by Triton itself (its graphs run inline, a batch's images in one call);
    # BLIP-2's encoder is batched behind the caption pipeline, through BLS
    before = {m: _batched_executions(stats, m) for m in ("clip-zero-shot", "blip2__prefix")}
    failures, answered = [], []

    def client(number: int) -> None:
        url = served.url(PROTOCOLS[number % 2])
        remote_classifier, remote_captioner = connect(url, "clip"), connect(url, "blip2")
        for request in range(50):
            kind, i = ("classify", "caption", "vqa")[(number + request) % 3], (number * 7 + request) % len(images)
            try:
                if kind == "classify":
                    got = remote_classifier.probabilities(images[i], LABELS)
                    ok = np.abs(got - expected[kind, i]).max() <= 1e-6
                elif kind == "caption":
                    got = remote_captioner.caption(images[i], max_new_tokens=8)
                    ok = got == expected[kind, i]
                else:
                    got = remote_captioner.ask(images[i], "what is it?", max_new_tokens=6)
                    ok = got == expected[kind, i]
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                failures.append(f"client {number} request {request} ({kind}): {type(exc).__name__}: {exc}")
                continue
            answered.append(kind)
            if not ok:
                failures.append(f"client {number} request {request} ({kind} of image {i}): {got!r} != "
                                f"{expected[kind, i]!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:5]
    assert len(answered) == 400
    for model, counts in before.items():
        after = _batched_executions(stats, model)
        grew = {size: after.get(size, 0) - counts.get(size, 0) for size in after}
        assert any(size > 1 and n > 0 for size, n in grew.items()), f"{model} never ran a batch > 1: {after}"
    print(f"400 requests from 8 clients in {time.monotonic() - started:.1f} s; batches: "
          + "; ".join(f"{m} {_batched_executions(stats, m)}" for m in before))


# --- faults ------------------------------------------------------------------------------------------
def _message(call) -> str:
    with pytest.raises(InputError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_requests_get_mmedges_message_and_the_server_serves_on(served, photos, protocol):
    connection = Connection(served.url(protocol))
    image = np.array([Path(photos[0]).read_bytes()], dtype=np.object_)
    labels = np.array([b"cat", b"dog"], dtype=np.object_)
    row_image, row_labels = image[np.newaxis], labels[np.newaxis]  # the zero-shot model takes one row per request
    classifier, captioner = served.local("clip"), served.local("blip2")
    good = classifier.probabilities(photos[0], ["cat", "dog"])

    def serves_on():
        answer = connection.infer("clip-zero-shot", {"images": row_image, "labels": row_labels})
        np.testing.assert_allclose(answer["probs"][0], good, rtol=0, atol=1e-6)

    refused = {  # request -> the message mmedge gives for the same mistake in-process
        ("clip-zero-shot", "bytes that are not an image"): (
            {"images": np.array([[b"GIF89a but not really"]], dtype=np.object_), "labels": row_labels},
            _message(lambda: classifier.probabilities(b"GIF89a but not really", ["cat", "dog"]))),
        ("clip-zero-shot", "empty labels"): (
            {"images": row_image, "labels": np.zeros((1, 0), dtype=np.object_)},
            _message(lambda: classifier.probabilities(photos[0], []))),
        ("blip2-caption", "generation settings that cannot work"): (
            {"images": image, "generation": np.array([b'{"num_beams": 0}'], dtype=np.object_)},
            _message(lambda: captioner.caption(photos[0], num_beams=0))),
        ("idefics-caption", "an over-long prompt"): (
            {"images": image, "prompt": np.array([("word " * 3000).encode()], dtype=np.object_)},
            _message(lambda: served.local("idefics").caption(photos[0], "word " * 3000))),
    }
    for (model, what), (inputs, local_message) in refused.items():
        with pytest.raises(ServerInputError) as caught:
            connection.infer(model, inputs)
        assert str(caught.value) == local_message, what
        serves_on()
    protocol_errors = {  # checked before any mmedge code runs (Triton's config) or by mmedge's protocol
        "wrong dtype": ("clip-zero-shot", {"images": np.zeros((1, 8), dtype=np.float32), "labels": row_labels},
                        "images"),
        "not a row": ("clip-zero-shot", {"images": image, "labels": labels}, "images"),
        "two rows": ("clip-zero-shot",
                     {"images": np.concatenate([row_image] * 2), "labels": np.concatenate([row_labels] * 2)},
                     "input 'images' holds 2 rows"),
        "wrong shape": ("clip__vision", {"pixel_values": np.zeros((1, 3, 7, 7), dtype=np.float32)}, "pixel_values"),
        "two prompts": ("blip2-caption", {"images": image, "prompt": np.array([b"a", b"b"], dtype=np.object_)},
                        "input 'prompt' holds 2 strings"),
        "no image": ("blip2-caption", {"prompt": np.array([b"a photo of"], dtype=np.object_)},
                     "the request has no 'images' input"),
    }
    for what, (model, inputs, mentioned) in protocol_errors.items():
        with pytest.raises(ServerError) as caught:
            connection.infer(model, inputs)
        assert mentioned in str(caught.value), what
        serves_on()
    with pytest.raises(ServerError, match="has no model 'nope'"):
        connection.infer("nope", {"images": image})
    serves_on()


def test_a_server_killed_under_load_fails_its_clients_fast(served, pytorch_artifacts, tmp_path, photos):
    """A second server (CLIP only) is killed while 4 clients send requests: each gets a ServerError within seconds,
    none hangs, and connecting afterwards fails at once. The module's server is untouched. This server's zero-shot
    pipeline calls the component models through BLS (the onnxruntime platform's way): its answers equal local ones."""
    from tests.support.triton_server import TritonServer

    (tmp_path / "clip").symlink_to(pytorch_artifacts("clip"), target_is_directory=True)
    # pipelines in two processes answering inside execute (workers=1), the other way to serve them
    repository = _repository({"clip": tmp_path / "clip"}, tmp_path / "repo", workers=1, pipeline_instances=2,
                             zero_shot_graphs="bls")
    expected = {i: served.local("clip").probabilities(photos[i % len(photos)], LABELS) for i in range(4)}
    server = TritonServer(repository, _server_env(), tmp_path / "server.log").start()
    outcomes: dict[int, tuple[str, float]] = {}
    answered = [0] * 4
    killed_at = []

    def client(number: int) -> None:
        remote = connect(served_url(server, PROTOCOLS[number % 2]), "clip", timeout=20)
        while True:
            try:
                got = remote.probabilities(photos[number % len(photos)], LABELS)
                if np.abs(got - expected[number]).max() > 1e-6:
                    outcomes[number] = (f"UNEXPECTED answer {got} != {expected[number]}", time.monotonic())
                    return
                answered[number] += 1
            except ServerError as exc:
                outcomes[number] = (str(exc), time.monotonic())
                return
            except Exception as exc:  # noqa: BLE001 - anything but ServerError fails the test below
                outcomes[number] = (f"UNEXPECTED {type(exc).__name__}: {exc}", time.monotonic())
                return

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while min(answered) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert min(answered) >= 3, f"the clients did not get going: {answered}"
        server.kill()
        killed_at.append(time.monotonic())
        for thread in threads:
            thread.join(timeout=30)
    finally:
        server.stop()
    assert not any(t.is_alive() for t in threads), "a client hung after the server was killed"
    for number, (message, when) in outcomes.items():
        assert not message.startswith("UNEXPECTED"), message
        assert when - killed_at[0] < 10, f"client {number} took {when - killed_at[0]:.1f} s to fail"
        assert "Triton server" in message, message
    for protocol in PROTOCOLS:
        started = time.monotonic()
        with pytest.raises(ServerError, match="Triton server"):
            connect(served_url(server, protocol), "clip", timeout=20)
        assert time.monotonic() - started < 5


def served_url(server, protocol: str) -> str:
    return f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"


# --- the command line --------------------------------------------------------------------------------
def test_mmedge_run_against_the_server_prints_what_it_prints_locally(served, photos):
    def run(*args):
        result = subprocess.run([sys.executable, "-m", "mmedge.cli", "run", *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    local = json.loads(run(str(served.sources["clip"]), photos[0], "--labels", *LABELS, "--json"))
    remote = json.loads(run("clip", photos[0], "--labels", *LABELS, "--json", "--triton", served.url("grpc")))
    assert [p["label"] for p in remote["predictions"]] == [p["label"] for p in local["predictions"]]
    assert run(str(served.sources["blip2"]), photos[1], "--question", "what is it?") == \
        run("blip2", photos[1], "--question", "what is it?", "--triton", served.url("http"))
    assert run(str(served.sources["blip2"]), photos[1],
               "--stream") == run("blip2", photos[1], "--stream", "--triton", served.url("grpc"))
    # a pipeline's full name with a task it serves (it was refused: "no mmedge pipeline 'blip2-caption' for task")
    assert run(str(served.sources["blip2"]), photos[1], "--task", "vqa", "--question", "what is it?") == \
        run("blip2-caption", photos[1], "--task", "vqa", "--question", "what is it?", "--triton", served.url("grpc"))
    missing = subprocess.run([sys.executable, "-m", "mmedge.cli", "run", "nothing-here", photos[0], "--triton",
                              served.url("http")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no mmedge pipeline 'nothing-here'" in missing.stderr
    assert "Traceback" not in missing.stderr


# --- client errors (mmedge.triton_client) --------------------------------------------------------------
def _in_thread(call, limit: float):
    """``call()``'s exception (or None) and the seconds it took; fails, not hangs, when it runs past ``limit``."""
    outcome: list = []

    def run():
        started = time.monotonic()
        try:
            call()
            outcome.append((None, time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - returned to the test
            outcome.append((exc, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert outcome, f"the call still blocked after {limit:.0f} s"
    return outcome[0]


def test_a_server_that_stopped_answering_fails_connect_within_the_timeout(served):
    import os
    import signal

    pid = served.server.process.pid
    os.killpg(pid, signal.SIGSTOP)  # alive, listening, never answering
    try:
        for protocol in PROTOCOLS:
            error, took = _in_thread(lambda: connect(served.url(protocol), "blip2", timeout=3), limit=30)
            assert isinstance(error, ServerError), (protocol, error)
            assert "did not answer within 3 s" in str(error) and "check that the server is up" in str(error), error
            assert took < 10, f"{protocol}: {took:.1f} s"
    finally:
        os.killpg(pid, signal.SIGCONT)
    assert connect(served.url("grpc"), "blip2").task == "caption"  # serves on


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_input_to_a_stream_gets_the_pipelines_own_message(served, photos, protocol):
    remote, local = connect(served.url(protocol), "blip2"), served.local("blip2")
    for image, settings in ((photos[0], {"max_new_tokens": 500}), (b"notimage", {})):
        expected = _message(lambda: list(local.stream(image, **settings)))
        with pytest.raises(ServerInputError) as caught:
            list(remote.stream(image, **settings))
        assert str(caught.value) == expected
    assert "".join(remote.stream(photos[0], max_new_tokens=4)) == local.caption(photos[0], max_new_tokens=4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_prompt_and_a_question_together_are_refused(served, photos, protocol):
    remote, local = connect(served.url(protocol), "blip2"), served.local("blip2")
    expected = _message(lambda: local.stream(photos[0], "a photo of", question="what is it?"))
    with pytest.raises(InputError) as caught:
        remote.stream(photos[0], "a photo of", question="what is it?")  # at the call, as locally
    assert str(caught.value) == expected
    # a client that sends both anyway is refused by the server too, not answered with one of them
    both = {"images": np.array([Path(photos[0]).read_bytes()], dtype=np.object_),
            "prompt": np.array([b"a photo of"], dtype=np.object_), "question": np.array([b"what?"], dtype=np.object_)}
    connection = Connection(served.url(protocol))
    with pytest.raises(ServerInputError, match="both a prompt and a question"):
        connection.infer("blip2-caption", both)
    if protocol == "grpc":  # the raw stream (HTTP streams need base64 images: RemoteCaptioner.stream sends them)
        with pytest.raises(ServerInputError, match="both a prompt and a question"):
            list(connection.stream("blip2-caption-stream", both))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_interleaved_item_that_is_neither_text_nor_image_is_refused_as_locally(served, photos, protocol):
    remote, local = connect(served.url(protocol), "idefics"), served.local("idefics")
    for prompt in ([Path(photos[0]), 5], [None, "An image of"]):
        expected = _message(lambda: local.generate(prompt))
        with pytest.raises(InputError) as caught:
            remote.generate(prompt)
        assert str(caught.value) == expected and "ImageError" not in type(caught.value).__name__
        with pytest.raises(InputError) as caught:
            list(remote.stream(prompt))
        assert str(caught.value) == expected


def test_an_http_url_at_the_grpc_port_says_so(served):
    error, took = _in_thread(lambda: connect(f"http://{served.server.grpc_url}", "blip2", timeout=5), limit=30)
    assert isinstance(error, ServerError) and "internal error" not in str(error), error
    assert "did not answer as an HTTP Triton endpoint" in str(error) and "grpc://" in str(error), error


@pytest.mark.parametrize("argv,fragment", [
    (["clip", "{photo}", "--question", "what is it?"], "--question would change nothing"),
    (["blip2", "{photo}", "--labels", "cat"], "--labels would change nothing"),
    (["blip2", "{photo}", "--prompt", "a", "--question", "b"], "--prompt would change nothing"),
    (["blip2", "{photo}", "--threads", "1"], "--threads would change nothing with --triton"),
    (["blip2", "{photo}", "--openvino-weights", "int4"], "--openvino-weights would change nothing with --triton"),
    (["blip2", "{photo}", "--llm-quantization", "nf4"], "--llm-quantization would change nothing with --triton"),
    (["blip2", "{photo}", "{missing}"], "does not exist"),
    (["clip", "{photo}"], "no labels were given"),
    # --task vqa runs on the caption pipeline (whose task is "caption"): its options were not judged at all
    (["blip2", "{photo}", "--task", "vqa", "--labels", "cat"], "--labels would change nothing"),
    (["blip2", "{photo}", "--task", "vqa", "--top-k", "2"], "--top-k would change nothing"),
    (["blip2", "{photo}", "--task", "vqa", "--prompt", "a", "--question", "b"], "--prompt would change nothing"),
    (["blip2-caption", "{photo}", "--task", "zero-shot"], "does not serve task 'zero-shot'"),
])
def test_mmedge_run_against_the_server_refuses_what_it_refuses_locally(served, photos, tmp_path, capsys, argv,
                                                                        fragment):
    """With --triton the option checks were skipped: --question on CLIP, --labels on BLIP-2 or --threads (the
    server's) were ignored, and a mistyped second image failed after the first image's line."""
    from mmedge.cli import main

    filled = [photos[0] if a == "{photo}" else str(tmp_path / "missing.png") if a == "{missing}" else a for a in argv]
    code = main(["run", *filled, "--triton", served.url("http")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and fragment in err, err


def test_client_side_checks_are_the_local_pipelines(served, images, photos):
    """A misspelt generation setting given as None (answered with a caption), texts that are no list (a TypeError),
    a batch of prompts to stream (an ImageError), similarity (absent): as the local pipelines have them."""
    remote, local = connect(served.url("grpc"), "blip2"), served.local("blip2")
    expected = _message(lambda: local.caption(photos[0], num_beam=None))
    with pytest.raises(InputError) as caught:
        remote.caption(photos[0], num_beam=None)
    assert str(caught.value) == expected and "num_beam" in expected
    assert remote.caption(photos[0], temperature=None, max_new_tokens=4) == local.caption(photos[0], max_new_tokens=4)
    remote, local = connect(served.url("grpc"), "clip", task="embed"), served.local("clip", "embed")
    assert str(pytest.raises(InputError, remote.embed_texts, 5).value) == _message(lambda: local.embed_texts(5))
    np.testing.assert_allclose(remote.similarity(images[:2], ["a cat", "a car"]),
                               local.similarity(images[:2], ["a cat", "a car"]), atol=1e-5)
    remote = connect(served.url("grpc"), "idefics")
    prompts = [[Path(photos[0]), "An image of"]]
    expected = _message(lambda: list(served.local("idefics").stream(prompts)))
    assert str(pytest.raises(InputError, lambda: list(remote.stream(prompts))).value) == expected


# --- streams, names and settings as the local pipelines have them ---------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stream_says_how_its_answer_ended_and_judges_its_settings_at_the_call(served, photos, protocol):
    """``stream()`` returns a TextStream as the local one does (``finish_reason``, ``tokens``), refuses bad settings
    when it is called (not at the first piece), and takes numpy scalars as settings."""
    from mmedge.generation import TextStream

    remote, local = connect(served.url(protocol), "blip2"), served.local("blip2")
    for settings in ({"max_new_tokens": 4}, {}, {"num_beams": 2, "max_new_tokens": 5}):
        ours, theirs = remote.stream(photos[0], **settings), local.stream(photos[0], **settings)
        assert isinstance(ours, TextStream) and (ours.finish_reason, ours.tokens) == (None, None)
        assert list(ours) == list(theirs)
        assert (ours.finish_reason, ours.tokens) == (theirs.finish_reason, theirs.tokens) != (None, None)
    asked = remote.stream(photos[1], question="what is it?", max_new_tokens=6)
    assert "".join(asked) == local.ask(photos[1], "what is it?", max_new_tokens=6) and asked.tokens == 6
    for bad in ({"num_beams": 0}, {"temperature": 0.5}, {"max_new_tokens": np.int64(0)}, {"stop_strings": "x"}):
        expected = _message(lambda: local.stream(photos[0], **bad))  # the local call refuses them before any piece
        with pytest.raises(InputError) as caught:
            remote.stream(photos[0], **bad)
        assert str(caught.value) == expected, bad
    numpy_settings = {"max_new_tokens": np.int64(3), "num_beams": np.int32(2), "length_penalty": np.float32(0.5)}
    assert remote.caption(photos[0], **numpy_settings) == local.caption(photos[0], **numpy_settings)
    assert "".join(remote.stream(photos[0], **numpy_settings)) == local.caption(photos[0], **numpy_settings)
    if protocol == "grpc":  # tritonclient's gRPC client holds one stream: a second one is refused, the first goes on
        first = remote.stream(photos[0], max_new_tokens=4)
        pieces = [next(first)]
        with pytest.raises(InputError, match="a second stream was started"):
            next(remote.stream(photos[1]))
        assert "".join(pieces + list(first)) == local.caption(photos[0], max_new_tokens=4)


def _settled(read, pause: float = 0.5, limit: float = 60.0) -> int:
    """``read()`` once two reads ``pause`` seconds apart agree."""
    deadline, last = time.monotonic() + limit, read()
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still changing after {limit:.0f} s")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stream_left_after_its_first_piece_stops_the_servers_generation(served, photos, protocol):
    """Closing a stream closes its request (a gRPC stream cancelled, an HTTP response closed); the pipeline sees it
    cancelled and stops between two decoder steps. It used to generate the whole answer for nobody: one decoder
    call per token, counted here by Triton's statistics of the decoder model."""
    local = served.local("idefics")
    most = local.max_positions - local.prompt_positions(photos[0]) + 1
    settings = {"max_new_tokens": most, "eos_token_id": []}  # no end-of-sequence token: the answer is `most` tokens
    stats = Connection(served.url("http"))

    def decoder_calls() -> int:
        return int(stats.statistics("idefics__decoder")["inference_stats"]["success"]["count"])

    before = _settled(decoder_calls)
    stream = connect(served.url(protocol), "idefics").stream(photos[0], **settings)
    assert next(stream)
    stream.close()
    calls = _settled(decoder_calls) - before
    print(f"{protocol}: {calls} decoder calls for a stream closed after its first piece (of {most} tokens)")
    assert calls < most // 2, f"{calls} decoder calls for a stream closed after its first piece (of {most} tokens)"
    assert "".join(connect(served.url(protocol), "idefics").stream(photos[0], max_new_tokens=5)) == \
        local.caption(photos[0], max_new_tokens=5)  # the pipeline serves on


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pipeline_names_tasks_and_the_stream_model(served, protocol):
    url = served.url(protocol)
    for task in ("caption", "vqa", None):  # a pipeline's full name with a task it serves
        assert connect(url, "blip2-caption", task=task).model == "blip2-caption"
    assert connect(url, "clip-embed", task="embed").model == "clip-embed"
    with pytest.raises(InputError, match="pipeline 'clip-zero-shot' .* does not serve task 'embed'"):
        connect(url, "clip-zero-shot", task="embed")
    with pytest.raises(InputError) as caught:  # it was accepted, and then nothing worked
        connect(url, "blip2-caption-stream")
    assert "streaming model of pipeline 'blip2-caption'" in str(caught.value)
    assert "connect to 'blip2-caption'" in str(caught.value)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_model_is_reported_as_failed_on_both_protocols(served, photos, protocol):
    """A model's failure (HTTP 5xx / 501, gRPC INTERNAL / UNIMPLEMENTED) says the model failed, not that the server
    did not answer: here the unary infer of the decoupled stream model, which Triton refuses as unsupported."""
    connection = Connection(served.url(protocol))
    with pytest.raises(ServerError) as caught:
        connection.infer("blip2-caption-stream", {"images": np.array([Path(photos[0]).read_bytes()], dtype=np.object_)})
    message = str(caught.value)
    assert "failed model 'blip2-caption-stream'" in message and "see the server's log" in message, message
    assert "did not answer" not in message and not isinstance(caught.value, ServerInputError)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_smaller_calls_are_refused_as_locally(served, photos, protocol):
    """A prompt= or question= beside an interleaved prompt list (dropped unread), a list among a prompt's items, an
    image URL, a question that is no string; and statistics of a model the server does not have."""
    remote, local = connect(served.url(protocol), "idefics"), served.local("idefics")
    calls = {
        "prompt= beside a prompt list": lambda p: p.stream([Path(photos[0]), "An image of"], "a photo of"),
        "question= beside a prompt list": lambda p: p.stream([Path(photos[0]), "An image of"], question="what?"),
        "a list among the items": lambda p: p.generate([Path(photos[0]), ["x"], "An image of"]),
        "an image URL": lambda p: p.caption("https://example.com/cat.jpg"),
        "a question list": lambda p: p.ask(photos[0], ["what is it?"]),
    }
    for what, call in calls.items():
        expected = _message(lambda: call(local))
        with pytest.raises(InputError) as caught:
            call(remote)
        assert str(caught.value) == expected, what
    assert "URLs are not fetched" in _message(lambda: remote.caption("https://example.com/cat.jpg"))
    with pytest.raises(ServerError) as caught:
        Connection(served.url(protocol)).statistics("nope")
    assert not isinstance(caught.value, ServerInputError) and "has no model 'nope'" in str(caught.value)
