"""Shared pytest fixtures: tiny checkpoints built offline, and artifacts exported from them once.

``MMEDGE_TEST_ARTIFACTS`` (optional) names a folder of tiny ``--with-pytorch`` artifacts exported earlier
(``bash benchmarks/gpu_check.sh --prepare`` writes it): the GPU check carries it to a machine whose export toolchain
(torch, onnx) differs, so its GPU minutes go to the backends under test. Without it everything is exported here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOLDOUT = sorted((ROOT / "export" / "data" / "images").glob("holdout-*.jpg"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP checkpoint folder (model, tokenizer, image processor), made once per session."""
    from tests.support.tiny_checkpoints import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def clip_artifacts(tiny_clip_dir, tmp_path_factory):
    """Export variants of the tiny CLIP, each once per session: ``clip_artifacts("int8-static")``."""
    from mmedge.export import export_model

    variants = {
        "fp32": {},
        "fp16": {"precision": "fp16"},
        "int8-static": {"precision": "int8", "quantization": "static"},
        "int8-dynamic": {"precision": "int8", "quantization": "dynamic"},
        "fused-fp32": {"labels": ["cat", "dog", "car", "rocket"]},
        "fused-int8": {"labels": ["cat", "dog", "car", "rocket"], "precision": "int8"},
    }
    root = tmp_path_factory.mktemp("artifacts")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = export_model(str(tiny_clip_dir), root / name, progress=False, **variants[name])
        return made[name]

    return get


@pytest.fixture
def photos():
    """Real photos (public domain / CC0) that ship with the exporter."""
    return [str(p) for p in HOLDOUT]


@pytest.fixture(scope="session")
def tiny_blip2_dir(tmp_path_factory):
    """A random-weight BLIP-2 checkpoint folder (ViT + Q-Former + OPT, OPT tokenizer, processor), made once per
    session."""
    from tests.support.tiny_checkpoints import make_tiny_blip2

    return make_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))


@pytest.fixture(scope="session")
def blip2_artifact(tiny_blip2_dir, tmp_path_factory):
    """The tiny BLIP-2 exported once per session (FP32, fused prefix): for captioner and reliability tests."""
    from mmedge.export import export_model

    return export_model(str(tiny_blip2_dir), tmp_path_factory.mktemp("b2") / "fp32", progress=False)


@pytest.fixture(scope="session")
def tiny_blip2_t5_dir(tmp_path_factory):
    """A random-weight BLIP-2 with Flan-T5 checkpoint folder (ViT + Q-Former + T5, T5 tokenizer, processor), made once
    per session."""
    from tests.support.tiny_checkpoints import make_tiny_blip2_t5

    return make_tiny_blip2_t5(tmp_path_factory.mktemp("tiny-blip2-t5"))


@pytest.fixture(scope="session")
def blip2_t5_artifact(tiny_blip2_t5_dir, tmp_path_factory):
    """The tiny BLIP-2 with Flan-T5 exported once per session (FP32, fused prefix)."""
    from mmedge.export import export_model

    return export_model(str(tiny_blip2_t5_dir), tmp_path_factory.mktemp("b2t5") / "fp32", progress=False)


@pytest.fixture(scope="session")
def tiny_instructblip_t5_dir(tmp_path_factory):
    """A random-weight InstructBLIP with Flan-T5 checkpoint folder (T5 tokenizer, the Q-Former's BERT tokenizer in
    qformer_tokenizer/, processor), made once per session."""
    from tests.support.tiny_checkpoints import make_tiny_instructblip_t5

    return make_tiny_instructblip_t5(tmp_path_factory.mktemp("tiny-instructblip-t5"))


@pytest.fixture(scope="session")
def tiny_instructblip_dir(tmp_path_factory):
    """A random-weight InstructBLIP with a Llama-family LLM (Vicuna's layout), made once per session."""
    from tests.support.tiny_checkpoints import make_tiny_instructblip

    return make_tiny_instructblip(tmp_path_factory.mktemp("tiny-instructblip"))


@pytest.fixture(scope="session")
def tiny_idefics_dir(tmp_path_factory):
    """A random-weight IDEFICS checkpoint (ViT, Perceiver Resampler, Llama with gated cross-attention,
    Llama-style tokenizer with the image tokens, IdeficsProcessor), made once per session."""
    from tests.support.tiny_checkpoints import make_tiny_idefics

    return make_tiny_idefics(tmp_path_factory.mktemp("tiny-idefics"))


@pytest.fixture(scope="session")
def pytorch_artifacts(tiny_clip_dir, tiny_blip2_dir, tiny_blip2_t5_dir, tiny_instructblip_t5_dir,
                      tiny_instructblip_dir, tiny_idefics_dir, tmp_path_factory):
    """Tiny artifacts exported with --with-pytorch (the torch backend's weights beside the graphs), each once per
    session: ``pytorch_artifacts("blip2")``; kinds: ``tests.support.artifacts.PYTORCH_VARIANTS``."""
    from tests.support.artifacts import export_pytorch_artifact

    sources = {"clip": tiny_clip_dir, "blip2": tiny_blip2_dir, "blip2_t5": tiny_blip2_t5_dir,
               "instructblip_t5": tiny_instructblip_t5_dir, "instructblip": tiny_instructblip_dir,
               "idefics": tiny_idefics_dir}
    carried = os.environ.get("MMEDGE_TEST_ARTIFACTS")
    root = tmp_path_factory.mktemp("pytorch-artifacts")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            if carried and (Path(carried) / name / "manifest.json").is_file():
                made[name] = Path(carried) / name
            else:
                made[name] = export_pytorch_artifact(name, sources, root / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def demo_blip2_with_pytorch(tmp_path_factory):
    """The shipped (trained) BLIP-2 demo model exported --with-pytorch, once per session: a model whose next-token
    margins are mostly wide, as a real checkpoint's are (a random tiny model's logits are near-uniform)."""
    from tests.support.artifacts import export_pytorch_artifact

    carried = os.environ.get("MMEDGE_TEST_ARTIFACTS")
    if carried and (Path(carried) / "demo-blip2" / "manifest.json").is_file():
        return Path(carried) / "demo-blip2"
    return export_pytorch_artifact("demo-blip2", {}, tmp_path_factory.mktemp("demo-blip2") / "fp32")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`mmedge demo --images 2` into a fresh cache (``<root>/demo``, so ``MMEDGE_CACHE=<root>`` finds it), run through
    the CLI once per session; returns (cache, stdout, stderr)."""
    cache = tmp_path_factory.mktemp("mmedge-cache") / "demo"
    result = subprocess.run([sys.executable, "-m", "mmedge.cli", "demo", "--cache", str(cache), "--images", "2"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    return cache, result.stdout, result.stderr
