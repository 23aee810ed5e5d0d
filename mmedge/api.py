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
         threads: int | None = None, backend_options: dict | None = None):
    """Open an artifact and return its pipeline (``ZeroShotClassifier`` or ``Embedder`` for CLIP).

    ``backend``: 'auto' or a backend name ('onnxruntime', 'tensorrt', 'torch'); a named backend that is absent raises
    BackendUnavailableError. With 'auto' on an NVIDIA GPU with TensorRT, the encoders and an FP32/FP16 decoder run as
    TensorRT engines (built on first use and cached under the artifact's engines/; ``mmedge build`` prebuilds them);
    with torch and an artifact exported ``--with-pytorch``, the decoder runs on torch (see ``mmedge.selection``). ``device``: 'auto',
    'cpu' or 'cuda'. ``task``: one of the manifest's tasks (default: its first). ``threads``: CPU threads per graph
    (default: all cores). ``backend_options``: settings per backend name, over the plan's, e.g.
    ``{"torch": {"quantization": "nf4", "dtype": "bfloat16", "checkpoint": "blip2-folder"}}`` (see
    ``mmedge.runtimes.torch_backend.TorchSettings``) or ``{"onnxruntime": {"device_id": 1}}``.
    """
    from mmedge import device as device_probe
    from mmedge.preprocess import ImagePreprocessor
    from mmedge.runtimes.registry import create_runner
    from mmedge.selection import log_fallbacks
    from mmedge.selection import plan as make_plan
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
    extra = _checked_backend_options(backend_options)
    # auto takes torch only when the weights are really here (a device copy may leave pytorch/ out); a named torch
    # backend goes by the manifest, so a missing folder is reported as missing
    present = artifact.has_pytorch_weights if backend == "auto" else bool(manifest.get("pytorch"))
    weights = present or bool(extra.get("torch", {}).get("checkpoint"))
    chosen = make_plan(device_probe.probe(), manifest, backend, device, pytorch_weights=weights)
    if backend == "auto":
        log.info("mmedge: %s", "; ".join(chosen.reasons))
        log_fallbacks(chosen, log)
    chained = _chained_outputs(artifact, chosen)
    runners = {}
    try:
        for name, comp_plan in chosen.components.items():
            if name == "decoder":
                continue  # stateful: built below, around its KV cache
            options = {**_runner_options(artifact, comp_plan, threads), **_encoder_options(extra.get(comp_plan.backend, {}))}
            if name in chained:
                options["keep_on_device"] = True  # its outputs feed another stage on the same GPU backend
            runners[name] = create_runner(comp_plan.backend, component_path(artifact, name, comp_plan), name,
                                          artifact.component(name), **options)
        tokenizer = None
        if manifest.get("tokenizer"):
            settings = manifest["tokenizer"]
            path = (artifact.verified_path(settings["file"], settings["sha256"], "tokenizer.file") if settings.get("sha256")
                    else artifact.resolve_file(settings["file"], "tokenizer.file"))
            tokenizer = TextTokenizer.from_file(path, settings)
        preprocessor = ImagePreprocessor(manifest["preprocess"])
        if "decoder" in chosen.components:
            decoder, embeddings = _decoder(artifact, chosen.components["decoder"], threads,
                                           extra.get(chosen.components["decoder"].backend, {}))
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer, decoder, embeddings)
        else:
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer)
    except MmedgeError:
        for runner in runners.values():
            runner.close()
        raise
    pipeline.plan = chosen
    return pipeline


DECODER_ONLY = ("quantization", "weights")  # torch INT8/NF4, OpenVINO NNCF weights: only the decoder runs the LLM


def _checked_backend_options(options: dict | None) -> dict:
    """``backend_options`` checked against the settings each backend takes (``TorchSettings``, ``OrtOptions``)."""
    from dataclasses import fields

    if options is None:
        return {}

    def settings_of(name: str) -> list[str]:  # imported only for the backends named (onnxruntime may be absent)
        if name == "torch":
            from mmedge.runtimes.torch_backend import TorchSettings

            return [f.name for f in fields(TorchSettings)]
        if name == "openvino":
            from mmedge.runtimes.openvino.core import OvOptions

            return [f.name for f in fields(OvOptions) if f.name not in ("threads", "engine_cache")]
        from mmedge.runtimes.onnxruntime import OrtOptions

        return [f.name for f in fields(OrtOptions) if f.name not in ("providers", "threads")]

    known = ("torch", "onnxruntime", "openvino")
    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise InputError(f"backend_options is {options!r}"[:200], "a dict of backend name -> dict of settings",
                         "pass e.g. backend_options={'torch': {'quantization': 'nf4'}}")
    for name, settings in options.items():
        if name not in known:
            raise InputError(f"backend_options names backend {name!r}", f"one of {', '.join(known)}",
                             "pass settings for 'torch', 'onnxruntime' or 'openvino'")
        allowed = settings_of(name)
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise InputError(f"backend_options['{name}'] has unknown settings {unknown}", f"settings among {', '.join(allowed)}",
                             "check the spelling")
    return options


