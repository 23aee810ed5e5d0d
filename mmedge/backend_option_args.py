"""Backend settings from the command line: ``--backend-option BACKEND.SETTING=VALUE`` (repeatable) and the decoder
flags that are short for one (``--llm-quantization nf4`` is ``torch.quantization=nf4``, ``--openvino-weights int4``
is ``openvino.weights=int4``).

They reach ``mmedge.load``'s ``backend_options``, so every setting the Python API takes (OpenVINO's ``device``,
``precision_hint`` and ``shape_cache``; ONNX Runtime's ``device_id`` and ``graph_optimization``; torch's ``dtype``,
``compile``, ``checkpoint``, ...) can be set by ``mmedge run``, ``validate``, ``serve``, ``bench`` and ``doctor``
(``validate`` refuses the decoder-only ones: it measures each graph as exported). A value is read as its setting's
type (``true`` / ``false``, ``none``, an integer, JSON for a dict); the setting's own checks then judge it, before
anything is loaded. A setting that would change nothing under the plan (its backend runs no component; a
decoder-only setting where no decoder runs on it; a GPU provider's setting on ONNX Runtime's CPU provider) is
refused in the words of the flag the user gave.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from mmedge.errors import InputError, MmedgeError

FLAG = "--backend-option"
METAVAR = "BACKEND.SETTING=VALUE"
HELP = ("a backend setting, as mmedge.load's backend_options takes it (repeatable), e.g. openvino.device=GPU, "
        "openvino.precision_hint=f16, onnxruntime.device_id=1, torch.dtype=bfloat16")
# flag -> (its backend, the setting it sets): flags short for one --backend-option (mmedge run)
DECODER_FLAGS = {"--llm-quantization": ("torch", "quantization"), "--openvino-weights": ("openvino", "weights")}
# what a decoder-only setting's backend needs to take the decoder
DECODER_NEEDS = {"torch": "an artifact exported --with-pytorch", "openvino": "an FP32 decoder; pip install "
                 "\"mmedge[openvino]\""}
_TRUE, _FALSE, _NONE = ("true", "yes", "on"), ("false", "no", "off"), ("none", "null")


@dataclass(frozen=True)
class GivenSetting:
    backend: str
    setting: str
    value: Any
    flag: str  # as given: "--openvino-weights int4", "--backend-option openvino.device=GPU"

    @property
    def option(self) -> str:
        """The option's name: "--openvino-weights", "--backend-option openvino.device"."""
        return f"{FLAG} {self.backend}.{self.setting}" if self.flag.startswith(FLAG) else self.flag.split(" ")[0]

    @property
    def runs_on(self) -> str:
        """What a plan must run on this setting's backend for it to do something."""
        if self.setting not in _backend(self.backend).decoder_only:
            return f"a component on {self.backend}"
        return f"the decoder on {self.backend} ({DECODER_NEEDS.get(self.backend, 'a captioning artifact')})"


class Idle(NamedTuple):
    """A setting that would change nothing under a plan: why, what would use it, what to do."""

    given: GivenSetting
    why: str
    expected: str
    fix: str


