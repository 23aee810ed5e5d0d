"""Captioning and questions with BLIP-2, streamed token by token: export once (host), then caption (device).

    python examples/caption.py                         # the demo BLIP-2 that ships with mmedge, on its bundled scenes
    python examples/caption.py --question "what color is the circle?"
    python examples/caption.py --model ~/models/blip2-opt-2.7b --out blip2-int4 photo.jpg
"""

import argparse
import sys
from pathlib import Path

import mmedge
from mmedge import demo
from mmedge.artifact import Artifact, export_needed
from mmedge.cli_args import export_folder
from mmedge.errors import InputError
from mmedge.families import FAMILIES
from mmedge.images import checked_image_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to caption (default: the bundled demo scenes)")
    parser.add_argument("--model", help="BLIP-2 or InstructBLIP checkpoint folder or hub id (default: the demo BLIP-2)")
    parser.add_argument("--question", help="ask this instead of captioning (BLIP-2's 'Question: ... Answer:' prompt)")
    parser.add_argument("--llm-precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--out", type=export_folder, default="artifacts/caption",
                        help="artifact folder; exported when missing or stale (a folder of anything else is refused)")
    args = parser.parse_args(argv)
    if args.question is not None and not args.question.strip():
        parser.error("--question is empty: pass a question, e.g. 'what color is the circle?', or leave it out")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens is {args.max_new_tokens}: pass 1 or more")
    model, out = args.model or str(demo.model_path("blip2")), Path(args.out)
    images = [checked_image_path(image) for image in args.images] or demo.images()  # cheap checks before an export
    if reason := export_needed(out, model, "int8", args.llm_precision):  # host side: needs pip install "mmedge[export]"
        from mmedge.export import export_model
        from mmedge.export.loading import checkpoint_family
    family = FAMILIES[checkpoint_family(model) if reason else Artifact.open(out).manifest["family"]]  # config only
    if family.generative is None or family.interleaved:  # refused before anything is written
        raise InputError(f"'{model}' is a checkpoint of the {family.label} family, which caption.py does not "
                         "caption", "a BLIP-2 or InstructBLIP checkpoint (OPT, Llama or Flan-T5 LLM)",
                         f"use examples/{'few_shot' if family.interleaved else 'zero_shot'}.py")
    if reason:
        export_model(model, out, precision="int8", llm_precision=args.llm_precision, overwrite=True, progress=False)
        print(f"exported {model} to {out} (INT8 encoders, {args.llm_precision.upper()} LLM) because {reason}")
    with mmedge.load(out) as captioner:  # device side: the generation loop owns the decoder's KV cache
        prompt = captioner.vqa_template.replace("{}", args.question.strip()) if args.question else None
        for image in images:
            print(f"{Path(image).name}: ", end="", flush=True)
            for piece in captioner.stream(str(image), prompt, max_new_tokens=args.max_new_tokens):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    try:
        main()
    except mmedge.MmedgeError as error:  # mmedge's errors say what failed and what to do: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
