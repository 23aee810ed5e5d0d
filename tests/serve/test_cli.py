"""`mmedge serve` on the command line: its help and its refusals, each one `mmedge: error:` line with its exit code,
before any model is loaded or port opened."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import textwrap

import pytest

from mmedge.cli import main
from mmedge.errors import ArtifactNotFoundError, InputError, MmedgeError
from mmedge.serve.models import load_models
from mmedge.serve.options import DEFAULT_CLIP_WORKERS, DEFAULT_MAX_QUEUE, ServeOptions, add_arguments
from tests.support.battery import cli_error
from tests.support.serve import ROOT

WITHOUT_STARLETTE = textwrap.dedent("""
    import sys
    sys.modules["starlette"] = None  # find_spec and import both see it as absent
    from mmedge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_without_starlette(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_STARLETTE, *argv], capture_output=True, text=True, cwd=ROOT)


def test_without_the_extra_help_works_and_serving_names_the_install():
    help_ = run_without_starlette("serve", "--help")
    assert help_.returncode == 0 and "--max-queue" in help_.stdout and "--api-key" in help_.stdout
    refused = run_without_starlette("serve", "some-artifact")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert 'pip install "mmedge[serve]"' in refused.stderr and "starlette not installed" in refused.stderr


def test_missing_artifact(capsys, tmp_path, served_artifacts):
    cli_error(capsys, ["serve", tmp_path / "nothing", "--port", "0"], ArtifactNotFoundError, "does not exist")
    # said before the artifact ahead of it loads (cli_error: the error is the only line on stderr)
    cli_error(capsys, ["serve", served_artifacts["clip-fp32"], tmp_path / "nothing", "--port", "0"],
              ArtifactNotFoundError, "does not exist")


def test_two_artifacts_with_one_name(capsys, tmp_path, served_artifacts):
    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
        (tmp_path / parent / "clip").symlink_to(served_artifacts["clip-fp32"], target_is_directory=True)
    cli_error(capsys, ["serve", tmp_path / "a" / "clip", tmp_path / "b" / "clip", "--port", "0"], InputError,
              "same model id (clip)", "rename")


@pytest.mark.parametrize("flag, value, words",
                         [("--workers", "0", "--workers is 0"), ("--max-queue", "-1", "at least 0"),
                                                 ("--port", "70000", "65535"),
                          ("--port", "99999", "pass e.g. --port 8000, or --port 0 for any free port"),
                                                ("--max-image-pixels", "0", "at least 1"),
                          ("--drain-seconds", "-1", "from 0 (cut requests off at once)"),
                          ("--drain-seconds", "nan", "--drain-seconds is nan")])
def test_bad_settings(capsys, served_artifacts, flag, value, words):
    cli_error(capsys, ["serve", served_artifacts["clip-fp32"], flag, value], InputError, words)


def test_a_port_in_use(capsys, served_artifacts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli_error(capsys, ["serve", served_artifacts["clip-fp32"], "--port", port], MmedgeError,
                  f"cannot listen on 127.0.0.1:{port}", "--port")


def test_two_servers_started_together_on_one_port():
    """Each `mmedge serve` binds its port before loading its models. Both bound it with SO_REUSEADDR, which Linux
    allows twice while neither socket listens, so the second loaded every model and only then failed ("Address
    already in use; fix: check the path, free space and permissions"). The first now listens as soon as it is bound,
    so the second is refused at its bind, with the port advice, before loading anything."""
    from mmedge.serve.server import _bind

    first = _bind("127.0.0.1", 0)
    try:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        port = first.getsockname()[1]
        with pytest.raises(MmedgeError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(Address already in use\).*"
                                              r"pick another --port"):
            _bind("127.0.0.1", port).close()
    finally:
        first.close()


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])  # a name that never resolves (RFC 6761);
def test_a_host_that_is_not_this_machines(capsys, served_artifacts, host):  # an address of no machine (RFC 5737)
    """A host that does not resolve, or an address not on this machine, is the host's fault: the advice is about
    --host, not --port."""
    line = cli_error(capsys, ["serve", served_artifacts["clip-fp32"], "--host", host, "--port", "8000"], MmedgeError,
                     f"cannot listen on {host}:8000 (--host: ", "check --host: 127.0.0.1")
    assert "--port" not in line


def test_the_allowed_image_folder_must_exist(capsys, served_artifacts, tmp_path):
    cli_error(capsys, ["serve", served_artifacts["clip-fp32"], "--allow-images-from", tmp_path / "none"], InputError,
              "is not a folder")


def test_workers_and_max_queue_size_every_artifacts_queue(served_artifacts):
    """--workers and --max-queue bound CLIP artifacts too (their calls ran unbounded: a few requests of large images
    took gigabytes), so they are taken with CLIP artifacts alone; without --workers a CLIP artifact runs
    DEFAULT_CLIP_WORKERS calls at once and a captioning artifact loads one captioner."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    clip = str(served_artifacts["clip-fp32"])
    for flags, workers, max_queue in (([], DEFAULT_CLIP_WORKERS, DEFAULT_MAX_QUEUE), (["--workers", "3", "--max-queue",
                                                                                      "5"], 3, 5)):
        models = load_models(ServeOptions.from_args(parser.parse_args([clip, "--quiet", *flags])))
        try:
            calls = models["clip-fp32"].calls
            assert (len(calls.slots), calls.max_queue) == (workers, max_queue)
            assert (models["clip-fp32"].card["workers"], models["clip-fp32"].card["max_queue"]) == (workers, max_queue)
        finally:
            for model in models.values():
                model.close()


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", [], True), ("0.0.0.0", ["--api-key", "k"], False),
                                               ("127.0.0.1", [], False)])
def test_a_network_address_without_a_key_is_warned_about(capsys, tmp_path, host, key, warned):
    """Binding a non-loopback address without --api-key is allowed but warned about on stderr as the server starts,
    before the artifacts load (here: an artifact that does not exist, so that the command ends there)."""
    capsys.readouterr()
    code = main(["serve", str(tmp_path / "nothing"), "--host", host, "--port", "0", *key])
    err = capsys.readouterr().err
    assert code == ArtifactNotFoundError.exit_code, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert bool(warning) == warned, err
    if warned:
        assert warning[0].startswith("mmedge serve: warning: --host 0.0.0.0") and "--api-key KEY" in warning[0]


def test_the_socket_listens_before_the_address_is_printed(monkeypatch, capsys, tmp_path):
    """The ready line was printed before anything listened (uvicorn listens once it starts), so a client that read it
    and connected at once was refused: the serve tests' own server failed so on a loaded machine. Checked at the
    moment uvicorn is handed the socket, with no models loaded (nothing else is under test)."""
    from mmedge.serve import server
    from mmedge.serve.options import ServeOptions

    seen = {}

    def run(self, sockets):
        out = capsys.readouterr().out
        seen["printed"] = "listening on http://127.0.0.1:" in out
        seen["listening"] = sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)

    monkeypatch.setattr(server, "load_models", lambda options: {})
    monkeypatch.setattr(server._Server, "run", run)
    assert server.serve(ServeOptions(artifacts=(tmp_path,), port=0)) == 0
    assert seen == {"printed": True, "listening": 1}


def test_loading_shows_progress_on_stderr(server, served_artifacts):
    """A large LLM loads for minutes before the ready line: each artifact's load is said as it starts and ends."""
    said = "".join(server.stderr)
    for index, name in enumerate(served_artifacts, 1):
        assert f"[{index}/{len(served_artifacts)}] loading {name} ... done (" in said, said[-2000:]
    assert not any("loading" in line for line in server.stdout)  # stdout holds the ready line a client reads
