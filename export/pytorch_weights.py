"""``export --with-pytorch``: the checkpoint's own weights beside the graphs, for the device's torch backend.

The loaded model is written with ``save_pretrained`` (safetensors only: config.json, model.safetensors or its
shards and index, generation_config.json) into the artifact's ``pytorch/`` folder, before any graph is traced
(large exports free towers as they go). Tensors a spec adds to the model (CLIP's baked label bank) go to
``pytorch/reference_tensors.safetensors``, keyed ``<component>.<name>``. The manifest's ``pytorch`` entry names
every file with its sha256; the device checks them before loading and never reads a pickle.

On the device, ``mmedge.runtimes.torch_backend`` rebuilds the family's model class from this folder and wraps it
with the same spec modules the exporter traced (``Family.reference_module``).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from mmedge.artifact import sha256_file
from mmedge.errors import ExportError
from mmedge.manifest import PICKLE_SUFFIXES, PYTORCH_FORMAT

PYTORCH_FOLDER = "pytorch"
REFERENCE_TENSORS = "reference_tensors.safetensors"


def save_pytorch_weights(loaded, folder: Path, progress: bool = True) -> None:
    """``loaded.model.save_pretrained(folder)`` as safetensors (transformers 5 always writes safetensors;
    older releases are asked to with ``safe_serialization=True``)."""
    model = loaded.model
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    folder.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        if enabled and not progress:
            hf_logging.enable_progress_bar()
    pickles = [p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ExportError(f"save_pretrained wrote pickled files {pickles}", "safetensors weights only",
                          "upgrade transformers (>= 4.35 writes safetensors)")


def pytorch_entry(loaded, folder: Path, specs) -> dict:
    """Write the specs' reference tensors (if any) and return the manifest's ``pytorch`` entry."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for spec in specs:
        for name, value in spec.reference_tensors().items():
            tensors[f"{spec.name}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    if tensors:
        save_file(tensors, str(folder / REFERENCE_TENSORS))
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            files[path.name] = {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    model = loaded.model
    # as saved (before tracing upcast the exported parts of a BF16/FP16 checkpoint)
    dtype = loaded.source.get("dtype") or str(next(model.parameters()).dtype).replace("torch.", "")
    import transformers

    return {"folder": folder.name, "format": PYTORCH_FORMAT, "model_class": type(model).__name__, "dtype": dtype,
            "transformers_version": transformers.__version__,
            "reference_tensors": REFERENCE_TENSORS if tensors else None, "files": files}
