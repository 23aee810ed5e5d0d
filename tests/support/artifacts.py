"""The tiny ``--with-pytorch`` artifacts the torch-backend and conformance tests run on, by kind, exported by the
``pytorch_artifacts`` fixture and, ahead of a GPU run, by ``benchmarks/gpu_check.sh --prepare``."""

from __future__ import annotations

from pathlib import Path

LABELS = ["cat", "dog", "car", "rocket"]
PYTORCH_VARIANTS: dict[str, tuple[str, dict]] = {  # kind: (tiny checkpoint, export options)
    "clip": ("clip", {}),
    "clip-fused": ("clip", {"labels": LABELS}),
    "blip2": ("blip2", {}),
    "blip2-split": ("blip2", {"extra": {"fused_prefix": False}}),
    "blip2_t5": ("blip2_t5", {}),
    "instructblip_t5": ("instructblip_t5", {}),
    "instructblip": ("instructblip", {}),
    "idefics": ("idefics", {}),
    "demo-blip2": ("demo:blip2", {}),  # the shipped trained BLIP-2: margins like a real checkpoint's
}


def export_pytorch_artifact(kind: str, checkpoints: dict[str, Path], out: Path) -> Path:
    """Export ``kind`` (a key of ``PYTORCH_VARIANTS``) from ``checkpoints[checkpoint]`` (``demo:NAME``: the shipped
    demo model) into ``out``."""
    from mmedge import demo
    from mmedge.export import export_model

    checkpoint, options = PYTORCH_VARIANTS[kind]
    source = demo.model_path(checkpoint.split(":", 1)[1]) if checkpoint.startswith("demo:") else checkpoints[checkpoint]
    return export_model(str(source), out, progress=False, with_pytorch=True, **options)


def main(folder: str) -> None:
    """Export every kind into ``folder`` (the GPU check carries it): ``python -m tests.support.artifacts DIR``."""
    import tempfile

    from tests.support.tiny_checkpoints import (
        make_tiny_blip2,
        make_tiny_blip2_t5,
        make_tiny_clip,
        make_tiny_idefics,
        make_tiny_instructblip,
        make_tiny_instructblip_t5,
    )

    root = Path(folder)
    with tempfile.TemporaryDirectory(prefix="mmedge-tiny-") as tmp:
        checkpoints = {"clip": make_tiny_clip(Path(tmp) / "clip"), "blip2": make_tiny_blip2(Path(tmp) / "blip2"),
                       "blip2_t5": make_tiny_blip2_t5(Path(tmp) / "blip2_t5"),
                       "instructblip_t5": make_tiny_instructblip_t5(Path(tmp) / "instructblip_t5"),
                       "instructblip": make_tiny_instructblip(Path(tmp) / "instructblip"),
                       "idefics": make_tiny_idefics(Path(tmp) / "idefics")}
        for kind in PYTORCH_VARIANTS:
            if not (root / kind / "manifest.json").is_file():
                export_pytorch_artifact(kind, checkpoints, root / kind)
                print(f"exported {kind} -> {root / kind}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
