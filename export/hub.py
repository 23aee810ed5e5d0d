"""Reaching the Hugging Face hub for a hub id: at once, quietly, or not at all.

Offline, transformers would retry each request with backoff for half a minute, printing a line per try, before
failing. mmedge first checks in a few seconds whether the hub (``$HF_ENDPOINT``, through the proxy the environment
names) answers HTTP at all: if not, a model in the local Hugging Face cache is loaded from there without any
request, and any other one is refused at once with one line.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import urllib.error
import urllib.request

from mmedge.errors import ModelLoadError

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _offline_by_choice() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=8)
def unreachable(url: str) -> str | None:
    """Why ``url`` gives no HTTP answer within the timeout (through the environment's proxy, as the hub client would
    go); None if it answers at all, whatever the status: then the hub client takes over."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "mmedge"})
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # an HTTP status is an answer
    except ssl.SSLError:
        return None  # it answered; certificates are the hub client's business (it has its own store)
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLError):
            return None
        return str(getattr(reason, "strerror", None) or reason)
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a peer that hangs up
        return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)


def _cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def mistyped_path_hint(model: str) -> str:
    """A note for a hub id that fails while its first part names a local folder ('bad/missing' beside 'bad/'): it
    may be a mistyped path (read as a hub id, as transformers reads it)."""
    first = os.path.normpath(model).split(os.sep)[0]
    return f" ('{model}' is no local folder, though '{first}' is: a mistyped path?)" if os.path.isdir(first) else ""


def hub_options(model: str) -> dict:
    """Keyword arguments for transformers' ``from_pretrained`` of the hub id ``model``: none when the hub answers,
    ``local_files_only`` when it cannot be reached (or HF_HUB_OFFLINE is set) and the model is cached; otherwise a
    ModelLoadError, without a single request."""
    why = "HF_HUB_OFFLINE is set" if _offline_by_choice() else unreachable(endpoint())
    if why is None:
        return {}
    if _cached(model):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"cannot fetch '{model}': the Hugging Face hub at {endpoint()} cannot be reached ({why}) and the model is not "
        f"in the local Hugging Face cache{mistyped_path_hint(model)}",
        "network access to the hub, or a local checkpoint folder (config.json + *.safetensors)",
        "download it where there is network (save_pretrained) and pass the folder, check HF_ENDPOINT and proxy "
        "settings, or export a bundled config offline with --random-weights (names: mmedge export --help)",
    )
