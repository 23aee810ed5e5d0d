"""Image and text embeddings (retrieval), L2-normalized, from a CLIP artifact."""

from __future__ import annotations

import numpy as np

from mmedge.errors import InputError
from mmedge.pipelines.common import ClipPipeline, check_text_chars, l2_normalize, pipeline_repr
from mmedge.pipelines.zero_shot import first_special_token, special_token_expected


class Embedder(ClipPipeline):
    task = "embed"

    def embed_images(self, images) -> np.ndarray:
        """[images, dim], unit-norm rows, for one image or a list."""
        pixels = self._pixels(images)  # [batch, 3, height, width]
        if self.fused:
            return self._batched("zero_shot", pixels, "image_embeds")  # normalized inside the graph
        return l2_normalize(self._batched("vision", pixels, "image_embeds"))

    def embed_texts(self, texts) -> np.ndarray:
        """[texts, dim], unit-norm rows, for one string or a list."""
        batch = text_batch(texts)
        if self.tokenizer is not None:
            check_text_chars(batch, self.tokenizer.max_length)
            refuse_unembeddable(batch, self.tokenizer)
        chunks = [self._text_embeds(batch[i:i + 256]) for i in range(0, len(batch), 256)]
        return l2_normalize(np.concatenate(chunks, axis=0))

    def similarity(self, images, texts) -> np.ndarray:
        """Cosine similarity [images, texts]."""
        return self.embed_images(images) @ self.embed_texts(texts).T

    def __repr__(self) -> str:
        return pipeline_repr(self)


def text_batch(texts) -> list:
    """``texts`` (one string, or any iterable of them) as a non-empty list: ``embed_texts``' input, here and on a
    server (``mmedge.triton_client``)."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise InputError(f"texts is {type(texts).__name__}", "a string or a list of strings",
                         "decode it first: texts.decode('utf-8')")
    try:
        batch = list(texts)
    except TypeError:
        raise InputError(f"texts is a {type(texts).__name__}", "a string or a list of strings",
                         "pass e.g. ['a photo of a cat', 'a dog']") from None
    if not batch:
        raise InputError("the text list is empty", "at least one string", "pass a string or a list of strings")
    refuse_unembeddable(batch)
    return batch


def unembeddable_text(texts: list, tokenizer=None) -> tuple[int, str, str, str] | None:
    """(index, what is wrong with it, what was expected, the fix) for the first text the text encoder would misread, or
    None: a blank one (it embeds as the start and end tokens alone), or, given ``tokenizer``, one holding a special
    token (CLIP reads a text up to its ``<|endoftext|>`` only; a zero-shot label holding one is refused too:
    ``check_label_tokens``). ``refuse_unembeddable`` and ``mmedge serve`` name the text each in its own terms."""
    blank = next((index for index, text in enumerate(texts) if isinstance(text, str) and not text.strip()), None)
    if blank is not None:
        return blank, f"is blank ({texts[blank]!r})", ("texts with words in them (a blank text embeds as the start "
                                                        "and end tokens alone: a vector that means nothing)"), \
            "remove it or write it out"
    found = first_special_token(tokenizer, texts) if tokenizer is not None and texts else None
    if found:
        index, special = found
        return index, f"holds the tokenizer's special token {special!r}", \
            special_token_expected(special, "plain text", "the"), f"remove {special!r} from it"
    return None


def refuse_unembeddable(texts: list, tokenizer=None) -> None:
    """InputError naming the text ``unembeddable_text`` finds, if any."""
    found = unembeddable_text(texts, tokenizer)
    if found:
        index, problem, expected, fix = found
        raise InputError(f"text {index} {problem}", expected, fix)
