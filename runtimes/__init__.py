"""Backends: each wraps one engine behind ``mmedge.runner.Runner`` and imports that engine lazily."""

from mmedge.runtimes.registry import BACKENDS, BackendInfo, create_runner, import_backend_module

__all__ = ["BACKENDS", "BackendInfo", "create_runner", "import_backend_module"]
