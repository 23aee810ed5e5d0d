"""Write a Triton model repository from mmedge artifacts (``mmedge triton ARTIFACT... --out REPO``).

For an artifact folder ``clip-b32`` the repository gets::

    clip-b32__vision/config.pbtxt  1/vision.onnx                  (--platform onnxruntime)
                                   1/model.py, vision.onnx, manifest.json   (--platform python)
    clip-b32__text/...
    clip-b32-zero-shot/config.pbtxt   1/model.py, manifest.json, tokenizer.json   (a Python-backend pipeline)
    clip-b32-embed/...

and for a BLIP-2 / IDEFICS artifact its components (prefix or vision + Q-Former, or vision, resampler, cross K/V;
the decoder) and ``-caption`` (one answer per request, HTTP and gRPC) and ``-caption-stream`` (decoupled: the text
in pieces as tokens arrive, gRPC streaming). Nothing is re-exported: every name, dtype and shape comes from the
manifest (``mmedge.triton.config``), each file the repository needs is hard-linked (or copied, across file
systems) with its sha256 checked against the manifest, and the repository appears only when complete (written
beside ``--out`` and renamed). A tampered artifact is refused here, with the file that does not match. The root's
``.mmedge-repository.json`` (the models written) marks it as mmedge's: ``--overwrite`` replaces only such a folder
holding nothing mmedge did not write (or an empty one; ``mmedge.triton.out_checks``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from mmedge import __version__
from mmedge.artifact import Artifact, atomic_folder, check_output_folder
from mmedge.errors import ArtifactError, InputError
from mmedge.idle_options import Rule, refuse_idle
from mmedge.manifest import MANIFEST_FILE
from mmedge.progress import Progress
from mmedge.triton.config import Options, component_config, pipeline_config, render, runner_settings
from mmedge.triton.names import (
    model_prefix,
    refuse_long_names,
    refuse_prefixes_read_as_models,
    refuse_shared_prefixes,
)
from mmedge.triton.out_checks import (
    MARKER_FILE,
    is_repository,
    refuse_out_inside,
    refuse_unwritten_entries,
)
from mmedge.triton.placing import Placer, link_or_copy, record_again
from mmedge.triton.protocol import STREAM_SUFFIX, TASK_PIPELINES

PLATFORMS = ("onnxruntime", "python")
ZERO_SHOT_GRAPHS = ("auto", "inline", "bls")
VERSION = "1"
INT32_MAX = 2 ** 31 - 1  # model_config.proto: max_batch_size and an instance group's count are int32
UINT64_MAX = 2 ** 64 - 1  # max_queue_delay_microseconds is uint64
# option -> (least, most); the counts written as strings (threads) or into mmedge's own settings (workers) are
# bounded as Triton's own counts are
BOUNDS = {"max_batch_size": (1, INT32_MAX), "instances": (1, INT32_MAX), "workers": (1, INT32_MAX),
          "pipeline_instances": (1, INT32_MAX), "threads": (1, INT32_MAX), "queue_delay_us": (0, UINT64_MAX)}
IDLE = (Rule("--queue-delay-us", lambda o: o.queue_delay_us > 0, lambda o, _: o.max_batch_size > 1,
             "--max-batch-size of at least 2 (a batch of one is full as soon as its request arrives, so the batcher "
             "never waits)", "drop --queue-delay-us, or raise --max-batch-size"),)


def pipeline_models(artifact: Artifact, prefix: str | None = None) -> dict[str, tuple[str, bool]]:
    """Pipeline model name -> (pipeline kind, decoupled) for an artifact's tasks."""
    prefix = prefix or model_prefix(artifact)
    models: dict[str, tuple[str, bool]] = {}
    for task in artifact.manifest["tasks"]:
        kind = TASK_PIPELINES[task]
        models[f"{prefix}-{kind}"] = (kind, False)
        if kind == "caption":
            models[f"{prefix}-{kind}{STREAM_SUFFIX}"] = (kind, True)
    return models


