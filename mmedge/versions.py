"""The runtime releases an artifact needs, and what an export records of its own.

``pyproject.toml`` states the floors (``MIN_ONNXRUNTIME``, ``MIN_TOKENIZERS``; a test holds the two alike): the
oldest releases that load every graph and tokenizer an export writes (ONNX Runtime 1.22: the INT4 LLM's 8-bit
MatMulNBits LM head; tokenizers 0.20: BPE merges written as pairs). pip keeps them, but a device's own build (a
Jetson's onnxruntime-gpu) may be older. An export records the releases it validated with (the manifest's
``export.validated_with.onnxruntime`` and ``tokenizer.tokenizers_version``), so that a graph or tokenizer this
device's older release cannot read is reported as that, with the upgrade to make, not as a damaged file.
"""

from __future__ import annotations

import re

MIN_ONNXRUNTIME = "1.22"
MIN_TOKENIZERS = "0.20"


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def release(version: str) -> tuple[int, ...]:
    """``"1.22.0"`` -> ``(1, 22, 0)``; leading numbers only (``"1.23.0.dev20250101"`` -> ``(1, 23, 0)``)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def older_than_needed(installed: str, floor: str, recorded: str | None,
                      recorded_as: str) -> tuple[str, str] | None:
    """(why, the release to install at least) where ``installed`` is older than the release the artifact
    ``recorded`` (``recorded_as`` names it for the message: "the export validated it on"), or than ``floor``,
    mmedge's own; None where it is neither."""
    if recorded and release(installed)[:2] < release(recorded)[:2]:  # patch releases add no operator
        return f"{recorded_as} {recorded}", recorded
    if release(installed) < release(floor):
        return f"mmedge needs {floor} or newer", floor
    return None
