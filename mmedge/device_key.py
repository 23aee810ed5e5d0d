"""This user's mmedge folder on this device, and a secret kept there that signs what this device compiled.

A compiled model in an artifact's ``engines/`` (OpenVINO's blobs) is code the engine runs as it finds it; none of the
ONNX graph's hashes covers it, and its record, key and sha256 are whatever the artifact's author wrote when the folder
is shipped. So a record also carries an HMAC, under this device's key, of what was compiled: a blob this user's
mmedge compiled here is imported wherever the folder is copied on this device; one from anywhere else is compiled
again. Where the key cannot be kept (a read-only home), nothing is signed and every load compiles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

KEY_FILE = "device-key"


def user_cache() -> Path:
    """``$MMEDGE_CACHE`` if set, else ``$XDG_CACHE_HOME/mmedge``, else ``~/.cache/mmedge``."""
    if os.environ.get("MMEDGE_CACHE"):
        return Path(os.environ["MMEDGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmedge"


def device_key() -> bytes | None:
    """32 random bytes kept in ``user_cache()/device-key`` (made once, readable by this user only), or None where
    the folder cannot be written or read."""
    path = user_cache() / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        try:
            return _read(path)
        except OSError:
            return None
    except OSError:
        return None
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return _read(path)


def _read(path: Path) -> bytes | None:
    key = path.read_bytes()
    return key if len(key) == 32 else None  # a key being written by another process, or damaged: none


def signature(entry: dict, fields: tuple[str, ...]) -> str | None:
    """HMAC-SHA256 (hex) under this device's key of a record's ``fields`` (canonical JSON), or None without a key."""
    key = device_key()
    text = json.dumps({name: entry.get(name) for name in fields}, sort_keys=True)
    return None if key is None else hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def signed_by_this_device(entry: dict, fields: tuple[str, ...], recorded) -> bool:
    """Whether ``recorded`` is this device's signature of the record's ``fields``."""
    expected = signature(entry, fields)
    return expected is not None and isinstance(recorded, str) and hmac.compare_digest(expected, recorded)


__all__ = ["device_key", "signature", "signed_by_this_device", "user_cache"]
