"""How far down IDEFICS-mid's FP32 time to first token can go on this CPU, against issue 19's target (0.6x HF's), in
one run: the MatMul arithmetic of mmedge's two first-token calls, the rate this CPU reaches on it, and HF's time.

- mmedge's first token is the preprocessing, the fused image graph (vision tower, Perceiver Resampler, every gated
  cross-attention layer's K/V) and the decoder's prefill. Both graphs are fed as the pipeline feeds them, on ONNX
  Runtime with the session settings mmedge's plan gives them, and profiled once: the profile gives the MatMul share
  of each call, and each MatMul / Gemm / FusedMatMul node's FLOPs follow from its shapes (2 * rows * inner *
  columns, times any batch).
- Then four subjects take turns, once a round, the order reversed every other round (``flamingo_cpu``'s
  ``measure_in_turns``), so this VM's slow and fast spells fall on all of them: HF's and mmedge's time to first token
  (``flamingo_cpu``'s subjects), the two graphs alone, and every MatMul shape
  of the graphs alone (a one-node graph with a constant weight like the model's). The best of those shapes' rates is
  **this CPU's MatMul rate**.
- **The floor**: mmedge's time to first token with every MatMul at that rate and the rest as it takes now, and the
  stricter **MatMul-only floor**: preprocessing + every MatMul at that rate, nothing else; both also as a share of
  HF's time. A one-row product by a large weight (the LM head's, at the last position) is bound by reading the
  weight, not by arithmetic: it counts at the time it takes alone. A target under the MatMul-only floor cannot be
  met at FP32 on this CPU by any schedule of the same arithmetic.
- The export is mmedge's default, whose image graph has its long-inner MatMuls split. Where ``flamingo_cpu.py`` has
  left its ``--no-split-matmuls`` export in ``benchmarks/out``, that image graph takes the same turns, so the two are
  compared alone, call for call (with their largest output difference).

    python benchmarks/flamingo_floor.py    # ~1 min; exports mmedge/idefics-mid FP32 into benchmarks/out once (~30 s)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from flamingo_cpu import MODEL, OUT, HFSubject, MmedgeSubject, measure_in_turns, photos_and_fp32_export, prompt

from _common import machine_info, markdown_table, package_versions, time_call, time_samples, write_json
from mmedge import cli_args

MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul")
TARGET = 0.6  # issue 19: FP32 time to first token <= 0.6x HF's
WHOLE = "image graph, MatMuls whole"


def profiled_feeds(captioner, photos) -> tuple[dict, dict, float]:
    """The feeds ``captioner`` (mmedge's pipeline on ONNX Runtime) gives the image graph and the decoder's prefill for
    the benchmark prompt, and the median preprocessing time (ms)."""
    inputs = captioner.inputs
    fused = inputs.settings["image_context"]
    image_feeds = {fused["input"]: inputs.prompt_pixels([photos], len(photos))}  # [1, images, 3, 224, 224]
    built = inputs.build([prompt(photos)])
    decoder = captioner.decoder
    captured: list[dict] = []
    forward = decoder._forward  # the prefill's feeds and (empty) cache, as the runner hands them to the graph

    def recording(feeds):
        past = [p.numpy() if hasattr(p, "numpy") else p for p in decoder._past]
        captured.append({**feeds, **dict(zip(decoder._past_names, past))})
        return forward(feeds)

    decoder._forward = recording
    try:
        decoder.set_context(built["prefill"], built["step"])
        decoder.start(built["embeds"], built["mask"])
    finally:
        del decoder._forward
    preprocessing = time_call(lambda: captioner.preprocessor(photos), warmup=1, runs=7).median_ms
    return image_feeds, captured[0], preprocessing


def profile(graph: Path, feeds: dict, options, runs: int = 7) -> dict:
    """From ONNX Runtime's profile of the median of ``runs`` calls (``options``: an ``OrtOptions``): the nodes' MatMul
    and other time (ms; the profiler's own cost included), the MatMul FLOPs and the MatMul shapes."""
    import onnxruntime as ort

    from mmedge.runtimes.ort_session import session_options

    with tempfile.TemporaryDirectory() as tmp:
        settings = session_options(options)
        settings.enable_profiling = True
        settings.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(graph), settings, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(runs + 1):  # the first warms up
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs_events = _split_runs(events)[1:]  # the first is the warm-up
    median_run = sorted(runs_events, key=lambda ev: sum(e["dur"] for e in ev))[len(runs_events) // 2]
    matmul_us, other_us, flops, shapes = 0.0, 0.0, 0, {}
    for event in median_run:
        op = event["args"].get("op_name", "")
        if op in MATMUL_OPS:
            matmul_us += event["dur"]
            shape, count = _matmul_shape(event["args"])
            flops += 2 * count * shape[0] * shape[1] * shape[2]
            shapes[shape] = shapes.get(shape, 0) + count
        else:
            other_us += event["dur"]
    return {"matmul_ms": matmul_us / 1e3, "other_ms": other_us / 1e3, "gflop": flops / 1e9, "shapes": shapes}


def _split_runs(events: list[dict]) -> list[list[dict]]:
    """The node events of each ``session.run``, in order (ONNX Runtime's "model_run" events bound them)."""
    bounds = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [[e for e in nodes if start <= e["ts"] <= end] for start, end in bounds]


def _matmul_shape(args: dict) -> tuple[tuple[int, int, int], int]:
    """(rows, inner, columns) of a MatMul-like node from its profiled shapes (a constant weight is not listed), and
    how many such products its batch dimensions hold."""
    shapes = [next(iter(s.values())) for s in args["input_type_shape"]]
    a, out = shapes[0], next(iter(args["output_type_shape"][0].values()))
    rows, columns = out[-2], out[-1]
    inner = a[-1] if a[-2] == rows else a[-2]  # [.., inner, rows]: A transposed (Gemm / FusedMatMul transA)
    batch = int(np.prod(out[:-2], dtype=np.int64))
    if len(shapes) == 1:  # a constant 2-D weight: ONNX Runtime multiplies the batch as one [batch * rows] product
        return (batch * int(rows), int(inner), int(columns)), 1
    return (int(rows), int(inner), int(columns)), batch


def shape_name(shape: tuple[int, int, int]) -> str:
    """"ROWSxINNERxCOLUMNS": how the rates and the JSON name a MatMul shape."""
    return "x".join(map(str, shape))


def timed_alone(shape: tuple[int, int, int]) -> bool:
    """The MatMul shapes ``RateSubject`` times alone: those of at least 50 MFLOP, and one-row products by a weight of
    at least 16 MB (the LM head's, ``[1, 768] @ [768, 32000]``: 49 MFLOP, bound by reading its 98 MB of weights)."""
    rows, inner, columns = shape
    return 2 * rows * inner * columns >= 50e6 or (rows == 1 and 4 * inner * columns >= 16e6)


def matmul_floor_ms(shapes: dict, rates: dict, peak: float) -> float:
    """A call's MatMuls at this CPU's rate (``peak``, GFLOP/s), except one-row products timed alone, which take the
    time they take alone: reading the weight bounds them, not arithmetic, so ``peak`` would be no floor for them."""
    total = 0.0
    for (rows, inner, columns), count in shapes.items():
        own = rates.get(shape_name((rows, inner, columns))) if rows == 1 else None
        total += count * 2 * rows * inner * columns / (own or peak) / 1e6
    return total


class RateSubject:
    """Each MatMul shape ``timed_alone`` picks, alone, a one-node graph with a constant weight like the model's: its
    rate (GFLOP/s, the best of ``calls``) each time it runs."""

    def __init__(self, shapes, threads: int, calls: int = 5):
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        from mmedge.runtimes.ort_session import OrtOptions, session_options

        rng = np.random.default_rng(0)
        self.sessions, self.calls = {}, calls
        for rows, inner, columns in filter(timed_alone, shapes):
            weight = numpy_helper.from_array(rng.standard_normal((inner, columns), dtype=np.float32), "W")
            graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, inner])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, columns])],
                                      [weight])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            stop = {"session.force_spinning_stop": "1"}  # as mmedge's graphs run in turn: the next has the cores
            session = ort.InferenceSession(model.SerializeToString(),
                                           session_options(OrtOptions(threads=threads, config_entries=stop)),
                                           providers=["CPUExecutionProvider"])
            self.sessions[(rows, inner, columns)] = (session, {"x": rng.standard_normal((rows, inner),
                                                                                       dtype=np.float32)})

    def run(self) -> tuple[dict, list]:
        rates = {}
        for (rows, inner, columns), (session, x) in self.sessions.items():
            # the first call is untimed: the other subjects' threads and caches fall on it
            best_ms = min(time_samples(lambda: session.run(None, x), warmup=1, runs=self.calls))
            rates[shape_name((rows, inner, columns))] = 2 * rows * inner * columns / best_ms / 1e6
        return rates, []

    def info(self) -> dict:
        return {}


