"""``mmedge.load``: an artifact folder in, the pipeline its manifest names out."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mmedge.artifact import Artifact
from mmedge.errors import BackendError, InputError, MmedgeError, MmedgeWarning, warn
from mmedge.pipelines import Captioner, Embedder, ZeroShotClassifier, pipeline_class
from mmedge.setting_checks import as_count

log = logging.getLogger("mmedge")
Pipeline = Captioner | ZeroShotClassifier | Embedder  # what load returns (InstructCaptioner is a Captioner)


class RandomWeightsWarning(MmedgeWarning):
    """The artifact was exported from randomly initialized weights: its outputs are noise."""


def load(path: str | os.PathLike, backend: str = "auto", device: str = "auto", task: str | None = None,
         threads: int | None = None, backend_options: dict | None = None) -> Pipeline:
    """Open an artifact and return its pipeline (``ZeroShotClassifier`` or ``Embedder`` for CLIP).

    ``backend``: 'auto' or a backend name ('onnxruntime', 'openvino', 'tensorrt', 'torch'); a named backend that is
    absent raises BackendUnavailableError. With 'auto' on an NVIDIA GPU with TensorRT, the encoders and an FP32/FP16
    decoder run as TensorRT engines (built on first use and cached under the artifact's engines/; ``mmedge build``
    prebuilds them);
    with torch and an artifact exported ``--with-pytorch``, the decoder runs on torch (see
    ``mmedge.runtimes.plugins``). ``device``: 'auto',
    'cpu' or 'cuda'. ``task``: one of the manifest's tasks (default: its first). ``threads``: CPU threads per graph
    (default: all cores). ``backend_options``: settings per backend name, over the plan's, e.g.
    ``{"torch": {"quantization": "nf4", "dtype": "bfloat16", "checkpoint": "blip2-folder"}}`` (see
    ``mmedge.runtimes.torch_backend.TorchSettings``) or ``{"onnxruntime": {"device_id": 1}}``.
    """
    from mmedge.memory import warn_if_it_may_not_fit
    from mmedge.preprocess import ImagePreprocessor
    from mmedge.selection import log_fallbacks
    from mmedge.tokenizer import TextTokenizer

    threads = check_threads(threads)
    artifact = Artifact.open(path)
    manifest = artifact.manifest
    task = manifest["tasks"][0] if task is None else task
    if task not in manifest["tasks"]:
        raise InputError(f"task '{task}' is not one this artifact was exported for",
                         f"one of {', '.join(manifest['tasks'])}",
                         "pass one of those" + (", or re-export with --task" if manifest["family"] == "clip" else ""))
    if artifact.random_weights:
        warn(f"artifact '{artifact.root.name}' was exported with random weights (source "
             f"{manifest['source']['model']}): its outputs are meaningless", RandomWeightsWarning)
    extra = _checked_backend_options(backend_options)
    chosen = _plan(artifact, backend, device, extra, threads)
    if backend == "auto":
        log.info("mmedge: %s", "; ".join(chosen.reasons))
        log_fallbacks(chosen, log)
    _refuse_idle_backend_options(extra, chosen)
    warn_if_it_may_not_fit(artifact, chosen, extra)
    runners = open_runners(artifact, chosen, threads=threads, backend_options=extra, decoder=False)
    try:
        tokenizer = None
        if manifest.get("tokenizer"):
            settings = manifest["tokenizer"]
            path = (artifact.verified_path(settings["file"], settings["sha256"],
                                           "tokenizer.file") if settings.get("sha256")
                    else artifact.resolve_file(settings["file"], "tokenizer.file"))
            tokenizer = TextTokenizer.from_file(path, settings)
        preprocessor = ImagePreprocessor(manifest["preprocess"])
        if "decoder" in chosen.components:
            decoder, embeddings = _decoder(artifact, chosen, threads, extra)
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer, decoder,
                                                                embeddings)
        else:
            pipeline = pipeline_class(manifest["family"], task)(artifact, runners, preprocessor, tokenizer)
    except MmedgeError:
        for runner in runners.values():
            runner.close()
        raise
    pipeline.plan = chosen
    return pipeline


THREADS_PER_CORE_CAP = 4  # past this many threads per core a graph only waits on its own threads


def check_threads(threads, fix: str = "pass e.g. threads=2") -> int | None:
    """CPU threads per graph: None (all cores) or a positive integer up to ``THREADS_PER_CORE_CAP`` per core, as a
    plain int; anything else is refused before any work (threads=10000 made 18,000 OS threads and hung the load)."""
    if threads is None:
        return None
    count = as_count(threads, 1)
    if count is None:
        raise InputError(f"threads is {threads!r}", "None (all cores) or a positive integer", fix)
    cores = os.cpu_count() or 1
    limit = THREADS_PER_CORE_CAP * cores
    if count > limit:
        raise InputError(f"threads is {threads}", f"at most {limit} on this machine ({THREADS_PER_CORE_CAP} per "
                         f"core, {cores} cores): more threads than cores wait on each other",
                         f"ask for {limit} threads or fewer ({cores}, one per core, is usually fastest), or leave "
                         "threads unset for all cores")
    return count


def open_runners(artifact: Artifact, chosen, *, threads: int | None = None, backend_options: dict | None = None,
                 decoder: bool = True, refused: dict[str, str] | None = None) -> dict:
    """A runner per planned component, each opened by its backend's plug-in (``mmedge.backends.Backend.open_runner``):
    what ``mmedge.load`` builds its pipeline on (``decoder=False``: the decoder is opened as a KV-cached decoder
    instead, and stages that hand arrays over on the GPU keep them there) and what ``mmedge validate`` measures (every
    component as a plain graph). A component whose backend refuses its graph and names a fallback (``auto``'s
    OpenVINO: ONNX Runtime) is re-planned there in ``chosen`` (``_opened``), so the plan says what runs.
    ``backend_options``: checked settings per backend name. ``refused``: where given, a
    component its backend cannot open (a BackendError: OpenVINO refusing a graph, for ``mmedge tune``) is left out and
    recorded there with why, and the others are opened. On an error, the runners already open are closed."""
    from mmedge.runtimes.registry import backend

    settings = backend_options or {}
    chained = _chained_outputs(artifact, chosen) if not decoder else set()
    runners = {}
    try:
        for name, comp_plan in chosen.components.items():
            if name == "decoder" and not decoder:
                continue  # stateful: opened around its KV cache by _decoder
            try:
                runners[name] = _opened(artifact, chosen, name, settings, lambda planned, name=name: backend(
                    planned.backend).open_runner(artifact, name, planned, threads=threads,
                                                 settings=settings.get(planned.backend),
                                                 keep_on_device=name in chained))
            except BackendError as exc:
                if refused is None:
                    raise
                refused[name] = exc.what
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def plan_for(source: str | os.PathLike | Artifact, backend: str = "auto", device: str = "auto",
             backend_options: dict | None = None, threads: int | None = None, probe=None):
    """The plan ``load`` would follow for these arguments (which backend runs each component), without opening
    anything: what the CLI checks its options against before loading, and what ``mmedge doctor`` and
    ``validate_artifact`` show and run. ``source``: an artifact folder or an open ``Artifact``; ``probe``: this
    device's ``DeviceProbe`` when the caller has one (else probed here)."""
    threads = check_threads(threads)
    artifact = source if isinstance(source, Artifact) else Artifact.open(source)
    return _plan(artifact, backend, device, _checked_backend_options(backend_options), threads, probe)


