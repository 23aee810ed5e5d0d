"""Zero-shot image classification with CLIP: image → label probabilities.

Two shapes of artifact feed it:
- two graphs (``vision`` + ``text``): labels are given at call time; their embeddings are computed once
  per (labels, templates) and cached;
- one fused graph (``zero_shot``): the label bank was baked in at export, so the device runs a single
  graph and needs neither tokenizer nor text encoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from mmedge.errors import InputError, LabelError
from mmedge.pipelines.common import ClipPipeline, check_text_chars, closed_error, l2_normalize, pipeline_repr
from mmedge.setting_checks import as_count

DEFAULT_TEMPLATES = ("a photo of a {}.",)
# A compact ensemble from the CLIP paper's ImageNet prompt study.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "a origami {}.",
    "a {} in a video game.",
    "art of the {}.",
)
MAX_CACHED_BANKS = 16
TEXT_CHUNK = 256
# ImageNet's 1,000 classes fit; a bank of 10,000 labels x 8 templates would run the text encoder 80,000
# times on the first call (minutes on a CPU, longer on a Jetson) and pin its memory in the bank cache.
MAX_LABELS = 1000


def check_labels(labels: Any) -> list[str]:
    """A non-empty list of at most ``MAX_LABELS`` distinct, non-empty strings."""
    if isinstance(labels, str):
        raise InputError("labels is a single string", "a list of label strings", f"pass labels=[{labels[:40]!r}, ...]")
    refuse_unlisted(labels, "labels", "label strings (in the order of the probabilities' columns: a set's order "
                    "changes from run to run)", "['cat', 'dog']")
    try:
        labels = list(labels)
    except TypeError:
        raise InputError(f"labels is a {type(labels).__name__}", "a list of label strings",
                         "pass a list such as ['cat', 'dog']") from None
    if not labels:
        raise InputError("the label list is empty", "at least one label", "pass labels such as ['cat', 'dog']")
    if len(labels) > MAX_LABELS:
        raise InputError(f"the label list has {len(labels):,} labels", f"at most {MAX_LABELS:,} labels per call",
                         f"classify against at most {MAX_LABELS:,} labels at a time (e.g. a coarse list first, "
                         "then its best group), or use embed_images / embed_texts and rank embeddings yourself")
    bad = [repr(x) for x in labels if not isinstance(x, str) or not x.strip()]
    if bad:
        raise InputError(f"labels contain non-text or blank entries ({', '.join(bad[:3])})",
                         "non-empty strings", "remove or fix those entries")
    seen: set[str] = set()
    duplicates = sorted({x for x in labels if x in seen or seen.add(x)})
    if duplicates:
        raise InputError(f"labels contain duplicates ({', '.join(map(repr, duplicates[:3]))})",
                         "each label once, so each probability means one class", "remove the repeated labels")
    return [str(label) for label in labels]  # numpy's str_ as str


def refuse_unlisted(value: Any, name: str, items: str, example: str) -> None:
    """InputError for a set, dict or bytes given as ``name`` (a list of ``items`` is expected): a set's order changes
    from run to run, a dict would be read by its keys, bytes by their numbers; labels and templates alike."""
    hints = {set: f", e.g. sorted({name})", frozenset: f", e.g. sorted({name})", dict: f", e.g. list({name}.values())"}
    if isinstance(value, (set, frozenset, dict, bytes, bytearray)):
        raise InputError(f"{name} is a {type(value).__name__}", f"a list of {items}",
                         f"pass a list such as {example}{hints.get(type(value), '')}")


def check_label_tokens(tokenizer, labels: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse labels the text encoder cannot tell apart, as it would see them. ``tokenizer``: a
    ``mmedge.tokenizer.TextTokenizer``; ``labels`` and ``templates`` already checked (``check_labels``,
    ``check_templates``). The device runs this before it builds a label bank, the exporter before it bakes one.

    - a label whose text holds a special token of the tokenizer (CLIP's ``<|endoftext|>``): CLIP pools its text at
      the end-of-text token, so the label would be read up to that token only;
    - two labels whose prompts are the same token ids under every template, once cut to ``tokenizer.max_length``
      as the tokenizer cuts them: labels that differ only in what the tokenizer drops (CLIP's lowercases and
      squeezes spaces: "Cat", " cat") or only past the cut. They are one class that would split its probability.
    """
    check_text_chars(labels, tokenizer.max_length, "label")
    found = first_special_token(tokenizer, labels)
    if found:
        index, special = found
        raise LabelError(f"label {_shown(labels[index])} holds the tokenizer's special token {special!r}",
                         special_token_expected(special, "labels of plain text", "the label's"),
                         f"remove {special!r} from the label", index=index)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    every = tokenizer.encode_each(prompts)  # one call for all: a label at a time took 0.8 s for 1000 x 10
    long = [i for i, ids in enumerate(every) if len(ids) > tokenizer.max_length]  # and those cut, as the encoder is
    read_ids = dict(zip(long, tokenizer.encode_each([prompts[i] for i in long], cut=True))) if long else {}
    seen: dict[tuple, tuple[str, tuple]] = {}
    for index, label in enumerate(labels):
        rows = range(index * len(templates), (index + 1) * len(templates))
        uncut = tuple(tuple(every[i]) for i in rows)
        read = tuple(tuple(read_ids.get(i, every[i])) for i in rows)
        same, same_uncut = seen.setdefault(read, (label, uncut))
        if same == label:
            continue
        if same_uncut == uncut:  # the same tokens before any cut: the tokenizer drops what tells them apart
            raise LabelError(f"labels {_shown(same)} and {_shown(label)} are the same tokens to this model's "
                             "tokenizer", "each class once, so each probability means one class",
                             f"remove {_shown(label)}", index=index)
        raise LabelError(f"labels {_shown(same)} and {_shown(label)} are the same tokens to this model's text "
                         f"encoder once each prompt is cut at {tokenizer.max_length} tokens (its length, start "
                         "and end tokens included)", "labels that differ within the tokens the text encoder reads",
                         "shorten the labels so that they differ early, or remove one of them", index=index)


