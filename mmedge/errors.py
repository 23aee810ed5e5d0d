"""Every error mmedge raises on purpose, in one place.

Each error says three things, in this order: what failed, what was expected,
and what to do about it. The CLI prints ``str(error)`` as one line and exits
with ``error.exit_code``; no traceback reaches the user.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


class MmedgeError(Exception):
    """Base class. ``what`` failed; ``expected`` is what would have worked; ``fix`` is the next step."""

    exit_code = 2

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None):
        self.what = what
        self.expected = expected
        self.fix = fix
        super().__init__(self.message)

    def __reduce__(self):
        """Pickled with its fields, whatever its ``__init__`` takes (an error raised in a worker process reaches the
        parent as itself; a subclass with another signature broke the pool)."""
        return _unpickled, (type(self), dict(self.__dict__))

    @property
    def message(self) -> str:
        parts = [_clause(self.what)]
        if self.expected:
            parts.append(f"expected {_clause(self.expected)}")
        if self.fix:
            parts.append(f"fix: {_clause(self.fix)}")
        return "; ".join(parts) + "."


def _unpickled(kind: type, fields: dict) -> MmedgeError:
    error = kind.__new__(kind)
    error.__dict__.update(fields)
    Exception.__init__(error, error.message)
    return error


def _clause(text: str) -> str:
    """``text`` without the full stop it may end in, but with the '...' of a value shortened to fit kept whole."""
    return text if text.endswith(("...", "…")) else text.rstrip(".")


# --- artifacts -----------------------------------------------------------------------------------
class ArtifactError(MmedgeError):
    """An artifact folder cannot be used."""


class ArtifactNotFoundError(ArtifactError):
    """The folder, its manifest or a file the manifest names is missing."""

    exit_code = 3


class ManifestError(ArtifactError):
    """manifest.json is not JSON, lacks a field, or has a field of the wrong type or value."""


class UnsupportedFormatError(ManifestError):
    """The manifest was written by a newer mmedge (or is not an mmedge manifest at all)."""


class UnsafePathError(ManifestError):
    """The manifest names a file outside the artifact folder."""


class IntegrityError(ArtifactError):
    """A file's sha256 differs from the one in the manifest, or the file is not a loadable graph."""


# --- export --------------------------------------------------------------------------------------
class ModelLoadError(MmedgeError):
    """A checkpoint could not be loaded (missing, unsupported family, unsafe weights format)."""


class ExportError(MmedgeError):
    """Tracing or writing a component failed."""


class ParityError(ExportError):
    """An exported or quantized graph drifted past tolerance from its reference: measured drift, not a usage error, so
    its own exit code (``mmedge export``'s parity gates and ``mmedge validate``)."""

    exit_code = 5

    def __init__(self, component: str, output: str, metric: str, value: float, bound: float, fix: str):
        self.component, self.output, self.metric, self.value, self.bound = component, output, metric, value, bound
        cmp = ">=" if metric == "cosine" or metric.endswith("agreement") else "<="
        super().__init__(
            f"component '{component}' output '{output}' failed parity: {metric} = {value:.6g}",
            f"{metric} {cmp} {bound:g}",
            fix,
        )


class QuantizationError(ExportError):
    """Quantizing a graph failed or is not possible with the given settings."""


class CalibrationError(QuantizationError):
    """The calibration images could not be read or are too few."""


# --- inputs at run time --------------------------------------------------------------------------
class InputError(MmedgeError):
    """A value passed to a pipeline is not acceptable (empty label list, bad argument)."""


class ImageError(InputError):
    """A file or object is not a usable image."""


class LabelError(InputError):
    """A zero-shot label cannot be scored; ``index`` is its place in the label list (a server names the field)."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None, *, index: int | None = None):
        super().__init__(what, expected, fix)
        self.index = index


class TokenizerError(InputError):
    """The tokenizer file is missing or unreadable, or text cannot be tokenized."""


class FeedError(InputError):
    """Feeds given to a runner do not match the component's declared inputs."""


# --- backends ------------------------------------------------------------------------------------
class BackendUnavailableError(MmedgeError):
    """The user named a backend whose engine is not installed or cannot run here."""

    exit_code = 4


class InsufficientMemoryError(BackendUnavailableError):
    """The engines (and KV cache) a backend would build and hold need more memory than this device has free."""


class BackendError(MmedgeError):
    """An engine failed while creating a session or running a graph."""


class StaleEngineError(BackendError):
    """A cached engine was built for another GPU, engine version, graph, precision or shape profile.

    Such an engine is never loaded: it is rebuilt on this device (see ``mmedge.runtimes.engine_cache``).
    """


# --- serving -------------------------------------------------------------------------------------
class ServerError(BackendError):
    """A Triton server answered a request with an error, or could not be reached (``mmedge.triton_client``).
    ``status``: the server's status code (an HTTP code or a gRPC status name), or None when it was not reached."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None, status: str | None = None):
        self.status = status
        super().__init__(what, expected, fix)


class ServerInputError(ServerError, InputError):
    """The server refused the request's input; the message is the one the pipeline gave (as it would locally)."""


# --- warnings --------------------------------------------------------------------------------------
class MmedgeWarning(UserWarning):
    """Every warning mmedge gives (a subclass names which): ``warnings.filterwarnings("ignore",
    category=mmedge.MmedgeWarning)`` silences them all."""


def warn(message: str, category: type[Warning] = MmedgeWarning) -> None:
    """Warn ``message`` at the line of the caller's own code: the first frame outside mmedge's packages (mmedge and
    its export and runtimes rooms), so that a filter by module or line, and the warning's location, name the
    user's call, however deep in mmedge it was given."""
    roots = tuple(os.path.join(str(Path(folder)), "") for name in ("mmedge", "mmedge.export", "mmedge.runtimes")
                  if name in sys.modules for folder in getattr(sys.modules[name], "__path__", ()))
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)  # no caller outside: mmedge's line
