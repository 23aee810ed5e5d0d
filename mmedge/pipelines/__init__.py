"""Pipelines: what a user calls. ``mmedge.load`` picks the one the manifest names."""

from mmedge.pipelines.embedder import Embedder
from mmedge.pipelines.zero_shot import ENSEMBLE_TEMPLATES, ZeroShotClassifier

PIPELINES = {"zero-shot": ZeroShotClassifier, "embed": Embedder}

__all__ = ["Embedder", "ZeroShotClassifier", "ENSEMBLE_TEMPLATES", "PIPELINES"]
