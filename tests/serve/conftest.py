"""The serve tests' servers and references, each made once per session.

``server`` is one real `mmedge serve` process for the API, battery, load and page tests: the shipped demo CLIP (labels
baked in) and BLIP-2 from the session's demo run, the tiny CLIP (labels at run time, text embeddings) and the tiny
IDEFICS the other tests export anyway, served under readable names (symlinks), with an API key and small limits so
that each refusal is cheap to provoke. ``local`` holds the same artifacts loaded in-process with ``mmedge.load``: what
the served answers must equal.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import mmedge
from mmedge import demo
from tests.support.serve import API_KEY, Server

# One CPU thread per graph, here and in-process (``local``): for these small models a second ONNX Runtime thread mostly
# spins (a third more CPU per caption on 2 cores), and both sides compute with the same threads.
THREADS = 1
MAIN_FLAGS = ("--threads", str(THREADS), "--api-key", API_KEY, "--workers", "2", "--max-images", "4", "--max-body-mb",
              "1",
              "--max-image-pixels", "1000000", "--allow-images-from", str(demo.IMAGES_DIR))


@pytest.fixture(scope="session")
def served_artifacts(demo_run, clip_artifacts, pytorch_artifacts, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("served")
    targets = {"clip-fp32": demo_run[0] / "clip-fp32", "blip2-fp32": demo_run[0] / "blip2-fp32",
               "clip-tiny": clip_artifacts("fp32"), "idefics-tiny": pytorch_artifacts("idefics")}
    for name, target in targets.items():
        (folder / name).symlink_to(target, target_is_directory=True)
    return {name: folder / name for name in targets}


@pytest.fixture(scope="session")
def long_blip2(tmp_path_factory) -> Path:
    """A random tiny BLIP-2 with 4,096 positions: asked for thousands of tokens, it generates for seconds, long enough
    to be interrupted, to fill a queue, or to be in flight at SIGTERM."""
    from mmedge.export import export_model
    from tests.support.tiny_checkpoints import make_tiny_blip2

    root = tmp_path_factory.mktemp("long-blip2")
    checkpoint = make_tiny_blip2(root / "checkpoint", max_position_embeddings=4096)
    return export_model(str(checkpoint), root / "blip2-long", progress=False)


@pytest.fixture(scope="session")
def server(served_artifacts):
    running = Server(list(served_artifacts.values()), *MAIN_FLAGS)
    yield running
    assert running.stop() == 0, running.text()


@pytest.fixture(scope="session")
def http(server):
    """Raw HTTP with the API key (what curl sends)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def local(served_artifacts):
    """The served artifacts loaded in this process: ``local("clip-tiny", "embed")``."""
    loaded = {}

    def get(name: str, task: str | None = None):
        if (name, task) not in loaded:
            loaded[name, task] = mmedge.load(served_artifacts[name], task=task, threads=THREADS)
        return loaded[name, task]

    yield get
    for pipeline in loaded.values():
        pipeline.close()


@pytest.fixture(scope="session")
def scenes() -> list[Path]:
    return demo.images()
