"""Zero-shot classification: export a CLIP checkpoint once (host), then classify images with labels chosen at run time.

    python examples/zero_shot.py                       # the demo CLIP that ships with mmedge, on its bundled scenes
    python examples/zero_shot.py cat.jpg --model ~/clip-vit-base-patch32 --labels cat dog --template "a photo of a {}."
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
from mmedge.pipelines.zero_shot import check_labels, check_templates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="images to classify (default: the bundled demo scenes)")
    parser.add_argument("--model", help="CLIP checkpoint folder or hub id (default: the shipped demo CLIP)")
    parser.add_argument("--labels", nargs="+", help="labels to classify against (needed for any CLIP but the demo's, "
                        "whose 24 colour × shape labels are the default)")
    parser.add_argument("--template", help="prompt template with {} (default: 'a {}' for the demo model)")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--out", type=export_folder, default="artifacts/zero-shot",
                        help="artifact folder; exported when missing or stale (a folder of anything else is refused)")
    args = parser.parse_args(argv)
    model, out = args.model or str(demo.model_path("clip")), Path(args.out)
    shipped = Path(model).resolve() == demo.model_path("clip").resolve()  # the demo CLIP: its labels and template
    templates = [args.template] if args.template else (demo.templates() if shipped else None)
    images = [checked_image_path(image) for image in args.images] or demo.images()  # cheap checks before an export
    check_templates(templates)
    if reason := export_needed(out, model, args.precision):  # host side: needs pip install "mmedge[export]"
        from mmedge.export import ExportOptions, export_model
        from mmedge.export.loading import checkpoint_family
    family = FAMILIES[checkpoint_family(model) if reason else Artifact.open(out).manifest["family"]]  # config only
    if family.name != "clip":  # refused before anything is written: a captioning model scores no labels
        raise InputError(f"'{model}' is a checkpoint of the {family.label} family: zero_shot.py classifies with CLIP",
                         "a CLIP checkpoint", f"use examples/{'few_shot' if family.interleaved else 'caption'}.py")
    if not args.labels and not shipped:  # the demo's 24 colour × shape labels are the demo CLIP's alone
        raise InputError(f"no --labels for '{model}'", "the labels to classify against (the demo's shape labels "
                         "only suit the demo CLIP)", "pass e.g. --labels cat dog bird")
    labels = check_labels(args.labels) if args.labels else demo.labels()
    if reason is None:
        print(f"using the artifact in {out} ({model}, {args.precision})")
    else:  # overwrite replaces only an mmedge artifact, once the new one is complete
        print(f"exporting {model} to {out} ({args.precision}): {reason}")
        export_model(model, out, ExportOptions(precision=args.precision, overwrite=True, progress=False))

    # device side: numpy + onnxruntime, no torch. Label embeddings are computed once, then cached.
    with mmedge.load(out) as classifier:
        for image in images:
            top = classifier(str(image), labels=labels, templates=templates, top_k=3)
            print(f"{Path(image).name}: " + ", ".join(f"{p['label']} {p['score']:.2f}" for p in top))


if __name__ == "__main__":
    try:
        main()
    except mmedge.MmedgeError as error:  # mmedge's errors say what failed and what to do: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