def first_special_token(tokenizer, texts: Sequence[str]) -> tuple[int, str] | None:
    """``(index, token)``: the first of ``texts`` whose own text holds a special token of ``tokenizer`` (a
    ``mmedge.tokenizer.TextTokenizer``) and that token as written, or None."""
    for index, ids in enumerate(tokenizer.encode_each(texts, add_special_tokens=False)):
        special = _special_tokens_in(tokenizer, ids)
        if special:
            return index, special
    return None


def special_token_expected(special: str, plain: str, whose: str) -> str:
    """Why a text holding ``special`` is refused (``plain``: "labels of plain text"; ``whose``: "the label's")."""
    return (f"{plain} (the text encoder reads a special token as a control mark, and {special!r} would end or "
            f"restart {whose} text)")


def _special_tokens_in(tokenizer, ids: Sequence[int]) -> str | None:
    """The first special token (``<|endoftext|>``) among a text's token ``ids`` (without added ones), or None."""
    for token_id in (i for i in ids if i in tokenizer.added_token_ids):  # few labels hold any
        if not tokenizer.decode([token_id]):  # special tokens decode to nothing by default
            written = tokenizer.decode([token_id], skip_special_tokens=False)
            if written:
                return written
    return None


def _shown(label: str) -> str:
    """``label`` quoted, its middle left out past 60 characters (two long labels often differ only at the end)."""
    return repr(label if len(label) <= 60 else f"{label[:28]}...{label[-28:]}")


def check_templates(templates: Any) -> list[str]:
    refuse_unlisted(templates, "templates", "prompt templates (each holding '{}' where the label goes)",
                    "['a photo of a {}.']")
    templates = list(DEFAULT_TEMPLATES if templates is None
                     else ([templates] if isinstance(templates, str) else templates))
    if not templates:
        raise InputError("the template list is empty", "at least one prompt template",
                         "leave templates unset for the default")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise InputError(f"prompt template {template!r} is not usable",
                             "a string with exactly one '{}' where the label goes", "use e.g. 'a photo of a {}.'")
    if len(set(templates)) != len(templates):
        repeated = sorted({t for t in templates if templates.count(t) > 1})
        raise InputError(f"prompt templates repeat ({', '.join(map(repr, repeated[:3]))})",
                         "each template once (a repeat weighs its prompts twice in the label average)",
                         "remove the repeated templates")
    return templates