class CliBackendOptions:
    """The backend settings a command was given, each with the flag that gave it (for messages)."""

    def __init__(self, given: list[GivenSetting]):
        self.given = given

    @classmethod
    def from_args(cls, args) -> "CliBackendOptions":
        given = [_given_flag(flag, backend, setting, flag_value(args, flag))
                 for flag, (backend, setting) in DECODER_FLAGS.items()]
        given = [g for g in given if g is not None]
        for item in flag_value(args, FLAG) or ():
            setting = parse_item(item)
            twice = next((g for g in given if (g.backend, g.setting) == (setting.backend, setting.setting)), None)
            if twice:
                raise InputError(f"{setting.backend}.{setting.setting} is set twice ({twice.flag}; {setting.flag})",
                                 "each backend setting once", "drop one of them")
            given.append(setting)
        for name, combined in cls(given).as_dict().items():  # settings judged together (a CPU-only one on a GPU)
            if len(combined) > 1:
                try:
                    _settings_class(name, FLAG)(**combined)
                except MmedgeError as error:
                    flags = "; ".join(g.flag for g in given if g.backend == name)
                    raise InputError(f"{flags}: {error.what}", _flag_words(error.expected, name),
                                     _flag_words(error.fix, name)) from None
        return cls(given)

    def __bool__(self) -> bool:
        return bool(self.given)

    def as_dict(self) -> dict:
        """``backend_options`` for ``mmedge.load`` / ``plan_for``."""
        options: dict = {}
        for g in self.given:
            options.setdefault(g.backend, {})[g.setting] = g.value
        return options

    def idle_in(self, chosen) -> list[Idle]:
        """The settings that would change nothing under the plan ``chosen`` (``mmedge.api.idle_backend_options``,
        the rule ``mmedge.load`` refuses by), each with the reason, what would use it and the fix."""
        from mmedge.api import NO_DECODER, idle_backend_options, plan_text

        found = {(i.backend, i.field): i for i in idle_backend_options(self.as_dict(), chosen)}
        idle = []
        for g in self.given:
            i = found.get((g.backend, g.setting))
            if i is None:
                continue
            other = f"add --backend {g.backend}, or drop {g.option}"
            if i.decoder:
                idle.append(Idle(g, i.decoder, f"a plan that runs {g.runs_on}",
                                 f"drop {g.option}" if i.decoder == NO_DECODER else other))
            elif i.unused_backend:
                idle.append(Idle(g, f"no component runs on {g.backend} here (the plan: {plan_text(chosen)})",
                                 f"a plan that runs {g.runs_on}", other))
            else:
                idle.append(Idle(g, i.provider, f"a plan whose {g.backend} components run what {g.setting} is for",
                                 f"drop {g.option}"))
        return idle

    def check_for(self, path, backend: str, device: str, threads: int | None) -> None:
        """``check_used`` against the plan ``mmedge.load`` would follow for the artifact at ``path`` (nothing to check
        without settings)."""
        if self.given:
            from mmedge.api import plan_for

            self.check_used(plan_for(path, backend=backend, device=device, backend_options=self.as_dict(),
                                     threads=threads), self.blocker(path, device, threads))

    def blocker(self, path, device: str, threads: int | None):
        """``blocked(given)``: why ``--backend`` of the setting ``given``'s backend would not take it for the artifact
        at ``path`` (that backend cannot run the artifact, or the setting would change nothing under its plan too);
        None where it would. A fix suggests adding a --backend only where this says None."""
        from mmedge.api import plan_for

        def blocked(given: GivenSetting) -> str | None:
            try:
                chosen = plan_for(path, backend=given.backend, device=device, backend_options=self.as_dict(),
                                  threads=threads)
            except MmedgeError as exc:
                return f"--backend {given.backend} fails here: {exc.what}"
            still = next((i for i in self.idle_in(chosen) if i.given is given), None)
            return None if still is None else f"with --backend {given.backend} too: {still.why}"

        return blocked

    def per_artifact(self, paths: dict, backend: str, device: str, threads: int | None) -> dict[str, dict]:
        """``backend_options`` per artifact of a command that takes several (``paths``: name -> folder; ``mmedge
        serve``, ``mmedge bench``): each gets the settings that change something under its plan, and one that would
        change nothing for every artifact is refused before anything is loaded."""
        if not self.given:
            return {}
        from mmedge.api import plan_for

        plans = {name: plan_for(path, backend=backend, device=device, backend_options=self.as_dict(), threads=threads)
                 for name, path in paths.items()}
        self.check_used_by_some(plans, {name: self.blocker(path, device, threads) for name, path in paths.items()})
        return {name: self.for_plan(chosen) for name, chosen in plans.items()}

    def check_used(self, chosen, blocked=None) -> None:
        """InputError for the first setting that would change nothing under ``chosen``, in the flag's words.
        ``blocked``: ``blocker``'s check, so that a fix never suggests a --backend that would refuse the setting
        too."""
        idle = self.idle_in(chosen)
        if idle:
            first = idle[0]
            raise InputError(f"{first.given.flag} would change nothing: {first.why}", first.expected,
                             _checked_fix(first, [blocked] if blocked else []))

    def for_plan(self, chosen) -> dict:
        """``backend_options`` holding only the settings that change something under ``chosen``: each artifact's share
        where one command takes several (``mmedge serve``, ``mmedge bench``)."""
        idle = {id(i.given) for i in self.idle_in(chosen)}
        return CliBackendOptions([g for g in self.given if id(g) not in idle]).as_dict()

    def check_used_by_some(self, plans: dict, blockers: dict | None = None) -> None:
        """For a command over several artifacts (``plans``: artifact name -> plan; ``blockers``: name -> ``blocker``'s
        check): InputError for a setting that would change nothing under every one of them."""
        for g in self.given:
            idle = [i for chosen in plans.values() for i in self.idle_in(chosen) if i.given is g]
            if len(idle) == len(plans):
                first = next((i for i in idle if i.fix != f"drop {g.option}"), idle[0])
                raise InputError(f"{g.flag} would change nothing for any artifact given ({', '.join(plans)}): "
                                 f"{idle[0].why}", f"{idle[0].expected}, for at least one artifact",
                                 _checked_fix(first, list((blockers or {}).values())))


