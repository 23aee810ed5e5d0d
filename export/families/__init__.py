"""Model families the exporter knows, each a ``mmedge.export.families.base.Family``. Adding a model means adding a
family module and its row here (and in ``mmedge.families`` on the device), not an if/elif."""

from __future__ import annotations

from mmedge.export.families.blip2 import Blip2Family
from mmedge.export.families.clip import ClipFamily
from mmedge.export.families.idefics import IdeficsFamily

FAMILIES = {"clip": ClipFamily(), "blip2": Blip2Family(), "idefics": IdeficsFamily()}
FAMILY_BY_MODEL_TYPE = {model_type: name for name, fam in FAMILIES.items() for model_type in fam.model_types}

__all__ = ["FAMILIES", "FAMILY_BY_MODEL_TYPE"]
