"""``mmedge.load``: an artifact folder in, the pipeline its manifest names out."""

from __future__ import annotations

import logging
import os
import warnings

from mmedge.artifact import Artifact
from mmedge.errors import InputError, MmedgeError
from mmedge.pipelines import pipeline_class

log = logging.getLogger("mmedge")


class RandomWeightsWarning(UserWarning):
    """The artifact was exported from randomly initialized weights: its outputs are noise."""


def load(path: str | os.PathLike, backend: str = "auto", device: str = "auto", task: str | None = None,
         threads: int | None = None):
    """Open an artifact and return its pipeline (``ZeroShotClassifier`` or ``Embedder`` for CLIP).

    ``backend``: 'auto' or a backend name ('onnxruntime', 'tensorrt'); a named backend that is absent raises
    BackendUnavailableError. With 'auto' on an NVIDIA GPU with TensorRT, the encoders run as TensorRT engines
    (built on first use and cached under the artifact's engines/; ``mmedge build`` prebuilds them). ``device``: 'auto', 'cpu' or 'cuda'. ``task``: one of the manifest's
    tasks (default: its first). ``threads``: CPU threads per graph (default: all cores).
    """
    from mmedge import device as device_probe
    from mmedge.preprocess import ImagePreprocessor
    from mmedge.runtimes.registry import create_runner
    from mmedge.selection import log_fallbacks, plan as make_plan
    from mmedge.tokenizer import TextTokenizer

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads is {threads!r}", "None (all cores) or a positive integer", "pass e.g. threads=2")
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
        log_fallbacks(chosen, log)
    runners = {}
    try:
        for name, comp_plan in chosen.components.items():
            if name == "decoder":
                continue  # stateful: built below, around its KV cache
            runners[name] = create_runner(comp_plan.backend, artifact.component_path(name), name,
                                          artifact.component(name), **_runner_options(artifact, comp_plan, threads))
        tokenizer = None
        if manifest.get("tokenizer"):
            settings = manifest["tokenizer"]
            path = (artifact.verified_path(settings["file"], settings["sha256"], "tokenizer.file") if settings.get("sha256")
                    else artifact.resolve_file(settings["file"], "tokenizer.file"))
            tokenizer = TextTokenizer.from_file(path, settings)
        preprocessor = ImagePreprocessor(manifest["preprocess"])
        if "decoder" in chosen.components:
            decoder, embeddings = _decoder(artifact, chosen.components["decoder"], threads)
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer, decoder, embeddings)
        else:
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer)
    except MmedgeError:
        for runner in runners.values():
            runner.close()
        raise
    pipeline.plan = chosen
    return pipeline


def _runner_options(artifact: Artifact, comp_plan, threads: int | None) -> dict:
    if comp_plan.backend == "tensorrt":
        return {"artifact": artifact, "defaults": comp_plan.options}  # engines/build.json, if any, comes first
    options = {"providers": comp_plan.providers, "threads": threads}
    if "tensorrt" in comp_plan.providers:
        options["engine_cache"] = artifact.engines_dir()
    return options


def _decoder(artifact: Artifact, comp_plan, threads: int | None):
    """The KV-cached decoder and the token-embedding table it embeds generated ids with."""
    from mmedge.embeddings import EmbeddingTable
    from mmedge.runtimes.onnxruntime import OrtOptions
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    family = artifact.manifest["family"]
    settings = artifact.manifest[family]
    table_entry = settings["embeddings"]
    table = EmbeddingTable.load(artifact.verified_path(table_entry["file"], table_entry["sha256"], f"{family}.embeddings.file"),
                                table_entry)
    decoder_settings = settings["decoder"]
    kv = decoder_settings["kv_cache"]
    known = {"inputs_embeds", "attention_mask", "position_ids"}
    known |= {kv["past"] % (layer, kind) for layer in range(kv["layers"]) for kind in ("key", "value")}
    context = [name for name in artifact.component("decoder")["inputs"] if name not in known]  # IDEFICS: image mask, cross K/V
    decoder = OrtDecoder(artifact.component_path("decoder"), table, decoder_settings["kv_cache"],
                         options=OrtOptions(**_runner_options(artifact, comp_plan, threads)),
                         position_offset=decoder_settings.get("position_offset", 0),
                         max_positions=decoder_settings.get("max_positions"), context_inputs=context)
    return decoder, table