def model_names(artifact: Artifact, prefix: str) -> list[str]:
    """Every model the repository gets for an artifact: its components' ("{prefix}__{component}"), then its
    pipelines'."""
    return [component_model(prefix, name) for name in artifact.components] + list(pipeline_models(artifact, prefix))


def component_model(prefix: str, name: str) -> str:
    return f"{prefix}__{name}"  # two underscores: a component (pipelines are "{prefix}-{task}")


def write_repository(artifacts: Iterable[str | os.PathLike], out: str | os.PathLike, options: Options = Options(),
                     *, overwrite: bool = False, progress: bool = False) -> dict[str, list[str]]:
    """Write the repository; returns each artifact path as given -> the models written for it. ``progress``: a line
    on stderr as each artifact starts and ends and one per component (checking a graph's sha256 reads it whole,
    about a second per GB)."""
    if options.platform not in PLATFORMS:
        raise InputError(f"platform '{options.platform}' is not one mmedge writes", f"one of {', '.join(PLATFORMS)}",
                         "use --platform onnxruntime (Triton's ONNX Runtime backend) or python")
    if options.zero_shot_graphs not in ZERO_SHOT_GRAPHS:
        raise InputError(f"zero_shot_graphs is {options.zero_shot_graphs!r}", f"one of {', '.join(ZERO_SHOT_GRAPHS)}",
                         "pass --zero-shot-graphs inline (in the pipeline's process) or bls (the component models)")
    for field, (least, most) in BOUNDS.items():
        value = getattr(options, field)
        if field == "threads" and value is None:  # ONNX Runtime's default
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise InputError(f"{field} is {value!r}", f"an integer from {least} to {most}",
                             f"pass e.g. --{field.replace('_', '-')} {max(least, 2)}")
    refuse_idle(IDLE, options, None, "with --max-batch-size 1")
    if options.spin and (options.platform != "python" or options.gpu):
        raise InputError("--spin was given for the " + ("GPU" if options.gpu else f"'{options.platform}' platform"),
                         "--spin only with --platform python on the CPU (it sets mmedge's own ONNX Runtime runner's "
                         "CPU threads; Triton's ONNX Runtime backend and GPU instances have no such setting here)",
                         "drop --spin, or write the repository with --platform python")
    paths = list(artifacts)
    replacing = {"recognize": is_repository, "kind": "a Triton repository mmedge wrote (with its " + MARKER_FILE + ")",
                 "command": "mmedge triton", "sources": paths}
    if overwrite:
        refuse_unwritten_entries(out)
    check_output_folder(out, overwrite=overwrite, **replacing)  # before any artifact is read
    refuse_out_inside(out, paths)
    opened = [Artifact.open(path, recheck=True) for path in paths]  # each file read and checked on its way in
    if not opened:
        raise InputError("no artifact was given", "at least one artifact folder",
                         "pass artifact folders written by `mmedge export`")
    prefixes = [model_prefix(a, path) for a, path in zip(opened, paths)]
    refuse_shared_prefixes(paths, opened, prefixes)
    models = [model_names(artifact, prefix) for artifact, prefix in zip(opened, prefixes)]
    refuse_prefixes_read_as_models(paths, prefixes, models)
    for path, prefix, names in zip(paths, prefixes, models):
        refuse_long_names(path, prefix, names, out)
    written: dict[str, list[str]] = {}
    placers = [Placer(artifact) for artifact in opened]
    steps = Progress(len(opened), enabled=progress)
    try:
        with atomic_folder(out, overwrite=overwrite, **replacing) as staging:
            for path, placer, prefix in zip(paths, placers, prefixes):
                with steps.step(f"{prefix}: checking the sha256 of its {_size(placer.artifact)} and placing its "
                                "files"):
                    written[str(path)] = _write_artifact(placer, prefix, staging, options, steps)
            # what makes this folder one `mmedge triton --overwrite` may replace; Triton reads only the root's
            # subfolders
            (staging / MARKER_FILE).write_text(json.dumps({"written_by": "mmedge triton", "mmedge_version":
                                                           __version__, "models": written}, indent=1) + "\n")
    except OSError as exc:
        raise ArtifactError(f"cannot write the repository --out '{out}': {exc.strerror or exc}"
                            + (f" ('{exc.filename}')" if exc.filename else ""),
                            "a writable folder with room for the repository (its files are hard links where the "
                            "artifacts share its file system, copies elsewhere)",
                            "check the path, free space and permissions, or choose another --out") from None
    record_again(placers)  # the links changed the artifacts' files' change times, not their bytes
    return written


