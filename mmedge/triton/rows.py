"""The zero-shot pipeline model's batch: every request Triton's dynamic batcher queued, answered with one graph call.

Each request (one row, its leading axis already dropped) is checked, decoded and preprocessed on its own, in the
order ``ZeroShotClassifier.probabilities`` checks them (labels, images, templates), so a bad request gets the
message the local pipeline gives and the others are not touched. The images of all good requests then go through
the vision graph (or the fused zero-shot graph) as one batch, and each request's rows are scored against its own
label bank, exactly as ``ZeroShotClassifier._probabilities`` scores them. If the merged graph call fails, each
request runs alone, so only the request that causes the failure gets the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mmedge.errors import MmedgeError
from mmedge.pipelines.common import l2_normalize
from mmedge.pipelines.zero_shot import ZeroShotClassifier, softmax
from mmedge.triton.protocol import blobs_of, text_tensor, texts_of


@dataclass
class _Row:
    names: list[str]  # the labels, in the order of the probabilities
    pixels: np.ndarray  # [images, 3, height, width]
    bank: np.ndarray | None  # [labels, dim] unit rows; None for a fused graph (labels baked in)


def classify_rows(pipeline: ZeroShotClassifier, requests: list[Mapping[str, Any]]) -> list[dict | Exception]:
    """Each request's outputs (``probs`` [images, labels], ``label_names`` [labels]) or the exception it met."""
    rows: list[_Row | Exception] = []
    for inputs in requests:
        try:
            rows.append(_prepare(pipeline, inputs))
        except Exception as exc:  # noqa: BLE001 - answered to that request alone
            rows.append(exc)
    ready = [i for i, row in enumerate(rows) if isinstance(row, _Row)]
    scores: dict[int, np.ndarray | Exception] = {}
    if len(ready) > 1:
        try:
            merged = _score(pipeline, np.concatenate([rows[i].pixels for i in ready]))  # [all images, dim or labels]
        except MmedgeError:
            pass  # each request again on its own, below
        else:
            offsets = np.cumsum([0, *(len(rows[i].pixels) for i in ready)])
            scores = {i: merged[start:stop] for i, start, stop in zip(ready, offsets[:-1], offsets[1:])}
    for i in ready:
        if i not in scores:
            try:
                scores[i] = _score(pipeline, rows[i].pixels)
            except Exception as exc:  # noqa: BLE001 - answered to that request alone
                scores[i] = exc
    out: list[dict | Exception] = []
    for i, row in enumerate(rows):
        result = scores.get(i, row)
        if isinstance(result, Exception):
            out.append(result)
            continue
        probs = result if row.bank is None else softmax(pipeline.logit_scale * result @ row.bank.T)  # [images, labels]
        out.append({"probs": np.asarray(probs, dtype=np.float32), "label_names": text_tensor(row.names)})
    return out


def _prepare(pipeline: ZeroShotClassifier, inputs: Mapping[str, Any]) -> _Row:
    labels = texts_of("labels", inputs["labels"]) if "labels" in inputs else None
    templates = texts_of("templates", inputs["templates"]) if "templates" in inputs else None
    names = pipeline._labels_for_call(labels, templates)
    pixels = pipeline._pixels(blobs_of("images", inputs.get("images", [])))  # [images, 3, height, width]
    bank = None if pipeline.fused else pipeline.label_bank(names, templates)
    return _Row(names, pixels, bank)


def _score(pipeline: ZeroShotClassifier, pixels: np.ndarray) -> np.ndarray:
    """Unit image embeddings [images, dim], or a fused graph's probabilities [images, labels]."""
    if pipeline.fused:
        return pipeline._batched("zero_shot", pixels, "probs")
    return l2_normalize(pipeline._batched("vision", pixels, "image_embeds"))
