"""A language model's token-embedding table stored beside its decoder graph, kept compressed in memory.

The decoder graph takes embeddings, not ids, so the device embeds prompt and generated tokens itself.
The table stays in its stored form (float32, float16, INT8 per row, INT4 in blocks) and only the rows
looked up are dequantized, so an INT4 artifact does not grow back to FP32 size in RAM.
"""

from __future__ import annotations

import os

import numpy as np

from mmedge.errors import IntegrityError, ManifestError

STORAGES = ("float32", "float16", "int8-per-row", "int4-block")


def dequantize_rows(arrays: dict[str, np.ndarray], storage: str, width: int, block_size: int | None = None,
                    rows: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows of a stored table (all rows, or those indexed by ``rows``) -> ``[..., width]``."""
    weight = arrays["weight"] if rows is None else arrays["weight"][rows]
    if storage in ("float32", "float16"):
        return weight.astype(np.float32)
    scales = arrays["scales"] if rows is None else arrays["scales"][rows]
    if storage == "int8-per-row":
        return weight.astype(np.float32) * scales
    if storage == "int4-block":
        q = np.empty((*weight.shape[:-1], weight.shape[-1] * 2), dtype=np.int16)  # [..., padded_width]
        q[..., 0::2] = weight & 0x0F
        q[..., 1::2] = weight >> 4
        values = (q - 8).astype(np.float32).reshape(*weight.shape[:-1], scales.shape[-1], block_size)
        return (values * scales[..., None]).reshape(*weight.shape[:-1], -1)[..., :width]
    raise ManifestError(f"embedding storage '{storage}' is unknown", f"one of {', '.join(STORAGES)}",
                        "re-export the artifact with this mmedge version")


class EmbeddingTable:
    """``table[ids]`` -> float32 ``[*ids.shape, width]``; ``shape`` is ``(vocab, width)``."""

    def __init__(self, arrays: dict[str, np.ndarray], entry: dict):
        self.storage = entry["storage"]
        self.shape = tuple(int(d) for d in entry["shape"])
        self.block_size = entry.get("block_size")
        self.ndim = 2
        if self.storage not in STORAGES:
            dequantize_rows(arrays, self.storage, self.shape[1])  # raises the ManifestError
        if "weight" not in arrays or arrays["weight"].shape[0] != self.shape[0]:
            raise IntegrityError(f"the embedding table's arrays do not match its manifest shape {list(self.shape)}",
                                 "arrays written by `mmedge export`", "re-export the artifact")
        self._arrays = arrays

    @classmethod
    def of_artifact(cls, artifact) -> "EmbeddingTable":
        """The token-embedding table of a captioning artifact (an ``mmedge.artifact.Artifact``), its sha256 checked."""
        from mmedge.manifest import embeddings_entry

        entry, field = embeddings_entry(artifact.manifest)
        return cls.load(artifact.verified_path(entry["file"], entry["sha256"], field), entry)

    @classmethod
    def load(cls, path: str | os.PathLike, entry: dict) -> "EmbeddingTable":
        from mmedge.artifact import read_arrays

        return cls(read_arrays(path, "embedding table"), entry)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IntegrityError(f"token id {int(ids.max())} is outside the embedding table of {self.shape[0]} rows",
                                 f"ids below {self.shape[0]}", "the tokenizer and the model do not match; re-export")
        return dequantize_rows(self._arrays, self.storage, self.shape[1], self.block_size, rows=ids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())
