"""What keeps the code base the way it is: ruff finds nothing (line length 120, import order, unused and undefined
names; the configuration is pyproject.toml's), and the wheel and sdist hold every module and every package data file,
with the wheel running the demo's device half in a fresh venv that has no torch."""

import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {"mmedge": "mmedge", "export": "mmedge/export", "runtimes": "mmedge/runtimes"}  # folder -> path in the wheel
PACKAGE_DATA = ["export/data/images", "export/data/configs", "mmedge/demo/models/clip", "mmedge/demo/models/blip2",
                "mmedge/demo/images", "mmedge/serve/static"]
DEVICE_DEPENDENCIES = ["numpy", "Pillow", "tokenizers", "onnxruntime"]  # pyproject's dependencies: the device runtime


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -e '.[test]')")
    from ruff.__main__ import find_ruff_bin

    result = subprocess.run([find_ruff_bin(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


# --- packaging -------------------------------------------------------------------------------------------
def expected_files() -> set[str]:
    """Every module and package data file, as the wheel names them."""
    names = set()
    for folder, target in ROOMS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                names.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    for folder in PACKAGE_DATA:
        for path in (ROOT / folder).iterdir():
            if path.is_file():
                room, rest = folder.split("/", 1)
                names.add(f"{ROOMS[room]}/{rest}/{path.name}")
    return names


def source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True,
                            text=True, cwd=ROOT, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist built from a copy of the checkout, and the wheel built from that unpacked sdist (what pip does)."""
    root = tmp_path_factory.mktemp("packaging")
    tree = root / "tree"
    for name in source_files():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())
    dist = root / "dist"
    build = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    sdist = subprocess.run([sys.executable, "-c", build, "build_sdist", str(dist)], cwd=tree, capture_output=True,
                           text=True)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    sdist_path = dist / sdist.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist_path) as archive:
        archive.extractall(root / "unpacked", filter="data")
    unpacked = next((root / "unpacked").iterdir())
    wheel = subprocess.run([sys.executable, "-c", build, "build_wheel", str(dist)], cwd=unpacked, capture_output=True,
                           text=True)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    return sdist_path, dist / wheel.stdout.strip().splitlines()[-1]


def test_the_wheel_holds_every_module_and_package_data_file(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(expected_files() - names)
    assert not missing, f"the wheel lacks {missing[:20]}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


def test_the_sdist_holds_the_sources_the_wheel_is_built_from(built):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {name for name in source_files() if name.split("/")[0] in ROOMS and not name.endswith(".md")}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing[:20]}"
    assert {"pyproject.toml", "setup.py", "README.md", "LICENSE", "constraints-cpu.txt"} <= names
    # the test suite whole (setuptools' default took tests/test_*.py alone), none of its caches
    tests = {name for name in source_files() if name.startswith("tests/")}
    assert tests <= names and "tests/conftest.py" in tests, sorted(tests - names)[:20]
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_build_declares_its_license_without_a_deprecated_table(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert "License-Expression: Apache-2.0" in metadata


def _requirements(names: list[str]) -> set[str]:
    """The installed distributions ``names`` need, recursively (markers evaluated here, extras left out)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        dist = importlib.metadata.distribution(name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


@pytest.mark.slow  # a fresh venv and the demo's second run on the demo_run fixture's cache: a minute or two
def test_the_wheel_runs_the_demo_device_half_without_torch(built, demo_run, tmp_path):
    """A fresh venv with the wheel and the device runtime's dependencies only (torch absent): `mmedge demo` on the
    cache the host half exported reuses every artifact and runs them all."""
    _, wheel = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    needed = _requirements(DEVICE_DEPENDENCIES)
    assert "torch" not in needed and "transformers" not in needed
    # the dependencies, from this interpreter's site-packages, through a folder that holds nothing else
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in needed:
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (deps / top).exists():
                (deps / top).symlink_to(source)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "device-deps.pth").write_text(str(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(python), "-c", "import importlib.util, mmedge; "
                            "print(importlib.util.find_spec('torch') is None, mmedge.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr
    no_torch, location = probe.stdout.split()
    assert no_torch == "True" and location.startswith(str(venv)), probe.stdout
    cache = demo_run[0]
    result = subprocess.run([str(venv / "bin" / "mmedge"), "demo", "--cache", str(cache), "--images", "1", "--json"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["artifacts"] and all(a["reused"] for a in report["artifacts"].values())