def _size(artifact: Artifact) -> str:
    size = artifact.size_bytes()  # its files as the manifest names them; a missing one is refused by name here
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _write_artifact(placer: Placer, prefix: str, repo: Path, options: Options, steps: Progress) -> list[str]:
    artifact = placer.artifact
    manifest = artifact.manifest
    components = {}
    models = []
    listed = manifest["components"].items()
    for name, component in steps.items(listed, len(listed), "component"):
        model = component_model(prefix, name)
        config = component_config(model, name, component, options, manifest)
        folder = _model_folder(repo, model, config)
        files = [(component["file"], component["sha256"])]
        if component.get("external_data"):
            files.append((component["external_data"]["file"], component["external_data"]["sha256"]))
        artifact.component_path(name)  # the manifest's own check first: a tampered graph is refused by name
        for file_name, sha256 in files:
            placer.place(file_name, sha256, f"components.{name}.file", folder)
        if options.platform == "python":
            _python_model(folder, "ComponentModel", artifact)
        components[name] = {"model": model, "max_batch_size": config["max_batch_size"]}
        models.append(model)
    shared = [(manifest["tokenizer"]["file"], manifest["tokenizer"].get("sha256"),
               "tokenizer.file")] if manifest.get("tokenizer") else []
    family_section = manifest.get(manifest["family"]) or {}
    if family_section.get("embeddings"):
        table = family_section["embeddings"]
        shared.append((table["file"], table["sha256"], f"{manifest['family']}.embeddings.file"))
    for model, (kind, decoupled) in pipeline_models(artifact, prefix).items():
        task = next(t for t in manifest["tasks"] if TASK_PIPELINES[t] == kind)
        settings = {"kind": kind, "task": task, "artifact": prefix, "family": manifest["family"],
                    "components": components}
        if kind == "caption":  # the client judges a call's generation settings over the artifact's defaults
            settings.update(vqa_template=family_section["prompts"]["vqa"], generation=manifest.get("generation") or {})
        inline = kind == "zero-shot" and options.inline_zero_shot()
        if inline:  # its graphs run in its own process (mmedge's runner), the component models serve the rest
            settings.update(graphs="inline", **runner_settings(None, options))
        folder = _model_folder(repo, model, pipeline_config(model, kind, settings, options, decoupled=decoupled))
        for file_name, sha256, field in shared:
            placer.place(file_name, sha256, field, folder)
        for name, component in (manifest["components"].items() if inline else ()):
            for entry, field in ((component, f"components.{name}.file"),
                                 (component.get("external_data"), f"components.{name}.external_data.file")):
                if entry:
                    placer.place(entry["file"], entry["sha256"], field, folder)
        _python_model(folder, "PipelineModel", artifact)
        models.append(model)
    return models


def _model_folder(repo: Path, model: str, config: dict) -> Path:
    (repo / model).mkdir()
    (repo / model / "config.pbtxt").write_text(render(config))
    version = repo / model / VERSION
    version.mkdir()
    return version


def _python_model(folder: Path, cls: str, artifact: Artifact) -> None:
    """The Python-backend model: mmedge's own class, and nothing from the artifact in the code (its folder's name
    had been written into the docstring as it was: a name holding three quotes and a line of Python ran that line
    when the server imported the model)."""
    (folder / "model.py").write_text(
        '"""Written by `mmedge triton` from an mmedge artifact (its manifest is beside this file): the server\'s\n'
        f'Python environment needs mmedge (`pip install mmedge`; see mmedge.triton.backend.{cls})."""\n\n'
        f"from mmedge.triton.backend import {cls} as TritonPythonModel  # noqa: F401\n")
    if not (folder / MANIFEST_FILE).exists():
        link_or_copy(artifact.root / MANIFEST_FILE, folder / MANIFEST_FILE)