class GraphsSubject:
    """The image graph and the decoder's prefill alone, fed as the pipeline feeds them: each call's time (ms) each
    time it runs."""

    def __init__(self, graphs: dict[str, tuple[Path, dict, object]]):
        import onnxruntime as ort

        from mmedge.runtimes.ort_session import session_options

        self.sessions = {}
        for name, (graph, feeds, options) in graphs.items():
            session = ort.InferenceSession(str(graph), session_options(options), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            self.sessions[name] = (session, {k: v for k, v in feeds.items() if k in names})
        self.difference = None
        if WHOLE in self.sessions:
            split, whole = (session.run(None, feeds) for session, feeds in (self.sessions["image graph"],
                                                                             self.sessions[WHOLE]))
            self.difference = max(float(np.abs(a - b).max()) for a, b in zip(split, whole))

    def run(self) -> tuple[dict, list]:
        times = {}
        for name, (session, feeds) in self.sessions.items():
            # one untimed hand-over call: the other subjects' threads and caches fall on it
            times[name] = time_samples(lambda: session.run(None, feeds), warmup=1, runs=1)[0]
        return times, []

    def info(self) -> dict:
        return {"whole_vs_split_max_abs_diff": self.difference}


def session_settings(folder: Path, threads: int) -> dict:
    """Component -> the ``OrtOptions`` mmedge's plan gives it on ONNX Runtime (its session config entries included)."""
    from mmedge.api import plan_for
    from mmedge.runtimes.ort_session import OrtOptions

    return {name: OrtOptions(threads=threads, config_entries=dict(chosen.options.get("config_entries", {})))
            for name, chosen in plan_for(folder, backend="onnxruntime", threads=threads).components.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=cli_args.count, default=2)
    parser.add_argument("--runs", type=cli_args.count, default=7, help="timed rounds (after a warm-up round)")
    args = parser.parse_args(argv)
    ready = photos_and_fp32_export(args.threads)
    if ready is None:
        return 1
    photos, folder = ready
    mmedge_subject = MmedgeSubject(folder, photos, args.threads, {"backend": "onnxruntime"})
    image_feeds, prefill_feeds, preprocessing = profiled_feeds(mmedge_subject.captioner, photos)
    settings = session_settings(folder, args.threads)
    graphs = {"image graph": (folder / "image_context.onnx", image_feeds, settings["image_context"]),
              "decoder prefill": (folder / "decoder.onnx", prefill_feeds, settings["decoder"])}
    calls = {name: profile(graph, feeds, options) for name, (graph, feeds, options) in graphs.items()}
    shapes = sorted({s for c in calls.values() for s in c["shapes"]})
    whole = OUT / "idefics-mid-fp32-whole-matmuls" / "image_context.onnx"  # flamingo_cpu.py's --no-split-matmuls
    compared = {WHOLE: (whole, image_feeds, graphs["image graph"][2])} if whole.is_file() else {}
    subjects = {"hf": HFSubject(photos, args.threads),
                "mmedge": mmedge_subject,
                "graphs": GraphsSubject({**graphs, **compared}), "rates": RateSubject(shapes, args.threads)}
    measured = measure_in_turns(subjects, runs=args.runs)  # each runs once a round, the order reversed by turns
    failed = {name: r["error"] for name, r in measured.items() if "error" in r}
    if failed:
        print(f"failed: {failed}")
        return 1
    hf_ttft, mm_ttft, graph_ms = measured["hf"]["ttft_ms"], measured["mmedge"]["ttft_ms"], measured["graphs"]
    rates = {k: v for k, v in measured["rates"].items() if k != "tokens"}
    peak = max(rates.values())  # one-row products are slower than any arithmetic-bound shape: never the peak

    rows, floor, strict = [], mm_ttft, preprocessing
    for name, c in calls.items():
        matmul_ms = graph_ms[name] * c["matmul_ms"] / (c["matmul_ms"] + c["other_ms"])  # the profile's shares
        at_peak = matmul_floor_ms(c["shapes"], rates, peak)
        floor, strict = floor - matmul_ms + at_peak, strict + at_peak
        rows.append([name, f"{graph_ms[name]:.1f}", f"{c['gflop']:.2f}", f"{matmul_ms:.1f}",
                     f"{c['gflop'] / matmul_ms * 1e3:.0f}", f"{graph_ms[name] - matmul_ms:.1f}", f"{at_peak:.1f}"])
    print(f"{MODEL}, 2 images, FP32, threads={args.threads}; every figure a median of {args.runs} rounds in turns\n")
    print(markdown_table(["call", "call ms", "MatMul GFLOP", "MatMul ms (profile's share)", "MatMul GFLOP/s",
                          "other ops ms", "MatMul ms at this CPU's rate"], rows))
    print("\nMatMul shapes alone (GFLOP/s): " + ", ".join(f"{shape}: {r:.0f}" for shape, r in rates.items())
          + f"; this CPU's rate: {peak:.0f}")
    print(f"HF's time to first token {hf_ttft:.1f} ms (target {TARGET} of it: {TARGET * hf_ttft:.1f} ms); "
          f"preprocessing {preprocessing:.1f} ms")
    if WHOLE in graph_ms:
        print(f"image graph with its MatMuls whole (--no-split-matmuls): {graph_ms[WHOLE]:.1f} ms; split: "
              f"{graph_ms['image graph']:.1f} ms ({graph_ms['image graph'] / graph_ms[WHOLE]:.2f} of it), largest "
              f"output difference {measured['graphs']['whole_vs_split_max_abs_diff']:.1e}")
    for label, ms in (("mmedge now (its time to first token, as flamingo_cpu.py measures it)", mm_ttft),
                      ("floor: every MatMul at this CPU's rate, the rest as now", floor),
                      ("MatMul-only floor: preprocessing + every MatMul at this CPU's rate", strict)):
        print(f"  {label}: {ms:.1f} ms = {ms / hf_ttft:.2f} of HF's")
    named = {n: {**{k: v for k, v in c.items() if k != "shapes"},
                 "shapes": {shape_name(shape): count for shape, count in c["shapes"].items()}}
             for n, c in calls.items()}
    write_json(OUT / "flamingo_floor.json", {
        "model": MODEL, "threads": args.threads, "machine": machine_info(),
        "versions": package_versions(["torch", "transformers", "onnxruntime"]), "preprocessing_ms": preprocessing,
        "profiles": named, "measured": measured, "peak_gflops": peak, "floor_ms": floor,
        "matmul_only_floor_ms": strict})
    return 0


if __name__ == "__main__":
    sys.exit(main())
