"""What a Jetson user does: export on the host, copy the artifact folder to the device, run it there.

    python examples/export_for_device.py                  # the shipped demo CLIP; the "device" is a torch-free process
    python examples/export_for_device.py --model ~/models/blip2-opt-2.7b --device-dir /mnt/orin/models/blip2
On a real device: `rsync -a ARTIFACT orin:models/`, then `mmedge validate` and `mmedge run` there; it needs
only `pip install mmedge` (numpy, Pillow, tokenizers, onnxruntime)."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mmedge import demo

# The device side, run in a process where torch and transformers are absent, as on a bare device: importing them
# raises ImportError and importlib.util.find_spec finds nothing, exactly as when they are not installed.
DEVICE = """import sys
sys.modules.update(torch=None, transformers=None)
from mmedge.cli import main
sys.exit(main(["validate", sys.argv[1]]) or main(["run", *sys.argv[1:]]))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to run on the device (default: the bundled demo scenes)")
    parser.add_argument("--model", help="CLIP or BLIP-2 checkpoint folder (default: the shipped demo CLIP)")
    parser.add_argument("--device-dir", help="where the artifact is copied to (default: a temporary folder)")
    args = parser.parse_args(argv)
    model = Path(args.model) if args.model else demo.model_path("clip")
    clip = json.loads((model / "config.json").read_text())["model_type"] == "clip"

    # 1. host: export and quantize (CLIP: INT8 with the labels baked in; BLIP-2: INT8 encoders + INT4 LLM)
    from mmedge.export import ExportOptions, export_model

    host = Path(tempfile.mkdtemp()) / "artifact"
    options = ExportOptions(precision="int8", progress=False)
    if clip:
        options.labels, options.templates = demo.labels(), (demo.templates() if not args.model else None)
    else:
        options.llm_precision = "int4"
    export_model(str(model), host, options)

    # 2. copy the folder: it is the whole contract (manifest.json, graphs, tokenizer, validation samples)
    device_dir = Path(args.device_dir or tempfile.mkdtemp()) / host.name
    shutil.copytree(host, device_dir, dirs_exist_ok=True)
    print(f"copied {host} -> {device_dir}")

    # 3. device: validate against the export's PyTorch outputs, then run, with no torch importable
    images = [str(p) for p in (args.images or demo.images())]
    subprocess.run([sys.executable, "-c", DEVICE, str(device_dir), *images], check=True)


if __name__ == "__main__":
    main()
