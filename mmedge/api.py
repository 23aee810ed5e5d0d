"""``mmedge.load``: an artifact folder in, the pipeline its manifest names out."""

from __future__ import annotations

import logging
import os
import warnings

from mmedge.artifact import Artifact
from mmedge.errors import InputError, MmedgeError
from mmedge.pipelines import PIPELINES

log = logging.getLogger("mmedge")


class RandomWeightsWarning(UserWarning):
    """The artifact was exported from randomly initialized weights: its outputs are noise."""


def load(path: str | os.PathLike, backend: str = "auto", device: str = "auto", task: str | None = None,
         threads: int | None = None):
    """Open an artifact and return its pipeline (``ZeroShotClassifier`` or ``Embedder`` for CLIP).

    ``backend``: 'auto' or a backend name ('onnxruntime'); a named backend that is absent raises
    BackendUnavailableError. ``device``: 'auto', 'cpu' or 'cuda'. ``task``: one of the manifest's
    tasks (default: its first). ``threads``: CPU threads per graph (default: all cores).
    """
    from mmedge import device as device_probe
    from mmedge.preprocess import ImagePreprocessor
    from mmedge.runtimes.registry import create_runner
    from mmedge.selection import plan as make_plan
    from mmedge.tokenizer import TextTokenizer

    artifact = Artifact.open(path)
    manifest = artifact.manifest
    task = task or manifest["tasks"][0]
    if task not in manifest["tasks"]:
        raise InputError(f"task '{task}' is not one this artifact was exported for",
                         f"one of {', '.join(manifest['tasks'])}", "pass one of those, or re-export with --task")
    if artifact.random_weights:
        warnings.warn(f"artifact '{artifact.root.name}' was exported with random weights "
                      f"(source {manifest['source']['model']}): its outputs are meaningless", RandomWeightsWarning,
                      stacklevel=2)
    chosen = make_plan(device_probe.probe(), manifest, backend, device)
    if backend == "auto":
        log.info("mmedge: %s", "; ".join(chosen.reasons))
    runners = {}
    try:
        for name, comp_plan in chosen.components.items():
            options = {"providers": comp_plan.providers, "threads": threads}
            if "tensorrt" in comp_plan.providers:
                options["engine_cache"] = artifact.engines_dir()
            runners[name] = create_runner(comp_plan.backend, artifact.component_path(name), name,
                                          artifact.component(name), **options)
        tokenizer = None
        if manifest.get("tokenizer"):
            settings = manifest["tokenizer"]
            tokenizer = TextTokenizer.from_file(artifact.resolve_file(settings["file"], "tokenizer.file"), settings)
        preprocessor = ImagePreprocessor(manifest["preprocess"])
    except MmedgeError:
        for runner in runners.values():
            runner.close()
        raise
    pipeline = PIPELINES[task](artifact, runners, preprocessor, tokenizer)
    pipeline.plan = chosen
    return pipeline
