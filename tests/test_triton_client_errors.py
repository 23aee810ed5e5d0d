"""How ``mmedge.triton_client`` reports what tritonclient gives it, without a server (a stand-in client)."""

import numpy as np
import pytest

from mmedge.errors import ServerError, ServerInputError

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
