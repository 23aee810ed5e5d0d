"""The InstructBLIP family with Flan-T5: BLIP-2 with Flan-T5 (``mmedge.export.families.blip2_t5``: ``encoder`` and
``decoder``) whose prefix also reads the instruction (``mmedge.export.families.instruction``)."""

from __future__ import annotations

from mmedge.export.families.blip2 import ENCODER_DECODER_LLMS
from mmedge.export.families.blip2_t5 import Blip2T5Family
from mmedge.export.families.instruction import InstructionFamily


class InstructBlipT5Family(InstructionFamily, Blip2T5Family):
    label = "InstructBLIP (Flan-T5)"
    name = "instructblip_t5"

    @staticmethod
    def claims(config: dict) -> bool:
        return (config.get("text_config") or {}).get("model_type") in ENCODER_DECODER_LLMS
