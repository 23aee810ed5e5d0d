"""The device room (mmedge, mmedge.runtimes) must import and run without torch installed."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import mmedge
import mmedge.runtimes
from tests.support.blocked_imports import blocking

# Runs in a fresh interpreter where importing torch or transformers raises ImportError.
PROBE = blocking("torch", "transformers", "tensorrt") + r"""
import importlib, pkgutil
import mmedge, mmedge.runtimes
names = []
for pkg in (mmedge, mmedge.runtimes):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.startswith("mmedge.export") or info.name.endswith(".__main__"):  # __main__ runs the CLI
            continue
        importlib.import_module(info.name)
        names.append(info.name)
import mmedge.device
mmedge.device.probe()
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules), "torch was imported"
print(len(names))
"""


def test_device_modules_import_without_torch():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            cwd=Path(mmedge.__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    expected = sum(1
                   for pkg in (mmedge, mmedge.runtimes) for i in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                   if not i.name.startswith("mmedge.export") and not i.name.endswith(".__main__"))
    assert int(result.stdout.strip()) == expected >= 10


def test_device_room_has_no_module_level_host_imports():
    """mmedge/ and runtimes/ never import torch, transformers or mmedge.export at module level."""
    root = Path(mmedge.__file__).parent.parent
    for folder in ("mmedge", "runtimes"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] not in ("torch", "transformers"), f"{path}: import {name}"
                    assert not name.startswith("mmedge.export"), f"{path}: import {name}"