def _checked_fix(idle: Idle, blockers: list) -> str:
    """``idle``'s fix, unless it suggests a --backend that ``blockers`` (each artifact's ``blocker`` check) say would
    refuse the setting for every artifact: then dropping the setting, and why."""
    given = idle.given
    if not blockers or not idle.fix.startswith(f"add --backend {given.backend}"):
        return idle.fix
    reasons = [blocked(given) for blocked in blockers]
    if any(reason is None for reason in reasons):
        return idle.fix
    return f"drop {given.option} ({reasons[0]})"


def _fields(backend: str) -> list[str]:
    return _backend(backend).settings_fields()


def flag_value(args, flag: str):
    """The value argparse stored for ``flag`` ("--openvino-weights" -> ``args.openvino_weights``); None where the
    command has no such flag."""
    return getattr(args, flag.lstrip("-").replace("-", "_"), None)


def _given_flag(flag: str, backend: str, setting: str, value) -> GivenSetting | None:
    return None if value is None else GivenSetting(backend, setting, value, f"{flag} {value}")


def parse_item(item: str) -> GivenSetting:
    """One ``BACKEND.SETTING=VALUE``: the backend and setting checked, the value read as the setting's type and
    judged by the setting's own checks."""
    flag = f"{FLAG} {item}"
    key, equals, text = item.partition("=")
    name, dot, setting = key.strip().partition(".")
    if not equals or not dot or not name or not setting:
        raise InputError(f"{flag} is not BACKEND.SETTING=VALUE", "e.g. --backend-option openvino.device=GPU",
                         "write the backend, a dot, the setting, '=' and its value")
    settings_class = _settings_class(name, flag)
    owner = _backend(name)
    by_name = {f.name: f for f in fields(settings_class)}
    if setting in owner.plan_owned:
        from mmedge.backends import PLAN_OWNED_FIX

        raise InputError(f"{flag}: '{setting}' is set by the plan, not by a backend option",
                         f"settings of {name} among {', '.join(owner.settings_fields())}",
                         PLAN_OWNED_FIX.get(setting, f"drop {FLAG} {key}"))
    if setting not in by_name:
        raise InputError(f"{flag}: {name} has no setting '{setting}'",
                         f"one of {', '.join(owner.settings_fields())}", "check the spelling")
    value = typed_value(text.strip(), str(by_name[setting].type), flag)
    try:
        settings_class(**{setting: value})  # the setting's own checks, before anything is loaded
    except MmedgeError as error:
        raise InputError(f"{flag}: {error.what}", _flag_words(error.expected, name),
                         _flag_words(error.fix, name)) from None
    except (TypeError, ValueError) as error:
        raise InputError(f"{flag}: {error}", f"a value {setting} takes ({by_name[setting].type})",
                         "check the value") from None
    return GivenSetting(name, setting, value, flag)


