"""A real Triton Inference Server for the tests and the benchmark, from the ``nvidia-pytriton`` wheel.

The wheel bundles ``tritonserver`` 2.51 with its Python backend (a stub binary per Python version) and runs on a
CPU-only x86-64 machine. It has no ONNX Runtime backend, so the tests serve ``mmedge triton --platform python``
repositories (the components run through mmedge's own ONNX Runtime runner inside Python-backend models).

Why a separate environment for the server (``server_env``): the Python-backend stub embeds the Python it finds
first on PATH (``python3`` of ``PATH``; its ``pyvenv.cfg`` makes a venv's site-packages the stub's), and the stub was
built against the numpy 1.x C API: with numpy 2 its tensors came back empty. The test environment runs numpy 2
(as users do), and downgrading it would test everything else on the wrong numpy. So the fixture builds, once per
checkout and cached under ``~/.cache/mmedge/triton-server`` (``$MMEDGE_CACHE/triton-server``; a checkout's venv is
removed after two days unused once the checkout is gone or its pins changed: ``remove_abandoned``), a venv with
``numpy<2``, the same onnxruntime, tokenizers and Pillow versions as the test environment (so served results are
computed by the same kernels and the same image decoding as local ones), this checkout installed editable without
dependencies, and the server wheel. Building it needs PyPI once (about a minute); after that it works offline. The
stub also links ``libpython3.X.so``: the server gets the base interpreter's ``LIBDIR`` on ``LD_LIBRARY_PATH`` (a
pyenv Python keeps it there, not in the system library path).

``TritonServer`` starts ``tritonserver`` on free loopback ports (HTTP, gRPC; metrics off), waits until it is ready
and stops it (``terminate``, then ``kill``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 with the Python backend
# The server side's own pins: numpy 1.x for the stub, and the engines and decoders that compute results taken from
# the test environment itself, so server and local runs differ only in where they run.
MATCHED = ("onnxruntime", "tokenizers", "pillow")


class ServerUnavailable(RuntimeError):
    """The server cannot run on this machine (the message says why); tests skip with it."""


def cache_root() -> Path:
    base = os.environ.get("MMEDGE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mmedge") / "triton-server"


def requirements() -> list[str]:
    return ["numpy<2", "setuptools>=68", "wheel", *(f"{name}=={importlib.metadata.version(name)}" for name in MATCHED)]


def server_env(log=print) -> Path:
    """The server's venv (built on first use, see the module docstring)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ServerUnavailable(f"the nvidia-pytriton wheel ships tritonserver for Linux x86-64 only (this is "
                                f"{platform.system()} {platform.machine()})")
    key_text = json.dumps({"python": sys.version, "requirements": requirements(), "server": PYTRITON,
                           "root": str(ROOT)})
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    env = cache_root() / f"{_python_tag()}{key}"
    env.parent.mkdir(parents=True, exist_ok=True)
    if (env / "ready.json").is_file():
        os.utime(env / "ready.json")  # used now: remove_abandoned keeps it
        remove_abandoned(env.parent, keep=env)
        return env
    remove_abandoned(env.parent, keep=env)
    staging = Path(tempfile.mkdtemp(prefix=f".{env.name}.partial-", dir=env.parent))
    log(f"building the Triton server environment in {env} (once per checkout; needs PyPI)")
    try:
        _run([sys.executable, "-m", "venv", str(staging)])
        pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, *requirements()])
        _run([*pip, "--no-deps", PYTRITON])  # its own dependencies (client, zmq, ...) are not needed to serve
        _run([*pip, "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
        (staging / "ready.json").write_text(key_text)
        # a venv's interpreter finds its site-packages from pyvenv.cfg beside it, so the folder may be renamed (only
        # the console scripts' first lines name the staging folder; nothing here runs them)
        try:
            staging.rename(env)
        except OSError:  # another session built it meanwhile (a finished folder is only ever renamed into place)
            shutil.rmtree(staging, ignore_errors=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise ServerUnavailable(f"could not build the Triton server environment ({' '.join(exc.cmd[:6])}...): "
                                + " | ".join(tail)) from None
    return env


ABANDONED_AFTER_S = 2 * 24 * 3600  # a venv no run has used this long, that this checkout cannot use, is removed
PARTIAL_AFTER_S = 6 * 3600  # a venv's build takes at most 4 x 900 s: a staging folder this old was left by a killed one


def remove_abandoned(cache: Path, keep: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the venvs (about 400 MB each: one per checkout, Python and pinned versions) that no run has used for
    ``ABANDONED_AFTER_S`` and that this checkout would not use (``keep`` is the one it uses): their checkout is gone
    (a fresh clone's), or it is this one and the pins changed since (an upgrade of onnxruntime). The age spares a
    checkout this process cannot see (another container's CI sharing the cache) and another Python's. Also removes
    the staging folders of builds killed more than ``PARTIAL_AFTER_S`` ago."""
    now = time.time() if now is None else now
    removed = []
    for ready in cache.glob("py*-*/ready.json"):
        try:
            root = json.loads(ready.read_text()).get("root")
            idle = now - ready.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        mine_outdated = root == str(ROOT) and ready.parent.name.startswith(_python_tag()) and ready.parent != keep
        gone = isinstance(root, str) and not Path(root).is_dir()
        if ready.parent != keep and (gone or mine_outdated) and idle > ABANDONED_AFTER_S:
            shutil.rmtree(ready.parent, ignore_errors=True)
            removed.append(ready.parent)
    for staging in cache.glob(".py*-*.partial-*"):
        try:
            stale = now - staging.stat().st_mtime > PARTIAL_AFTER_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _python_tag() -> str:
    return f"py{sys.version_info[0]}{sys.version_info[1]}-"


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TritonServer:
    """``tritonserver`` over ``repository`` on free loopback ports: ``http_url`` ("127.0.0.1:PORT"), ``grpc_url``."""

    def __init__(self, repository: str | os.PathLike, env: Path, log_path: str | os.PathLike):
        self.repository = Path(repository)
        self.env = env
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _layout(self) -> tuple[Path, Path, dict]:
        """(tritonserver binary, backend folder with the stub for this Python, environment)."""
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        site = self.env / "lib" / f"python{version}" / "site-packages"
        dist = site / "pytriton" / "tritonserver"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerUnavailable(f"nvidia-pytriton has no Python-backend stub for Python {version}")
        backends = self.log_path.parent / "triton-backends"
        if not (backends / "python" / "triton_python_backend_stub").is_file():
            shutil.copytree(dist / "backends", backends, dirs_exist_ok=True)
            shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        base = Path(sys.base_prefix)
        libdir = sysconfig.get_config_var("LIBDIR") or str(base / "lib")
        environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        libraries = [str(site / "nvidia_pytriton.libs"), libdir, environ.get("LD_LIBRARY_PATH", "")]
        environ.update(LD_LIBRARY_PATH=":".join(p for p in libraries if p),
                       PATH=f"{self.env / 'bin'}:{environ.get('PATH', '')}",
                       PYTHONNOUSERSITE="1", OMP_NUM_THREADS=environ.get("OMP_NUM_THREADS", "1"))
        folders = (libdir, "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")
        if not any(Path(p, f"libpython{version}.so.1.0").exists() for p in folders):
            raise ServerUnavailable(f"the Python-backend stub needs libpython{version}.so.1.0, which this Python "
                                    "(built without --enable-shared) does not have: apt-get install "
                                    f"libpython{version}")
        return dist / "bin" / "tritonserver", backends, environ

    def start(self, timeout: float = 180.0) -> "TritonServer":
        binary, backends, environ = self._layout()
        self.http_port, self.grpc_port = _free_port(), _free_port()
        command = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--strict-readiness=true", "--exit-on-error=true",
                   "--exit-timeout-secs=5", "--log-verbose=0"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        return False

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)  # its own session: the Python-backend stubs go with it
            self.process.wait(timeout=30)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
