"""Pipelines: what a user calls. ``mmedge.load`` picks the one the manifest names.

Threads (tests/reliability/test_concurrency.py): one loaded pipeline may be shared by any number of
threads, and gives the results of serial calls.

- ``ZeroShotClassifier`` and ``Embedder``: calls run in parallel (ONNX Runtime sessions, the preprocessor
  and the tokenizer hold no per-call state; the label-bank cache is locked).
- ``Captioner`` (every captioning family; its inputs come from the family's input builder): calls are safe but
  generation is serialized (one decoder, one KV cache); the image inputs are computed outside the lock.
  Load one Captioner per thread to caption in parallel.
- ``close()`` while other threads still call: those calls raise ``BackendError``; close last.
- Not shareable: an ``OrtDecoder`` on its own (it holds the KV cache of the generation in progress) and a
  ``stream()`` generator (iterate it from the thread that made it).

Which pipeline serves a family's task is the family's row in ``mmedge.families``.
"""

from mmedge.families import pipeline_class
from mmedge.pipelines.captioner import Captioner
from mmedge.pipelines.embedder import Embedder
from mmedge.pipelines.zero_shot import ENSEMBLE_TEMPLATES, ZeroShotClassifier

__all__ = ["Captioner", "Embedder", "pipeline_class", "ZeroShotClassifier", "ENSEMBLE_TEMPLATES"]
