"""Copy a wheel leaving out its native libraries for other accelerators, so it fits what travels to a GPU machine.

bitsandbytes' wheel carries one ``libbitsandbytes_*.so`` per CUDA (11.8 … 13.2), ROCm and XPU release: 129 MB
unpacked, 43 MB packed. A machine with a CUDA 13 build of torch loads ``libbitsandbytes_cuda13*.so`` (and the CPU
one); ``--keep cuda13`` keeps those and drops the other accelerator libraries, and the wheel's RECORD is rewritten to
match, so pip installs it as usual.

    python benchmarks/slim_wheel.py IN.whl OUT.whl --keep cuda13
"""

from __future__ import annotations

import argparse
import re
import zipfile

NATIVE = re.compile(r"lib[a-z_]+_(cuda\d+|rocm\d+|xpu\d+)\.so$")


def slim(source: str, target: str, keep: str) -> list[str]:
    """Write ``target``: ``source`` without the accelerator libraries whose tag does not start with ``keep``."""
    dropped = []
    with zipfile.ZipFile(source) as whl, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        names = whl.namelist()
        for name in names:
            match = NATIVE.search(name)
            if match and not match.group(1).startswith(keep):
                dropped.append(name)
        for name in names:
            if name in dropped:
                continue
            data = whl.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if line.split(",", 1)[0] not in dropped) + "\n").encode()
            out.writestr(whl.getinfo(name), data)
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--keep", default="cuda13",
                        help="the accelerator tag to keep (cuda13: CUDA 13.x builds of torch)")
    args = parser.parse_args()
    dropped = slim(args.source, args.target, args.keep)
    print(f"slim_wheel: {args.target}: dropped {len(dropped)} libraries not for {args.keep}")


if __name__ == "__main__":
    main()
