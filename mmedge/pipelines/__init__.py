"""Pipelines: what a user calls. ``mmedge.load`` picks the one the manifest names."""

from mmedge.pipelines.captioner import Captioner
from mmedge.pipelines.embedder import Embedder
from mmedge.pipelines.zero_shot import ENSEMBLE_TEMPLATES, ZeroShotClassifier

PIPELINES = {"zero-shot": ZeroShotClassifier, "embed": Embedder, "caption": Captioner, "vqa": Captioner}

__all__ = ["Captioner", "Embedder", "ZeroShotClassifier", "ENSEMBLE_TEMPLATES", "PIPELINES"]
