"""``mmedge serve``: one device as an HTTP service, on a maintained ASGI stack (Starlette, uvicorn, sse-starlette,
prometheus_client; ``pip install "mmedge[serve]"``).

    mmedge serve ARTIFACT [ARTIFACT ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--workers N] [--max-queue N]

Each artifact is loaded once with ``mmedge.load`` (the backend chosen as ``load`` chooses) and served under its folder
name as the model id:

- ``POST /v1/chat/completions`` (BLIP-2, IDEFICS): OpenAI's chat format with images as data-URI ``image_url`` parts,
  streamed as server-sent events in OpenAI's chunk format with ``stream: true`` (``chat.py``);
- ``POST /v1/embeddings`` and ``POST /v1/classify`` (CLIP; ``clip.py``); ``GET /v1/models``, ``GET /health``,
  ``GET /metrics`` (Prometheus); a web page at ``/`` (``static/``).

The package's modules: ``options`` (settings and limits), ``errors`` (OpenAI's error shape), ``inputs`` (request
fields and images), ``models`` (the loaded artifacts), ``queue`` (each artifact's requests: running, waiting), ``chat``,
``clip``, ``metrics``, ``app`` (routes), ``server`` (uvicorn, signals). This module only adds the CLI command and
imports
none of the serve extra's packages, so ``mmedge --help`` works without them.
"""

from __future__ import annotations

import importlib.util

from mmedge.errors import MmedgeError

REQUIRED = ("starlette", "uvicorn", "sse_starlette", "prometheus_client")


def require_extra() -> None:
    """Raise an MmedgeError naming ``pip install "mmedge[serve]"`` when a package of the serve extra is absent."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise MmedgeError(f"`mmedge serve` needs the serve extra ({', '.join(missing)} not installed)",
                          "starlette, uvicorn, sse-starlette and prometheus-client installed",
                          'pip install "mmedge[serve]"')


def main(args) -> int:
    """The CLI command (see ``mmedge serve --help``)."""
    require_extra()
    from mmedge.serve.options import ServeOptions
    from mmedge.serve.server import serve

    return serve(ServeOptions.from_args(args))


def add_parser(sub) -> None:
    from mmedge.serve.options import add_arguments

    serve = sub.add_parser("serve", help="serve artifacts over HTTP: OpenAI-compatible API, metrics, a web page "
                                         "(needs mmedge[serve])")
    add_arguments(serve)
    serve.set_defaults(func=main)
