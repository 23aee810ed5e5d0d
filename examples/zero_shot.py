"""Zero-shot classification: export a CLIP checkpoint once (host), then classify images with labels chosen at run time.

    python examples/zero_shot.py                       # the demo CLIP that ships with mmedge, on its bundled scenes
    python examples/zero_shot.py --model ~/models/clip-vit-base-patch32 --labels cat dog --template "a photo of a {}."
    cat.jpg
"""

import argparse
from pathlib import Path

import mmedge
from mmedge import demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to classify (default: the bundled demo scenes)")
    parser.add_argument("--model", help="CLIP checkpoint folder or hub id (default: the shipped demo CLIP)")
    parser.add_argument("--labels", nargs="+", help="default: the demo's 24 colour × shape labels")
    parser.add_argument("--template", help="prompt template with {} (default: 'a {}' for the demo model)")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--out", default="artifacts/zero-shot", help="artifact folder; exported when missing")
    args = parser.parse_args(argv)
    shipped = args.model is None
    labels = args.labels or demo.labels()
    templates = [args.template] if args.template else (demo.templates() if shipped else None)

    out = Path(args.out)
    if (out / "manifest.json").is_file():
        print(f"using the artifact in {out} (delete it to export again)")
    else:  # host side: needs pip install "mmedge[export]"
        from mmedge.export import ExportOptions, export_model

        model = str(demo.model_path("clip")) if shipped else args.model
        export_model(model, out, ExportOptions(precision=args.precision, progress=False))
        print(f"exported {model} to {out} ({args.precision})")

    # device side: numpy + onnxruntime, no torch. Label embeddings are computed once, then cached.
    with mmedge.load(out) as classifier:
        for image in args.images or demo.images():
            top = classifier(str(image), labels=labels, templates=templates, top_k=3)
            print(f"{Path(image).name}: " + ", ".join(f"{p['label']} {p['score']:.2f}" for p in top))


if __name__ == "__main__":
    main()
