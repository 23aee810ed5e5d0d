"""The device side of a family: one row per family saying which components and tasks its manifests may declare,
which manifest section the captioning runtime reads (with the fields it must hold), which pipeline serves each
task, and which input builder turns a captioning family's prompts into decoder inputs. ``mmedge.manifest`` checks
manifests against it, ``mmedge.pipelines.pipeline_class`` picks pipelines from it.

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
    inputs: str = ""  # "module:Class" of the Captioner's input builder (images + text -> decoder inputs)
    interleaved: bool = False  # its captioner takes interleaved image/text prompts (`mmedge run --interleaved`)


CAPTIONER = "mmedge.pipelines.captioner:Captioner"
INSTRUCT_CAPTIONER = "mmedge.pipelines.instruct:InstructCaptioner"  # + the Q-Former's tokenizer for its builder

FAMILIES: dict[str, FamilyRow] = {row.name: row for row in (
    FamilyRow("clip", "CLIP", ("vision", "text", "zero_shot"), ("zero-shot", "embed"),
              {"zero-shot": "mmedge.pipelines.zero_shot:ZeroShotClassifier",
               "embed": "mmedge.pipelines.embedder:Embedder"}),
    FamilyRow("blip2", "BLIP-2", ("vision", "qformer", "prefix", "decoder"), ("caption", "vqa"),
              {"caption": CAPTIONER, "vqa": CAPTIONER},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "decoder", "image_tokens", "prompts", "embeddings")),
              inputs="mmedge.pipelines.prefix_inputs:PrefixInputs"),
    FamilyRow("blip2_t5", "BLIP-2 (Flan-T5)", ("vision", "qformer", "prefix", "encoder", "decoder"),
              ("caption", "vqa"), {"caption": CAPTIONER, "vqa": CAPTIONER},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "encoder", "decoder", "image_tokens", "prompts", "embeddings")),
              inputs="mmedge.pipelines.seq2seq:Seq2SeqInputs"),
    FamilyRow("instructblip_t5", "InstructBLIP (Flan-T5)", ("vision", "qformer", "prefix", "encoder", "decoder"),
              ("caption", "vqa"), {"caption": INSTRUCT_CAPTIONER, "vqa": INSTRUCT_CAPTIONER},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "encoder", "decoder", "image_tokens", "prompts", "embeddings",
                                 "qformer_tokenizer")),
              inputs="mmedge.pipelines.instruct:InstructSeq2SeqInputs"),
    FamilyRow("instructblip", "InstructBLIP", ("vision", "qformer", "prefix", "decoder"), ("caption", "vqa"),
              {"caption": INSTRUCT_CAPTIONER, "vqa": INSTRUCT_CAPTIONER},
              GenerativeSection(("bos_token_id", "num_query_tokens"),
                                ("prefix", "decoder", "image_tokens", "prompts", "embeddings", "qformer_tokenizer")),
              inputs="mmedge.pipelines.instruct:InstructPrefixInputs"),
    FamilyRow("idefics", "IDEFICS", ("image_context", "vision", "resampler", "cross_kv", "decoder"),
              ("caption", "vqa"), {"caption": CAPTIONER, "vqa": CAPTIONER},
              GenerativeSection(("bos_token_id", "vision_width"),
                                ("cross_kv", "decoder", "prompt_format", "prompts", "embeddings")),
              inputs="mmedge.pipelines.interleaved:FlamingoInputs", interleaved=True),
)}


def pipeline_class(family: str, task: str) -> type:
    """The pipeline class serving ``task`` for ``family`` (both already checked by ``mmedge.manifest``)."""
    return _imported(FAMILIES[family].pipelines[task])


def input_builder_class(family: str) -> type:
    """The class that builds the decoder inputs of ``family``'s captioner (a row with a generative section)."""
    return _imported(FAMILIES[family].inputs)


def _imported(where: str) -> type:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["FAMILIES", "FamilyRow", "GenerativeSection", "input_builder_class", "pipeline_class"]
