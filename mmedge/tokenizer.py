"""Text tokenization on the device: a ``tokenizers`` tokenizer.json plus the manifest's settings.

Produces the same ``input_ids`` and ``attention_mask`` as the transformers tokenizer it was exported
from (``tokenizer(texts, padding=..., truncation=True, max_length=...)``), without transformers.
Truncation and padding are configured once at load time, so one instance is safe to share
between threads.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mmedge.errors import InputError, ManifestError, TokenizerError, warn

PADDING_MODES = ("longest", "max_length")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# transformers' clean_up_tokenization, in its order: spaces before punctuation and English contractions dropped
SPACE_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                   (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TextTokenizer:
    """Turns text into padded, truncated token ids for a text encoder, and token ids back into text.

    ``settings`` is the manifest's ``tokenizer`` object: ``file`` (the tokenizer.json name),
    ``max_length`` (tokens per text, special tokens included), ``pad_id`` and ``padding``
    (``"longest"``: pad to the longest text in the batch; ``"max_length"``: pad to ``max_length``).
    """

    def __init__(self, backend: Tokenizer, settings: dict[str, Any]):
        self.settings = _checked_settings(settings, backend)
        self.max_length: int = self.settings["max_length"]
        self.pad_id: int = self.settings["pad_id"]
        self.padding: str = self.settings["padding"]
        self._untruncated: Tokenizer | None = None  # encode_all's copy, without cut or padding
        self._untruncated_lock = threading.Lock()
        self._byte_token_ids: frozenset[int] | None = None  # made on first use (byte_token_ids)
        self._backend = _configured(backend, self.settings)
        self._end_of_word_suffix = getattr(backend.model, "end_of_word_suffix", None) or ""

    @classmethod
    def from_file(cls, path: str | Path, settings: dict[str, Any]) -> "TextTokenizer":
        """Load ``path`` (a tokenizers tokenizer.json) and apply ``settings`` from the manifest."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file '{path}' does not exist",
                "the tokenizer.json named by the manifest's tokenizer.file inside the artifact folder",
                "re-export the artifact, or copy its tokenizer.json back beside manifest.json",
            )
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for every parse failure
            raise _unreadable(path, settings, exc) from exc
        return cls(backend, settings)

    def encode(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize one text or a batch; returns ``(input_ids, attention_mask)``, both int64 ``[batch, tokens]``.

        Texts longer than ``max_length`` tokens are cut to fit, keeping the end-of-text token last,
        and a warning says how many were cut.
        """
        batch = _checked_texts(texts)
        try:
            encodings = self._backend.encode_batch(batch)
        except Exception as exc:  # tokenizers raises plain Exception
            raise _untokenizable(exc) from exc
        self._warn_if_truncated(encodings)
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)  # [batch, tokens]
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # [batch, tokens]
        return input_ids, attention_mask

    def encode_all(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Every token id of one text (special tokens included unless ``add_special_tokens=False``), int64
        ``[tokens]``: neither cut to ``max_length`` nor padded, so a caller that must shorten a prompt can
        choose which end to keep. Special tokens written in the text itself (``<image>``) are always parsed."""
        batch = _checked_texts(text)
        if len(batch) != 1:
            raise InputError(f"encode_all got {len(batch)} texts", "one string", "call encode_all once per text")
        try:
            encoding = self._untruncated_backend().encode(batch[0], add_special_tokens=add_special_tokens)
        except Exception as exc:  # tokenizers raises plain Exception
            raise _untokenizable(exc) from exc
        return np.array(encoding.ids, dtype=np.int64)  # [tokens]

    def encode_each(self, texts: Sequence[str], add_special_tokens: bool = True, cut: bool = False) -> list[list[int]]:
        """Each text's token ids, in one call of the tokenizer (its threads), unpadded: every id (``encode_all``'s),
        or with ``cut`` those a text encoder reads (``encode``'s, cut to ``max_length``, without its warning)."""
        batch = _checked_texts(list(texts))
        try:
            encodings = (self._backend.encode_batch(batch) if cut else
                         self._untruncated_backend().encode_batch(batch, add_special_tokens=add_special_tokens))
        except Exception as exc:  # tokenizers raises plain Exception
            raise _untokenizable(exc) from exc
        return [[i for i, kept in zip(e.ids, e.attention_mask) if kept] for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True,
               clean_up_spaces: bool | None = None) -> str:
        """Text for one sequence of token ids (``[tokens]``); special and padding tokens are dropped by default.
        ``clean_up_spaces``: None cleans up as the tokenizer does (``cleans_up_spaces``), False never."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InputError(
                f"cannot decode token ids of shape {list(ids.shape)} and dtype {ids.dtype}",
                "one sequence of integer token ids, shape [tokens]",
                "decode each row of a batch separately",
            )
        text = self._backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)
        if self._end_of_word_suffix:  # CLIP's BPE marks word ends with "</w>"; transformers turns it into a space
            text = text.replace(self._end_of_word_suffix, " ").strip()
        if self.cleans_up_spaces if clean_up_spaces is None else clean_up_spaces:
            text = clean_up_spaces_in(text)
        return text

    @property
    def cleans_up_spaces(self) -> bool:
        """Whether decoding drops spaces before punctuation as transformers' decode does for this tokenizer (the
        manifest's ``clean_up_spaces``: its ``clean_up_tokenization_spaces``, which transformers 5 applies to
        WordPiece and Unigram models such as T5's, not to BPE)."""
        return bool(self.settings.get("clean_up_spaces", False))

    def _untruncated_backend(self) -> Tokenizer:
        """A copy of the tokenizer with truncation and padding off, made on first use."""
        with self._untruncated_lock:
            if self._untruncated is None:
                copy = Tokenizer.from_str(self._backend.to_str())
                copy.no_truncation()
                copy.no_padding()
                self._untruncated = copy
            return self._untruncated

    @functools.cached_property
    def added_token_ids(self) -> frozenset[int]:
        """The ids of the tokenizer's added tokens (its special ones among them: ``<|endoftext|>``, ``<image>``)."""
        return frozenset(self._backend.get_added_tokens_decoder())

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """The ids of the tokenizer's special tokens (``</s>``, ``<|endoftext|>``, ``<pad>``): those a decode skips."""
        return frozenset(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """The ids of ``<0xNN>`` byte tokens where the decoder falls back to bytes (Llama / Vicuna / IDEFICS
        SentencePiece): a run of them decodes as a whole, so a byte that comes later can turn characters already
        decoded into U+FFFD (a stream holds such a run back until it ends). Empty for byte-level BPE (CLIP, OPT)."""
        if self._byte_token_ids is None:
            spec = json.loads(self._backend.to_str())
            if '"ByteFallback"' in json.dumps(spec.get("decoder")):
                self._byte_token_ids = frozenset(i for token, i in self._backend.get_vocab(with_added_tokens=False)
                                                 .items() if _BYTE_TOKEN.fullmatch(token))
            else:
                self._byte_token_ids = frozenset()
        return self._byte_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _warn_if_truncated(self, encodings: list) -> None:
        """One warning per call naming how many texts were cut to ``max_length``."""
        truncated = sum(1 for e in encodings if e.overflowing)
        if truncated:
            warn(f"{truncated} of {len(encodings)} texts were longer than {self.max_length} tokens and were "
                 f"truncated to {self.max_length}")


def _unreadable(path: Path, settings: dict[str, Any], exc: Exception) -> TokenizerError:
    """The error for a tokenizer.json this tokenizers release cannot parse: an upgrade where the release is older
    than the one that wrote it (``settings["tokenizers_version"]``) or than mmedge needs (its sha256 was checked, so
    the file is intact; 0.19 cannot read the BPE merges newer releases write), else a damaged or foreign file."""
    from mmedge.versions import MIN_TOKENIZERS, older_than_needed, tokenizers_version

    installed = tokenizers_version()
    written = settings.get("tokenizers_version")
    older = older_than_needed(installed, MIN_TOKENIZERS, written if isinstance(written, str) else None,
                              "the export wrote it with")
    if older:
        why, wanted = older
        return TokenizerError(f"tokenizer file '{path}' cannot be read by tokenizers {installed} ({_first_line(exc)})",
                              f"a tokenizers release that reads it ({why})",
                              f'upgrade it: pip install -U "tokenizers>={wanted}"')
    return TokenizerError(f"tokenizer file '{path}' cannot be read ({_first_line(exc)})",
                          "a tokenizer.json written by the Hugging Face tokenizers library",
                          "re-export the artifact; the file may be truncated or from an incompatible tokenizers "
                          "version")


def _configured(backend: Tokenizer, settings: dict[str, Any]) -> Tokenizer:
    """``backend`` with truncation and padding set once, as transformers sets them per call."""
    backend.enable_truncation(max_length=settings["max_length"], strategy="longest_first", direction="right")
    length = settings["max_length"] if settings["padding"] == "max_length" else None
    pad_token = backend.id_to_token(settings["pad_id"])
    backend.enable_padding(direction="right", pad_id=settings["pad_id"], pad_token=pad_token, length=length)
    return backend


def clean_up_spaces_in(text: str) -> str:
    """transformers' ``clean_up_tokenization``: "yes , it is n't" -> "yes, it isn't"."""
    for before, after in SPACE_CLEAN_UPS:
        text = text.replace(before, after)
    return text


CLEAN_UP_REACH = 8  # a space's fate under SPACE_CLEAN_UPS rests on at most the 5 characters after it (" n ' t": "n't")


def settled_clean_up(raw: str) -> str:
    """A prefix of ``clean_up_spaces_in(raw)`` that no text appended to ``raw`` can change. A clean-up only drops
    spaces, each decided by the few characters after it (" ' " then "," cleans to " '," and not "',": the rules apply
    in turn), so a stream that sent the clean-up of the text so far could be contradicted by the next token. At most
    ``CLEAN_UP_REACH`` characters of the clean-up come from the last ``CLEAN_UP_REACH`` of ``raw``, so leaving that
    many out leaves only characters whose fate is settled; one clean-up of the whole text per token, at C speed (a
    character-by-character version took 42 s over a 4000-token stream)."""
    return clean_up_spaces_in(raw)[:-CLEAN_UP_REACH] if len(raw) > CLEAN_UP_REACH else ""


def _checked_settings(settings: Any, backend: Tokenizer) -> dict[str, Any]:
    """``settings`` if every field is present and valid for ``backend``; ManifestError otherwise."""
    if not isinstance(settings, dict):
        raise _settings_error("the tokenizer settings are not a JSON object",
                              "an object with file, max_length, pad_id, padding")
    for key, kind in (("file", str), ("max_length", int), ("pad_id", int), ("padding", str)):
        value = settings.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _settings_error(f"tokenizer.{key} is {value!r}", f"a {kind.__name__}")
    if not isinstance(settings.get("clean_up_spaces", False), bool):
        raise _settings_error(f"tokenizer.clean_up_spaces is {settings['clean_up_spaces']!r}", "true or false")
    if settings["max_length"] < 2:
        raise _settings_error(f"tokenizer.max_length is {settings['max_length']}",
                              "at least 2 (room for the special tokens)")
    if settings["padding"] not in PADDING_MODES:
        raise _settings_error(f"tokenizer.padding is {settings['padding']!r}", f"one of {', '.join(PADDING_MODES)}")
    if backend.id_to_token(settings["pad_id"]) is None:
        raise _settings_error(
            f"tokenizer.pad_id {settings['pad_id']} is not in the tokenizer's vocabulary",
            f"an id below {backend.get_vocab_size(with_added_tokens=True)}",
        )
    return dict(settings)


def _settings_error(what: str, expected: str) -> ManifestError:
    """A ManifestError for a bad ``tokenizer`` settings field."""
    return ManifestError(what, expected, "re-export the artifact with this version of mmedge")


def _checked_texts(texts: Any) -> list[str]:
    """``texts`` as a non-empty list of strings; InputError otherwise."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise InputError(
            f"texts of type {type(texts).__name__} cannot be tokenized",
            "a string or a list of strings",
            "pass the text itself, or a list of texts",
        )
    if len(texts) == 0:
        raise InputError("the list of texts is empty", "at least one text", "pass one or more strings")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(
                f"text {index} is a {type(text).__name__} ({text!r:.60})",
                "every item to be a str",
                "convert each item to a string before tokenizing",
            )
    return list(texts)


def _untokenizable(exc: Exception) -> TokenizerError:
    return TokenizerError(f"cannot tokenize the given text ({_first_line(exc)})", "valid Unicode strings",
                          "remove unpaired surrogates or other invalid characters from the text")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, shortened, for embedding in our own message."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
