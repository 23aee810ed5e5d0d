"""Compiled OpenVINO models cached in the artifact's ``engines/`` folder, keyed like the TensorRT engines.

A compiled model (``CompiledModel.export_model()``) is only valid for the graph (the export's OpenVINO IR, where it
compiled that one), precision (and any weight compression: NNCF's version and settings), device and OpenVINO version
it was compiled with, so each blob has a record of that key and of its
bytes' sha256; a blob whose key or bytes differ is never imported, it is recompiled and replaced. Layout::

    engines/<component>-openvino-<key digest, 16 hex>.blob   the compiled model
    engines/<component>-openvino-<key digest, 16 hex>.record {"format": "mmedge.openvino-blob", "key": {...},
                                                              "blob_sha256": "...", "blob_bytes": n}  (JSON)

The record is not named ``*.json``: TensorRT's engine cache reads every ``<component>-*.json`` in the same folder as
one of its own engines (and would report these as stale TensorRT engines).

Writes go through a temporary file and ``os.replace`` (``mmedge.artifact.write_whole``): a process killed
mid-write leaves no blob that a later load would trust. The cache is optional: ``store`` raises OSError on read-only
or full storage, and the caller (``compile.compiled_model``) runs the compiled model uncached. Blobs the same load
compiled under older OpenVINO, mmedge or NNCF versions are removed (``remove_superseded``): each upgrade would
otherwise leave a dead copy of every compiled model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mmedge.artifact import write_whole
from mmedge.device_key import signature, signed_by_this_device
from mmedge.locks import remove_abandoned_temporaries
from mmedge.runtimes.engine_cache import _checked_component

FORMAT = "mmedge.openvino-blob"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class OvKey:
    """Everything a compiled model depends on."""

    onnx_sha256: str  # the component graph (the manifest's sha256)
    external_data_sha256: str  # its .onnx.data weights, "" if none
    precision: str  # the graph's precision, plus any weights OpenVINO compressed: "fp32", "int8", "fp32+nncf-int4"
    device: str  # OpenVINO's device name: CPU, GPU.0, NPU
    device_full_name: str
    openvino_version: str
    mmedge_version: str
    inference_precision: str  # the precision hint it was compiled under
    ir_sha256: str  # the export's OpenVINO IR it compiled (--openvino-weights): "<.xml sha256>+<.bin sha256>", or ""
    compression: dict  # NNCF's weight compression run at load (its version and arguments), or {}

    def digest(self) -> str:
        text = json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def differences(self, built: dict) -> list[str]:
        """Why a blob compiled under ``built`` (a stored key) cannot serve this key."""
        return [f"compiled with {name} {built.get(name)!r}; this load has {value!r}"
                for name, value in asdict(self).items() if built.get(name) != value]


# what a record's signature covers (mmedge.device_key): a compiled model is code OpenVINO runs as it finds it, which
# none of the ONNX graph's hashes covers, so only a blob this device's mmedge compiled is imported
SIGNED = ("component", "key", "blob_sha256")


class BlobCache:
    """One ``engines/`` folder's compiled OpenVINO models."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def paths(self, component: str, key: OvKey) -> tuple[Path, Path]:
        stem = f"{_checked_component(component)}-openvino-{key.digest()[:16]}"
        return self.folder / f"{stem}.blob", self.folder / f"{stem}.record"

    def load(self, component: str, key: OvKey) -> tuple[bytes | None, list[str]]:
        """(the blob's bytes, []) when a fresh one is cached; (None, reasons) otherwise (reasons empty: none yet)."""
        blob, record = self.paths(component, key)
        if not blob.is_file() or not record.is_file():
            others = sorted(self.folder.glob(f"{component}-openvino-*.record"))
            reasons = []
            for other in others:
                try:
                    reasons += self_differences(key, json.loads(other.read_text())["key"], other.name)
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    reasons.append(f"{other.name}: its record is unreadable")
            return None, reasons
        try:
            entry = json.loads(record.read_text())
            data = blob.read_bytes()
        except (OSError, ValueError):
            return None, [f"{record.name}: its record is unreadable"]
        if not isinstance(entry, dict) or not isinstance(entry.get("key") or {}, dict):
            return None, [f"{record.name}: its record is not one mmedge wrote"]
        if entry.get("format") != FORMAT or entry.get("format_version") != FORMAT_VERSION:
            return None, [f"{record.name}: format {entry.get('format')!r} version {entry.get('format_version')!r}"]
        differences = key.differences(entry.get("key") or {})
        if differences:
            return None, [f"{blob.name}: {d}" for d in differences]
        if hashlib.sha256(data).hexdigest() != entry.get("blob_sha256"):
            return None, [f"{blob.name}: its bytes differ from those recorded when it was compiled"]
        if not signed_by_this_device(entry, SIGNED, entry.get("blob_signature")):
            return None, [f"{blob.name}: not compiled by mmedge on this device (shipped with the artifact, copied from "
                          "another device, or cached by an older mmedge): compiled again"]
        return data, []

    def store(self, component: str, key: OvKey, data: bytes, extra: dict | None = None) -> Path:
        """Write the blob, then its record (``extra``: what else to record, e.g. the weight compression); OSError
        where storage is read-only or full, leaving no blob without its record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        blob, record = self.paths(component, key)
        entry = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": component, "key": asdict(key),
                 "blob_sha256": hashlib.sha256(data).hexdigest(), "blob_bytes": len(data), **(extra or {})}
        entry["blob_signature"] = signature(entry, SIGNED)  # None where this device keeps no key
        write_whole(blob, bytes(data))
        try:
            write_whole(record, (json.dumps(entry, indent=2) + "\n").encode())
        except OSError:
            with contextlib.suppress(OSError):
                blob.unlink()
            raise
        self.remove_superseded(component, key)
        remove_abandoned_temporaries(self.folder)  # what writers killed mid-write left
        return blob

    def remove_superseded(self, component: str, key: OvKey) -> list[Path]:
        """Delete the blobs (and records) of ``component`` compiled for what ``key`` is, by an older (or other)
        OpenVINO, mmedge or NNCF: no load here uses them again, and each upgrade would otherwise leave a dead copy
        of every compiled model. Blobs for other devices, precisions or graphs are kept. Called by ``store`` only (the
        first load after an upgrade compiles and stores): a load that finds its own blob removes nothing, so two
        services of different versions sharing one artifact do not delete each other's blob at every start. What
        cannot be removed (read-only media) stays. Returns what was removed."""
        removed = []
        for other in sorted(self.folder.glob(f"{_checked_component(component)}-openvino-*.record")):
            if other == self.paths(component, key)[1]:
                continue
            try:
                built = json.loads(other.read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed meanwhile, or not one of ours to judge
            if not isinstance(built, dict) or _unversioned(built) != _unversioned(asdict(key)):
                continue
            for path in (other.with_suffix(".blob"), other):
                try:
                    path.unlink()
                except OSError:  # another process removed it first; read-only media: kept
                    continue
                removed.append(path)
        return removed


_VERSIONS = ("openvino_version", "mmedge_version")
# fields later mmedge releases added to the key, with what a key written before them meant (an ONNX graph compiled
# as it is): such a blob is the same model as one stored now, so storing that one removes it
ADDED_FIELDS = {"ir_sha256": "", "compression": {}}


def older_key_fields(key: dict) -> list[str]:
    """The fields of this mmedge's key that a stored key lacks (written by an older mmedge): no load here reads
    its blob, whose name is the digest of a key without them."""
    return [name for name in OvKey.__dataclass_fields__ if name not in key]


def _unversioned(key: dict) -> dict:
    """A stored key without the versions of what compiled it (OpenVINO, mmedge, NNCF's in ``compression``), the
    fields an older mmedge did not write filled with what they meant then."""
    out = {name: value for name, value in {**ADDED_FIELDS, **key}.items() if name not in _VERSIONS}
    if isinstance(out.get("compression"), dict):
        out["compression"] = {name: value for name, value in out["compression"].items() if name != "nncf_version"}
    return out


def self_differences(key: OvKey, built: dict, name: str) -> list[str]:
    return [f"{name}: {d}" for d in key.differences(built)] or [f"{name}: another key"]
