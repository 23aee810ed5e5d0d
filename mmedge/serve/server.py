"""Running the app under uvicorn: the port taken before the artifacts load, a ready line, and graceful stops.

SIGTERM (or Ctrl-C once) stops accepting connections, lets every request in flight finish (streams included: their
SSE responses are not cut; requests waiting in a queue get their turn), then closes the pipelines and exits 0. Requests
still running ``--drain-seconds`` (default ``DRAIN_SECONDS``) after the signal are cut off: uvicorn cancels them and
each is answered 503 ``shutting_down`` (a stream ends with an error event; ``app.InternalErrorMiddleware``), and the
server says how many as it exits 0. A second Ctrl-C cuts them off at once and exits 130; a second SIGTERM is said and
changes nothing (an orchestrator's SIGKILL comes after its grace period).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import socket
import sys

import uvicorn
from sse_starlette.sse import AppStatus

from mmedge.errors import MmedgeError
from mmedge.serve.app import create_app
from mmedge.serve.models import load_models
from mmedge.serve.options import API_KEY_ENV, KEEP_ALIVE_SECONDS, ServeOptions

BACKLOG = 2048  # connections the kernel holds until they are accepted (uvicorn's default)


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            again = "; Ctrl-C again to stop at once" if sig == signal.SIGINT else ""
            print(f"mmedge serve: {signal.Signals(sig).name}: finishing the requests in flight, then exiting "
                  f"(at most {self.config.timeout_graceful_shutdown:g} s{again})", file=sys.stderr, flush=True)
        elif sig == signal.SIGINT:  # uvicorn's force exit: it cancels the requests still running
            print("mmedge serve: SIGINT again: stopping now; the requests in flight are answered 503",
                  file=sys.stderr, flush=True)
        else:  # uvicorn takes a second SIGTERM as the first: the drain goes on
            print(f"mmedge serve: SIGTERM again: still finishing the requests in flight (at most "
                  f"{self.config.timeout_graceful_shutdown:g} s after the first signal; Ctrl-C stops at once)",
                  file=sys.stderr, flush=True)
        super().handle_exit(sig, frame)


class _DrainDeadline(logging.Filter):
    """uvicorn's own line when the drain deadline passes ("Cancel N running task(s), timeout graceful shutdown
    exceeded"): mmedge says it in its words instead, with the requests answered 503 counted (``serve``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "timeout graceful shutdown exceeded" not in record.getMessage()


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
        app = create_app(options, models)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=options.drain_seconds,
                                backlog=BACKLOG)
        AppStatus.disable_automatic_graceful_drain()  # sse-starlette would cut streams at SIGTERM; they finish instead
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in host else host
        print(f"mmedge serve: {len(models)} model{'s' if len(models) != 1 else ''} ({', '.join(models)}); "
              f"listening on http://{where}:{port}", flush=True)
        # uvicorn re-raises the signal it drained on once it is done: no-op handlers let the process exit 0 instead
        # (for Ctrl-C as for SIGTERM: one Ctrl-C is a graceful stop, not an interruption)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        server = _Server(config)
        deadline = _DrainDeadline()
        logging.getLogger("uvicorn.error").addFilter(deadline)
        try:
            server.run(sockets=[sock])  # serving starts here (connections made while loading waited in the backlog)
        finally:
            logging.getLogger("uvicorn.error").removeFilter(deadline)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        sock.close()
        for model in models.values():
            model.close()
    cut = app.state.serving.cut_off
    if server.force_exit:
        print(f"mmedge serve: stopped at a second Ctrl-C{_answered_503(cut)}", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT, as a shell reports an interrupted command
    if cut:
        print(f"mmedge serve: --drain-seconds {options.drain_seconds:g} passed{_answered_503(cut)}", file=sys.stderr,
              flush=True)
    print("mmedge serve: stopped", flush=True)
    return 0  # a graceful stop, as asked: the requests cut off were answered, and said above


def _answered_503(cut: int) -> str:
    return f"; {cut} request{'s' * (cut != 1)} still running answered 503 shutting_down" if cut else ""


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback  # an IPv6 address may carry a %scope
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to the address and listening (port 0: any free port), or an MmedgeError saying why not.

    It listens at once, before the artifacts load: with SO_REUSEADDR (set so that a restarted server need not wait
    for its old connections' TIME_WAIT, as uvicorn does), Linux lets two sockets bind one port as long as neither
    listens, so a second `mmedge serve` on a port whose first was still loading bound it too, loaded every model and
    only then failed. A client that connects while the artifacts load waits in the backlog until serving starts."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:  # the host is at fault, not the port
            raise MmedgeError(f"cannot listen on {host}:{port} (--host: {exc.strerror or exc})",
                              "an IP address or host name of this machine",
                              "check --host: 127.0.0.1 for this machine only, 0.0.0.0 for every network interface, "
                              "or an address `ip addr` lists") from None
        raise MmedgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                          "a free port on an address of this machine",
                          "pick another --port (0 takes any free one), or stop the process that holds it") from None
    return sock