def _encoder_options(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in DECODER_ONLY}


def _chained_outputs(artifact: Artifact, chosen) -> set[str]:
    """Components on a GPU backend (torch, or ONNX Runtime with IO binding) whose outputs another component on the
    same backend takes as inputs (BLIP-2's split vision → Q-Former, IDEFICS' vision → resampler → cross K/V): they
    hand over arrays that stay on the GPU. Read from the manifest's tensor names, nothing model-specific."""
    components = artifact.manifest["components"]

    def on_gpu(plan) -> bool:
        return ((plan.backend == "torch" and plan.options.get("device") == "cuda")
                or (plan.backend == "onnxruntime" and bool(plan.options.get("io_binding"))))

    chained = set()
    for name, plan in chosen.components.items():
        if name == "decoder" or not on_gpu(plan):
            continue
        for other, other_plan in chosen.components.items():
            if other not in (name, "decoder") and other_plan.backend == plan.backend and on_gpu(other_plan) \
                    and set(components[name]["outputs"]) & set(components[other]["inputs"]):
                chained.add(name)
    return chained


def component_path(artifact: Artifact, name: str, comp_plan):
    """The component's graph (sha256 checked), or None for the torch backend, which loads the PyTorch weights instead."""
    return None if comp_plan.backend == "torch" else artifact.component_path(name)


def _runner_options(artifact: Artifact, comp_plan, threads: int | None) -> dict:
    if comp_plan.backend == "tensorrt":
        return {"artifact": artifact, "defaults": comp_plan.options}  # engines/build.json, if any, comes first
    if comp_plan.backend == "torch":
        return {"artifact": artifact, **comp_plan.options}
    if comp_plan.backend == "openvino":
        return {"artifact": artifact, "threads": threads, **comp_plan.options}
    options = {"providers": comp_plan.providers, "threads": threads, **comp_plan.options}
    if "tensorrt" in comp_plan.providers:
        options["engine_cache"] = artifact.engines_dir()
    return options


def _decoder(artifact: Artifact, comp_plan, threads: int | None, settings: dict | None = None):
    """The KV-cached decoder and the token-embedding table it embeds generated ids with: ``TorchDecoder`` (torch),
    ``RunnerDecoder`` over the decoder's TensorRT engine (tensorrt), else ``OrtDecoder``."""
    from mmedge.embeddings import EmbeddingTable

    family = artifact.manifest["family"]
    table_entry = artifact.manifest[family]["embeddings"]
    table = EmbeddingTable.load(artifact.verified_path(table_entry["file"], table_entry["sha256"], f"{family}.embeddings.file"),
                                table_entry)
    if comp_plan.backend == "torch":
        from mmedge.runtimes.torch_decoder import create_decoder

        return create_decoder(artifact, **{**comp_plan.options, **(settings or {})}), table
    if comp_plan.backend == "openvino":
        from mmedge.runtimes.openvino import create_decoder as openvino_decoder

        options = {k: v for k, v in {**_runner_options(artifact, comp_plan, threads), **(settings or {})}.items()
                   if k != "artifact"}
        return openvino_decoder(artifact, table, **options), table
    if comp_plan.backend == "tensorrt":
        from mmedge.runtimes.registry import import_backend_module

        engine = import_backend_module("tensorrt")  # TensorRT itself is imported when the decoder's engine is obtained
        options = {k: v for k, v in _runner_options(artifact, comp_plan, threads).items() if k != "artifact"}
        return engine.create_decoder(artifact, table, **options), table
    from mmedge.runtimes.kv_decoder import artifact_decoder
    from mmedge.runtimes.onnxruntime import OrtOptions
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    layout, decoder_options = artifact_decoder(artifact.manifest)  # IDEFICS: context inputs (image mask, cross K/V)
    ort_settings = {k: v for k, v in {**_runner_options(artifact, comp_plan, threads), **(settings or {})}.items()
                    if k not in ("io_binding", "keep_on_device")}  # the decoder binds its cache itself
    decoder = OrtDecoder(artifact.component_path("decoder"), table, layout, options=OrtOptions(**ort_settings),
                         **decoder_options)
    return decoder, table
