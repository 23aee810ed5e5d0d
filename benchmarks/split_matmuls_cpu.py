"""FP32 image graphs with their long-inner MatMuls split in two (the exporter's default) against the same graphs with
every MatMul whole (``--no-split-matmuls``), on ONNX Runtime's and OpenVINO's CPU backends: the comparison behind
``mmedge.export.graph_rewrites``, in one run.

Three full-size graphs with random weights (seed 0): CLIP ViT-B/32's vision tower (batch 1 and 8), BLIP-2's prefix
graph on the ``mmedge/blip2-vitb-opt125m`` config (ViT-B/16 and Q-Former; batch 1 and 4) and IDEFICS-mid's image
graph (one prompt, 2 images; the exports ``flamingo_cpu.py`` uses). Each export is made twice, split and whole, and
each graph is opened by mmedge's runner for the backend, as ``mmedge.load`` opens it (``--threads``). A fourth case is
the graph the exporter keeps whole: CLIP ViT-B/32's text tower (its MLPs are 2048 -> 512, long enough to split), whose
split copy is made here by the exporter's rewrite and opened with the whole graph's runner settings. The two take
turns (``mmedge.bench.samples_in_turns``: blocks of 3 calls, each opened by an untimed hand-over call, the order
reversed every round) for ``--rounds`` rounds of 9 calls each; the table gives each round's split / whole ratio of
medians, and the largest output difference between the two.

    python benchmarks/split_matmuls_cpu.py      # ~8 min with cold exports on 2 cores, 3-7 min cached
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _common import export_once, machine_info, markdown_table, package_versions, write_json
from mmedge import cli_args

OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Case:
    title: str
    model: str
    component: str
    folder: str  # OUT / f"{folder}" split, OUT / f"{folder}-whole-matmuls" whole
    shapes: tuple[tuple[int, ...], ...]  # the pixel_values shapes to time; text: (batch, tokens)
    options: tuple = ()
    split_here: bool = False  # a graph the exporter keeps whole: its split copy is made by this script


CASES = (
    Case("CLIP ViT-B/32 vision tower", "openai/clip-vit-base-patch32", "vision", "split-clip-b32-fp32",
         ((1, 3, 224, 224), (8, 3, 224, 224)), (("task", "embed"),)),
    Case("BLIP-2 prefix (ViT-B/16 + Q-Former)", "mmedge/blip2-vitb-opt125m", "prefix", "split-blip2-vitb-fp32",
         ((1, 3, 224, 224), (4, 3, 224, 224))),
    Case("IDEFICS-mid image graph", "mmedge/idefics-mid", "image_context", "idefics-mid-fp32",
         ((1, 2, 3, 224, 224),)),  # flamingo_cpu.py's fp32 and fp32-whole-matmuls exports
    Case("CLIP ViT-B/32 text tower (kept whole)", "openai/clip-vit-base-patch32", "text", "split-clip-b32-fp32",
         ((1, 10), (24, 10), (8, 77)), (("task", "embed"),), split_here=True),  # one query, 24 labels, full context
)
BACKENDS = ("onnxruntime", "openvino")


def chosen_backends(parser: argparse.ArgumentParser, named: list[str] | None) -> list[str]:
    """The backends to measure, checked before any export: by default every one installed here (OpenVINO, when
    absent, dropped with a note); one named with ``--backends`` but not installed is a usage error."""
    from mmedge.device import importable
    from mmedge.runtimes.registry import BACKENDS as REGISTRY

    wanted = list(dict.fromkeys(named or BACKENDS))
    missing = [name for name in wanted if not importable(REGISTRY[name].package)]
    if named and missing:
        parser.error("; ".join(f"--backends {name}: {name} is not installed here ({REGISTRY[name].install})"
                               for name in missing) + "; leave it out of --backends")
    for name in missing:
        print(f"note: {name} is not installed here ({REGISTRY[name].install}): measuring without it",
              file=sys.stderr)
    return [name for name in wanted if name not in missing]


def exports(case: Case, threads: int) -> dict[str, Path]:
    """The split and the whole export of ``case`` (each made once, remade when the exporter's recipes changed); for a
    graph the exporter keeps whole, the split export's folder and a folder with the graph's split copy."""
    from mmedge.export import export_model

    if case.split_here:
        folders = {"whole": OUT / case.folder, "split": OUT / f"{case.folder}-{case.component}-split"}
        if not (folders["whole"] / "manifest.json").is_file():
            raise RuntimeError(f"{case.title}: run the case that exports {folders['whole']} first")
        return folders  # the split copy: split_copy
    folders = {"split": OUT / case.folder, "whole": OUT / f"{case.folder}-whole-matmuls"}
    for how, folder in folders.items():
        made = export_once(f"{case.title} ({how})", folder, (folder / "manifest.json").is_file(),
                           lambda f=folder, split=how == "split": export_model(
                               case.model, f, random_weights=True, seed=0, overwrite=True, progress=False,
                               threads=threads, split_matmuls=split, **dict(case.options)))
        if made["error"]:
            raise RuntimeError(f"export of {case.title} ({how}) failed:\n{made['error']}")
    return folders


def split_copy(artifact: Path, folder: Path, component: str) -> int:
    """``folder``/``component``.onnx: the artifact's graph with the exporter's split applied; returns how many MatMuls
    were split."""
    import shutil

    from mmedge.artifact import Artifact
    from mmedge.export.graph_rewrites import split_long_inner_matmuls

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{component}.onnx"
    shutil.copyfile(artifact / Artifact.open(artifact).manifest["components"][component]["file"], path)
    return split_long_inner_matmuls(path)


def open_runner(folder: Path, component: str, backend: str, threads: int):
    """The component's runner on ``backend``, opened by the backend's plug-in as ``mmedge.load`` opens it (the
    artifact's other graphs stay closed)."""
    from mmedge.api import plan_for
    from mmedge.artifact import Artifact
    from mmedge.runtimes.registry import backend as registered

    artifact = Artifact.open(folder)
    planned = plan_for(artifact, backend=backend, device="cpu", threads=threads).components[component]
    return registered(backend).open_runner(artifact, component, planned, threads=threads, settings=None,
                                           keep_on_device=False)


def compare(case: Case, folders: dict[str, Path], backend: str, threads: int, rounds: int) -> list[dict]:
    from mmedge.bench import samples_in_turns

    runners = {"whole": open_runner(folders["whole"], case.component, backend, threads)}
    if case.split_here:  # the split copy, by the whole graph's runner class with its settings, compiled afresh
        from dataclasses import replace

        from mmedge.artifact import Artifact

        whole, entry = runners["whole"], Artifact.open(folders["whole"]).manifest["components"][case.component]
        options = replace(whole.options, engine_cache=None) if hasattr(whole.options, "engine_cache") else \
            whole.options  # OpenVINO's blob cache is keyed by the manifest's entry: it would give the whole graph
        runners["split"] = type(whole)(folders["split"] / f"{case.component}.onnx", case.component, entry, options)
    else:
        runners["split"] = open_runner(folders["split"], case.component, backend, threads)
    rows = []
    try:
        for shape in case.shapes:
            feeds = inputs(case, shape)
            split, whole = (runners[how].infer(feeds) for how in ("split", "whole"))
            difference = max(float(np.abs(split[k] - whole[k]).max()) for k in split)
            ratios, medians = [], {"split": [], "whole": []}
            for _ in range(rounds):
                times = samples_in_turns({how: (lambda r=r: r.infer(feeds)) for how, r in runners.items()},
                                         runs=9, block=3, hand_over=1, warmup=1)
                for how in medians:
                    medians[how].append(statistics.median(times[how]))
                ratios.append(medians["split"][-1] / medians["whole"][-1])
            rows.append({"case": case.title, "input": list(shape), "backend": backend, "ratios": ratios,
                         **{f"{how}_ms": statistics.median(values) for how, values in medians.items()},
                         "max_abs_diff": difference})
            print(f"{case.title} {list(shape)} on {backend}: split / whole " + ", ".join(f"{r:.2f}" for r in ratios),
                  file=sys.stderr, flush=True)
    finally:
        for runner in runners.values():
            runner.close()
    return rows


def inputs(case: Case, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if case.component != "text":
        return {"pixel_values": rng.standard_normal(shape, dtype=np.float32)}
    return {"input_ids": rng.integers(1, 49000, shape, dtype=np.int64),  # [batch, tokens], CLIP's vocabulary
            "attention_mask": np.ones(shape, np.int64)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=cli_args.count, default=2)
    parser.add_argument("--rounds", type=cli_args.count, default=3,
                        help="rounds of 9 calls each, split and whole in turns")
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                        help="default: both, OpenVINO left out (with a note) where it is not installed")
    args = parser.parse_args(argv)
    args.backends = chosen_backends(parser, args.backends)
    if not args.backends:
        parser.error("none of the backends is installed here: pip install onnxruntime")
    warnings.simplefilter("ignore")  # random weights
    results = []
    for case in CASES:
        folders = exports(case, args.threads)
        if case.split_here:
            count = split_copy(folders["whole"], folders["split"], case.component)
        else:
            split = json.loads((folders["split"] / "manifest.json").read_text())
            count = split["components"][case.component].get("rewrites", {}).get("split_long_inner_matmuls", 0)
        for backend in args.backends:
            results += [{**row, "split_matmuls": count} for row in compare(case, folders, backend, args.threads,
                                                                             args.rounds)]
    rows = [[r["case"], "x".join(map(str, r["input"])), r["backend"], r["split_matmuls"],
             f"{r['split_ms']:.1f}", f"{r['whole_ms']:.1f}", ", ".join(f"{x:.2f}" for x in r["ratios"]),
             f"{r['max_abs_diff']:.1e}"] for r in results]
    print(f"threads={args.threads}; median of 9 calls a round, {args.rounds} rounds in turns\n")
    print(markdown_table(["graph", "input", "backend", "MatMuls split", "split ms", "whole ms",
                          "split / whole, each round", "max |diff|"], rows))
    write_json(OUT / "split_matmuls_cpu.json", {"threads": args.threads, "machine": machine_info(),
                                                "versions": package_versions(["onnxruntime", "openvino"]),
                                                "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
