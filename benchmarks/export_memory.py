"""Full-size exports on this host: wall time and peak RSS per step (issue 20). Not in CI: many GB, many minutes.

Run it alone, under the shared lock, from the worktree root:

    flock /work/heavy.lock .venv/bin/python benchmarks/export_memory.py [--only blip2] [--keep]

For each case it runs ``mmedge export`` (bundled config, random weights) under ``/usr/bin/time``, reads each step's
peak RSS from the manifest (``export.memory``), then ``mmedge validate`` and ``mmedge run`` (one 8-token caption) on
the artifact, each in its own process, and deletes the artifact (they are 5-16 GB) unless ``--keep``. The
reference point, measured in the same run: a process that only builds the Hugging Face model
(``Blip2ForConditionalGeneration(config)``, FP32, what ``from_pretrained`` holds) — every export peak is printed as a
ratio to it. Results go to ``benchmarks/out/export_memory.json`` (git-ignored; the tracked figures in
``benchmarks/results/`` are copied there by hand when a run is recorded in RESULTS.md, or written there with
``--json``), with the machine (``_common.machine_info``), and a markdown table on stdout.

``--smoke`` checks this script on a bundled benchmark-size config instead (``SMOKE``: a family's small stand-in; the
families without one are skipped with a note) and writes ``benchmarks/out/export_memory-smoke.json`` (untracked)
unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info

ROOT = Path(__file__).resolve().parent.parent
MMEDGE = [sys.executable, "-m", "mmedge.cli"]
PHOTO = ROOT / "export" / "data" / "images" / "holdout-camera.jpg"
GB = 1e9
CASES = {
    "blip2": ("Salesforce/blip2-opt-2.7b", [
        ("INT8 + INT4 LLM", ["--precision", "int8", "--llm-precision", "int4"]),  # the README's quickstart command
        ("INT8 + INT8 LLM", ["--precision", "int8", "--llm-precision", "int8"]),
        ("FP16", ["--precision", "fp16"]),
        ("FP32", []),
    ]),
    "blip2_t5": ("Salesforce/blip2-flan-t5-xl", [
        ("FP32", []),
        ("INT8 + INT4 LLM", ["--precision", "int8", "--llm-precision", "int4"]),
    ]),
    "idefics": ("HuggingFaceM4/idefics-9b", [("INT8 + INT4 LLM", ["--precision", "int8", "--llm-precision", "int4"])]),
}
# --smoke: a family's bundled benchmark-size stand-in (GB, not tens of GB). Not blip2_t5's or idefics' (the
# mmedge/blip2-vitb-flan-t5-base and mmedge/idefics-mid configs): a random-weight INT4 LLM that small misses the
# export's default logits check (idefics-mid: cosine 0.944 < 0.95; flamingo_cpu.py and caption_t5_cpu.py lower it)
SMOKE = {"blip2": "mmedge/blip2-vitb-opt125m"}
# git-ignored, like every script's output: a run never overwrites the tracked figures in benchmarks/results/
RESULTS = ROOT / "benchmarks" / "out" / "export_memory.json"
SMOKE_RESULTS = ROOT / "benchmarks" / "out" / "export_memory-smoke.json"
HF_BUILD = """
import json, sys, transformers, torch
from mmedge.export.loading import _bundled_config
from mmedge.export.families import FAMILIES, family_for
entry = _bundled_config(sys.argv[1])
config = transformers.AutoConfig.for_model(**entry["config"])
family = FAMILIES[family_for(entry["config"])]
torch.manual_seed(0)
model = family.model_class()(config).eval()
print(sum(p.numel() for p in model.parameters()))
"""


def timed(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under /usr/bin/time -v; wall seconds, peak RSS bytes, exit code, last stderr line."""
    stats = log.with_suffix(".time")
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *argv], stdout=out,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - start
    fields = stats.read_text().split()[-2:] if stats.is_file() else ["nan", "0"]
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return {"rc": code, "wall_s": round(wall, 1), "peak_rss_bytes": int(fields[1]) * 1024,
            "last_line": lines[-1][:400] if lines else "",
            "argv": " ".join(argv[2:]) if argv[:2] == MMEDGE[:2] else " ".join(argv)}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_case(model: str, label: str, flags: list[str], work: Path, keep: bool) -> dict:
    slug = label.lower().replace(" + ", "-").replace(" ", "-")
    out = work / slug
    result = {"model": model, "case": label, "load_before": load_average()}
    log = work / f"{slug}-export.log"
    result["export"] = timed([*MMEDGE, "export", model, str(out), "--random-weights", *flags], log)
    # /usr/bin/time's %M is the whole process's peak; each step's own peak is on its progress line
    steps = [float(m) for m in re.findall(r"peak RSS ([0-9.]+) GB\)", log.read_text())]
    result["export"]["peak_rss_bytes"] = max([result["export"]["peak_rss_bytes"], *(int(x * GB) for x in steps)])
    result["step_lines"] = [line for line in log.read_text().splitlines() if "... done (" in line]
    result["load_after_export"] = load_average()
    if result["export"]["rc"] == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        result["steps"] = manifest.get("export", {}).get("memory", {}).get("steps", [])
        result["estimate"] = manifest.get("export", {}).get("memory", {}).get("estimate")
        result["artifact_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        result["validate"] = timed([*MMEDGE, "validate", str(out)], work / f"{slug}-validate.log")
        result["run"] = timed([*MMEDGE, "run", str(out), str(PHOTO), "--max-new-tokens", "8"], work / f"{slug}-run.log")
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def markdown(results: list[dict], reference: dict | None) -> str:
    ref = reference["peak_rss_bytes"] if reference and reference.get("rc") == 0 else None
    rows = [("| model | case | export wall | export peak RSS | x HF model | steps (peak RSS) | validate wall / peak | "
             "run wall / peak | artifact |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e = r["export"]
        if e["rc"] != 0:
            rows.append(f"| {r['model']} | {r['case']} | {e['wall_s']:.0f} s | {e['peak_rss_bytes'] / GB:.1f} GB | | "
                        f"exit {e['rc']}: {e['last_line']} | | | |")
            continue
        steps = "; ".join(re.sub(r"^\[(\d)/5\] (\S+).*done \((.*) s, peak RSS (.*)\)$", r"\2 \3 s \4", line)
                          for line in r.get("step_lines", []))
        ratio = f"{e['peak_rss_bytes'] / ref:.2f}x" if ref else ""
        v, run = r["validate"], r["run"]
        rows.append(f"| {r['model']} | {r['case']} | {e['wall_s']:.0f} s | **{e['peak_rss_bytes'] / GB:.1f} "
                    f"GB** | {ratio} "
                    f"| {steps} | {v['wall_s']:.0f} s / {v['peak_rss_bytes'] / GB:.1f} GB (rc {v['rc']}) "
                    f"| {run['wall_s']:.0f} s / {run['peak_rss_bytes'] / GB:.1f} GB (rc {run['rc']}) "
                    f"| {r['artifact_bytes'] / GB:.2f} GB |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``cases`` (family -> (model, [(label, flags)]): what this run exports, in order; under
    ``--smoke`` the small stand-ins, a family without one left out with a note) and ``json`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="families to run (default: all)")
    parser.add_argument("--case", action="append", help="run only cases with this label (e.g. 'FP32')")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (5-16 GB each)")
    parser.add_argument("--work", default=None, help="folder for artifacts and logs (default: a temporary one)")
    parser.add_argument("--no-reference", action="store_true", help="skip building the HF model for the ratio")
    parser.add_argument("--smoke", action="store_true",
                        help="the small bundled BLIP-2 instead, the other families skipped (checks this script)")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default benchmarks/out/export_memory.json; with "
                             "--smoke benchmarks/out/export_memory-smoke.json)")
    args = parser.parse_args(argv)
    labels = {label for family in args.only or list(CASES) for label, _ in CASES[family][1]}
    if args.case and set(args.case) - labels:
        parser.error(f"--case: no case {', '.join(map(repr, sorted(set(args.case) - labels)))} in "
                     f"{', '.join(args.only or list(CASES))}; the cases: {', '.join(map(repr, sorted(labels)))}")
    args.cases = {}
    for family in dict.fromkeys(args.only or CASES):
        model, cases = CASES[family]
        if args.smoke and family not in SMOKE:
            print(f"--smoke: skipping {family} ({model}): no small stand-in for it", flush=True)
            continue
        args.cases[family] = (SMOKE[family] if args.smoke else model, cases)
    if not args.cases:
        parser.error(f"--smoke: no small stand-in for {', '.join(args.only)}: nothing to run")
    args.json = Path(args.json or (SMOKE_RESULTS if args.smoke else RESULTS))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="export-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info()}
    print(json.dumps(header), flush=True)
    results, references = [], {}
    for family, (model, cases) in args.cases.items():
        if not args.no_reference:
            references[model] = timed([sys.executable, "-c", HF_BUILD, model], work / f"{family}-hf.log")
            print(f"HF model build {model}: {references[model]['wall_s']} s, "
                  f"{references[model]['peak_rss_bytes'] / GB:.2f} GB peak (rc {references[model]['rc']})", flush=True)
        for label, flags in cases:
            if args.case and label not in args.case:
                continue
            result = run_case(model, label, flags, work, args.keep)
            result["hf_reference"] = references.get(model)
            results.append(result)
            print(json.dumps(result), flush=True)
            print(markdown([result], references.get(model)), flush=True)
    out = args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"header": header, "references": references, "results": results}, indent=1))
    print(markdown(results, next(iter(references.values()), None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
