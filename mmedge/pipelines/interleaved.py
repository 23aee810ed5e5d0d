"""Interleaved image/text prompts for Flamingo-style models (IDEFICS), built exactly as transformers'
``IdeficsProcessor`` builds them, in numpy.

A prompt is a list mixing images and text, e.g. ``[img1, "An image of two cats.", img2, "An image of"]``.
Text items are strings; anything else (a path as ``pathlib.Path``, a PIL image, an array, bytes) is an
image. The processor's text is ``<s>`` then, per item: an image becomes
``<fake_token_around_image><image><fake_token_around_image>`` (just ``<image><fake_token_around_image>``
right after another image), a text is appended with surrounding spaces stripped (and
``<end_of_utterance>`` before it when the tokenizer has that token and the previous item was text).
The whole string is tokenized without added special tokens.

Each token may see one image: the most recent ``<image>`` before it (none before the first image, and
none after an end-of-sequence token until the next image). That is ``image_attention_mask``,
``[tokens, images]`` one-hot rows (all zero for tokens that see no image).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmedge.errors import InputError
from mmedge.generation.config import most_new_tokens, positions_taken
from mmedge.pipelines.prefix_inputs import check_prompt_chars


def is_text(item: Any) -> bool:
    return isinstance(item, str)


class ImagePath(os.PathLike):
    """An image path given as a string where a prompt's strings are text (``caption("cat.png")``): an image item that
    gives the string back unchanged (``pathlib.Path`` squeezed "https://" to "https:/", losing the URL's hint)."""

    def __init__(self, path: str):
        self.path = path

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ImagePath({self.path!r})"


def prompt_text(items: list, prompt_format: dict) -> tuple[str, list]:
    """The processor's text for ``items`` and the images in order."""
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError("the interleaved prompt is empty or not a list",
                         "a list mixing images and strings, e.g. [image, 'An image of']",
                         "pass at least one image or text item")
    fake, image_token = prompt_format["fake_image_token"], prompt_format["image_token"]
    end_of_utterance = prompt_format.get("end_of_utterance_token")
    text, images = prompt_format["bos_token"], []
    last_was_image = False
    for index, item in enumerate(items):
        last_was_text = index > 0 and not last_was_image
        if is_text(item):
            placeholder = next((token for token in (image_token, fake) if token in item), None)
            if placeholder:
                raise InputError(f"prompt item {index} holds {placeholder!r}, a token the prompt format places "
                                 "around images", "plain text: images are passed as items of the prompt, and the "
                                 "format puts its tokens around them", f"remove {placeholder!r} from the text")
            if end_of_utterance and last_was_text:
                text += end_of_utterance
            text += item.strip(" ")
            last_was_image = False
        elif item is None or isinstance(item, (int, float, bool)):
            raise InputError(f"prompt item {index} is {item!r}",
                             "an image (path as pathlib.Path, PIL image, array) or a string",
                             "remove the item or wrap a file path in pathlib.Path")
        else:
            text += image_token + fake if last_was_image else fake + image_token + fake
            images.append(item)
            last_was_image = True
    return text, images


def image_attention_mask(ids: np.ndarray, image_token_id: int, eos_token_id: int | None, images: int) -> np.ndarray:
    """``[tokens, images]`` int64: row t is one-hot on the image token t may see (HF's packed-input rule)."""
    mask = np.zeros((len(ids), max(images, 1)), dtype=np.int64)
    count, seen_eos = -1, False
    for position, token in enumerate(ids.tolist()):
        if token == image_token_id:
            count += 1
            seen_eos = False
        if not seen_eos and 0 <= count < images:
            mask[position, count] = 1
        if eos_token_id is not None and token == eos_token_id:
            seen_eos = True
    return mask


class FlamingoInputs:
    """Interleaved prompts → the decoder's prefill inputs and per-call context, for a batch of prompts.

    ``settings``: the manifest's ``idefics`` object. ``run(name, feeds)``: runs an encoder component
    (the fused ``image_context`` graph, or the split ``vision``, ``resampler``, ``cross_kv``) and returns its
    outputs by name. ``embeddings``: the token table (``[vocab, hidden]``, rows looked up by id).
    ``max_prompt_tokens``: the decoder's positions (by default the manifest's ``decoder.max_positions``), shared by
    the prompt and the new tokens.
    """

    least_prompt_positions = 1  # BOS: a prompt of one empty text; any image adds its tokens around it

    def __init__(self, settings: dict, tokenizer, preprocessor, run, embeddings, max_prompt_tokens: int | None = None):
        self.settings = settings
        self.format = settings["prompt_format"]
        self.tokenizer, self.preprocessor, self.run, self.embeddings = tokenizer, preprocessor, run, embeddings
        self.max_prompt_tokens = max_prompt_tokens or settings["decoder"].get("max_positions") or 2048
        self.cross = settings["cross_kv"]

    def for_images(self, images, prompt: str | None, max_new_tokens: int = 0) -> dict:
        """``build`` of one prompt per image: the image, then ``prompt`` (the text after it) when given. Images may be
        paths as strings here (``caption(images)`` takes them so). ``max_new_tokens``: room the decoder keeps."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise InputError("the image list is empty", "at least one image", "pass an image path, PIL image or array")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt is a {type(prompt).__name__}", "a string or None", "pass prompt='An image of'")
        batch = [ImagePath(image) if is_text(image) else image for image in batch]
        # the user gave images, not prompts: an error names the image as a batch of them is named (one: by itself)
        places = [f"image at index {index} of the batch" for index in range(len(batch))] if len(batch) > 1 else [None]
        return self.build([[image, *([prompt] if prompt else [])] for image in batch], max_new_tokens, places)

    def prompt_positions(self, image, prompt: str | None) -> int:
        """Tokens of one interleaved prompt (``image``: its list), or of ``[image, prompt]`` as ``for_images`` builds
        it (a string ``image`` is a path), image tokens included."""
        if isinstance(image, (list, tuple)):
            items = list(image)
        else:
            items = [ImagePath(image) if is_text(image) else image, *([prompt] if prompt else [])]
        return int(self._encoded(items)[0].shape[0])

    def prompt_ids(self, items: list, max_new_tokens: int = 0) -> tuple[np.ndarray, list]:
        ids, images = self._encoded(items)
        tokens, positions = int(ids.shape[0]), self.max_prompt_tokens
        if positions_taken(tokens, max_new_tokens) > positions:
            fits = most_new_tokens(positions, tokens)
            raise InputError(f"the prompt has {tokens} tokens (image tokens included); with "
                             f"max_new_tokens={max_new_tokens} that is {positions_taken(tokens, max_new_tokens)} "
                             "positions (the last new token is never fed back)",
                             f"at most the model's {positions} positions",
                             f"lower max_new_tokens to {fits} or less, or shorten the text or pass fewer images"
                             if fits > 0 else "shorten the text or pass fewer images")
        return ids, images

    def _encoded(self, items: list) -> tuple[np.ndarray, list]:
        """The prompt's ids ``[tokens]`` and its images in order."""
        text, images = prompt_text(items, self.format)
        # the user's text, before tokenizing (the format's image tokens are many characters but few tokens)
        check_prompt_chars("".join(item for item in items if is_text(item)), self.max_prompt_tokens)
        return self.tokenizer.encode_all(text, add_special_tokens=False), images

    def build(self, prompts: list[list], max_new_tokens: int = 0, places: list[str | None] | None = None) -> dict:
        """``{"embeds" [batch, tokens, hidden], "mask" [batch, tokens], "ids" [batch, tokens], "prefill": {...},
        "step": {...}}``; prompts are left-padded to the longest; each leaves ``max_new_tokens`` positions free.
        ``places``: how an error names each image, in order (by default its prompt item: "prompt 1 item 2")."""
        encoded = []
        for row, items in enumerate(prompts):
            try:
                encoded.append(self.prompt_ids(items, max_new_tokens))
            except InputError as exc:
                if len(prompts) == 1:
                    raise
                raise InputError(f"prompt {row}: {exc.what}", exc.expected, exc.fix) from exc
        if places is None:
            places = [f"prompt {row} item {index}" if len(prompts) > 1 else f"prompt item {index}"
                      for row, items in enumerate(prompts) for index, item in enumerate(items) if not is_text(item)]
        length = max(ids.shape[0] for ids, _ in encoded)
        max_images = max(1, max(len(images) for _, images in encoded))
        pad = self.settings["pad_token_id"] if self.settings.get("pad_token_id") is not None else 0
        batch = len(encoded)
        ids = np.full((batch, length), pad, dtype=np.int64)
        mask = np.zeros((batch, length), dtype=np.int64)
        seen = np.zeros((batch, length, max_images), dtype=np.int64)
        for row, (row_ids, images) in enumerate(encoded):
            start = length - row_ids.shape[0]
            ids[row, start:], mask[row, start:] = row_ids, 1
            seen[row, start:] = image_attention_mask(row_ids, self.format["image_token_id"],
                                                     self.format["eos_token_id"], max_images)
        fused = self.settings.get("image_context")
        if fused:  # one graph: its outputs are the decoder's image inputs (cross K/V or visual tokens), by name
            pixels = self.prompt_pixels([images for _, images in encoded], max_images, places)
            context = self.run(fused["component"], {fused["input"]: pixels})
        elif self.settings["decoder"]["cross_kv"] == "inputs":
            # [batch, images * tokens, width]
            visual = self.visual_tokens([images for _, images in encoded], max_images, places)
            # each [batch, heads, image_tokens, head_dim]
            context = self.run(self.cross["component"], {"visual_tokens": visual})
        else:
            context = {"visual_tokens": self.visual_tokens([images for _, images in encoded], max_images, places)}
        embeds = np.asarray(self.embeddings[ids.reshape(-1)], dtype=np.float32).reshape(batch, length, -1)
        return {"embeds": embeds, "mask": mask, "ids": ids,
                "prefill": {"image_attention_mask": seen, **context},
                "step": {"image_attention_mask": np.ascontiguousarray(seen[:, -1:, :]), **context}}

    def prompt_pixels(self, images_per_prompt: list[list], max_images: int, places: list[str | None] | None = None
                      ) -> np.ndarray:
        """Every prompt's images, preprocessed: ``[batch, max_images, 3, height, width]``, zeros where a prompt has
        fewer images (masked out of every cross-attention)."""
        shape = self.settings["image_context"]["shape"][2:]  # [3, height, width]
        out = np.zeros((len(images_per_prompt), max_images, *shape), dtype=np.float32)
        flat = [image for images in images_per_prompt for image in images]
        if flat:
            pixels = self.preprocessor(flat, places)  # [images, 3, height, width]
            start = 0
            for row, images in enumerate(images_per_prompt):
                out[row, :len(images)] = pixels[start:start + len(images)]
                start += len(images)
        return out

    def visual_tokens(self, images_per_prompt: list[list], max_images: int, places: list[str | None] | None = None
                      ) -> np.ndarray:
        """Vision (+ resampler) over every image once; ``[batch, max_images * tokens_per_image, width]``,
        zeros where a prompt has fewer images (masked out of every cross-attention)."""
        per_image, width = self.cross["tokens_per_image"], self.settings["vision_width"]
        out = np.zeros((len(images_per_prompt), max_images * per_image, width), dtype=np.float32)
        flat = [image for images in images_per_prompt for image in images]
        if not flat:
            return out
        pixels = self.preprocessor(flat, places)  # [images, 3, height, width]
        tokens = self.run("vision", {"pixel_values": pixels})["image_features"]  # [images, patches + 1, width]
        if "resampler" in self.settings["components"]:
            tokens = self.run("resampler", {"image_features": tokens})["visual_tokens"]  # [images, latents, width]
        start = 0
        for row, images in enumerate(images_per_prompt):
            count = len(images)
            out[row, :count * per_image] = tokens[start:start + count].reshape(count * per_image, width)
            start += count
        return out
