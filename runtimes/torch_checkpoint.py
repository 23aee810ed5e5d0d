"""A ``checkpoint=`` folder checked against the artifact it stands in for.

The torch backend may run a local checkpoint folder instead of an artifact's ``pytorch/`` weights. The pipeline
around it is still the artifact's: its preprocessing, tokenizer, token-embedding table and label bank. A checkpoint
of the right model type but another size (OPT-125m beside an OPT-350m export, a ViT at 384 pixels) used to load and
then fail deep in a call on a numpy shape. The sizes the artifact's manifest records are compared with the loaded
model's here, before the first call.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmedge.errors import ModelLoadError
from mmedge.manifest import family_section


def _image_size(manifest: Mapping) -> int | None:
    """The square side every ``pixel_values`` input of the artifact's graphs takes, or None when none is fixed."""
    for component in manifest.get("components", {}).values():
        shape = (component.get("inputs", {}).get("pixel_values") or {}).get("shape")
        if shape and isinstance(shape[-1], int):
            return shape[-1]
    return None


def _embedding_rows(model) -> tuple[int, int] | None:
    """(rows, width) of the model's token-embedding table, IDEFICS' additional rows counted."""
    table = model.get_input_embeddings()
    weight = getattr(table, "weight", None)
    if weight is None:
        return None
    return weight.shape[0] + int(getattr(table, "num_additional_embeddings", 0) or 0), weight.shape[1]


def sizes_compared(manifest: Mapping, model) -> list[tuple[str, object, object]]:
    """(what, the artifact's, the checkpoint's) for each size both record."""
    config, section = model.config, family_section(manifest)
    vision = getattr(config, "vision_config", None)
    pairs = [("image size", _image_size(manifest), getattr(vision, "image_size", None))]
    if "projection_dim" in section:
        pairs.append(("projection size", section["projection_dim"], getattr(config, "projection_dim", None)))
    if "num_query_tokens" in section:
        pairs.append(("query tokens", section["num_query_tokens"], getattr(config, "num_query_tokens", None)))
    embeddings = section.get("embeddings")
    if isinstance(embeddings, Mapping) and embeddings.get("shape"):
        found = _embedding_rows(model)
        pairs.append(("token-embedding table [rows, width]", list(embeddings["shape"]), found and list(found)))
    tokens_per_image = (section.get("cross_kv") or {}).get("tokens_per_image")
    if tokens_per_image is not None and getattr(config, "use_resampler", False):
        perceiver = getattr(config, "perceiver_config", None)
        pairs.append(("visual tokens per image", tokens_per_image, getattr(perceiver, "resampler_n_latents", None)))
    return [(what, ours, theirs) for what, ours, theirs in pairs if ours is not None and theirs is not None]


def refuse_another_size(manifest: Mapping, model, folder: Path) -> None:
    """ModelLoadError (bad input: exit 2, not an absent backend) naming each size in which the checkpoint in
    ``folder`` differs from the artifact."""
    differ = [f"{what} {theirs} (the artifact's: {ours})" for what, ours, theirs in sizes_compared(manifest, model)
              if ours != theirs]
    if differ:
        raise ModelLoadError(
            f"the checkpoint in '{folder}' is another size of {manifest['family']} than the artifact: "
            + "; ".join(differ),
            "the checkpoint the artifact was exported from (or one of the same sizes)",
            "point checkpoint= at that checkpoint's folder, or use the artifact's own weights (export --with-pytorch)")
