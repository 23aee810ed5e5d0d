"""Model families the exporter knows, each a ``mmedge.export.families.base.Family``. Adding a model means adding a
family module and its row here (and in ``mmedge.families`` on the device), not an if/elif."""

from __future__ import annotations

from mmedge.export.families.blip2 import Blip2Family
from mmedge.export.families.blip2_t5 import Blip2T5Family
from mmedge.export.families.clip import ClipFamily
from mmedge.export.families.idefics import IdeficsFamily
from mmedge.export.families.instructblip import InstructBlipFamily
from mmedge.export.families.instructblip_t5 import InstructBlipT5Family

# Families sharing a model type are asked in this order (``Family.claims``): the more specific first.
FAMILIES = {"clip": ClipFamily(), "blip2_t5": Blip2T5Family(), "blip2": Blip2Family(), "idefics": IdeficsFamily(),
            "instructblip_t5": InstructBlipT5Family(), "instructblip": InstructBlipFamily()}
MODEL_TYPES = sorted({model_type for fam in FAMILIES.values() for model_type in fam.model_types})


def family_for(config: dict) -> str | None:
    """The name of the family that exports a checkpoint with this config (``config.json`` as a dict), or None."""
    for name, family in FAMILIES.items():
        if config.get("model_type") in family.model_types and family.claims(config):
            return name
    return None


__all__ = ["FAMILIES", "MODEL_TYPES", "family_for"]
