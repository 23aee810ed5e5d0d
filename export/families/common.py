"""What every generative family (BLIP-2, IDEFICS) shares: settings, per-component precision, the LLM's
token-embedding table.

Their options are checked with every family's by ``mmedge.export.option_checks`` before anything is loaded."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmedge.export.families.base import Family

EMBEDDINGS_FILE = "embed_tokens.npz"


class GenerativeFamily(Family):
    """Base of the captioning families. Subclasses set ``label`` (for messages), ``tasks`` and ``extra_defaults``
    (the ``ExportOptions.extra`` settings they accept, with defaults)."""

    default_task = "caption"
    has_llm = True
    tasks_alike = "a captioning artifact answers captions and questions alike"

    def generation_not_carried(self, loaded) -> dict:
        from mmedge.export.families.blip2 import generation_not_carried

        return generation_not_carried(loaded)

    def precision_of(self, spec, options) -> str:
        """The decoder takes ``--llm-precision`` (default: ``--precision``); the encoders ``--precision``."""
        return (options.llm_precision or options.precision) if spec.name == "decoder" else options.precision


def embedding_arrays(table: np.ndarray, precision: str, block_size: int) -> tuple[str, dict[str, np.ndarray]]:
    """(storage name, arrays) for the table at the LLM's precision."""
    from mmedge.export.int4 import quantize_rows_int4, quantize_rows_int8

    if precision == "int4":
        return "int4-block", quantize_rows_int4(table, block_size)
    if precision == "int8":
        return "int8-per-row", quantize_rows_int8(table)
    if precision == "fp16":
        return "float16", {"weight": table.astype(np.float16)}
    return "float32", {"weight": np.ascontiguousarray(table, dtype=np.float32)}


def write_embedding_table(builder, table: np.ndarray, describe: Callable[[str, dict], dict]) -> dict:
    """Write ``embed_tokens.npz``: the LLM's token-embedding table ``table [vocab, width]`` at the LLM's precision
    (the decoder graph takes embeddings, not ids). Returns its manifest entry: ``describe(storage, arrays)`` (the
    family's description of the rows) with the file, its sha256 and size."""
    from mmedge.artifact import sha256_file

    options = builder.options
    storage, arrays = embedding_arrays(table, options.llm_precision or options.precision, options.int4_block_size)
    path = builder.stage / EMBEDDINGS_FILE
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return describe(storage, arrays) | {"file": EMBEDDINGS_FILE, "sha256": sha256_file(path),
                                        "size_bytes": path.stat().st_size}


__all__ = ["EMBEDDINGS_FILE", "GenerativeFamily", "embedding_arrays", "write_embedding_table"]
