"""Copy a wheel leaving out its native libraries for other accelerators, so it fits what travels to a GPU machine.

bitsandbytes' wheel carries one ``libbitsandbytes_*.so`` per CUDA (11.8 … 13.2), ROCm and XPU release: 129 MB
unpacked, 43 MB packed. A machine with a CUDA 13 build of torch loads ``libbitsandbytes_cuda13*.so`` (and the CPU
one); ``--keep cuda13`` keeps those and drops the other accelerator libraries, and the wheel's RECORD is rewritten to
match, so pip installs it as usual.

    python benchmarks/slim_wheel.py IN.whl OUT.whl --keep cuda13

A missing or unreadable wheel, and a ``--keep`` that names none of the wheel's accelerator tags (which would drop
every one of them), are usage errors (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import re
import sys
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


def accelerator_tags(source: str) -> list[str]:
    """The accelerator tags of the native libraries in the wheel ``source`` (e.g. cuda118, cuda130, rocm63)."""
    with zipfile.ZipFile(source) as whl:
        return sorted({match.group(1) for name in whl.namelist() if (match := NATIVE.search(name))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the wheel to slim")
    parser.add_argument("target", help="where to write the slimmed wheel")
    parser.add_argument("--keep", default="cuda13",
                        help="the accelerator tag (or its start) to keep (cuda13: CUDA 13.x builds of torch); it "
                             "must match one of the wheel's tags")
    args = parser.parse_args(argv)
    try:
        tags = accelerator_tags(args.source)
    except FileNotFoundError:
        parser.error(f"{args.source}: no such file")
    except (OSError, zipfile.BadZipFile) as exc:
        parser.error(f"{args.source}: not a readable wheel ({exc})")
    if tags and not any(tag.startswith(args.keep) for tag in tags):
        parser.error(f"--keep {args.keep}: no accelerator library in {args.source} has that tag, so every one would be "
                     f"dropped; its tags: {', '.join(tags)}")
    dropped = slim(args.source, args.target, args.keep)
    print(f"slim_wheel: {args.target}: dropped {len(dropped)} libraries not for {args.keep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
