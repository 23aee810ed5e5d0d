"""The KV-cache layout a decoder graph declares in its manifest (``kv_cache``: layers, heads, head_dim and the
``past`` / ``present`` name patterns) and the decoder's context inputs: plain manifest reading, no engine, shared by
selection and every decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmedge.errors import ManifestError
from mmedge.manifest import decoder_settings

KV_KEYS = ("layers", "heads", "head_dim", "past", "present")
KV_KINDS = ("key", "value")
# An optional decoder input: int64 [batch, logits_sequence], the positions whose logits the graph computes (the LM head
# runs on those rows only). The generation loop asks for the last one; the exporter's checks for every position.
LOGITS_POSITIONS = "logits_positions"
STEP_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", LOGITS_POSITIONS)  # fed by the loop, not context


def checked_layout(kv_cache: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``kv_cache`` entry, checked: ManifestError naming what is missing or malformed."""
    if not isinstance(kv_cache, Mapping) or set(KV_KEYS) - set(kv_cache):
        missing = sorted(set(KV_KEYS) - set(kv_cache)) if isinstance(kv_cache, Mapping) else list(KV_KEYS)
        raise ManifestError(f"the decoder's kv_cache layout lacks {missing}", f"an object with {', '.join(KV_KEYS)}",
                            "re-export the artifact with this version of mmedge")
    layout = dict(kv_cache)
    for key in ("layers", "heads", "head_dim"):
        if not isinstance(layout[key], int) or isinstance(layout[key],
                                                          bool) or layout[key] < (0 if key == "layers" else 1):
            raise ManifestError(f"kv_cache.{key} is {layout[key]!r}", "a positive integer", "re-export the artifact")
    for key in ("past", "present"):
        try:
            layout[key] % (0, "key")
        except (TypeError, ValueError):
            raise ManifestError(f"kv_cache.{key} is {layout[key]!r}",
                                'a pattern with %d (layer) and %s ("key"/"value")',
                                'use e.g. "past_key_values.%d.%s"') from None
    return layout


def cache_names(layout: Mapping[str, Any], pattern: str) -> list[str]:
    """``past_key_values.0.key``, ``past_key_values.0.value``, ... for ``pattern`` "past" or "present"."""
    return [layout[pattern] % (layer, kind) for layer in range(layout["layers"]) for kind in KV_KINDS]


def context_inputs(input_names, kv_cache: Mapping[str, Any]) -> list[str]:
    """The decoder graph's inputs beyond ``STEP_INPUTS`` and the KV cache (IDEFICS: the image attention mask and the
    cross-attention K/V), in graph order: what ``set_context`` must feed."""
    known = {*STEP_INPUTS, *cache_names(checked_layout(kv_cache), "past")}
    return [name for name in input_names if name not in known]


def decoder_context(manifest: Mapping[str, Any]) -> list[str]:
    """The decoder's inputs beyond embeddings, mask, positions and its cache (IDEFICS: the image mask and the
    cross-attention K/V); [] without a decoder."""
    decoder = manifest["components"].get("decoder")
    if decoder is None:
        return []
    kv = decoder_settings(manifest).get("kv_cache")
    if kv:
        return context_inputs(decoder["inputs"], kv)
    return [name for name in decoder["inputs"] if name not in STEP_INPUTS]
