"""The artifacts a server holds: each loaded once with ``mmedge.load`` (the backend chosen as ``load`` chooses) and
served under its folder name.

A captioning artifact (a pipeline with ``stream``: BLIP-2, IDEFICS) gets ``--workers`` captioners behind one
``GenerationQueue``; a CLIP artifact gets one pipeline per task its manifest lists (``zero-shot``, ``embed``), whose
calls run in parallel, ``--workers`` at once (``CallQueue``).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import mmedge
from mmedge.artifact import Artifact
from mmedge.errors import InputError, MmedgeError
from mmedge.manifest import MANIFEST_FILE, parse_manifest
from mmedge.progress import Progress
from mmedge.serve import inputs
from mmedge.serve.errors import ApiError
from mmedge.serve.options import DEFAULT_CLIP_WORKERS, ServeOptions
from mmedge.serve.queue import CallQueue, GenerationQueue


@dataclass
class ServedModel:
    id: str
    manifest: dict
    card: dict  # its /v1/models entry
    clip: dict[str, Any] = field(default_factory=dict)  # task -> ZeroShotClassifier / Embedder
    queue: GenerationQueue | None = None  # captioners
    calls: CallQueue | None = None  # the turns of a CLIP artifact's requests
    fitting_prompts: OrderedDict = field(default_factory=OrderedDict)  # (labels, templates) found to fit: not rechecked
    fitting_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def captioner(self):
        """One of the captioners (for its settings and tokenizer; generation goes through ``queue``)."""
        return self.queue.pipelines[0] if self.queue else None

    def close(self) -> None:
        if self.queue:
            self.queue.close()
        for pipeline in self.clip.values():
            pipeline.close()


def load_models(options: ServeOptions) -> dict[str, ServedModel]:
    """Every artifact, loaded; the model ids (folder names) must differ."""
    ids = [Path(os.path.abspath(path)).name for path in options.artifacts]  # a symlink's own name
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise InputError(f"two artifacts would be served under the same model id ({', '.join(repeated)})",
                         "artifact folders with different names (the folder name is the model id)",
                         "rename or copy one of the folders")
    for path in options.artifacts:  # every manifest read first: a mistyped third folder is said before minutes of
        Artifact.open(path)  # loading the first two
    # each artifact gets the --backend-option settings its plan uses (OpenVINO's device for those on OpenVINO)
    settings = options.backend_options.per_artifact(dict(zip(ids, options.artifacts)), options.backend,
                                                    options.device, options.threads) if options.backend_options else {}
    models: dict[str, ServedModel] = {}
    progress = Progress(len(ids), enabled=not options.quiet)  # on stderr: a large LLM loads for minutes
    try:
        for model_id, path in zip(ids, options.artifacts):
            with progress.step(f"loading {model_id}"):
                models[model_id] = load_model(model_id, Path(path), options, settings.get(model_id))
    except MmedgeError:
        for model in models.values():
            model.close()
        raise
    return models


def load_model(model_id: str, path: Path, options: ServeOptions, backend_options: dict | None = None) -> ServedModel:
    def load(task: str | None = None):
        return mmedge.load(path, backend=options.backend, device=options.device, task=task, threads=options.threads,
                           backend_options=backend_options or None)

    loaded = [load()]
    first = loaded[0]
    manifest = parse_manifest((path / MANIFEST_FILE).read_bytes())
    model = ServedModel(model_id, manifest, card={})
    try:
        if hasattr(first, "stream"):  # a captioner: --workers of them behind one queue
            while len(loaded) < (options.workers or 1):
                loaded.append(load())
            model.queue = GenerationQueue(model_id, loaded, options.max_queue)
        else:
            model.calls = CallQueue(model_id, options.workers or DEFAULT_CLIP_WORKERS, options.max_queue)
            model.clip[first.task] = first
            for task in manifest["tasks"]:
                if task not in model.clip:
                    loaded.append(load(task))
                    model.clip[task] = loaded[-1]
    except MmedgeError:
        for pipeline in loaded:
            pipeline.close()
        raise
    model.card = _card(model_id, path, manifest, first, model, options)
    return model


def _card(model_id: str, path: Path, manifest: dict, pipeline, model: ServedModel, options: ServeOptions) -> dict:
    endpoints = ["/v1/chat/completions"] if model.queue else \
        [e for task, e in (("zero-shot", "/v1/classify"), ("embed", "/v1/embeddings")) if task in model.clip]
    card = {"id": model_id, "object": "model", "created": int(os.path.getmtime(path / MANIFEST_FILE)),
            "owned_by": "mmedge",
            "family": manifest["family"], "tasks": list(manifest["tasks"]), "endpoints": endpoints,
            "source": _public_source(manifest["source"]["model"]),
            "precision": {name: comp["precision"] for name, comp in manifest["components"].items()},
            "plan": _plan(pipeline)}
    card.update(workers=len((model.queue or model.calls).slots), max_queue=options.max_queue)
    classifier = model.clip.get("zero-shot")
    if classifier is not None and getattr(classifier, "baked_labels", None):
        card["labels"] = list(classifier.baked_labels)  # labels baked into the graph: /v1/classify needs none
    return card


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # also a relative folder that looks like one: kept as typed


def _public_source(model: str) -> str:
    """The checkpoint an artifact came from, as clients may see it: a hub id (``org/name``) as recorded, a local folder
    by its name only (the export host's path says nothing to a client and tells it about that host's disk)."""
    if _HUB_ID.fullmatch(model) and ".." not in model.split("/"):
        return model
    return (PureWindowsPath if "\\" in model else PurePosixPath)(model).name or model


def _plan(pipeline) -> dict:
    """Which backend runs each component (``mmedge.load``'s plan), as JSON."""
    chosen = getattr(pipeline, "plan", None)
    components = getattr(chosen, "components", None) or {}
    return {name: {"backend": getattr(c, "backend", None), "providers": list(getattr(c, "providers", None) or []),
                   "precision": getattr(c, "precision", None)} for name, c in components.items()}


def find_model(models: dict[str, ServedModel], data: dict) -> ServedModel:
    """The model a request's ``model`` field names; 404 for one this server does not hold."""
    return model_named(models, inputs.field(data, "model", "string", required=True))


def model_named(models: dict[str, ServedModel], name: str) -> ServedModel:
    """The model served as ``name``; 404 (OpenAI's ``model_not_found``) for one this server does not hold."""
    if name not in models:
        raise ApiError(404, f"model '{name[:80]}' is not served here", f"one of {', '.join(models)}",
                       "pick a model id from GET /v1/models", param="model", code="model_not_found")
    return models[name]