def _plan(artifact: Artifact, backend: str, device: str, extra: dict, threads: int | None = None, found=None):
    from mmedge import device as device_probe
    from mmedge.runtimes.registry import backend as registered
    from mmedge.selection import plan as make_plan
    from mmedge.tuning import measured_for

    # auto takes torch only when the weights are really here (a device copy may leave pytorch/ out); a named torch
    # backend goes by the manifest, so a missing folder is reported as missing
    present = artifact.has_pytorch_weights if backend == "auto" else bool(artifact.manifest.get("pytorch"))
    weights = present or any(registered(name).supplies_weights(settings) for name, settings in extra.items())
    found = found or device_probe.probe()
    chosen = make_plan(found, artifact.manifest, backend, device, pytorch_weights=weights,
                       measured=measured_for(artifact, found, threads))
    for name, comp_plan in chosen.components.items():  # the user's settings, as they reach each component
        if extra.get(comp_plan.backend):
            chosen.components[name] = registered(comp_plan.backend).settled(artifact, name, comp_plan,
                                                                            extra[comp_plan.backend])
    return chosen


NO_DECODER = "this artifact has no LLM decoder"


@dataclass(frozen=True)
class IdleSetting:
    """A backend setting that would change nothing under a plan (``idle_backend_options``), with each reason that
    applies: its backend runs no component; it is decoder-only (torch's ``quantization``, OpenVINO's ``weights``) and
    no decoder runs on its backend (``decoder``: why); the backend's own reason (``provider``: a GPU provider's setting
    on ONNX Runtime's CPU provider)."""

    backend: str
    field: str
    unused_backend: bool
    decoder: str | None
    provider: str | None


