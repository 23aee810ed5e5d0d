"""mmedge's errors cross process boundaries as themselves: a worker process (an export run apart to contain its
memory, a ProcessPoolExecutor of loads) that raises one hands it to the parent with its fields and message. A
subclass with its own __init__ signature (ParityError, GraphLoadError) failed to unpickle and broke the pool."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

from mmedge.errors import BackendUnavailableError, InputError, ParityError, ServerError
from mmedge.runtimes.ort_session import GraphLoadError

ERRORS = [ParityError("decoder", "logits", "cosine", 0.5, 0.99, "try another backend"),
          GraphLoadError("component 'vision' from 'vision.onnx'", "Fail: an operator"),
          ServerError("the server answered 503", "a running server", "retry", status="503"),
          InputError("labels is empty", "at least one label", "pass labels"),
          BackendUnavailableError("backend 'openvino' needs openvino", "openvino importable", "pip install it")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_pickles_with_its_fields(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)
    assert back.exit_code == error.exit_code


def _raise(index: int) -> None:
    raise ERRORS[index]


def test_an_error_raised_in_a_worker_process_reaches_the_parent_as_itself():
    with ProcessPoolExecutor(max_workers=1) as pool:
        with pytest.raises(ParityError) as raised:
            pool.submit(_raise, 0).result(timeout=60)
        assert raised.value.component == "decoder" and raised.value.bound == 0.99
        with pytest.raises(GraphLoadError, match="could not load component 'vision'"):
            pool.submit(_raise, 1).result(timeout=60)
