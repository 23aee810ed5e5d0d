"""Fidelity measures shared by export-time checks and on-device `mmedge validate`."""

from __future__ import annotations

import numpy as np


def cosine_rows(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine similarity per batch row, each row flattened. Returns [batch]."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)  # [batch, features]
    act = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    dots = (ref * act).sum(axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is maximally wrong.
    return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0),
                    np.where(np.abs(ref).sum(1) + np.abs(act).sum(1) == 0, 1.0, 0.0))


def compare(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """max abs difference and the worst per-row cosine of two same-shaped arrays."""
    reference = np.asarray(reference)
    actual = np.asarray(actual)
    if reference.shape != actual.shape:
        return {"max_abs": float("inf"), "cosine": 0.0}
    diff = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    cos = float(cosine_rows(reference, actual).min()) if reference.size and reference.ndim else 1.0
    return {"max_abs": max_abs, "cosine": cos}


def compare_outputs(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {name: compare(reference[name], actual[name]) for name in reference}


def top1_agreement(reference_scores: np.ndarray, actual_scores: np.ndarray) -> float:
    """Share of rows whose arg-max class is the same in both [batch, classes] score arrays."""
    return float(np.mean(np.argmax(reference_scores, axis=-1) == np.argmax(actual_scores, axis=-1)))


def common_prefix(reference: list[int], actual: list[int]) -> int:
    """How many leading tokens two generated sequences share."""
    shared = 0
    for ref, act in zip(reference, actual):
        if ref != act:
            break
        shared += 1
    return shared
