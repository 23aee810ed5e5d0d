"""Running the app under uvicorn: artifacts loaded before the port opens, a ready line, and SIGTERM draining.

SIGTERM (or Ctrl-C once) stops accepting connections, lets every request in flight finish (streams included: their
SSE responses are not cut), then closes the pipelines and exits 0; uvicorn gives up on requests still running after
``DRAIN_SECONDS``. A second Ctrl-C quits at once.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys

import uvicorn
from sse_starlette.sse import AppStatus

from mmedge.errors import MmedgeError
from mmedge.serve.app import create_app
from mmedge.serve.models import load_models
from mmedge.serve.options import API_KEY_ENV, DRAIN_SECONDS, KEEP_ALIVE_SECONDS, ServeOptions


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            print(f"mmedge serve: {signal.Signals(sig).name}: finishing the requests in flight, then exiting",
                  file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)


def serve(options: ServeOptions) -> int:
    sock = _bind(options.host, options.port)  # first: a taken port is reported before minutes of loading
    if options.api_key is None and not _loopback(sock.getsockname()[0]):
        print(f"mmedge serve: warning: --host {options.host} can be reached from other machines, and there is no "
              f"--api-key: anyone who can reach this port can use the models; pass --api-key KEY (or set "
              f"{API_KEY_ENV}), or bind 127.0.0.1", file=sys.stderr, flush=True)
    try:
        models = load_models(options)
    except BaseException:
        sock.close()
        raise
    try:
        config = uvicorn.Config(create_app(options, models), log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=DRAIN_SECONDS)
        AppStatus.disable_automatic_graceful_drain()  # sse-starlette would cut streams at SIGTERM; they finish instead
        sock.listen(config.backlog)  # before the address is printed: a client that reads it may connect at once
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        print(f"mmedge serve: {len(models)} model{'s' if len(models) != 1 else ''} ({', '.join(models)}); "
              f"listening on http://{where}:{port}", flush=True)
        # uvicorn re-raises the signal it drained on once it is done: a no-op handler lets the process exit 0 instead
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            _Server(config).run(sockets=[sock])  # serving starts here (listening only once the models are loaded)
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
        for model in models.values():
            model.close()
    print("mmedge serve: stopped", flush=True)
    return 0


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback  # an IPv6 address may carry a %scope
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to the address (port 0: any free port), or an MmedgeError saying why not."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise MmedgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                          "a free port on an address of this machine",
                          "pick another --port (0 takes any free one), or stop the process that holds it") from None
    return sock
