"""Serve artifacts on NVIDIA Triton Inference Server: ``mmedge triton ARTIFACT... --out REPO`` writes a model
repository (``write_repository``), and ``mmedge.triton_client`` talks to the server.

- ``mmedge.triton.config``: each model's ``config.pbtxt``, from the manifest alone.
- ``mmedge.triton.repository``: the repository: one model per component, pipeline models per task.
- ``mmedge.triton.names``, ``mmedge.triton.out_checks``: the model names and ``--out``, refused before any write
  where they cannot work.
- ``mmedge.triton.placing``: the artifact's files linked in, checked, and this device's record of the checks kept.
- ``mmedge.triton.protocol``: the pipeline models' tensors, shared by server and client.
- ``mmedge.triton.backend``: the Python-backend models the repository's ``model.py`` files import (inside Triton).

Writing a repository needs nothing beyond mmedge; serving it needs a Triton server whose Python environment has
mmedge installed; the client needs ``pip install "mmedge[triton]"`` (tritonclient).
"""

from mmedge.triton.config import Options
from mmedge.triton.repository import pipeline_models, write_repository

__all__ = ["Options", "pipeline_models", "write_repository"]
