"""The InstructBLIP family with a decoder-only LLM (Vicuna, Llama-family; OPT): BLIP-2's ``decoder`` and prompt
layout (``mmedge.export.families.blip2``) with a prefix that also reads the instruction
(``mmedge.export.families.instruction``)."""

from __future__ import annotations

from mmedge.export.families.blip2 import Blip2Family
from mmedge.export.families.instruction import InstructionFamily


class InstructBlipFamily(InstructionFamily, Blip2Family):
    label = "InstructBLIP"
    name = "instructblip"
