"""What the CLIP pipelines share: runners per component, preprocessing, tokenization, batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmedge.artifact import Artifact
from mmedge.errors import InputError
from mmedge.runner import Runner

if TYPE_CHECKING:
    from mmedge.backends import Plan

MAX_BATCH = 32  # images per graph call: bounds peak memory on small devices


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class ClipPipeline:
    """Base for CLIP pipelines. Thread-safe: runners, preprocessing and tokenization hold no per-call state."""

    task = ""
    plan: Plan | None = None  # the backends ``mmedge.load`` chose per component (set by load)

    def __init__(self, artifact: Artifact, runners: dict[str, Runner], preprocessor, tokenizer=None,
                 max_batch: int = MAX_BATCH):
        self.artifact = artifact
        self.runners = runners
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.max_batch = max_batch

    @property
    def fused(self) -> bool:
        return "zero_shot" in self.runners

    def _pixels(self, images) -> np.ndarray:
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        return self.preprocessor(batch)  # [batch, 3, height, width]

    def _batched(self, component: str, pixels: np.ndarray, output: str) -> np.ndarray:
        runner = self.runners[component]
        parts = [runner.infer({"pixel_values": pixels[i:i + self.max_batch]})[output]
                 for i in range(0, len(pixels), self.max_batch)]
        return np.concatenate(parts, axis=0)

    def _text_embeds(self, texts: list[str]) -> np.ndarray:
        if "text" not in self.runners or self.tokenizer is None:
            raise InputError(
                "this artifact has no text encoder (it was exported with labels baked in)",
                "an artifact exported without --labels",
                "re-export without --labels to embed arbitrary text",
            )
        input_ids, attention_mask = self.tokenizer.encode(texts)  # [batch, tokens] each
        return self.runners["text"].infer({"input_ids": input_ids, "attention_mask": attention_mask})["text_embeds"]

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
