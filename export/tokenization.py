"""Host side of tokenization: write the checkpoint's tokenizer.json and the manifest's tokenizer settings.

The device reads both with ``mmedge.tokenizer.TextTokenizer`` (tokenizers only, no transformers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmedge.errors import InputError, ModelLoadError
from mmedge.tokenizer import PADDING_MODES

TOKENIZER_FILE = "tokenizer.json"


def tokenizer_settings_from_hf(hf_tokenizer: Any, max_length: int, padding: str = "longest") -> dict[str, Any]:
    """The manifest's ``tokenizer`` object for ``hf_tokenizer``: file, max_length, pad_id, padding.

    ``max_length`` counts special tokens (77 for CLIP); ``padding`` is ``"longest"`` (pad to the
    longest text in a batch) or ``"max_length"`` (always pad to ``max_length``).
    """
    _backend_of(hf_tokenizer)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise InputError(f"max_length is {max_length!r}", "an int of at least 2 (special tokens included)",
                         "pass the text model's context length, e.g. config.text_config.max_position_embeddings")
    if padding not in PADDING_MODES:
        raise InputError(f"padding is {padding!r}", f"one of {', '.join(PADDING_MODES)}",
                         "pass padding='longest' or 'max_length'")
    if hf_tokenizer.pad_token_id is None:
        raise ModelLoadError(
            f"the tokenizer ({type(hf_tokenizer).__name__}) has no padding token",
            "a tokenizer with pad_token set, so batches of texts can be padded",
            "set tokenizer.pad_token (for example to tokenizer.eos_token) and save it into the checkpoint",
        )
    return {"file": TOKENIZER_FILE, "max_length": max_length, "pad_id": int(hf_tokenizer.pad_token_id),
            "padding": padding, **({"clean_up_spaces": True} if _cleans_up_spaces(hf_tokenizer) else {})}


def _cleans_up_spaces(hf_tokenizer: Any) -> bool:
    """Whether transformers' ``decode`` drops spaces before punctuation for this tokenizer: its
    ``clean_up_tokenization_spaces`` (False by default in transformers 5), which transformers 5 skips for BPE models
    unless ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`` forces it."""
    if not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
        return False
    bpe = type(_backend_of(hf_tokenizer).model).__name__ == "BPE"
    return not bpe or bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_"
                                                  "output", False))


def save_tokenizer_json(hf_tokenizer: Any, dest_path: str | Path) -> Path:
    """Write ``hf_tokenizer``'s tokenizers definition to ``dest_path`` (a tokenizer.json) and return the path.

    Truncation and padding are left out of the file: the device sets them from the manifest.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_backend_of(hf_tokenizer).to_str())  # a copy: the caller's tokenizer is untouched
    backend.no_truncation()
    backend.no_padding()
    dest_path = Path(dest_path)
    backend.save(str(dest_path))
    return dest_path


def _backend_of(hf_tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer; ModelLoadError if there is none."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) if getattr(hf_tokenizer, "is_fast", False) else None
    if backend is None:
        raise ModelLoadError(
            f"the tokenizer ({type(hf_tokenizer).__name__}) is not backed by the tokenizers library",
            "a fast tokenizer (tokenizer.is_fast is True) that can be saved as tokenizer.json",
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True), or add a tokenizer.json to the checkpoint",
        )
    return backend
