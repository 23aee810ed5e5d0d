"""Captioning and questions with BLIP-2, streamed token by token: export once (host), then caption (device).

    python examples/caption.py                         # the demo BLIP-2 that ships with mmedge, on its bundled scenes
    python examples/caption.py --question "what color is the circle?"
    python examples/caption.py --model ~/models/blip2-opt-2.7b --out blip2-int4 photo.jpg
"""

import argparse
from pathlib import Path

import mmedge
from mmedge import demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to caption (default: the bundled demo scenes)")
    parser.add_argument("--model", help="BLIP-2 checkpoint folder or hub id (default: the shipped demo BLIP-2)")
    parser.add_argument("--question", help="ask this instead of captioning (BLIP-2's 'Question: ... Answer:' prompt)")
    parser.add_argument("--llm-precision", default="int4", choices=["fp32", "int8", "int4"])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--out", default="artifacts/caption", help="artifact folder; exported when missing")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if (out / "manifest.json").is_file():
        print(f"using the artifact in {out} (delete it to export again)")
    else:  # host side: needs pip install "mmedge[export]"
        from mmedge.export import ExportOptions, export_model

        model = args.model or str(demo.model_path("blip2"))
        export_model(model, out, ExportOptions(precision="int8", llm_precision=args.llm_precision, progress=False))
        print(f"exported {model} to {out} (INT8 encoders, {args.llm_precision.upper()} LLM)")

    # device side: the generation loop owns the decoder's KV cache; text arrives piece by piece.
    with mmedge.load(out) as captioner:
        prompt = captioner.vqa_template.replace("{}", args.question) if args.question else None
        for image in args.images or demo.images():
            print(f"{Path(image).name}: ", end="", flush=True)
            for piece in captioner.stream(str(image), prompt, max_new_tokens=args.max_new_tokens):
                print(piece, end="", flush=True)
            print()


if __name__ == "__main__":
    main()