def build_label_bank(embed_texts: Callable[[list[str]], np.ndarray], labels: Sequence[str],
                     templates: Sequence[str], chunk: int = TEXT_CHUNK) -> np.ndarray:
    """Label embeddings averaged over templates (open_clip's ensembling). Returns [labels, dim], rows unit-norm.

    ``embed_texts`` maps a list of prompts to their (unnormalized) text embeddings [prompts, dim]. The
    exporter calls this with a PyTorch text tower, the device with the ONNX one, so both agree.
    """
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    parts = [np.asarray(embed_texts(prompts[i:i + chunk]), dtype=np.float32) for i in range(0, len(prompts), chunk)]
    embeds = l2_normalize(np.concatenate(parts, axis=0))  # [labels * templates, dim]
    embeds = embeds.reshape(len(labels), len(templates), -1).mean(axis=1)  # [labels, dim]
    return l2_normalize(embeds)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ZeroShotClassifier(ClipPipeline):
    """``classifier(images, labels)``: ``[{"label", "score"}, ...]`` sorted by score for one image, a list of such
    lists for a list of images."""

    task = "zero-shot"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._banks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bank_lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}  # one thread builds a bank; the others asking wait for it
        zero_shot = self.artifact.manifest.get("zero_shot") or {}
        self.baked_labels: list[str] | None = zero_shot.get("labels") if self.fused else None
        self.logit_scale = float(self.artifact.manifest["clip"]["logit_scale"])

    def label_bank(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """Normalized label embeddings [labels, dim], computed once per (labels, templates) and cached: read-only,
        since every later call with these labels reads the same array (``bank.copy()`` gives one to change)."""
        labels, templates = check_labels(labels), check_templates(templates)
        key = (tuple(labels), tuple(templates))
        with self._bank_lock:
            if self._closed:  # the bank cache is dropped at close(): not answered from it
                raise closed_error(self)
            cached = self._cached_bank(key)
            if cached is not None:
                return cached
            building = self._building.setdefault(key, threading.Lock())
        with building:  # 8 threads asking for one new bank ran the text tower 8 times
            with self._bank_lock:
                cached = self._cached_bank(key)
            if cached is not None:
                return cached
            try:
                if self.tokenizer is not None:
                    check_label_tokens(self.tokenizer, labels, templates)
                bank = build_label_bank(self._text_embeds, labels, templates)
                bank.flags.writeable = False
                with self._bank_lock:
                    self._banks[key] = bank
                    while len(self._banks) > MAX_CACHED_BANKS:
                        self._banks.popitem(last=False)
            finally:
                with self._bank_lock:
                    self._building.pop(key, None)
        return bank

    def __repr__(self) -> str:
        return pipeline_repr(self)

    def close(self) -> None:
        """The runners closed and the cached label banks dropped (a closed classifier answers nothing)."""
        with self._bank_lock:
            self._banks.clear()
            self._closed = True
        super().close()

    def _cached_bank(self, key: tuple) -> np.ndarray | None:
        """The bank for ``key`` if it is cached (marked as just used); the caller holds ``_bank_lock``."""
        if key in self._banks:
            self._banks.move_to_end(key)
            return self._banks[key]
        return None

    def probabilities(self, images, labels: Sequence[str] | None = None,
                      templates: Sequence[str] | None = None) -> np.ndarray:
        """Label probabilities [images, labels] for one image or a list of images."""
        return self._probabilities(images, self._labels_for_call(labels, templates), templates)

    def __call__(self, images, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                 top_k: int | None = None) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        single = not isinstance(images, (list, tuple))
        names = self._labels_for_call(labels, templates)
        k = len(names) if top_k is None else self._check_top_k(top_k, len(names))
        probs = self._probabilities(images, names, templates)  # [images, labels]
        results = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            results.append([{"label": names[i], "score": float(row[i])} for i in order])
        return results[0] if single else results

    def _probabilities(self, images, labels: list[str], templates) -> np.ndarray:
        pixels = self._pixels(images)  # [batch, 3, height, width]
        if self.fused:
            return self._batched("zero_shot", pixels, "probs")
        image_embeds = l2_normalize(self._batched("vision", pixels, "image_embeds"))  # [batch, dim]
        logits = self.logit_scale * image_embeds @ self.label_bank(labels, templates).T  # [batch, labels]
        return softmax(logits)

    classify = __call__

    def _labels_for_call(self, labels, templates) -> list[str]:
        if not self.fused:
            if labels is None:
                raise InputError("no labels were given", "a list of labels for this artifact (it has no baked labels)",
                                 "pass labels=['cat', 'dog', ...], or export with --labels to bake them in")
            return check_labels(labels)
        if (labels is not None and check_labels(labels) != self.baked_labels) or templates is not None:
            raise InputError(
                "this artifact has labels baked into its graph, and other labels or templates were given",
                f"labels=None (the baked {len(self.baked_labels)} labels: {', '.join(self.baked_labels[:5])}"
                + (", ..." if len(self.baked_labels) > 5 else "") + ")",
                "leave labels unset, or export without --labels to choose labels at run time",
            )
        return list(self.baked_labels)

    @staticmethod
    def _check_top_k(top_k: Any, n: int) -> int:
        k = as_count(top_k, 1)
        if k is None:
            raise InputError(f"top_k is {top_k!r}", "a positive integer", "pass e.g. top_k=5")
        return min(k, n)
