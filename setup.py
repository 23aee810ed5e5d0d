"""The package list, derived: every package under the three rooms (``mmedge/``, ``export/`` as ``mmedge.export``,
``runtimes/`` as ``mmedge.runtimes``; the mapping is ``[tool.setuptools] package-dir`` in pyproject.toml), so a new
subpackage is never left out of the wheel. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

ROOMS = {"mmedge": "mmedge", "mmedge.export": "export", "mmedge.runtimes": "runtimes"}


def packages() -> list[str]:
    found = []
    for name, folder in ROOMS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return found


setup(packages=packages())
