"""The backend contract: what selection and loading ask of every backend, whatever engine it wraps.

The core (``mmedge.selection``, ``mmedge.api``, ``mmedge.validate``) speaks only to this contract; each backend is a
plug-in (``mmedge.runtimes.plugins.<name>``) listed in ``mmedge.runtimes.registry``, which says how one is added.
Nothing here imports an engine or a backend module.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mmedge.errors import BackendError, BackendUnavailableError, InputError

if TYPE_CHECKING:
    from mmedge.artifact import Artifact
    from mmedge.device import DeviceProbe
    from mmedge.embeddings import EmbeddingTable
    from mmedge.runner import Runner


@dataclass
class ComponentPlan:
    backend: str
    providers: tuple[str, ...]
    precision: str
    options: dict = field(default_factory=dict)  # backend settings: TensorRT's precision, workspace, max batch


@dataclass
class Plan:
    components: dict[str, ComponentPlan]
    reasons: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # auto only: a better backend was absent here, and why


@dataclass
class PlanRequest:
    """One selection: the device probe, the manifest, what the user asked for, and the plan's running notes.

    ``explicit``: the user named this backend (it takes every component or refuses); ``weights``: the torch backend
    has PyTorch weights to load; ``measured``: ``mmedge tune``'s timings of the components on this device;
    ``claims``: component -> the backend that must run it ahead of any higher-priority
    backend (``Backend.claims``); ``reasons`` / ``fallbacks`` collect what ``Plan`` reports."""

    probe: DeviceProbe
    manifest: dict
    device: str = "auto"
    explicit: bool = False
    weights: bool = False
    claims: dict[str, str] = field(default_factory=dict)
    measured: dict[str, dict] = field(default_factory=dict)  # component -> this device's timings (mmedge.tuning)
    reasons: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return bool(self.probe.gpus or self.probe.jetson)


@dataclass(frozen=True)
class BackendInfo:
    """A registry row: the backend's name, its plug-in module (imported only when the backend is asked something),
    the engine package it needs and how to install it, and any other packages it needs."""

    name: str
    plugin: str  # the plug-in module, e.g. "mmedge.runtimes.plugins.onnxruntime"; it defines BACKEND
    package: str  # the import name of the engine it needs
    install: str  # how to get that engine
    also_needs: tuple[tuple[str, str], ...] = ()  # (distribution, import name) of other packages it needs
    priority: int = 50  # auto asks the backends lowest first


class Backend(abc.ABC):
    """What a backend plug-in answers. ``selection.plan`` asks the backends in the registry's priority order;
    ``open_runners`` then opens each planned component on its backend.

    - ``unusable(request)``: why ``auto`` cannot use it on this device (None: it can). Judged from the probe alone.
    - ``claims(request)``: components it must run ahead of higher-priority backends (default: none).
    - ``plan_components(request, taken)``: the components it takes (never one in ``taken``), appending its reasons
      to ``request.reasons``; with ``request.explicit`` it takes every component or raises
      BackendUnavailableError saying what is missing.
    - ``runner_module``: the module holding its ``Runner`` and ``create_runner(path, component_name, component,
      **options)``, imported only when a runner is opened.
    - ``open_runner`` / ``open_decoder``: a ``Runner`` for one planned component, the KV-cached decoder;
      ``fallback(plan)``: the backend that runs it instead where opening it raised a BackendError (default: none).
    - ``settings``: the dataclass ``backend_options[name]`` is checked against (None: it takes none);
      ``plan_owned``: its fields the plan sets (refused in ``backend_options``); ``decoder_only``: fields that apply to
      the decoder only (not passed to the encoders' runners).
    """

    info: BackendInfo
    runner_module: str  # the module with its Runner and create_runner, imported when a runner is opened
    settings: type | None = None
    plan_owned: tuple[str, ...] = ()
    decoder_only: tuple[str, ...] = ()

    def __init__(self, info: BackendInfo):
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    def import_runner_module(self) -> ModuleType:
        """The runner module, turning a missing engine into a BackendUnavailableError with the install command."""
        try:
            return importlib.import_module(self.runner_module)
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] == self.info.package:
                raise BackendUnavailableError(
                    f"backend '{self.name}' needs the Python package '{self.info.package}', which is not installed",
                    f"'{self.info.package}' importable", self.info.install) from None
            raise

    def require_installed(self, engines: dict) -> None:
        """BackendUnavailableError naming what is missing and the install command, judged from a device probe's
        ``engines`` (distribution name -> version or None): nothing is imported."""
        needed = [(self.info.package, self.info.package), *self.info.also_needs]
        missing = [dist for dist, _ in needed if not engines.get(dist)]
        if missing:
            raise BackendUnavailableError(
                f"backend '{self.name}' needs the Python package{'s' if len(missing) > 1 else ''} "
                f"{' and '.join(repr(m) for m in missing)}, which {'are' if len(missing) > 1 else 'is'} not installed",
                " and ".join(f"'{dist}' importable as '{module}'" for dist, module in needed if dist in missing),
                self.info.install)

    def gpu_unusable(self, request: PlanRequest) -> str | None:
        """Why a GPU backend cannot run here (device=cpu, no NVIDIA GPU, its packages absent), or None."""
        if request.device == "cpu":
            return "device=cpu requested"
        if not request.has_gpu:
            return "no NVIDIA GPU found"
        try:
            self.require_installed(request.probe.engines)
        except BackendUnavailableError as exc:
            return f"{exc.what} (fix: {exc.fix})"
        return None

    def declined(self, request: PlanRequest, why: str, taken: dict[str, ComponentPlan]) -> None:
        """``auto`` found this backend unusable (``why``): record it (a backend may also add a fallback or raise)."""
        request.reasons.append(f"backend {self.name}: {why}")

    @abc.abstractmethod
    def unusable(self, request: PlanRequest) -> str | None:
        """Why ``auto`` cannot use this backend here, or None."""

    def claims(self, request: PlanRequest) -> tuple[str, ...]:
        """Components this backend must run even where a higher-priority backend could (``auto`` only)."""
        return ()

    @abc.abstractmethod
    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        """The components this backend takes, with their settings."""

    @abc.abstractmethod
    def open_runner(self, artifact: Artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False) -> Runner:
        """A runner for the planned component ``name``; ``settings``: the user's ``backend_options`` for it."""

    def open_decoder(self, artifact: Artifact, plan: ComponentPlan, table: EmbeddingTable, *,
                     threads: int | None = None, settings: dict | None = None) -> Any:
        """The artifact's KV-cached decoder (an ``mmedge.generation.Decoder``) on this backend."""
        raise BackendError(f"backend '{self.name}' has no KV-cached decoder", "a backend that runs decoders",
                           "load with backend='auto'")

    def fallback(self, plan: ComponentPlan) -> str | None:
        """The backend that runs the planned component on the CPU where this backend's runner or decoder refused its
        graph (a BackendError at opening), or None where the error stands: ``auto``'s OpenVINO components name ONNX
        Runtime; a backend the user named never falls back. ``mmedge.api.open_runners`` re-plans the component there."""
        return None

    def supplies_weights(self, settings: dict | None) -> bool:
        """Whether the user's ``settings`` for this backend bring PyTorch weights of their own (a checkpoint folder),
        so a plan may use backends that need them even where the artifact carries none."""
        return False

    def settings_fields(self) -> list[str]:
        """The settings ``backend_options[name]`` may hold."""
        if self.settings is None:
            return []
        return [f.name for f in fields(self.settings) if f.name not in self.plan_owned]

    def refuse_plan_owned(self, settings: dict) -> None:
        """InputError for a setting the plan owns (``plan_owned``), saying where to set it instead."""
        owned = [name for name in settings if name in self.plan_owned]
        if owned:
            raise InputError(f"backend_options['{self.name}'] sets '{owned[0]}', which the plan sets, not "
                             "backend_options", f"settings among {', '.join(self.settings_fields())}",
                             PLAN_OWNED_FIX.get(owned[0], f"drop '{owned[0]}'"))

    def decoder_settings(self, settings: dict | None) -> dict:
        """The user's decoder-only settings, their values checked by ``settings`` even where no decoder of this
        backend runs (a bad one is refused, not dropped unseen)."""
        chosen = {k: v for k, v in (settings or {}).items() if k in self.decoder_only}
        if chosen and self.settings is not None:
            self.settings(**chosen)  # its checks raise InputError
        return chosen

    def idle_settings(self, settings: dict, plans: list[ComponentPlan]) -> dict[str, str]:
        """The user's ``settings`` that would change nothing for the components this backend runs (``plans``), each
        with the reason: a provider's setting where that provider runs none of them (default: none)."""
        return {}

    def runner_settings(self, settings: dict | None) -> dict:
        """The user's settings that apply to the encoders' runners (the decoder-only ones checked, then left out)."""
        self.decoder_settings(settings)
        return {k: v for k, v in (settings or {}).items() if k not in self.decoder_only}

    def settled(self, artifact: Artifact, name: str, plan: ComponentPlan, settings: dict) -> ComponentPlan:
        """The component's plan once the user's ``settings`` for this backend apply, as ``doctor``, ``/v1/models`` and
        ``pipeline.plan`` show it: a backend whose settings change what runs (OpenVINO's NNCF weights, torch's dtype
        and LLM quantization) says so in the precision. The runner gets the settings beside the plan's options as
        before; a backend may mirror one in them where it names the same thing (torch's ``dtype``)."""
        return plan

    # what `mmedge doctor` prints for this backend (nothing by default)
    def device_lines(self, probe: DeviceProbe) -> list[str]:
        return []

    def artifact_lines(self, artifact: Artifact) -> list[str]:
        return []

    def hands_over_on_gpu(self, plan: ComponentPlan) -> bool:
        """Whether a runner opened for ``plan`` can hand its outputs to another runner of this backend without leaving
        the GPU (then ``open_runners`` asks it to keep them there)."""
        return False


# where a setting the plan owns is set instead (Backend.refuse_plan_owned)
PLAN_OWNED_FIX = {"threads": "pass threads= to mmedge.load (--threads on the command line)",
                  "providers": "pass backend= and device= to mmedge.load (--backend / --device): the plan picks them",
                  "engine_cache": "drop it: compiled models are cached in the artifact's engines/ folder (uncached "
                                  "where it cannot be written)"}


def listed(names: list[str]) -> str:
    """At most three names, then "...": for reasons."""
    return f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"


def refuse_unknown_options(backend: str, unknown: dict, allowed) -> None:
    """InputError for options a backend's ``create_runner`` / ``create_decoder`` does not take (none are ignored)."""
    if unknown:
        raise InputError(f"backend '{backend}' got unknown options {sorted(unknown)}",
                         f"options among {', '.join(sorted(allowed))}", "check the spelling, or drop them")


def settings_from_options(backend: str, settings_class, options: dict):
    """``settings_class(**options)`` for a backend whose runner / decoder options are the fields of one settings
    dataclass (``OrtOptions``, ``OvOptions``); an option it has no field for is an InputError, never ignored."""
    from dataclasses import fields

    allowed = [f.name for f in fields(settings_class)]
    refuse_unknown_options(backend, {k: v for k, v in options.items() if k not in allowed}, allowed)
    return settings_class(**options)


__all__ = ["Backend", "BackendInfo", "ComponentPlan", "Plan", "PlanRequest", "listed", "refuse_unknown_options",
           "settings_from_options"]
