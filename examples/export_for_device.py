"""What a Jetson user does: export on the host, copy the artifact folder to the device, run it there.

    python examples/export_for_device.py                  # the shipped demo CLIP; the "device" is a torch-free process
    python examples/export_for_device.py --model ~/models/blip2-opt-2.7b --device-dir /mnt/orin/models/blip2
On a real device: `rsync -a ARTIFACT orin:models/`, then `mmedge validate` and `mmedge run` there; it needs
only `pip install mmedge` (numpy, Pillow, tokenizers, onnxruntime)."""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mmedge
from mmedge import demo
from mmedge.images import checked_image_path

# The device side, run in a process where torch and transformers are absent, as on a bare device: importing them
# raises ImportError and importlib.util.find_spec finds nothing, exactly as when they are not installed.
DEVICE = """import sys
sys.modules.update(torch=None, transformers=None)
from mmedge.cli import main
sys.exit(main(["validate", sys.argv[1]]) or main(["run", *sys.argv[1:]]))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to run on the device (default: the bundled demo scenes)")
    parser.add_argument("--model", help="CLIP or BLIP-2 checkpoint folder (default: the shipped demo CLIP)")
    parser.add_argument("--device-dir", help="where the artifact is copied to (default: a temporary folder)")
    args = parser.parse_args(argv)
    images = [checked_image_path(image) for image in args.images] or list(map(str, demo.images()))  # cheap checks
    from mmedge.export import export_model  # host side: needs pip install "mmedge[export]"
    from mmedge.export.loading import checkpoint_family

    model = args.model or str(demo.model_path("clip"))
    family = checkpoint_family(model)  # from its config.json alone: a wrong --model is refused before any export
    if family == "idefics":
        parser.error("an IDEFICS model answers interleaved prompts, not images alone: run examples/few_shot.py")
    clip, shipped = family == "clip", args.model is None
    with tempfile.TemporaryDirectory() as scratch:  # the host's export, removed at the end (and the default device dir)
        # 1. host: export and quantize (CLIP: INT8 with the labels baked in; BLIP-2: INT8 encoders + INT4 LLM)
        host = Path(scratch) / "artifact"
        export_model(model, host, precision="int8", llm_precision=None if clip else "int4", progress=False,
                     labels=demo.labels() if clip else None, templates=demo.templates() if clip and shipped else None)

        # 2. copy the folder: it is the whole contract (manifest.json, graphs, tokenizer, validation samples)
        device_dir = Path(args.device_dir or Path(scratch) / "device") / host.name
        shutil.copytree(host, device_dir, dirs_exist_ok=True)
        print(f"copied the host's export to {device_dir}")

        # 3. device: validate against the export's PyTorch outputs, then run, with no torch importable
        return subprocess.run([sys.executable, "-c", DEVICE, str(device_dir), *images]).returncode

if __name__ == "__main__":
    try:
        sys.exit(main())
    except mmedge.MmedgeError as error:  # mmedge's errors say what failed and what to do: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
