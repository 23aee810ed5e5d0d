"""How ``mmedge.triton_client`` reports what tritonclient gives it, without a server (a stand-in client)."""

import numpy as np
import pytest

from mmedge.errors import InputError, ServerError, ServerInputError

pytest.importorskip("tritonclient.grpc", reason='the client needs tritonclient: pip install "mmedge[triton]"')
from tritonclient.utils import InferenceServerException  # noqa: E402

from mmedge.triton_client import Connection, _json_error  # noqa: E402


class BrokenStream:
    """A gRPC client whose stream broke before the request went out (the server went away): tritonclient hands the
    cause to the callback and refuses the request with 'no longer in valid state'."""

    def start_stream(self, callback, **_):
        self.callback = callback

    def async_stream_infer(self, *_, **__):
        self.callback(result=None, error=InferenceServerException(
            "failed to connect to all addresses", status="StatusCode.UNAVAILABLE"))
        raise InferenceServerException("The stream is no longer in valid state, the error detail is reported through "
                                       "provided callback. A new stream should be started after stopping the current "
                                       "stream.")

    def stop_stream(self, cancel_requests=False):
        pass


class AnsweringStream(BrokenStream):
    """A stream whose model answers with an error (a gRPC stream's error has no status code)."""

    def __init__(self, message):
        self.message = message

    def async_stream_infer(self, *_, **__):
        self.callback(result=None, error=InferenceServerException(self.message))


def _stream(client) -> Exception:
    connection = Connection("grpc://127.0.0.1:1", timeout=2)
    connection._local.client = client
    with pytest.raises(ServerError) as caught:
        list(connection.stream("m-stream", {"images": np.array([b"x"], dtype=np.object_)}))
    return caught.value


def test_a_broken_grpc_stream_says_the_server_did_not_answer():
    error = _stream(BrokenStream())
    assert "did not answer" in str(error) and "check that the server is up" in str(error), error
    assert "no longer in valid state" not in str(error)


def test_a_grpc_stream_error_is_the_requests_fault_unless_the_server_says_it_failed():
    refused = _stream(AnsweringStream("image data is not an image PIL can read; expected an encoded image."))
    assert isinstance(refused, ServerInputError)
    assert str(refused) == "image data is not an image PIL can read; expected an encoded image."
    for message in ("mmedge server error: Triton model 'm__decoder' failed", "mmedge internal error: KeyError: 'x'"):
        failed = _stream(AnsweringStream(message))
        assert not isinstance(failed, ServerInputError) and "failed model 'm-stream'" in str(failed), failed
        assert "(: " not in str(failed)


def test_an_http_streams_error_event_gives_only_its_message():
    assert _json_error('data: {"error":"generation setting max_new_tokens=500 is not usable."}\n\n') == \
        "generation setting max_new_tokens=500 is not usable."
    assert _json_error('{"error": "no such model"}') == "no such model"
    assert _json_error("plain text\n") == "plain text"


def test_an_http_model_failure_says_the_model_failed_as_grpc_does():
    """A 5xx from a model that failed is the server's answer, not a server that did not answer."""
    connection = Connection("http://127.0.0.1:1", timeout=2)
    failure = "mmedge server error: Triton model 'm__decoder' (component 'decoder') failed: Stub process is not healthy"
    for status in ("500", "501"):
        error = connection._server_error("m-caption", InferenceServerException(failure, status=status))
        assert "failed model 'm-caption'" in str(error) and "see the server's log" in str(error), error
        assert "did not answer" not in str(error) and "check that the server is up" not in str(error)
    grpc = Connection("grpc://127.0.0.1:1", timeout=2)._server_error(
        "m-caption", InferenceServerException(failure, status="StatusCode.INTERNAL"))
    assert str(grpc).replace("grpc://", "http://").replace("StatusCode.INTERNAL", "500") == str(
        connection._server_error("m-caption", InferenceServerException(failure, status="500")))


