"""Errors as HTTP answers: OpenAI's error shape around mmedge's message (what failed; what was expected; what to do).

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}
"""

from __future__ import annotations

import re

from mmedge.errors import BackendError, ImageError, InputError, LabelError, MmedgeError

# mmedge's generation settings by the request fields that set them (chat.generation_settings)
FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop_strings": "stop",
          "do_sample": "temperature"}
SETTING = re.compile(r"^generation setting (\w+)=")
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error",
         413: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"}


class ApiError(MmedgeError):
    """A request the server refuses: an HTTP status, mmedge's three-part message, the request field (``param``) and a
    short machine-readable ``code``; ``headers`` go with the answer (``Retry-After`` on a 503)."""

    def __init__(self, status: int, what: str, expected: str | None = None, fix: str | None = None, *,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(what, expected, fix)
        self.status, self.param, self.code, self.headers = status, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"), "param": self.param,
                          "code": self.code}}


def from_mmedge(exc: MmedgeError, param: str | None = None) -> ApiError:
    """The answer for an error a pipeline raised: its input was refused (400), or the engine failed (500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        code = "invalid_image" if isinstance(exc, ImageError) else "invalid_value"
        setting = SETTING.match(exc.what)
        if param is None and setting:
            param = FIELDS.get(setting.group(1), setting.group(1))
        if param is None and isinstance(exc, LabelError) and exc.index is not None:
            param = f"labels[{exc.index}]"
        return ApiError(400, exc.what, exc.expected, exc.fix, param=param, code=code)
    code = "backend_error" if isinstance(exc, BackendError) else "server_error"
    return ApiError(500, exc.what, exc.expected, exc.fix, param=param, code=code)


def internal(exc: BaseException) -> ApiError:
    """A bug in mmedge, answered (the traceback goes to the server log) so that the process serves the next request."""
    first = (str(exc).splitlines() or [""])[0][:300]
    return ApiError(500, f"internal error: {type(exc).__name__}: {first}", "a request mmedge can answer",
                    "this is a bug in mmedge: report it with the server log's traceback", code="internal_error")


def invalid(what: str, expected: str, fix: str, param: str | None, status: int = 400,
            code: str = "invalid_value") -> ApiError:
    """A request field with the wrong value (400) or, with ``status=422``, the wrong JSON type or shape."""
    return ApiError(status, what, expected, fix, param=param, code=code)