def plan_text(chosen) -> str:
    """"vision on onnxruntime, decoder on openvino": where each component of a plan runs, for messages."""
    return ", ".join(f"{name} on {c.backend}" for name, c in chosen.components.items())


def idle_backend_options(options: dict, chosen) -> list[IdleSetting]:
    """Every setting of ``options`` (backend name -> settings) that would change nothing under the plan ``chosen``:
    the one rule ``mmedge.load`` refuses by and the command line refuses by in its flags' words
    (``mmedge.backend_option_args``)."""
    from mmedge.runtimes.registry import backend

    decoder = chosen.components.get("decoder")
    idle = []
    for name, settings in options.items():
        owner = backend(name)
        runs = [c for c in chosen.components.values() if c.backend == name]
        provider = owner.idle_settings(settings, runs) if runs else {}
        for field in settings:
            why = None
            if field in owner.decoder_only and (decoder is None or decoder.backend != name):
                why = f"the decoder runs on {decoder.backend}" if decoder else NO_DECODER
            if not runs or why or field in provider:
                idle.append(IdleSetting(name, field, not runs, why, provider.get(field)))
    return idle


def _refuse_idle_backend_options(options: dict, chosen) -> None:
    """Settings for a backend that runs no component of the plan would do nothing: refused, not ignored; so would a
    provider's setting where that provider runs nothing, and a decoder-only setting (torch's ``quantization``,
    OpenVINO's ``weights``) given a value where that backend runs no decoder (``idle_backend_options``). The
    decoder-only values are checked first, whatever the plan."""
    from mmedge.runtimes.registry import backend

    for name, settings in options.items():
        backend(name).decoder_settings(settings)  # a bad value is refused as such, before any "would change nothing"
    idle = idle_backend_options(options, chosen)
    used = sorted({comp_plan.backend for comp_plan in chosen.components.values()})
    unused = sorted({i.backend for i in idle if i.unused_backend})
    if unused:
        raise InputError(f"backend_options holds settings for {', '.join(unused)}, which runs no component here "
                         f"(the plan: {plan_text(chosen)})",
                         f"settings only for the backends the plan uses ({', '.join(used)})",
                         f"pass backend='{unused[0]}' to run it, or drop its settings")
    provider = next((i for i in idle if i.provider), None)
    if provider:
        raise InputError(f"backend_options['{provider.backend}']['{provider.field}'] would change nothing: "
                         f"{provider.provider}", f"settings that change something under the plan ({plan_text(chosen)})",
                         f"drop {provider.field}")
    decoder = next((i for i in idle if i.decoder and options[i.backend][i.field]), None)
    if decoder:
        fix = f"drop {decoder.field}" + ("" if decoder.decoder == NO_DECODER else
                                         f", or pass backend='{decoder.backend}' to run the decoder on it")
        raise InputError(f"backend_options['{decoder.backend}']['{decoder.field}'] would change nothing: "
                         f"{decoder.decoder}", f"a captioning artifact whose decoder runs on the {decoder.backend} "
                         f"backend ({decoder.field} applies to the LLM)", fix)


