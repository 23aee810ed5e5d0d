"""The device-local engine cache: which built engine (a TensorRT plan) may be reused, and which is stale.

A TensorRT engine is only valid for the graph, precision and shape profile it was built from, and for
the TensorRT version and GPU it was built with. One from another device or TensorRT version fails to
deserialize at best and misbehaves at worst, so an engine is never handed to TensorRT on trust: its
key is compared first, its record must be signed by mmedge on this device (``mmedge.device_key``: a plan shipped with
the artifact, whose record its author wrote, is built again), and its bytes are checked against the sha256 recorded
when it was stored.
Nothing here imports tensorrt; the backend that builds engines passes in what it knows.

Layout, under the artifact's ``engines/`` folder (never shipped)::

    <component>-<key digest, 16 hex>.plan    the engine bytes
    <component>-<key digest, 16 hex>.json    {"format": "mmedge.engine", "format_version": 1,
                                              "key": {...}, "plan_sha256": "...", "plan_bytes": n}

How a backend uses it::

    key = EngineKey.create(onnx_sha256=component["sha256"], precision="fp16",
                           profile={"pixel_values": ([1, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224])},
                           tensorrt_version=tensorrt.__version__, gpu_name=name, compute_capability="8.7",
                           external_data_sha256=component["external_data"]["sha256"],  # optional
                           mmedge_version=mmedge.__version__)  # optional
    cache = EngineCache(artifact.engines_dir())
    found = cache.lookup("vision", key)
    plan = cache.load("vision", key) if found.fresh else cache.store("vision", key, build_engine(...))
    # found.reasons says why an engine was rebuilt: "built for GPU 'Orin' (sm 8.7); this device has ..."

``store`` writes through temporary files and ``os.replace``: a process killed mid-write leaves either
the old engine or a plan whose sha256 differs from its record, which ``lookup`` reports as stale.

Several processes share one folder (services on one device): ``obtain_plan`` holds a lock file per component
(``.<component>.engine.lock``) around its lookup, build and store, so one process builds while the others wait and
then load what it built. Engines of the component for other shape profiles or precisions (another service's) are
kept; only those no load here can use again (another TensorRT, GPU, graph or mmedge version) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from mmedge import locks
from mmedge.artifact import write_whole
from mmedge.device_key import signature, signed_by_this_device
from mmedge.errors import InputError, StaleEngineError
from mmedge.locks import remove_abandoned_temporaries
from mmedge.runtimes.tensorrt_planning import MIB, ProfileLimits

FORMAT = "mmedge.engine"
FORMAT_VERSION = 1
PLAN_SUFFIX = ".plan"
RECORD_SUFFIX = ".json"

Shape = tuple[int, ...]
_CHANGED = "its bytes differ from those recorded when it was built (truncated or replaced)"
_VANISHED = "its files were removed while they were read"
# an engine is code TensorRT runs as it finds it: only one mmedge built on this device is used (mmedge.device_key)
_FOREIGN = ("it was not built by mmedge on this device (shipped with the artifact, copied from another device, or "
            "built by an older mmedge)")
# the key fields an engine outlives: another value is obsolete (an upgrade, another graph), not another service's
_SUPERSEDING = ("onnx_sha256", "external_data_sha256", "tensorrt_version", "gpu_name", "compute_capability",
                "mmedge_version")


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on. Two engines are interchangeable only if their keys are equal."""

    onnx_sha256: str  # the component graph the engine was built from (the manifest's sha256)
    precision: str  # e.g. "fp32", "fp16", "int8"
    profile: tuple[tuple[str, Shape, Shape, Shape], ...]  # (input, min, opt, max), sorted by input name
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    external_data_sha256: str = ""  # the graph's .onnx.data weights (manifest external_data.sha256); "" if none
    mmedge_version: str = ""  # the mmedge that built it: a new release may build differently

    @classmethod
    def create(cls, *, onnx_sha256: str, precision: str, profile: Mapping[str, Sequence[Sequence[int]]],
               tensorrt_version: str, gpu_name: str, compute_capability: str,
               external_data_sha256: str | None = None, mmedge_version: str | None = None) -> "EngineKey":
        """A checked key; ``profile`` maps each dynamic input to its (min, opt, max) shapes."""
        for name, value in (("onnx_sha256", onnx_sha256), ("external_data_sha256", external_data_sha256 or "0" * 64)):
            if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
                raise InputError(f"{name} is {value!r:.80}", "64 lowercase hex digits (the manifest's sha256)",
                                 "pass the component's sha256 from manifest.json")
        if mmedge_version is not None and not isinstance(mmedge_version, str):
            raise InputError(f"engine key field mmedge_version is {mmedge_version!r:.80}", "a string or None",
                             "pass mmedge.__version__")
        for name, value in (("precision", precision), ("tensorrt_version", tensorrt_version),
                            ("gpu_name", gpu_name), ("compute_capability", compute_capability)):
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"engine key field {name} is {value!r:.80}", "a non-empty string",
                                 f"pass {name} as the engine and device report it")
        return cls(onnx_sha256, precision, _checked_profile(profile), tensorrt_version, gpu_name, compute_capability,
                   external_data_sha256 or "", mmedge_version or "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["profile"] = [[name, list(lo), list(opt), list(hi)] for name, lo, opt, hi in self.profile]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "EngineKey":
        """The key stored in a record; InputError if it is malformed."""
        try:
            profile = {entry[0]: entry[1:] for entry in data["profile"]}
            return cls.create(onnx_sha256=data["onnx_sha256"], precision=data["precision"], profile=profile,
                              tensorrt_version=data["tensorrt_version"], gpu_name=data["gpu_name"],
                              compute_capability=data["compute_capability"],
                              external_data_sha256=data.get("external_data_sha256") or None,
                              mmedge_version=data.get("mmedge_version") or None)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise InputError(f"engine key is malformed ({type(exc).__name__}: {exc})",
                             "a key written by EngineCache.store",
                             "delete the engines/ folder; engines are rebuilt on this device") from None

    def digest(self) -> str:
        """sha256 of the canonical JSON of the key (and of the cache format version)."""
        text = json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def superseded(self, built: "EngineKey") -> bool:
        """Whether an engine built under ``built`` can serve no load of this graph here any more: built by another
        TensorRT, GPU, graph, weights or mmedge version. One for another shape profile or precision is another
        service's engine, not superseded."""
        return any(getattr(built, name) != getattr(self, name) for name in _SUPERSEDING)

    def differences(self, built: "EngineKey") -> list[str]:
        """Why an engine built under ``built`` cannot serve this key, one phrase per differing field."""
        out = []
        if (built.gpu_name, built.compute_capability) != (self.gpu_name, self.compute_capability):
            out.append(f"built for GPU '{built.gpu_name}' (sm {built.compute_capability}); this device has "
                       f"'{self.gpu_name}' (sm {self.compute_capability})")
        if built.tensorrt_version != self.tensorrt_version:
            out.append(f"built with TensorRT {built.tensorrt_version}; this device has TensorRT "
                       f"{self.tensorrt_version}")
        if built.onnx_sha256 != self.onnx_sha256:
            out.append(f"built from another graph (sha256 {built.onnx_sha256[:12]}…; the artifact's is "
                       f"{self.onnx_sha256[:12]}…)")
        if built.external_data_sha256 != self.external_data_sha256:
            out.append(f"built from other external weights (sha256 {built.external_data_sha256[:12] or 'none'}…; "
                       f"the artifact's are {self.external_data_sha256[:12] or 'none'}…)")
        if built.mmedge_version != self.mmedge_version:
            out.append(f"built by mmedge {built.mmedge_version or 'unknown'}; this is mmedge "
                       f"{self.mmedge_version or 'unknown'}")
        if built.precision != self.precision:
            out.append(f"built at precision {built.precision}; {self.precision} is asked for")
        if built.profile != self.profile:
            out.append(f"built for shape profile {_profile_text(built.profile)}; {_profile_text(self.profile)} "
                       "is asked for")
        return out


@dataclass
class EngineLookup:
    """What the cache holds for one component and key.

    ``status``: "fresh" (``plan`` may be loaded), "stale" (this key's engine is damaged, or engines that no load
    here can use any more exist: ``reasons`` says why, ``stale`` lists their plan files) or "missing" (nothing was
    built for this key yet; engines of other shape profiles or precisions may be there, and are kept).
    """

    status: str
    plan: Path | None = None
    reasons: list[str] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return self.status == "fresh"


class EngineCache:
    """One ``engines/`` folder. Lookups read only; ``store`` and ``remove_stale`` write."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def paths(self, component: str, key: EngineKey) -> tuple[Path, Path]:
        """(plan, record) file paths of ``component`` under ``key``."""
        stem = f"{_checked_component(component)}-{key.digest()[:16]}"
        return self.folder / f"{stem}{PLAN_SUFFIX}", self.folder / f"{stem}{RECORD_SUFFIX}"

    def lookup(self, component: str, key: EngineKey, *, check_bytes: bool = True) -> EngineLookup:
        """Fresh, stale (with the reasons) or missing. A fresh answer has had the plan's size checked and,
        with ``check_bytes``, its sha256 (``load`` checks the bytes it reads instead)."""
        plan, record = self.paths(component, key)
        if plan.exists() or record.exists():
            reasons = self._problems(plan, record, key, check_bytes)
            if not reasons:
                return EngineLookup("fresh", plan)
            found = EngineLookup("stale", None, [f"{plan.name}: {r}" for r in reasons], [plan])
        else:
            found = EngineLookup("missing")
        for other in sorted(self.folder.glob(f"{_checked_component(component)}-*{RECORD_SUFFIX}")):
            if other == record:
                continue
            built = _read_key(other)
            if built is None and not other.exists():  # removed by another process meanwhile
                continue
            if built is not None and built != key and not key.superseded(built):
                continue  # another service's shape profile or precision: valid, kept
            why = (["its record is unreadable"] if built is None
                   else key.differences(built) or ["its record names another file"])
            found.status = "stale"
            found.stale.append(other.with_suffix(PLAN_SUFFIX))
            found.reasons += [f"{other.with_suffix(PLAN_SUFFIX).name}: {r}" for r in why]
        return found

    def load(self, component: str, key: EngineKey) -> bytes:
        """The plan's bytes if a fresh engine is cached; StaleEngineError (never a foreign engine) otherwise."""
        found = self.lookup(component, key, check_bytes=False)
        plan = found.plan if found.fresh else None
        if plan is not None:
            try:
                data = plan.read_bytes()
                recorded = json.loads(self.paths(component, key)[1].read_text())["plan_sha256"]
            except OSError:  # removed by another process since the lookup
                found = EngineLookup("stale", None, [f"{plan.name}: {_VANISHED}"], [plan])
            except (ValueError, KeyError, TypeError):
                found = EngineLookup("stale", None, [f"{plan.name}: its record is unreadable"], [plan])
            else:
                if hashlib.sha256(data).hexdigest() == recorded:
                    return data
                found = EngineLookup("stale", None, [f"{plan.name}: {_CHANGED}"], [plan])
        if found.status == "missing":
            what = f"no engine for component '{component}' has been built on this device yet"
        else:
            what = f"the cached engine for component '{component}' cannot be used here ({'; '.join(found.reasons)})"
        raise StaleEngineError(what, "an engine built from this graph, precision and shape profile with this "
                               "TensorRT version on this GPU", "build the engine on this device (mmedge rebuilds stale "
                               "engines); engines/ is a device-local cache, never copy it between devices")

    def store(self, component: str, key: EngineKey, plan_bytes: bytes) -> bytes:
        """Write the plan, then its record, each through a temporary file and ``os.replace``; return the bytes."""
        if not isinstance(plan_bytes, (bytes, bytearray, memoryview)) or not len(plan_bytes):
            raise InputError("the engine to store is empty or not bytes", "the serialized engine (non-empty bytes)",
                             "pass engine.serialize() as bytes")
        plan_bytes = bytes(plan_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        plan, record = self.paths(component, key)
        entry = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": component, "key": key.to_dict(),
                 "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(), "plan_bytes": len(plan_bytes)}
        entry["plan_signature"] = signature(entry, SIGNED)  # None where this device keeps no key
        write_whole(plan, plan_bytes)
        write_whole(record, (json.dumps(entry, indent=2) + "\n").encode())
        remove_abandoned_temporaries(self.folder)  # what writers killed mid-write left
        return plan_bytes

    def remove_stale(self, component: str, key: EngineKey) -> list[Path]:
        """Delete the stale engines of ``component`` (those ``lookup`` reports); return what was removed. Another
        process removing the same engine at once is no error: what it removed first is not listed."""
        removed = []
        for plan in self.lookup(component, key).stale:
            for path in (plan, plan.with_suffix(RECORD_SUFFIX)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path)
        return removed

    @contextlib.contextmanager
    def locked(self, component: str) -> Iterator[None]:
        """The lock ``obtain_plan`` holds for ``component``: one process looks up, builds and stores its engines at a
        time; the others wait (where the folder cannot be made or written, nothing is locked)."""
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
        with locks.locked(self.folder / f"{_checked_component(component)}.engine"):
            yield

    @staticmethod
    def _problems(plan: Path, record: Path, key: EngineKey, check_bytes: bool) -> list[str]:
        if not record.is_file():
            return ["it has no record of what it was built for"]
        if not plan.is_file():
            return ["its record names a plan file that is missing"]
        try:
            entry = json.loads(record.read_text())
            built = EngineKey.from_dict(entry["key"])
            sha, size = entry["plan_sha256"], entry["plan_bytes"]
            if entry.get("format") != FORMAT or entry.get("format_version") != FORMAT_VERSION:
                return [f"its record has format {entry.get('format')!r} version {entry.get('format_version')!r}"]
        except (OSError, ValueError, KeyError, TypeError, InputError):
            return ["its record is unreadable"]
        reasons = key.differences(built)
        if reasons:
            return reasons
        if not signed_by_this_device(entry, SIGNED, entry.get("plan_signature")):
            return [_FOREIGN]
        try:
            if plan.stat().st_size != size or (check_bytes and _sha256(plan) != sha):
                return [_CHANGED]
        except OSError:  # removed by another process while it was checked
            return [_VANISHED]
        return []


# --- helpers ---------------------------------------------------------------------------------------
SIGNED = ("component", "key", "plan_sha256")  # what a record's signature covers (mmedge.device_key)


def _checked_profile(profile: Mapping[str, Sequence[Sequence[int]]]) -> tuple[tuple[str, Shape, Shape, Shape], ...]:
    expected = ("a mapping of input name to (min, opt, max) shapes of equal rank, 0 <= min <= opt <= max per axis "
                "and max > 0 (a min of 0 is an empty tensor, e.g. no past tokens yet)")
    if not isinstance(profile, Mapping):
        raise InputError(f"the shape profile is a {type(profile).__name__}", expected, "pass e.g. "
                         "{'pixel_values': ([1, 3, 224, 224], [4, 3, 224, 224], [8, 3, 224, 224])}")
    out = []
    for name, shapes in sorted(profile.items(), key=lambda item: str(item[0])):
        try:
            lo, opt, hi = (tuple(int(d) for d in shape) for shape in shapes)
        except (TypeError, ValueError):
            raise InputError(f"the shape profile of input {name!r} is {shapes!r:.80}", expected,
                             "give three shapes: min, opt and max") from None
        ok = isinstance(name, str) and len(lo) == len(opt) == len(hi) and all(
            0 <= a <= b <= c and c > 0 for a, b, c in zip(lo, opt, hi))
        if not ok:
            raise InputError(f"the shape profile of input {name!r} is {shapes!r:.80}", expected,
                             "give three shapes of equal rank with non-negative sizes, min <= opt <= max, max > 0")
        out.append((name, lo, opt, hi))
    return tuple(out)


def _checked_component(name: str) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_." for c in name) or name.startswith("."):
        raise InputError(f"component name {name!r:.80} cannot name an engine file",
                         "a manifest component name (letters, digits, '_', '.')", "pass the component's name")
    return name


def _profile_text(profile) -> str:
    return ", ".join(f"{name} {list(lo)}..{list(hi)} (opt {list(opt)})" for name, lo, opt, hi in profile) or "none"


def _read_key(record: Path) -> EngineKey | None:
    try:
        return EngineKey.from_dict(json.loads(record.read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the engine cache ------------------------------------------------------------------------------
def engine_key(component: Mapping, precision: str, profile: Mapping, *, tensorrt_version: str, gpu_name: str,
               compute_capability: str) -> EngineKey:
    """The cache key of a component's engine: graph and weight hashes from the manifest, precision, profile,
    TensorRT version, GPU, and the mmedge version."""
    from mmedge import __version__

    external = component.get("external_data") or {}
    return EngineKey.create(onnx_sha256=component["sha256"], precision=precision, profile=profile,
                            tensorrt_version=tensorrt_version, gpu_name=gpu_name, compute_capability=compute_capability,
                            external_data_sha256=external.get("sha256"), mmedge_version=__version__)


@dataclass
class EngineOutcome:
    """What ``obtain_plan`` did: "loaded" a fresh engine, "built" a first one, or "rebuilt" over stale ones
    (``reasons`` says why each was refused)."""

    action: str
    plan: bytes = field(repr=False)
    path: Path
    reasons: list[str] = field(default_factory=list)


def obtain_plan(cache: EngineCache, component: str, key: EngineKey, build: Callable[[], bytes], *,
                allow_build: bool = True, force: bool = False) -> EngineOutcome:
    """The engine bytes for ``key``: the cached plan when it is fresh (its key and sha256 match), else ``build()``,
    stored in the cache. Stale and foreign engines are deleted and rebuilt; their bytes are never returned, so
    never reach TensorRT. With ``allow_build=False`` a missing or stale engine raises StaleEngineError.

    The component's lock (``EngineCache.locked``) is held throughout: processes starting at once build one engine
    (not one each, which on a Jetson can run out of memory), the others wait and load it, and a plan is never
    written over by another process between its write and its record's."""
    with cache.locked(component):
        found = cache.lookup(component, key)
        if found.fresh and not force:
            try:
                return EngineOutcome("loaded", cache.load(component, key), cache.paths(component, key)[0])
            except StaleEngineError as exc:  # changed on disk between lookup and read (by a process not locking)
                found = cache.lookup(component, key)
                found.reasons = found.reasons or [exc.what]
        if not allow_build:
            cache.load(component, key)  # raises StaleEngineError with the reasons
        reasons = list(found.reasons)
        if force:
            for path in cache.paths(component, key):
                path.unlink(missing_ok=True)
            reasons.append("a rebuild was requested")
        cache.remove_stale(component, key)
        plan = cache.store(component, key, build())
        action = "rebuilt" if found.status == "stale" or force else "built"
        return EngineOutcome(action, plan, cache.paths(component, key)[0], reasons)


def timing_cache_path(engines_dir: Path, tensorrt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """One timing cache per TensorRT version and GPU: kernel timings from one never steer a build on another."""
    digest = hashlib.sha256(f"{tensorrt_version}|{gpu_name}|{compute_capability}".encode()).hexdigest()[:16]
    return Path(engines_dir) / f"timing-{digest}.cache"


@dataclass
class EngineSettings:
    """How a component's engine is built; ``None`` fields take the device's defaults
    (``tensorrt_planning.tensorrt_defaults``)."""

    precision: str | None = None
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    workspace_mb: int | None = None
    device_id: int = 0


BUILD_SETTINGS = "build.json"  # under engines/: the limits `mmedge build` used, so later loads look up the same engines
_SETTING_FIELDS = ("precision", "max_batch", "opt_batch", "max_sequence", "max_images", "workspace_mb")


def save_build_settings(engines_dir: Path, settings: EngineSettings) -> Path:
    """Record the limits and precision engines were prebuilt with: ``mmedge.load`` then keys its engines the same
    way."""
    limits = settings.limits
    data = {"format": "mmedge.engine-settings", "format_version": 1, "precision": settings.precision,
            "max_batch": limits.max_batch, "opt_batch": limits.opt_batch, "max_sequence": limits.max_sequence,
            "max_images": limits.max_images, "workspace_mb": settings.workspace_mb}
    path = Path(engines_dir) / BUILD_SETTINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, (json.dumps(data, indent=2) + "\n").encode())
    return path


def load_build_settings(engines_dir: Path) -> dict:
    """The settings ``save_build_settings`` recorded ({} when there are none or they are unreadable: defaults apply)."""
    try:
        data = json.loads((Path(engines_dir) / BUILD_SETTINGS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != "mmedge.engine-settings" or data.get("format_version") != 1:
        return {}
    out = {}
    for name in _SETTING_FIELDS:
        value = data.get(name)
        if name == "precision":
            if value in (None, "fp32", "fp16", "int8"):
                out[name] = value
        elif value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            out[name] = value
    return out


def describe_engines(engines_dir: Path) -> list[str]:
    """One line per engine cached under ``engines_dir``: what it was built for, read from its record (nothing is
    loaded)."""
    from mmedge.tuning import TIMINGS_FILE

    lines = []
    for record in sorted(Path(engines_dir).glob("*.json")):
        if record.name in (BUILD_SETTINGS, TIMINGS_FILE):  # not engines: build defaults, `mmedge tune`'s timings
            continue
        try:
            entry = json.loads(record.read_text())
            key = EngineKey.from_dict(entry["key"])
        except (OSError, ValueError, KeyError, TypeError, InputError):
            lines.append(f"{record.stem}: unreadable record (rebuilt when needed)")
            continue
        lines.append(f"{record.stem}: {key.precision}, GPU '{key.gpu_name}' (sm {key.compute_capability}), TensorRT "
                     f"{key.tensorrt_version}, mmedge {key.mmedge_version or '?'}, "
                     f"{entry.get('plan_bytes', 0) / MIB:.1f} MiB")
    return lines


__all__ = ["EngineCache", "EngineKey", "EngineLookup"]
