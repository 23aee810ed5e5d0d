"""Real `mmedge serve` processes for the serve tests: started on a free loopback port (``--port 0``; the server prints
the port it got), stopped with SIGTERM, their output kept for the assertions."""

from __future__ import annotations

import base64
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent
READY = re.compile(r"listening on (http://\S+)")
API_KEY = "test-key-3f9a"


def data_uri(path: str | Path) -> str:
    kind = Path(path).suffix.lstrip(".").replace("jpg", "jpeg")
    return f"data:image/{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


class Server:
    """``mmedge serve ARTIFACT... --port 0 FLAGS``, ready once it printed its address and /health answers."""

    def __init__(self, artifacts: list, *flags: str, launcher: list[str] | None = None, timeout: float = 120):
        """``launcher``: the command that stands for `mmedge` (default: ``python -m mmedge.cli``)."""
        command = [*(launcher or [sys.executable, "-m", "mmedge.cli"]), "serve", *map(str, artifacts), "--port", "0",
                   *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MMEDGE_API_KEY", None)
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        lines: queue.Queue = queue.Queue()
        for stream, kept, forward in ((self.process.stdout, self.stdout, lines),
                                      (self.process.stderr, self.stderr, None)):
            threading.Thread(target=_pump, args=(stream, kept, forward), daemon=True).start()
        self.url = self._wait_ready(lines, timeout)

    def _wait_ready(self, lines: queue.Queue, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            found = READY.search(line)
            if found:
                url = found.group(1)
                httpx.get(f"{url}/health", timeout=30).raise_for_status()
                return url
        self.process.kill()
        raise RuntimeError(f"mmedge serve did not start (exit {self.process.wait()}): {''.join(self.stderr)[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code once it has drained."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def text(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the server's /metrics, read with prometheus_client's own parser (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, timeout: float = 60, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def raw_post(url: str, path: str, body: dict, headers: dict | None = None):
    """A request written on a plain socket and not read: the test decides when this client goes away (close())."""
    import json
    import socket

    parsed = httpx.URL(url)
    sock = socket.create_connection((parsed.host, parsed.port), timeout=60)
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {parsed.host}", "Content-Type: application/json",
             f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    return sock


def _pump(stream, kept: list, forward: queue.Queue | None) -> None:
    for line in stream:
        kept.append(line)
        if forward is not None:
            forward.put(line)
