"""Time to load an artifact in a new process, with every graph hashed (no record of earlier checks: every load
before ``mmedge.file_checks``) and with this device's record of them (``engines/sha256-checks.record``).

Each load runs in a fresh Python process, as each ``mmedge run`` does: ``mmedge.load(artifact,
threads=N)`` (``--threads``) then ``close()``, timed inside the child (interpreter start and imports not counted).
The two cases take turns, ``--rounds`` times; the files stay in the page cache throughout (a warm disk: the read
saved is the hash's own, not the disk's).

    python benchmarks/load_cpu.py                               # the IDEFICS-mid and CLIP ViT-B/32 FP32 artifacts
    python benchmarks/load_cpu.py --artifacts out/my-artifact   # any artifact folders
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info, write_json
from mmedge.cli_args import count

HERE = Path(__file__).resolve().parent
DEFAULT = [HERE / "out" / "idefics-mid-fp32", HERE / "out" / "clip-b32-fp32"]
MADE_BY = {"idefics-mid-fp32": "benchmarks/flamingo_cpu.py", "clip-b32-fp32": "benchmarks/clip_cpu.py"}
CHILD = """
import sys, time, warnings
warnings.simplefilter("ignore")
import mmedge
start = time.perf_counter()
mmedge.load(sys.argv[1], threads=int(sys.argv[2])).close()
print(time.perf_counter() - start)
"""


def load_seconds(artifact: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(artifact), str(threads)], capture_output=True, text=True,
                         env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def graph_bytes(artifact: Path) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text())
    entries = [e for c in manifest["components"].values() for e in (c, c.get("external_data")) if e]
    return sum((artifact / e["file"]).stat().st_size for e in entries)


def main(argv=None) -> int:
    from mmedge.artifact import ENGINES_DIR
    from mmedge.file_checks import RACY_SECONDS, RECORD_FILE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", nargs="+", type=Path, default=DEFAULT)
    parser.add_argument("--rounds", type=count, default=5)
    parser.add_argument("--threads", type=count, default=2, help="mmedge.load(threads=) in each loading process")
    parser.add_argument("--json", type=Path, default=HERE / "out" / "load_cpu.json")
    args = parser.parse_args(argv)
    for artifact in args.artifacts:
        if not (artifact / "manifest.json").is_file():
            raise SystemExit(f"{artifact} is not an artifact: run {MADE_BY.get(artifact.name, 'mmedge export')} first")
    time.sleep(RACY_SECONDS)  # files written moments ago are not recorded
    rows = []
    for artifact in args.artifacts:
        record = artifact / ENGINES_DIR / RECORD_FILE
        hashed, trusted = [], []
        load_seconds(artifact, args.threads)  # warm: the page cache, and the record written
        for _ in range(args.rounds):  # in turns
            record.unlink(missing_ok=True)
            hashed.append(load_seconds(artifact, args.threads))  # hashes every file, then records them
            if not record.is_file():
                raise SystemExit(f"{artifact}: no record was written (read-only engines/ folder?)")
            trusted.append(load_seconds(artifact, args.threads))
        row = {"artifact": artifact.name, "graphs_gb": round(graph_bytes(artifact) / 1e9, 3),
               "load_hashing_s": round(statistics.median(hashed), 3),
               "load_with_record_s": round(statistics.median(trusted), 3), "rounds": args.rounds,
               "all_hashing_s": [round(x, 3) for x in hashed], "all_with_record_s": [round(x, 3) for x in trusted]}
        row["ratio"] = round(row["load_with_record_s"] / row["load_hashing_s"], 3)
        rows.append(row)
        print(f"{row['artifact']} ({row['graphs_gb']} GB of graphs): load {row['load_hashing_s']:.2f} s hashing every "
              f"graph, {row['load_with_record_s']:.2f} s with the record: {row['ratio']:.2f}x the time "
              f"(median of {args.rounds}, in turns)", flush=True)
    write_json(args.json, {"machine": machine_info(), "threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
