"""Backends: each wraps one engine behind ``mmedge.runner.Runner`` and imports that engine lazily."""

from mmedge.backends import BackendInfo
from mmedge.runtimes.registry import BACKENDS, backend, backends, create_runner, import_backend_module

__all__ = ["BACKENDS", "BackendInfo", "backend", "backends", "create_runner", "import_backend_module"]