def _flag_words(text: str | None, backend: str) -> str | None:
    """A settings check's words for the Python API ("pass dtype='float16'", "None") as the flag takes them
    ("pass torch.dtype=float16", "none")."""
    if text is None:
        return None
    text = re.sub(r"\bdrop (\w+)", lambda m: f"drop {FLAG} {backend}.{m[1]}" if m[1] in _fields(backend) else m[0],
                  text)
    text = re.sub(r"\b(\w+)=None\b", rf"{backend}.\1=none", text)
    text = re.sub(r"\b(\w+)='([^']*)'", rf"{backend}.\1=\2", text)
    return re.sub(r"\bNone\b", "none", text)


def typed_value(text: str, annotation: str, flag: str):
    """``text`` read as a value of the dataclass field type ``annotation`` (its source text: ``"int | None"``)."""
    if not text:  # "torch.device=" read as no setting at all would be an option that does nothing
        raise InputError(f"{flag} has no value after '='", "a value, or none where the setting takes none",
                         f"write e.g. {FLAG} openvino.device=GPU")
    kinds = {kind.strip() for kind in annotation.replace("Optional[", "").rstrip("]").split("|")}
    lowered = text.lower()
    if "None" in kinds and lowered in _NONE:
        return None
    if "bool" in kinds and lowered in _TRUE + _FALSE:
        return lowered in _TRUE
    if "int" in kinds:
        try:
            return int(text)
        except ValueError:
            if not kinds & {"str", "Path"}:
                raise InputError(f"{flag}: '{text}' is not a whole number", f"a value of type {annotation}",
                                 "pass e.g. 0, 1, 256" + (" or none" if "None" in kinds else "")) from None
    if any(kind.startswith("dict") for kind in kinds):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise InputError(f"{flag}: '{text}' is not a JSON object", f"a value of type {annotation}",
                             "pass e.g. '{\"key\": \"value\"}' (quoted for the shell)") from None
        return value
    if kinds & {"str", "Path"}:
        return text
    words = {"bool": "true or false", "int": "a whole number", "None": "none"}
    raise InputError(f"{flag}: '{text}' is not a value of type {annotation}",
                     " or ".join(words.get(kind, kind) for kind in sorted(kinds)), "check the value")


def _backend(name: str):
    from mmedge.runtimes.registry import backend

    return backend(name)


def _settings_class(name: str, flag: str) -> type:
    """The settings dataclass of backend ``name``; a backend that takes none, or an unknown name, is refused."""
    from mmedge.runtimes.registry import BACKENDS

    if name not in BACKENDS:
        raise InputError(f"{flag} names backend '{name}'", f"one of {', '.join(_settable())}", "check the spelling")
    owner = _backend(name)
    try:
        settings_class = owner.settings
    except ImportError:
        owner.import_runner_module()  # BackendUnavailableError with the install command
        raise
    if settings_class is None:
        raise InputError(f"{flag}: backend '{name}' takes no settings", f"a setting of {', '.join(_settable())}",
                         f"drop {FLAG} {name}...")
    return settings_class


def _settable() -> list[str]:
    """The backends that take settings (read without importing their engines: ``settings`` is a property there)."""
    import inspect

    from mmedge.runtimes.registry import backends

    return [b.name for b in backends() if inspect.getattr_static(b, "settings") is not None]