def _checked_backend_options(options: dict | None) -> dict:
    """``backend_options`` checked against the settings dataclass of each backend that takes any (``TorchSettings``,
    ``OrtOptions``)."""
    from mmedge.runtimes.registry import backend, backends

    if options is None:
        return {}
    known = [candidate.name for candidate in backends() if candidate.settings is not None]
    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise InputError(f"backend_options is {options!r}"[:200], "a dict of backend name -> dict of settings",
                         "pass e.g. backend_options={'torch': {'quantization': 'nf4'}}")
    for name, settings in options.items():
        if name not in known:
            raise InputError(f"backend_options names backend {name!r}", f"one of {', '.join(known)}",
                             f"pass settings for {' or '.join(repr(k) for k in known)}")
        backend(name).refuse_plan_owned(settings)
        allowed = backend(name).settings_fields()
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise InputError(f"backend_options['{name}'] has unknown settings {unknown}",
                             f"settings among {', '.join(allowed)}",
                             "check the spelling")
        backend(name).settings(**settings)  # the values judged by the settings' own checks, before any work
    return options


def _chained_outputs(artifact: Artifact, chosen) -> set[str]:
    """Components whose backend can hand arrays over on the GPU (torch on CUDA, ONNX Runtime with IO binding) and
    whose outputs another component on the same backend takes as inputs (BLIP-2's split vision → Q-Former, IDEFICS'
    vision → resampler → cross K/V): they keep their outputs on the GPU. Read from the manifest's tensor names,
    nothing model-specific."""
    from mmedge.runtimes.registry import backend

    components = artifact.manifest["components"]

    def on_gpu(plan) -> bool:
        return backend(plan.backend).hands_over_on_gpu(plan)

    chained = set()
    for name, plan in chosen.components.items():
        if name == "decoder" or not on_gpu(plan):
            continue
        for other, other_plan in chosen.components.items():
            if other not in (name, "decoder") and other_plan.backend == plan.backend and on_gpu(other_plan) \
                    and set(components[name]["outputs"]) & set(components[other]["inputs"]):
                chained.add(name)
    return chained


def _decoder(artifact: Artifact, chosen, threads: int | None, backend_options: dict):
    """The KV-cached decoder the plan's backend opens (``TorchDecoder`` on torch, ``RunnerDecoder`` over the decoder's
    TensorRT engine, ``OrtDecoder`` on ONNX Runtime; re-planned as ``open_runners`` does where that backend refuses
    it), with the user's settings for that backend, and the token-embedding table it embeds generated ids with."""
    from mmedge.embeddings import EmbeddingTable
    from mmedge.runtimes.registry import backend

    table = EmbeddingTable.of_artifact(artifact)
    return _opened(artifact, chosen, "decoder", backend_options, lambda planned: backend(planned.backend).open_decoder(
        artifact, planned, table, threads=threads, settings=backend_options.get(planned.backend, {}))), table


def _opened(artifact: Artifact, chosen, name: str, backend_options: dict, open_planned):
    """``open_planned(chosen.components[name])``; where its backend refuses the graph (BackendError) and names a
    backend that runs it instead (``Backend.fallback``), that backend's own CPU plan for it, settled with the user's
    settings for it, replaces the component's plan in ``chosen`` (so ``pipeline.plan``, ``/v1/models`` and ``bench``
    say what runs), the reason goes to ``chosen.fallbacks`` and is warned once per load, and it is opened there."""
    from mmedge.backends import PlanRequest
    from mmedge.device import probe
    from mmedge.runtimes.registry import backend

    planned = chosen.components[name]
    try:
        return open_planned(planned)
    except BackendError as exc:
        instead = backend(planned.backend).fallback(planned)
        if instead is None:
            raise
        why = exc.what
    others = {other: None for other in artifact.components if other != name}
    replanned = backend(instead).plan_components(PlanRequest(probe(), artifact.manifest, "cpu"), others)[name]
    if backend_options.get(instead):
        replanned = backend(instead).settled(artifact, name, replanned, backend_options[instead])
    chosen.components[name] = replanned
    reason = (f"{why}: auto runs component '{name}' on {instead} instead (`mmedge tune ARTIFACT` records this, so "
              f"that later loads plan it there without asking {planned.backend})")
    chosen.fallbacks.append(reason)
    log.warning("mmedge: %s", reason)
    return open_planned(replanned)
