"""The demo models through their exported graphs, every precision, on held-out test scenes, in one run.

`mmedge demo` exports the shipped CLIP and BLIP-2 at FP32 and quantized (or reuses its cache); this script then
measures each artifact on the first N test-split scenes (`examples/scenes.py`, never trained on), as
`tests/test_demo.py` does with its floors:

- CLIP: zero-shot top-1 over the 24 colour × shape labels on one-shape scenes, FP32 and INT8, and their agreement;
- BLIP-2: exact greedy captions and colour/shape/count answers, FP32 and INT8 encoders + INT4 LLM, and how often
  the INT4 caption is identical to the FP32 one;
- IDEFICS: exact greedy answers per interleaved task (few-shot captions in three styles, comparisons of two
  images; ``examples/flamingo_demo.py``), FP32 and INT8 encoders + INT4 LLM, and how often INT4 answers as FP32.

    python benchmarks/demo_fidelity.py                 # 240 scenes per measurement, the demo's cache
    python benchmarks/demo_fidelity.py --scenes 480    # the whole test split the model cards report on
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import mmedge
from _common import markdown_table, write_json
from mmedge import demo
from mmedge.cli_args import count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import flamingo_demo  # noqa: E402
import scenes  # noqa: E402


def zero_shot(folder: Path, images: list) -> np.ndarray:
    """Top-1 label per image."""
    with mmedge.load(folder) as classifier:
        labels = classifier.baked_labels
        return np.array([labels[k] for k in classifier.probabilities(images).argmax(-1)])  # [images]


def captions_and_answers(folder: Path, images: list, chosen: list) -> tuple[list[str], dict[str, list[bool]]]:
    """Greedy captions, and whether each answer is right, by question kind."""
    with mmedge.load(folder) as captioner:
        captions = captioner.caption(images)
        right: dict[str, list[bool]] = {"color": [], "shape": [], "count": []}
        for question, asked in scenes.questions_by_text(chosen).items():
            got = captioner.caption([images[i] for i, _ in asked], captioner.vqa_template.replace("{}", question))
            right[scenes.question_kind(question)] += [g == want for g, (_, want) in zip(got, asked)]
    return captions, right


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=count, default=240, help="test-split scenes per measurement")
    parser.add_argument("--idefics-prompts", type=count, default=None,
                        help="held-out IDEFICS prompts per task (default: scenes / 6; the model card uses 200)")
    parser.add_argument("--cache", type=Path, default=None, help="the demo's cache (default: mmedge demo's)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "demo_fidelity.json")
    args = parser.parse_args(argv)
    cache = Path(demo.run_demo(args.cache, count=1, progress=False)["cache"])  # exports, or reuses the cache

    single = scenes.split("test", args.scenes, (1,))
    truth = np.array([s.label for s in single])
    top1 = {name: zero_shot(cache / name, [s.render() for s in single]) for name in ("clip-fp32", "clip-int8")}
    mixed = scenes.split("test", args.scenes)
    images = [s.render() for s in mixed]
    blip2 = {name: captions_and_answers(cache / name, images, mixed) for name in ("blip2-fp32", "blip2-int4")}

    results = {"scenes": args.scenes, "clip": {name: float(np.mean(t == truth)) for name, t in top1.items()},
               "clip_int8_agreement": float(np.mean(top1["clip-fp32"] == top1["clip-int8"])), "blip2": {}}
    for name, (captions, right) in blip2.items():
        results["blip2"][name] = {"caption_exact": float(np.mean([c == s.caption for c, s in zip(captions, mixed)])),
                                  "color_shape_answers": float(np.mean(right["color"] + right["shape"])),
                                  "count_answers": float(np.mean(right["count"]))}
    fp32, int4 = blip2["blip2-fp32"][0], blip2["blip2-int4"][0]
    results["blip2_int4_identical_captions"] = float(np.mean([a == b for a, b in zip(fp32, int4)]))

    pct = "{:.1%}".format
    print(f"demo models through their exports, first {args.scenes} test-split scenes (ONNX Runtime CPU)\n")
    print(markdown_table(["artifact", "zero-shot top-1", "agreement with FP32"], [
        ["clip-fp32", pct(results["clip"]["clip-fp32"]), "reference"],
        ["clip-int8", pct(results["clip"]["clip-int8"]), pct(results["clip_int8_agreement"])]]))
    print()
    print(markdown_table(["artifact", "exact captions", "colour/shape answers", "count answers",
                          "captions identical to FP32"], [
        [name, pct(r["caption_exact"]), pct(r["color_shape_answers"]), pct(r["count_answers"]),
         "reference" if name == "blip2-fp32" else pct(results["blip2_int4_identical_captions"])]
        for name, r in results["blip2"].items()]))
    per_task = args.idefics_prompts or max(args.scenes // 6, 1)
    prompts = flamingo_demo.held_out_prompts(per_task)  # per task, over test-split scenes
    answers = {}
    for name in ("idefics-fp32", "idefics-int4"):
        with mmedge.load(cache / name) as model:
            answers[name] = [model.generate(p["prompt"]) for p in prompts]
    results["idefics"] = {name: flamingo_demo.scores(got, prompts) for name, got in answers.items()}
    results["idefics_items_any_order"] = {name: flamingo_demo.scores(got, prompts, flamingo_demo.same_items)
                                          for name, got in answers.items()}
    results["idefics_prompts_per_task"] = per_task
    results["idefics_int4_identical_answers"] = float(np.mean([a == b for a, b in zip(*answers.values())]))
    print()
    print(markdown_table(["artifact", *flamingo_demo.TASKS, "answers identical to FP32"], [
        [name, *(f"{pct(r[t])} ({pct(results['idefics_items_any_order'][name][t])} any order)"
                 for t in flamingo_demo.TASKS),
         "reference" if name == "idefics-fp32" else pct(results["idefics_int4_identical_answers"])]
        for name, r in results["idefics"].items()]))
    print(f"\nwritten: {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
