"""Few-shot, interleaved prompts with a Flamingo-style model (IDEFICS), streamed: export once (host), then ask (device).

    python examples/few_shot.py                  # the demo IDEFICS that ships with mmedge, on its bundled scenes
    python examples/few_shot.py --style shapes   # the two examples in the prompt set the answer's style
    python examples/few_shot.py --compare        # questions across two images instead: more shapes? same colour?
"""

import argparse
import sys
from pathlib import Path

import mmedge
from mmedge import demo
from mmedge.artifact import export_needed
from mmedge.cli_args import export_folder
from mmedge.demo import few_shot


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    task = parser.add_mutually_exclusive_group()  # --style shapes the few-shot examples, which --compare has none of
    task.add_argument("--style", default="colors", choices=few_shot.STYLES, help="the examples' caption style")
    task.add_argument("--compare", action="store_true", help="which image has more shapes, or same colour?")
    parser.add_argument("--llm-precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--out", type=export_folder, default="artifacts/few-shot",
                        help="artifact folder; exported when missing or stale (a folder of anything else is refused)")
    args = parser.parse_args(argv)
    model, out = str(demo.model_path("idefics")), Path(args.out)
    if reason := export_needed(out, model, "int8", args.llm_precision):  # host side: needs mmedge[export]
        from mmedge.export import export_model
        export_model(model, out, precision="int8", llm_precision=args.llm_precision, overwrite=True, progress=False)
        print(f"exported the demo IDEFICS to {out} (INT8 encoders, {args.llm_precision.upper()} LLM) because {reason}")
    scenes = [(path, entry["present_labels"]) for path, entry in zip(demo.images(), demo.truth()["images"].values())]
    with mmedge.load(out) as model:  # device side: one image graph per prompt, then the decoder streams
        for i, (scene, nxt) in enumerate(zip(scenes, scenes[1:] + scenes[:1])):
            if not args.compare:  # two examples in the chosen style, then the scene to describe
                prompt, _ = few_shot.few_shot([nxt, scenes[(i + 2) % len(scenes)]], scene, args.style)
            elif i % 2 == 0 and len(scene[1]) != len(nxt[1]):  # both kinds of question the demo model learnt
                prompt, _ = few_shot.more_shapes(scene, nxt)
            else:  # this scene's first shape against the next one's last
                prompt, _ = few_shot.same_color(scene, nxt, scene[1][0].split()[1], nxt[1][-1].split()[1])
            print(f"{scene[0].name} {prompt[0] if args.compare else f'like the examples ({args.style})'}: ", end="")
            for piece in model.stream(prompt):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    try:
        main()
    except mmedge.MmedgeError as error:  # mmedge's errors say what failed and what to do: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
