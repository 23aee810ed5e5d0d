"""Few-shot, interleaved prompts with a Flamingo-style model (IDEFICS), streamed: export once (host), then ask (device).

    python examples/few_shot.py                  # the demo IDEFICS that ships with mmedge, on its bundled scenes
    python examples/few_shot.py --style shapes   # the two examples in the prompt set the answer's style
    python examples/few_shot.py --compare        # questions across two images instead
"""

import argparse
from pathlib import Path

import mmedge
from mmedge import demo
from mmedge.demo import few_shot


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", default="colors", choices=few_shot.STYLES, help="the examples' caption style")
    parser.add_argument("--compare", action="store_true", help="which image has more shapes, or same colour?")
    parser.add_argument("--llm-precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--out", default="artifacts/few-shot", help="artifact folder; exported when missing")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if (out / "manifest.json").is_file():
        print(f"using the artifact in {out} (delete it to export again)")
    else:  # host side: needs pip install "mmedge[export]"
        from mmedge.export import ExportOptions, export_model

        quantized = {} if args.llm_precision == "fp32" else {"precision": "int8", "llm_precision": args.llm_precision}
        export_model(str(demo.model_path("idefics")), out, ExportOptions(progress=False, **quantized))
        print(f"exported the demo IDEFICS to {out} ({args.llm_precision.upper()} LLM)")

    scenes = [(path, entry["present_labels"]) for path, entry in zip(demo.images(), demo.truth()["images"].values())]
    with mmedge.load(out) as model:  # device side: one image graph per prompt, then the decoder streams
        for i, scene in enumerate(scenes):
            other = scenes[(i + 1) % len(scenes)]
            if not args.compare:  # two examples in the chosen style, then the scene to describe
                prompt, _ = few_shot.few_shot([scenes[(i + 1) % len(scenes)], scenes[(i + 2) % len(scenes)]], scene,
                                              args.style)
            elif len(scene[1]) != len(other[1]):
                prompt, _ = few_shot.more_shapes(scene, other)
            else:
                prompt, _ = few_shot.same_color(scene, other, scene[1][0].split()[1], other[1][0].split()[1])
            question = prompt[0] if args.compare else f"like the examples ({args.style})"
            print(f"{scene[0].name} {question}: ", end="", flush=True)
            for piece in model.stream(prompt):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
