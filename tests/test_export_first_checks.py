"""`mmedge export` checks what is cheap before loading anything, fails fast and in one line when the hub cannot be
reached, lists the bundled --random-weights names, and keeps quiet under --quiet."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmedge.cli import main
from mmedge.errors import ArtifactError, ModelLoadError
from mmedge.export import export_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to load a checkpoint fails the test."""
    import mmedge.export.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the options were checked")

    monkeypatch.setattr(loading, "load_checkpoint", refuse)


def test_an_existing_output_folder_is_refused_before_loading(tiny_clip_dir, tmp_path, nothing_loads):
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        export_model(str(tiny_clip_dir), tmp_path / "out", progress=False)


def test_an_unknown_random_weights_name_is_refused_before_loading(tmp_path, nothing_loads):
    with pytest.raises(ModelLoadError, match="neither a bundled config.*mmedge export --help"):
        export_model("openai/clip-vit-base-patch99", tmp_path / "out", random_weights=True, progress=False)


def test_an_idle_option_is_refused_before_loading(tiny_blip2_dir, tmp_path, nothing_loads, capsys):
    assert main(["export", str(tiny_blip2_dir), str(tmp_path / "out"), "--quantization", "static"]) == 2
    assert "--quantization static" in capsys.readouterr().err


def test_export_help_lists_the_bundled_configs_and_the_readme_names_them(capsys):
    from mmedge.export.loading import known_random_configs

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    for name in known_random_configs():
        assert name in text.replace("- ", "-"), name  # argparse may wrap a name at its hyphen
        assert name in readme, name


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the with block ends


def test_a_hub_id_without_a_reachable_hub_fails_at_once_in_one_line(tmp_path):
    """The hub's retries (half a minute, a line each) never start: one mmedge line within seconds."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "export", "someone/some-clip", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("mmedge: error: "), result.stderr
    assert "cannot be reached" in lines[0] and "someone/some-clip" in lines[0]
    assert seconds < 15, seconds  # interpreter and imports included; the retries alone took 31 s


def test_a_cached_model_loads_without_the_hub(tiny_clip_dir, tmp_path, monkeypatch):
    """Unreachable hub, model in the local cache: loaded from there, no request made."""
    import mmedge.export.hub as hub

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    hub.unreachable.cache_clear()
    monkeypatch.setattr(hub, "_cached", lambda model: model == "someone/cached")
    assert hub.hub_options("someone/cached") == {"local_files_only": True}
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        hub.hub_options("someone/elsewhere")
    hub.unreachable.cache_clear()


def test_quiet_export_prints_no_library_progress(tiny_blip2_dir, tmp_path, capfd):
    """transformers' "Loading weights" bar and its notices stay off with --quiet; the summary stays on stdout."""
    assert main(["export", str(tiny_blip2_dir), str(tmp_path / "out"), "--quiet", "--with-pytorch"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.startswith("wrote "), err
