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
