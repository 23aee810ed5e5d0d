"""Captioning, VQA and interleaved few-shot prompts with Flamingo-style models (IDEFICS).

``FlamingoCaptioner`` keeps ``Captioner``'s interface (``caption``, ``ask``, ``stream``, generation
settings as keywords) and adds interleaved prompts: ``generate([img1, "An image of two cats.", img2,
"An image of"])``. The family decides how a prompt becomes model inputs (``FlamingoInputs``): vision
and resampler run once per image, the cross-attention K/V once per prompt, and the decoder gets them
as context for the prefill and every step. Thread safety is ``Captioner``'s: calls are serialized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mmedge.errors import InputError
from mmedge.generation import generate_text, stream
from mmedge.pipelines.captioner import Captioner, _strip_stream
from mmedge.pipelines.interleaved import FlamingoInputs, is_text


class FlamingoCaptioner(Captioner):
    def __init__(self, artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        super().__init__(artifact, runners, preprocessor, tokenizer, decoder, embeddings)
        positions = self.settings["decoder"].get("max_positions") or 2048
        self.inputs = FlamingoInputs(self.settings, tokenizer, preprocessor, self._run_encoder, embeddings, positions)

    def _run_encoder(self, name: str, feeds: dict) -> dict:
        return self.runners[name].infer(feeds)

    # --- public API ------------------------------------------------------------------------------
    def caption(self, images, prompt: str | None = None, **generation: Any):
        """A caption per image (a string for one image, a list for a list); ``prompt`` is the text after the image."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None", "pass prompt='An image of'")
        batch = [Path(image) if is_text(image) else image for image in batch]  # caption() takes paths as strings
        texts = self._generate([[image, *([prompt] if prompt else [])] for image in batch], generation)
        return texts[0] if single else texts

    __call__ = caption

    def generate(self, prompt: list, **generation: Any):
        """Continue an interleaved prompt (a list of images and strings), or a list of such prompts."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InputError("generate() needs an interleaved prompt", "a non-empty list of images and strings",
                             "pass e.g. [image, 'An image of two cats.', image2, 'An image of']")
        batched = all(isinstance(p, (list, tuple)) for p in prompt)
        texts = self._generate([list(p) for p in prompt] if batched else [list(prompt)], generation)
        return texts if batched else texts[0]

    def stream(self, image, prompt: str | None = None, **generation: Any) -> Iterator[str]:
        """Yield the continuation in pieces: of one image (+ ``prompt``), or of one interleaved prompt list."""
        if is_text(image):
            image = Path(image)  # a single image given as a path string, as caption() takes it
        items = list(image) if isinstance(image, (list, tuple)) else [image, *([prompt] if prompt else [])]
        config = self._config(generation)
        built = self.inputs.build([items])
        with self._decoder_in_use():
            self.decoder.set_context(built["prefill"], built["step"])
            yield from _strip_stream(stream(self.decoder, built["embeds"], built["mask"], config, self.tokenizer,
                                            prompt_ids=built["ids"]))

    def _generate(self, prompts: list[list], generation: dict) -> list[str]:
        config = self._config(generation)  # bad settings are refused before any graph runs
        built = self.inputs.build(prompts)
        with self._decoder_in_use():
            self.decoder.set_context(built["prefill"], built["step"])
            texts = generate_text(self.decoder, built["embeds"], built["mask"], config, self.tokenizer,
                                  prompt_ids=built["ids"])
        return [t.strip() for t in texts]
