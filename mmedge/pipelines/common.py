"""What the CLIP pipelines share: runners per component, preprocessing, tokenization, batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmedge.artifact import Artifact
from mmedge.errors import BackendError, InputError
from mmedge.runner import Runner

if TYPE_CHECKING:
    from mmedge.backends import Plan

MAX_BATCH = 32  # images per graph call: bounds peak memory on small devices
# A text the CLIP text encoder reads only the first tokens of: past this many characters per token it reads, it is far
# past them (no token of its vocabulary is this long), and tokenizing all of it took seconds (10 M characters: 75 s).
CUT_CHARS_PER_TOKEN = 64


def overlong_text(texts: list, max_tokens: int) -> int | None:
    """The index of the first text of more than ``CUT_CHARS_PER_TOKEN * max_tokens`` characters, or None."""
    limit = CUT_CHARS_PER_TOKEN * max_tokens
    return next((i for i, text in enumerate(texts) if isinstance(text, str) and len(text) > limit), None)


def check_text_chars(texts: list, max_tokens: int, what: str = "text") -> None:
    """InputError for a text far longer than the ``max_tokens`` the text encoder reads, before it is tokenized."""
    index = overlong_text(texts, max_tokens)
    if index is not None:
        raise InputError(f"{what} {index} has {len(texts[index]):,} characters",
                         f"at most {CUT_CHARS_PER_TOKEN * max_tokens:,}: the text encoder reads only its first "
                         f"{max_tokens} tokens (a longer text is cut there), and one this long is far past them",
                         f"shorten {what} {index} to its first sentences")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def finite_output(values: np.ndarray, component: str, output: str) -> np.ndarray:
    """``values``, refused when any is NaN or infinite: scores made of them would print as NaN with success (weights
    a graph reads from an unchecked file, a backend's overflow)."""
    if not np.isfinite(values).all():
        raise BackendError(f"component '{component}' output '{output}' holds NaN or infinite values",
                           "finite outputs from the graph",
                           "run `mmedge doctor ARTIFACT` to check its files, or re-export it (at fp32 if it overflows)")
    return values


def closed_error(pipeline) -> BackendError:
    """What a pipeline used after ``close()`` (or past its ``with`` block) answers, instead of its runner's words."""
    return BackendError(f"this {type(pipeline).__name__} is closed", "an open pipeline",
                        "load the artifact again with mmedge.load (a pipeline in a with block is closed at its end)")


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
        self._closed = False

    @property
    def fused(self) -> bool:
        return "zero_shot" in self.runners

    def _pixels(self, images) -> np.ndarray:
        if self._closed:
            raise closed_error(self)
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        return self.preprocessor(batch)  # [batch, 3, height, width]

    def _batched(self, component: str, pixels: np.ndarray, output: str) -> np.ndarray:
        runner = self.runners[component]
        parts = [runner.infer({"pixel_values": pixels[i:i + self.max_batch]})[output]
                 for i in range(0, len(pixels), self.max_batch)]
        return finite_output(np.concatenate(parts, axis=0), component, output)

    def _text_embeds(self, texts: list[str]) -> np.ndarray:
        if self._closed:
            raise closed_error(self)
        if "text" not in self.runners or self.tokenizer is None:
            raise InputError(
                "this artifact has no text encoder (it was exported with labels baked in)",
                "an artifact exported without --labels",
                "re-export without --labels to embed arbitrary text",
            )
        input_ids, attention_mask = self.tokenizer.encode(texts)  # [batch, tokens] each
        embeds = self.runners["text"].infer({"input_ids": input_ids, "attention_mask": attention_mask})["text_embeds"]
        return finite_output(embeds, "text", "text_embeds")

    def close(self) -> None:
        self._closed = True
        for runner in self.runners.values():
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pipeline_repr(pipeline) -> str:
    """``Captioner('blip2-demo', family=blip2, task=caption, prefix=onnxruntime, decoder=onnxruntime)``: a loaded
    pipeline's artifact folder, family, task and each component's backend: the one its runner runs on (a component
    ``auto`` gave OpenVINO that OpenVINO refused runs on ONNX Runtime), else as ``mmedge.load`` planned it."""
    manifest = pipeline.artifact.manifest
    parts = [repr(str(pipeline.artifact.root)), f"family={manifest['family']}", f"task={pipeline.task}"]
    if pipeline.plan is not None:
        running = {**(getattr(pipeline, "runners", None) or {}), "decoder": getattr(pipeline, "decoder", None)}
        parts += [f"{name}={getattr(running.get(name), 'backend', chosen.backend)}"
                  for name, chosen in pipeline.plan.components.items()]
    if pipeline._closed:
        parts.append("closed")
    return f"{type(pipeline).__name__}({', '.join(parts)})"