@pytest.mark.parametrize("url,says", [
    ("http://127.0.0.1:notaport", r"no usable port \('notaport'\)"),
    ("http://127.0.0.1", "has no port"),
    ("grpc://127.0.0.1:8001/v2", "a path"),
    ("http:127.0.0.1:8000", "has no '//' after 'http:'.*fix: pass http://127.0.0.1:8000"),
    ("grpc:127.0.0.1:8001", "has no '//' after 'grpc:'"),
    ("http://::1", r"more than one ':' in its address \(an IPv6 host goes in brackets\)"),
    ("http://127.0.0.1:8000:8000", "more than one ':'"),
    ("http://[::1", "is malformed"),
    ("http://user@127.0.0.1:8000", r"has a user part \('user@'\).*drop 'user@': pass http://127.0.0.1:8000"),
    ("grpc://user:secret@127.0.0.1:8001", "has a user part"),
    ("http://127.0.0.1:+8000", r"no usable port \('\+8000'\)"),
    ("http://127.0.0.1:70000", "no usable port"),
    ("http:// 127.0.0.1:8000", "a space in its host"),
    ("tcp://127.0.0.1:8000", "is not one mmedge can use"),
])
def test_a_malformed_url_is_refused_naming_it_before_connecting(url, says):
    """They crashed deep in tritonclient ("Port could not be cast", then __del__ noise), or a user part worked
    for one request and failed the stream."""
    with pytest.raises(InputError, match=says) as caught:
        Connection(url)
    assert f"'{url}'" in str(caught.value)


@pytest.mark.parametrize("url,address", [("127.0.0.1:8000", ("http", "127.0.0.1:8000")),
                                         ("HTTP://Host:8000/", ("http", "Host:8000")),
                                         ("grpc://[::1]:8001", ("grpc", "[::1]:8001"))])
def test_the_urls_mmedge_takes(url, address):
    connection = Connection(url)
    assert (connection.protocol, connection.address) == address


@pytest.mark.parametrize("timeout", [None, 0, -1, "5", float("inf"), float("nan"), True, 1e10])
def test_a_timeout_that_is_no_positive_finite_number_is_refused(timeout):
    """None (a TypeError over HTTP, no deadline at all over gRPC), 0, -1, inf, "5": raw errors or odd messages."""
    for url in ("http://127.0.0.1:8000", "grpc://127.0.0.1:8001"):
        with pytest.raises(InputError, match=r"timeout=.* is not a usable timeout; expected a number of seconds "
                                             "above 0, at most 86400"):
            Connection(url, timeout=timeout)
    assert Connection("http://127.0.0.1:8000", timeout=np.float32(2.5)).timeout == 2.5


class RepositoryServer:
    """tritonclient's gRPC client answering as a server serving ``repo`` would: its model index, and each model's
    config as Triton reads it (config.pbtxt parsed with Triton's own schema, then as the JSON a gRPC call with
    as_json=True returns)."""

    def __init__(self, repo):
        self.repo = repo

    def get_model_repository_index(self, **_):
        return {"models": [{"name": p.name} for p in sorted(self.repo.iterdir()) if p.is_dir()]}

    def get_model_config(self, model, **_):
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        config = text_format.Parse((self.repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return {"config": json_format.MessageToDict(config, preserving_proto_field_name=True)}


def test_a_name_that_is_a_pipeline_and_another_artifacts_prefix_is_refused(clip_artifacts, tmp_path, monkeypatch):
    """A repository an earlier mmedge wrote for artifact 'clip' beside a fused CLIP in a folder named 'clip-embed':
    'clip-embed' is clip's embed pipeline and the other artifact's prefix, and connect gave clip's Embedder. Now it
    is refused, saying how to reach each; names that mean one pipeline (here or for the task) still connect."""
    from mmedge.triton import write_repository
    from mmedge.triton_client import RemoteClassifier, RemoteEmbedder, connect

    for name, variant in (("clip", "fp32"), ("clip-embed", "fused-fp32")):  # written apart, then merged, as before
        (tmp_path / name).symlink_to(clip_artifacts(variant), target_is_directory=True)
        write_repository([tmp_path / name], tmp_path / f"repo-{name}")
        for model in (tmp_path / f"repo-{name}").iterdir():
            if model.is_dir():
                model.rename(tmp_path / "repo-clip" / model.name)
    monkeypatch.setattr(Connection, "_client", lambda self: RepositoryServer(tmp_path / "repo-clip"))
    url = "grpc://127.0.0.1:8001"
    for task in (None, "zero-shot"):
        with pytest.raises(InputError) as caught:
            connect(url, "clip-embed", task=task)
        assert str(caught.value).startswith(f"'clip-embed' means two things on the server at {url}: the embed "
                                            "pipeline of the artifact 'clip', and the prefix of the artifact "
                                            "'clip-embed' (its clip-embed-zero-shot"), caught.value
        assert "connect to 'clip' with task='embed' for the first, or to 'clip-embed-zero-shot'" in str(caught.value)
    assert isinstance(connect(url, "clip", task="embed"), RemoteEmbedder)
    assert connect(url, "clip-embed", task="embed").settings["artifact"] == "clip"  # the other has no embed pipeline
    assert connect(url, "clip-embed-zero-shot").settings["artifact"] == "clip-embed"
    assert isinstance(connect(url, "clip"), RemoteClassifier)
