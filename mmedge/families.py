"""The device side of a family: one row per family saying which components and tasks its manifests may declare,
which manifest section the captioning runtime reads (with the fields it must hold), and which pipeline serves each
task. ``mmedge.manifest`` checks manifests against it, ``mmedge.pipelines.pipeline_class`` picks pipelines from it.

A new family adds its row here (and, on the host, its ``mmedge.export.families`` module and specs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerativeSection:
    """The manifest section ``manifest[<family>]`` of a captioning family: the integer and object fields it must
    have (``mmedge.manifest`` checks them; the decoder's ``kv_cache`` and the ``embeddings`` table are checked in
    depth)."""

    ints: tuple[str, ...]
    objects: tuple[str, ...]


@dataclass(frozen=True)
class FamilyRow:
    name: str
    label: str  # for messages
    components: tuple[str, ...]  # the components its manifests may declare
    tasks: tuple[str, ...]
    pipelines: dict[str, str] = field(default_factory=dict)  # task -> "module:Class"
    generative: GenerativeSection | None = None  # None: no captioning section (an encoder-only family)
    interleaved: bool = False  # its captioner takes interleaved image/text prompts (`mmedge run --interleaved`)


FAMILIES: dict[str, FamilyRow] = {row.name: row for row in (
    FamilyRow("clip", "CLIP", ("vision", "text", "zero_shot"), ("zero-shot", "embed"),
              {"zero-shot": "mmedge.pipelines.zero_shot:ZeroShotClassifier",
               "embed": "mmedge.pipelines.embedder:Embedder"}),
    FamilyRow("blip2", "BLIP-2", ("vision", "qformer", "prefix", "decoder"), ("caption", "vqa"),
              {"caption": "mmedge.pipelines.captioner:Captioner", "vqa": "mmedge.pipelines.captioner:Captioner"},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "decoder", "image_tokens", "prompts", "embeddings"))),
    FamilyRow("blip2_t5", "BLIP-2 (Flan-T5)", ("vision", "qformer", "prefix", "encoder", "decoder"),
              ("caption", "vqa"), {"caption": "mmedge.pipelines.seq2seq:Seq2SeqCaptioner",
                                   "vqa": "mmedge.pipelines.seq2seq:Seq2SeqCaptioner"},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "encoder", "decoder", "image_tokens", "prompts", "embeddings"))),
    FamilyRow("instructblip_t5", "InstructBLIP (Flan-T5)", ("vision", "qformer", "prefix", "encoder", "decoder"),
              ("caption", "vqa"), {"caption": "mmedge.pipelines.instruct:InstructSeq2SeqCaptioner",
                                   "vqa": "mmedge.pipelines.instruct:InstructSeq2SeqCaptioner"},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "encoder", "decoder", "image_tokens", "prompts", "embeddings",
                                 "qformer_tokenizer"))),
    FamilyRow("instructblip", "InstructBLIP", ("vision", "qformer", "prefix", "decoder"), ("caption", "vqa"),
              {"caption": "mmedge.pipelines.instruct:InstructCaptioner",
               "vqa": "mmedge.pipelines.instruct:InstructCaptioner"},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "decoder", "image_tokens", "prompts", "embeddings", "qformer_tokenizer"))),
    FamilyRow("idefics", "IDEFICS", ("vision", "resampler", "cross_kv", "decoder"), ("caption", "vqa"),
              {"caption": "mmedge.pipelines.flamingo:FlamingoCaptioner",
               "vqa": "mmedge.pipelines.flamingo:FlamingoCaptioner"},
              GenerativeSection(("bos_token_id", "vision_width"),
                                ("cross_kv", "decoder", "prompt_format", "prompts", "embeddings")), interleaved=True),
)}


def pipeline_class(family: str, task: str) -> type:
    """The pipeline class serving ``task`` for ``family`` (both already checked by ``mmedge.manifest``)."""
    module, name = FAMILIES[family].pipelines[task].split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["FAMILIES", "FamilyRow", "GenerativeSection", "pipeline_class"]
