"""What a Jetson user does: export on the host, copy the artifact folder to the device, run it there.

    python examples/export_for_device.py                  # the shipped demo CLIP; the "device" is a torch-free process
    python examples/export_for_device.py --model ~/models/clip-vit-base-patch32 --labels cat dog "traffic light"
    python examples/export_for_device.py --model ~/models/blip2-opt-2.7b --device-dir /mnt/orin/models/blip2
On a real device: `rsync -a ARTIFACT orin:models/`, then `mmedge validate` and `mmedge run` (pip install mmedge)."""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mmedge
from mmedge import demo
from mmedge.artifact import atomic_folder, is_artifact_folder
from mmedge.errors import InputError
from mmedge.images import checked_image_path

# The device side: a process where torch and transformers cannot be imported (nor found), as on a bare device.
DEVICE = """import sys
sys.modules.update(torch=None, transformers=None)
from mmedge.cli import main
sys.exit(main(["validate", sys.argv[1]]) or main(["run", *sys.argv[1:]]))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     fromfile_prefix_chars="@")  # --labels @labels.txt: one label a line
    parser.add_argument("images", nargs="*", help="images to run on the device (default: the bundled demo scenes)")
    parser.add_argument("--model", help="CLIP or BLIP-2 checkpoint folder (default: the shipped demo CLIP)")
    parser.add_argument("--labels", nargs="+", type=lambda s: s.removeprefix("\ufeff"), help="to bake in, or @FILE")
    parser.add_argument("--device-dir", help="copied to DIR/artifact, replacing an earlier copy (default: temporary)")
    args = parser.parse_args(argv)
    images = [checked_image_path(image) for image in args.images] or list(map(str, demo.images()))  # cheap checks
    from mmedge.export import export_model, loading  # host side: needs pip install "mmedge[export]"

    model = args.model or str(demo.model_path("clip"))
    family = loading.checkpoint_family(model)  # from its config.json alone: a wrong --model is refused before exporting
    if family == "idefics":
        raise InputError(f"'{model}' is an IDEFICS model: it answers interleaved prompts, not images alone",
                         "a CLIP or BLIP-2 checkpoint", "run examples/few_shot.py for IDEFICS")
    clip, shipped = family == "clip", Path(model).resolve() == demo.model_path("clip").resolve()
    if clip and not args.labels and not shipped:  # the demo's 24 colour × shape labels are the demo CLIP's alone
        raise InputError(f"no labels to bake into the export of '{model}'", "--labels for a CLIP other than the demo's",
                         "pass its classes: --labels cat dog 'traffic light', or --labels @labels.txt (one a line)")
    with tempfile.TemporaryDirectory() as scratch:  # the host's export, removed at the end (and the default device dir)
        device_dir = Path(args.device_dir or Path(scratch) / "device") / "artifact"
        if not next(folder for folder in device_dir.parents if folder.exists()).is_dir():  # before the export
            raise InputError(f"--device-dir '{args.device_dir}' is not a folder", "a folder (or a path to make one)",
                             "pass a folder's path")
        if device_dir.exists() and not is_artifact_folder(device_dir):  # an earlier copy is replaced, nothing else
            raise InputError(f"'{device_dir}' is not an mmedge artifact, so it is not replaced", "no artifact/ in "
                             "--device-dir, or an earlier copy", "choose another --device-dir, or remove it yourself")
        # 1. host: export (CLIP INT8, labels baked; BLIP-2 INT8 + INT4 LLM); 2. copy it, swapped in whole when complete
        with atomic_folder(device_dir, overwrite=True, command="examples/export_for_device.py") as copy:
            host = export_model(model, Path(scratch) / "artifact", precision="int8", llm_precision=None if clip
                                else "int4", progress=False, labels=args.labels or (demo.labels() if clip else None),
                                templates=demo.templates() if clip and shipped else None)
            shutil.copytree(host, copy, dirs_exist_ok=True)
        print(f"copied the host's export to {device_dir}")  # 3. device: validate, then run, with no torch importable
        return subprocess.run([sys.executable, "-c", DEVICE, str(device_dir), *images]).returncode


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: one line and 130, as `mmedge export` (the half-written folders are gone)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except mmedge.MmedgeError as error:  # mmedge's errors say what failed and what to do: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
