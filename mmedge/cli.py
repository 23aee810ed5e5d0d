"""The `mmedge` command: export, run, validate, build, doctor, demo, bench, triton, serve.

Every mmedge error becomes one line on stderr and its exit code (2 bad input, 3 not found, 4 backend unavailable,
5 measured drift past its floor: validate, export); no traceback. So do bad command lines (exit 2) and, as a last
resort, errors mmedge did not anticipate (exit 1, with a hint to rerun with MMEDGE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from mmedge.cli_args import Once, count, text, threads, whole_number_between
from mmedge.errors import ArtifactNotFoundError, InputError, MmedgeError

DEFAULT_TOP_K = 5  # `mmedge run`: zero-shot labels shown per image
MAX_TUNE_RUNS = 1000  # `mmedge tune --runs`: mmedge.runtimes.openvino.tune.MAX_RUNS (not imported to build the parser)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"mmedge: warning: {message}\n"


def _labels(args) -> list[str] | None:
    labels = list(args.labels or [])
    if getattr(args, "labels_file", None):
        labels += _read_labels_file(args.labels_file)
    if args.labels is not None and not labels:
        raise InputError("--labels was given with no labels", "at least one label after --labels",
                         "pass e.g. --labels cat dog bird")
    return labels or None


def _read_labels_file(name: str) -> list[str]:
    """The labels of --labels-file: any readable file that is not a folder (a pipe, <(command), /dev/stdin); - reads
    standard input."""
    path = Path(name)
    shown = "standard input" if name == "-" else f"labels file '{path}'"
    if name != "-" and not path.exists():
        raise InputError(f"labels file '{path}' does not exist", "a text file with one label per line",
                         "check the path")
    if path.is_dir() and name != "-":
        raise InputError(f"labels file '{path}' is a folder", "a text file with one label per line",
                         "check the path")
    try:
        data = sys.stdin.buffer.read() if name == "-" else path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {shown} ({exc.strerror or exc})", "a readable text file with one label per "
                         "line", "check the file's permissions") from None
    try:
        # a byte order mark (Windows Notepad writes one) is not part of the first label; decoded whole, the error
        # names the byte's offset in the file
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputError(f"{shown} is not UTF-8 text (its byte {exc.start} cannot start a character)",
                         "a UTF-8 text file with one label per line",
                         "check that the path names the labels file, or save it as UTF-8") from None
    read = [line.strip() for line in text.splitlines() if line.strip()]
    if not read:
        raise InputError(f"{shown} holds no labels (it is empty or blank)", "a text file with one label per line",
                         "write the labels into it, or drop --labels-file")
    return read


# --- export ------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from mmedge.export import ExportOptions, export_model, require_export_tools

    require_export_tools("`mmedge export`")
    extra = {"fused_prefix": False} if args.split_prefix else {}
    if args.recompute_cross_kv:
        extra["cached_cross_kv"] = False
    if args.split_image_graphs:
        extra["fused_image_context"] = False
    if args.fused_attention:
        extra["fused_attention"] = True
    options = ExportOptions(task=args.task, precision=args.precision, quantization=args.quantization,
                            llm_precision=args.llm_precision, int4_block_size=args.int4_block_size,
                            int4_accuracy_level=args.int4_accuracy_level, int4_head=args.int4_head,
                            int4_symmetric=True if args.int4_symmetric else None, extra=extra,
                            labels=_labels(args), labels_file=args.labels_file, templates=args.templates,
                            calibration=args.calibration,
                            calibration_method=args.calibration_method, fidelity=args.fidelity_images,
                            random_weights=args.random_weights,
                            allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=not args.quiet,
                            with_pytorch=args.with_pytorch, openvino_weights=args.openvino_weights,
                            split_matmuls=not args.no_split_matmuls)
    _check_out_writable(args.out)
    try:
        out = export_model(args.model, args.out, options)
    except OSError as exc:  # named as OUT, not as its staging folder '.OUT.partial-…'
        raise InputError(f"cannot write the artifact OUT '{args.out}': {exc.strerror or exc}",
                         "a writable folder with room for the artifact", "check the path, free space and permissions, "
                         "or choose another OUT") from None
    from mmedge.artifact import Artifact

    artifact = Artifact.open(out)
    print(f"wrote {out} ({artifact.size_bytes() / 1e6:.1f} MB)")
    for name, comp in artifact.components.items():
        print(f"  {name}: {comp['file']} {comp['precision']} {_parity_line(comp['parity'])}")
    return 0


def _check_out_writable(out: str) -> None:
    """Make and remove a folder beside OUT, before the checkpoint loads: a folder that refuses it (/proc, a read-only
    mount where access() says yes to root) would otherwise fail the export after all its work."""
    import tempfile

    parent = Path(out).parent
    if not parent.is_dir():  # made by the export (mmedge.artifact.check_output_folder judges it)
        return
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mmedge-write-check-", dir=parent))
    except OSError as exc:
        raise InputError(f"cannot write the artifact OUT '{out}': its folder '{parent}' refuses a new folder "
                         f"({exc.strerror or exc})", "a writable folder with room for the artifact",
                         "check the path, free space and permissions, or choose another OUT") from None


def _parity_line(parity: dict) -> str:
    worst = min(m["cosine"] for m in parity["outputs"].values())
    text = f"cosine vs PyTorch {worst:.6f}"
    fidelity = parity.get("fidelity") or {}
    on = "held-out" if fidelity.get("held_out", True) else "calibration-image"  # static INT8 with only --calibration
    if "top1_agreement" in fidelity:  # CLIP
        text += f", {on} top-1 agreement vs FP32 {fidelity['top1_agreement']:.3f}"
    elif "logits_cosine_mean" in fidelity:  # a captioner's decoder
        text += f", {on} logits cosine vs FP32 {fidelity['logits_cosine_mean']:.4f}"
    elif "embedding_cosine_mean" in fidelity:  # a captioner's encoders
        text += f", {on} output cosine vs FP32 {fidelity['embedding_cosine_mean']:.4f}"
    return text


# --- run ---------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    import mmedge
    from mmedge.artifact import Artifact
    from mmedge.backend_option_args import CliBackendOptions
    from mmedge.run_options import (
        check_generation,
        check_list_values,
        check_run_options,
        check_served_run_options,
        check_task,
        remote_target_of,
        target_of,
    )

    check_list_values(args)  # an image path a list option took: before anything is opened
    if args.triton:  # MODEL on a Triton server (mmedge.triton_client) in place of an artifact folder
        import dataclasses

        from mmedge.triton.cli import connect_for_run

        check_served_run_options(args)
        if not args.interleaved:
            _check_image_paths(args.images)
        pipeline = connect_for_run(args)  # a --task the pipeline does not serve is refused here
        target = remote_target_of(pipeline)
        if args.task is not None:  # --task vqa runs on the caption pipeline: its options are judged for vqa
            target = dataclasses.replace(target, task=args.task)
        check_run_options(args, target)  # before any request
        labels = _labels_for(args, target)
    else:
        manifest = Artifact.open(args.artifact).manifest
        check_task(args, manifest)
        target = target_of(manifest, args.task)
        check_run_options(args, target)  # before anything is loaded
        check_generation(args, manifest, target)  # the values, as the captioner would judge them once loaded
        # --backend-option, --llm-quantization (torch), --openvino-weights (OpenVINO): checked, then refused before
        # loading where the plan would leave them nothing to change
        backend_options = CliBackendOptions.from_args(args)
        if not args.interleaved:
            _check_image_paths(args.images)
        labels = _labels_for(args, target)  # a missing or unreadable labels file: refused before loading
        backend_options.check_for(args.artifact, args.backend, args.device, args.threads)
        pipeline = mmedge.load(args.artifact, backend=args.backend, device=args.device, task=args.task,
                               threads=args.threads, backend_options=backend_options.as_dict() or None)
    with pipeline:
        if args.interleaved:
            _print_line(_run_interleaved(pipeline, args.images, args))
            return 0
        for image in args.images:
            _print_line(_run_one(pipeline, image, args, labels))
    return 0


def _labels_for(args, target) -> list[str] | None:
    """The labels a zero-shot run classifies against (--labels, --labels-file), read once, before the model loads;
    refused there when a two-graph artifact gets none."""
    from mmedge.run_options import check_labels_given

    check_labels_given(args, target)
    if target.task != "zero-shot":
        return None
    from mmedge.pipelines.zero_shot import check_labels, check_templates

    labels = _labels(args)
    if labels is not None:  # judged as the classifier judges them, before it loads: repeats, blanks, too many
        check_labels(labels)
    if args.templates is not None:
        check_templates(args.templates)
    return labels


def _check_image_paths(images: list[str]) -> None:
    """Every image path names a file, before the model loads: a mistyped one would otherwise stop the run after the
    lines of the images before it."""
    from mmedge.images import checked_image_path

    for image in images:
        checked_image_path(image)


def _print_line(line: str | None) -> None:
    if line is not None:  # None: a caption or answer, printed already (before any note on it)
        print(line)


def _run_interleaved(pipeline, items: list[str], args) -> str | None:
    """One interleaved prompt: arguments naming existing files are images, the others text."""
    if not getattr(pipeline, "interleaved", False):
        raise InputError("--interleaved was given for a model without interleaved prompts",
                         "a Flamingo-style (IDEFICS) captioning artifact",
                         "drop --interleaved, or export an IDEFICS model")
    prompt = [_interleaved_item(index, item) for index, item in enumerate(items)]  # counted as the pipeline counts
    generation = _generation_args(args)
    if args.stream and not args.json:
        _note_if_empty(_print_stream(pipeline.stream(prompt, **generation)), "the answer", args)
        return None
    text = pipeline.generate(prompt, **generation)
    if args.json:
        return json.dumps({"prompt": items, "text": text})
    print(text)
    _note_if_empty(text, "the answer", args)  # after the line it explains
    return None


def _interleaved_item(index: int, item: str):
    """An existing file is an image; a folder, or a lone word that looks like a path (an image file's suffix, or a
    leading ./ ../ / ~ or trailing /) and names no file, is refused (as text it would quietly become part of the
    prompt); the rest is text."""
    from PIL import Image

    path = Path(item)
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"prompt item {index} '{item}' is a folder", "an image file, or text",
                         "name an image file in it (each image of the prompt is one argument)")
    lone = bool(item.strip()) and not any(c.isspace() for c in item)
    looks_like_a_path = path.suffix.lower() in Image.registered_extensions() or item.startswith(
        ("./", "../", "/", "~")) or item.endswith("/")
    if lone and looks_like_a_path:
        raise InputError(f"prompt item {index} '{item}' names an image file that does not exist",
                         "an existing image file, or text", "check the path (text that is only a file name: put it "
                         "in a sentence, e.g. 'the file photo.png')")
    return item


def _print_stream(pieces) -> str:
    """Print streamed text as it arrives, then end its line; returns all of it."""
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print(flush=True)
    return text


def _note_if_empty(text: str, what: str, args) -> None:
    """A blank line alone would look like a fault: say on stderr that the model's answer itself is empty (as the
    PyTorch model's is on prompts unlike the ones it learnt: it ends the answer with its first token)."""
    if text.strip():
        return
    cut = ", or a stop string matched at its start" if args.stop else ""
    print(f"mmedge: note: {what} is empty: the model ended it before any text{cut}; a prompt in the form the model "
          "was trained on gives one (the demo models' prompts: README, 'Demo models and examples')",
          file=sys.stderr)


def _generation_args(args) -> dict:
    from mmedge.run_options import generation_args

    return generation_args(args)


def _caption_one(pipeline, image: str, args) -> str | None:
    from mmedge.pipelines.captioner import vqa_prompt

    generation = _generation_args(args)
    prompt = vqa_prompt(pipeline.vqa_template, args.question) if args.question is not None else args.prompt
    if args.stream and not args.json:
        print(f"{image}: ", end="", flush=True)
        _note_if_empty(_print_stream(pipeline.stream(image, prompt, **generation)), f"the caption of {image}", args)
        return None
    text = pipeline.caption(image, prompt, **generation)
    if args.json:
        return json.dumps({"image": image, "prompt": prompt, "text": text})
    print(f"{image}: {text}")
    _note_if_empty(text, f"the caption of {image}", args)  # after the line it explains
    return None


def _run_one(pipeline, image: str, args, labels: list[str] | None) -> str | None:
    if pipeline.task == "caption":
        return _caption_one(pipeline, image, args)
    if pipeline.task == "embed":
        vector = pipeline.embed_images(image)[0]
        if args.json:
            return json.dumps({"image": image, "embedding": [round(float(x), 6) for x in vector]})
        return f"{image}: embedding of {vector.shape[0]} floats, first {', '.join(f'{x:.4f}' for x in vector[:4])}"
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    predictions = pipeline(image, labels=labels, templates=args.templates, top_k=top_k)
    if args.json:
        return json.dumps({"image": image, "predictions": predictions})
    return f"{image}: " + ", ".join(f"{p['label']} ({p['score']:.3f})" for p in predictions)


# --- validate ----------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from mmedge.backend_option_args import CliBackendOptions
    from mmedge.runtimes.registry import backend
    from mmedge.validate import raise_on_failure, validate_artifact

    backend_options = CliBackendOptions.from_args(args)
    for given in backend_options.given:  # the generation loop's decoder: validation measures the graphs as exported
        if given.setting in backend(given.backend).decoder_only:
            raise InputError(f"{given.flag} would change nothing in validation",
                             "settings of the graphs it runs (each as exported: this one shapes the decoder "
                             "mmedge.load opens for generation)", f"drop {given.option}")
    backend_options.check_for(args.artifact, args.backend, args.device, args.threads)
    report = validate_artifact(args.artifact, backend=args.backend, device=args.device, threads=args.threads,
                               backend_options=backend_options.as_dict() or None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, entry in report.items():
            for output, m in entry["outputs"].items():
                status = "ok" if m["ok"] else "FAIL"
                export = "unrecorded" if m["export_cosine"] is None else f"{m['export_cosine']:.6f}"
                print(f"{name}.{output} [{entry['precision']}, {entry['backend']}]: cosine {m['cosine']:.6f} "
                      f"(export {export}, floor {m['min_cosine']:.6f}), max_abs "
                      f"{m['max_abs']:.3g}  {status}")
            if "generation" in entry:
                g = entry["generation"]
                print(f"{name}.generation [{entry['precision']}, {entry['backend']}]: cosine {g['cosine']:.6f} "
                      f"(KV-cached, {g['steps']} steps, vs {g['reference']}; floor {g['min_cosine']:.6f}), max_abs "
                      f"{g['max_abs']:.3g}  {'ok' if g['ok'] else 'FAIL'}")
    raise_on_failure(report)
    return 0


# --- build -------------------------------------------------------------------------------------
def cmd_build(args) -> int:
    """Prebuild the artifact's TensorRT engines on this device, with progress lines; a summary on stdout."""
    from mmedge.device import probe
    from mmedge.runtimes.engine_cache import EngineSettings
    from mmedge.runtimes.tensorrt_build import build_artifact
    from mmedge.runtimes.tensorrt_planning import ProfileLimits, tensorrt_defaults

    found = probe()
    limits = ProfileLimits(max_batch=tensorrt_defaults(found).max_batch if args.max_batch is None else args.max_batch,
                           max_sequence=args.max_sequence,
                           max_images=args.max_images)
    settings = EngineSettings(args.precision, limits, args.workspace_mb)
    results = build_artifact(args.artifact, settings, components=args.components, force=args.force,
                             progress=not args.quiet, probe=found)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['component']}: {r['action']} {r['precision']} engine {r['engine']} "
                  f"({r['bytes'] / 2**20:.1f} MiB)")
    return 0


# --- doctor ------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from mmedge.backend_option_args import CliBackendOptions
    from mmedge.device import probe
    from mmedge.runtimes.registry import backends

    if not args.artifact:  # they only change the plan for an artifact
        from mmedge.run_options import plan_flags_given

        given = plan_flags_given(args)
        if given:
            raise InputError(f"{given[0]} would change nothing without an artifact",
                             "an artifact folder (mmedge doctor ARTIFACT shows the plan these options change)",
                             f"add the artifact, or drop {given[0]}")
    backend_options = CliBackendOptions.from_args(args)  # checked before every file is hashed
    found = probe()
    report = {"device": found.to_dict(),
              "backends": [line for candidate in backends() for line in candidate.device_lines(found)]}
    status = 0
    if args.artifact:
        from mmedge.api import plan_for
        from mmedge.artifact import Artifact
        from mmedge.memory import load_estimate

        # the command users turn to when a load fails: a damaged or missing file is reported, not planned around
        try:
            artifact = Artifact.open(args.artifact, recheck=True)  # every file hashed now: a failing disk writes none
            artifact.check_every_file()
            report["files"] = "ok: every file the manifest names matches its sha256"
        except ArtifactNotFoundError as error:
            artifact = _with_missing_files(args.artifact)
            if artifact is None:  # no folder or no manifest: nothing to plan
                raise
            report["files"], status = f"MISSING: {error}", error.exit_code
        except MmedgeError as error:
            artifact = Artifact.open(args.artifact)
            report["files"], status = f"DAMAGED: {error}", error.exit_code
        chosen = plan_for(artifact, args.backend, args.device, backend_options=backend_options.as_dict(),
                          threads=args.threads, probe=found)  # load's plan, its settings applied
        backend_options.check_used(chosen, backend_options.blocker(artifact, args.device, args.threads))
        report["plan"] = {name: vars(c) for name, c in chosen.components.items()}
        report["reasons"] = chosen.reasons
        report["artifact"] = [line for candidate in backends() for line in candidate.artifact_lines(artifact)]
        estimate = load_estimate(artifact, chosen, backend_options.as_dict(), found)
        report["memory"] = {"graphs_mib": estimate.graphs_mib, "estimated": estimate.estimated,
                            "may_not_fit": estimate.may_not_fit,
                            "available_mib": estimate.available.mib if estimate.available else None,
                            "limited_by": estimate.available.limited_by if estimate.available else None}
    if args.json:
        print(json.dumps(report, indent=2, default=list))
        return status
    print(f"machine: {found.system} {found.machine}, {found.cpu_cores} cores, "
          f"{(found.memory_total_mb or 0) / 1024:.1f} GiB, ISA: {', '.join(found.cpu_flags) or 'baseline'}")
    gpus = "; ".join(f"{g.name} (sm {g.compute_capability}, {g.memory_free_mb}/{g.memory_total_mb} MiB free)"
                     for g in found.gpus)
    print(f"GPUs: {gpus or 'none found'}")
    print(f"Jetson: {found.jetson or 'no'}")
    print("engines: " + ", ".join(f"{k} {v or 'absent'}" for k, v in found.engines.items()))
    print(f"onnxruntime providers: {', '.join(found.ort_providers)}")
    for line in report["backends"]:
        print(line)
    if args.artifact:
        print(f"files: {report['files']}")
        for name, c in report["plan"].items():
            where = f"[{', '.join(c['providers'])}]" if c["providers"] else json.dumps(c["options"])
            print(f"plan: {name} -> {c['backend']} {where} {c['precision']}")
        for reason in report["reasons"]:
            print(f"  because {reason}")
        for line in report["artifact"]:
            print(line)
        print(_memory_line(estimate))
    return status


def _memory_line(estimate) -> str:
    from mmedge.memory import FITTING

    line = f"memory: {estimate.text()}"
    if estimate.may_not_fit:
        line = f"WARNING: {line}: it may not fit; {FITTING}"
    return line


def _with_missing_files(path: str):
    """The artifact at ``path`` without the check that every file it names is there (``mmedge doctor`` reports the
    missing ones and plans the rest), or None where the folder or its manifest is missing."""
    from mmedge.artifact import Artifact
    from mmedge.manifest import MANIFEST_FILE, parse_manifest

    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        return None
    return Artifact(Path(path).resolve(), parse_manifest(manifest.read_bytes()), recheck=True)


# --- tune --------------------------------------------------------------------------------------
def cmd_tune(args) -> int:
    """Time each component on ONNX Runtime and OpenVINO here; ``auto`` decides those components from the figures."""
    from mmedge.api import plan_for
    from mmedge.artifact import Artifact
    from mmedge.runtimes.openvino.tune import tune
    from mmedge.tuning import timings_path

    artifact = Artifact.open(args.artifact)
    record = tune(artifact.root, threads=args.threads, runs=args.runs, progress=not args.quiet)
    chosen = plan_for(artifact, threads=args.threads)  # reads the timings tune has just stored
    picks = {name: chosen.components[name].backend for name in record["components"]}
    if args.json:
        print(json.dumps({**record, "auto": picks}, indent=2))
        return 0
    for name, timing in record["components"].items():
        openvino = f"OpenVINO {timing['openvino_ms']:.2f} ms" if timing["openvino_ms"] is not None else \
            timing["openvino_failed"]  # "OpenVINO could not read component ..."
        print(f"{name}: ONNX Runtime {timing['onnxruntime_ms']:.2f} ms, {openvino} ({timing['inputs']}) -> auto runs "
              f"it on {picks[name]}")
    print(f"stored in {timings_path(artifact)} for this device at "
          f"{record['device']['threads']} thread{'s' if record['device']['threads'] != 1 else ''} per graph")
    return 0


def _bundled_configs() -> list[str]:
    """The config names --random-weights knows (export/data/configs), or none without the exporter's package."""
    try:
        from mmedge.export.loading import known_random_configs
    except ImportError:
        return []
    return known_random_configs()


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``mmedge: error:`` line (what, then what to do), exit 2."""

    def error(self, message: str):
        # mmedge.cli_args' words after the flag: "--stop is empty; expected ...; fix: ..."
        message = re.sub(r"^argument ([^:]+): (is empty|given twice)", r"\1 \2", message)
        fix = "" if "; fix: " in message else f"; fix: see `{self.prog} --help`"
        print(f"mmedge: error: {message.rstrip('.')}{fix}.", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option after a subcommand points at that subcommand's --help."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            parser = commands.get(getattr(parsed, "command", None), self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from mmedge import __version__

    parser = _Parser(prog="mmedge", description="Export, quantize and run multimodal models on edge devices.")
    parser.add_argument("--version", action="version", version=f"mmedge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    bundled = _bundled_configs()
    exp = sub.add_parser("export", help="export a checkpoint to an artifact folder (host side; needs mmedge[export])",
                         description="Export a checkpoint to a validated artifact folder. An option that would change "
                                     "nothing for the model's family is refused (exit 2), before anything is loaded.")
    exp.add_argument("model", type=text,
                     help="hub id, checkpoint folder, or (with --random-weights) a bundled config name")
    exp.add_argument("out", type=text, help="artifact folder to write (must not exist unless --overwrite)")
    exp.add_argument("--task", type=text, default=None,
                     help="CLIP only: zero-shot or embed (default zero-shot); a captioning "
                          "artifact (BLIP-2, InstructBLIP, IDEFICS) answers captions and "
                          "questions alike and takes no --task")
    exp.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                     help="encoders (and the LLM unless --llm-precision)")
    exp.add_argument("--llm-precision", choices=["fp32", "fp16", "int8", "int4"],
                     help="BLIP-2 and IDEFICS: the LLM decoder's precision (int8 dynamic, int4 weight-only); "
                          "default: --precision")
    exp.add_argument("--int4-block-size", type=int, default=None,
                     help="INT4 LLM: weights per scale (16-256, power of two; default 32)")
    exp.add_argument("--int4-accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                     help="INT4 LLM, MatMulNBits compute: 4 (default) = int8 activations (fastest on CPU), 0 = unset")
    exp.add_argument("--int4-head", default=None, choices=["int8", "fp32", "int4"],
                     help="INT4 LLM: the precision of its output projection (LM head); default int8 (8-bit "
                          "MatMulNBits blocks), as INT4 LLM recipes keep the head above 4 bits")
    exp.add_argument("--int4-symmetric", action="store_true",
                     help="INT4 LLM: symmetric blocks, no zero points (default: a zero point per block, which "
                          "halved the demo BLIP-2's INT4 logit error for 2.5%% more bytes)")
    exp.add_argument("--split-prefix", action="store_true",
                     help="BLIP-2: vision and Q-Former as two graphs, not one prefix graph")
    exp.add_argument("--recompute-cross-kv", action="store_true",
                     help="IDEFICS: the decoder recomputes cross-attention K/V from the visual tokens every step "
                          "(as transformers does) instead of taking them once per image set; for comparison")
    exp.add_argument("--split-image-graphs", action="store_true",
                     help="IDEFICS: vision, resampler and cross K/V as separate graphs, not one image_context graph")
    exp.add_argument("--no-split-matmuls", action="store_true",
                     help="FP32 image graphs: keep every MatMul whole. By default a MatMul with a long inner "
                          "dimension (an MLP's down-projection) is split in two, the same sum in another order, "
                          "which CPUs run faster (ViT image graphs in a median 0.94 of their time on ONNX Runtime "
                          "and OpenVINO; benchmarks/split_matmuls_cpu.py); GPU engines from it are unmeasured. "
                          "Refused where the image graph has no MatMul that long")
    exp.add_argument("--fused-attention", action="store_true",
                     help="BLIP-2 / InstructBLIP with an OPT LLM: the decoder's attention as one ONNX Runtime "
                          "MultiHeadAttention node per layer instead of transformers' ops (half the nodes; ONNX "
                          "Runtime and OpenVINO run it, TensorRT cannot; off by default: on a 2-core Xeon decode "
                          "1.01x, a 300-token prefill 1.08x, benchmarks/RESULTS.md)")
    exp.add_argument("--quantization", default=None, choices=["dynamic", "static"],
                     help="INT8 recipe: dynamic (default; fastest on CPU, no calibration) or static QDQ of the "
                          "encoders (calibrated; for TensorRT; needs --precision int8)")
    exp.add_argument("--labels", nargs="*", action="extend", type=text,
                     help="bake these labels into one zero-shot graph (no text encoder on the device)")
    exp.add_argument("--labels-file", type=text, action=Once,
                     help="CLIP: file with one label per line (added to --labels)")
    exp.add_argument("--templates", nargs="+", action="extend", type=text,
                     help="CLIP with --labels: prompt templates with '{}' for the label, baked "
                          "in (default: 'a photo of a {}.'); at --precision int8 also the "
                          "text graph's calibration and fidelity prompts")
    exp.add_argument("--calibration", metavar="DIR",
                     help="static INT8: folder of images to calibrate on (default: bundled photos)")
    exp.add_argument("--calibration-method", default=None, choices=["minmax", "percentile", "entropy"],
                     help="static INT8: how activation ranges are set from the calibration images "
                          "(default: percentile)")
    exp.add_argument("--fidelity-images", metavar="DIR",
                     help="quantized exports: folder of images to measure fidelity vs FP32 on, recorded in "
                          "the manifest "
                          "(default: the --calibration folder, else bundled held-out photos)")
    exp.add_argument("--random-weights", action="store_true",
                     help="build the architecture with random weights (offline benchmarks); MODEL is a "
                          "checkpoint folder "
                          "or a bundled config: " + (", ".join(bundled) or "(the exporter is not installed)"))
    exp.add_argument("--allow-pickle", action="store_true",
                     help="accept pickled .bin weights (loaded with weights_only=True); refused for a local folder "
                          "with safetensors weights, which are loaded anyway")
    exp.add_argument("--with-pytorch", action="store_true",
                     help="also write the checkpoint's safetensors weights (pytorch/) for the torch backend")
    exp.add_argument("--openvino-weights", choices=["int8", "int4"], default=None,
                     help="BLIP-2 and IDEFICS at an FP32 LLM: also write the decoder with NNCF-compressed weights for "
                          "the OpenVINO backend (needs mmedge[openvino]; its parity is measured and recorded)")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT once the new artifact is complete")
    exp.add_argument("--quiet", action="store_true", help="no progress lines")
    exp.set_defaults(func=cmd_export)

    from mmedge import backend_option_args
    from mmedge.runtimes.registry import backend_names

    def runtime_flags(p):
        p.add_argument("--backend", default="auto", choices=backend_names())
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--threads", type=threads, default=None, help="CPU threads per graph")
        p.add_argument(backend_option_args.FLAG, action="append", metavar=backend_option_args.METAVAR,
                       help=backend_option_args.HELP)
        p.add_argument("--json", action="store_true", help="machine-readable output")

    run = sub.add_parser("run", help="run an artifact on images",
                         description="Run an artifact on images. An option the artifact's task would not use is "
                         "refused (exit 2).")
    run.add_argument("artifact", type=text, help="artifact folder (written by mmedge export or mmedge demo)")
    run.add_argument("images", nargs="+", type=text,
                     help="image files (with --interleaved: images and text, in prompt order)")
    run.add_argument("--labels", nargs="*", action="extend", type=text,
                     help="zero-shot with two graphs: labels to classify against")
    run.add_argument("--labels-file", type=text, action=Once,
                     help="zero-shot: file with one label per line (added to --labels); - reads standard input")
    run.add_argument("--templates", nargs="+", action="extend", type=text,
                     help="zero-shot: prompt templates with '{}' for the label "
                          "(default: 'a photo of a {}.')")
    run.add_argument("--top-k", type=count, default=None, help=f"zero-shot: labels to show (default {DEFAULT_TOP_K})")
    run.add_argument("--task", default=None, choices=["zero-shot", "embed", "caption", "vqa"])
    cap = run.add_argument_group("captioning (BLIP-2, IDEFICS)")
    cap.add_argument("--prompt", type=text, help="text the caption continues, e.g. 'a photo of'")
    cap.add_argument("--question", help="ask a question (VQA prompting: 'Question: ... Answer:')")
    cap.add_argument("--stream", action="store_true", help="print text as tokens arrive")
    cap.add_argument("--interleaved", action="store_true",
                     help="IDEFICS: the arguments after ARTIFACT form one prompt; existing files are images, "
                          "the rest text")
    cap.add_argument("--max-new-tokens", type=int)
    cap.add_argument("--num-beams", type=int)
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    cap.add_argument("--temperature", type=float)
    cap.add_argument("--top-p", type=float)
    cap.add_argument("--top-k-tokens", type=int, help="sampling: keep the k most likely tokens")
    cap.add_argument("--seed", type=int)
    cap.add_argument("--stop", nargs="+", action="extend", type=text, help="stop strings")
    cap.add_argument("--llm-quantization", choices=["int8", "nf4"],
                     help="torch backend: the LLM's weights in bitsandbytes INT8 (LLM.int8) or NF4")
    cap.add_argument("--openvino-weights", choices=["int8", "int4"],
                     help="OpenVINO backend: the LLM's weights compressed by NNCF (the IR `mmedge export "
                          "--openvino-weights` wrote, else compressed at the first load and cached)")
    runtime_flags(run)
    run.add_argument("--triton", type=text, metavar="URL",
                     help="run on a Triton server (http://HOST:8000 or grpc://HOST:8001): "
                          "ARTIFACT is then a model `mmedge triton` wrote (needs "
                          "mmedge[triton])")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="re-measure an artifact's parity on this device")
    val.add_argument("artifact", type=text)
    runtime_flags(val)
    val.set_defaults(func=cmd_validate)

    build = sub.add_parser("build",
                           help="prebuild an artifact's TensorRT engines on this device (needs mmedge[tensorrt])")
    build.add_argument("artifact", type=text)
    build.add_argument("--precision", choices=["fp16", "int8", "fp32"], default=None,
                       help="engine precision (default: int8 for static QDQ graphs, fp16 for FP16 graphs, else "
                            "fp16 - fp32 for FP32 T5 graphs, which overflow at FP16)")
    build.add_argument("--max-batch", type=count, default=None,
                       help="largest batch an engine takes (default: 4 on Jetson, 16 on a desktop GPU)")
    build.add_argument("--max-sequence", type=count, default=None,
                       help="longest token sequence (default: the decoder's positions up to 512; a text encoder "
                            "the tokenizer's max_length); at most those, and for a captioning model at least the "
                            "image's query rows and BOS every prompt starts with")
    build.add_argument("--max-images", type=count, default=None, help="most images per call (default: --max-batch)")
    build.add_argument("--workspace-mb", type=count, default=None,
                       help="TensorRT builder workspace (default: 1/16 of a Jetson's memory up to 1 GiB, 1/4 of free "
                            "GPU memory up to 4 GiB)")
    build.add_argument("--components", nargs="+", action="extend", type=text,
                       help="only these components (default: all that TensorRT can build)")
    build.add_argument("--force", action="store_true", help="rebuild even engines that are fresh")
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    build.add_argument("--json", action="store_true", help="machine-readable summary")
    build.set_defaults(func=cmd_build)

    doc = sub.add_parser("doctor", help="what this device has and what mmedge would pick")
    doc.add_argument("artifact", nargs="?", type=text)
    runtime_flags(doc)
    doc.set_defaults(func=cmd_doctor)

    tune = sub.add_parser("tune", help="measure which CPU backend (ONNX Runtime or OpenVINO) runs each graph faster "
                          "here; auto then follows the measurement (needs mmedge[openvino])")
    tune.add_argument("artifact", type=text)
    tune.add_argument("--threads", type=threads, default=None,
                      help="CPU threads per graph, as the artifact will be loaded with (default: all cores)")
    tune.add_argument("--runs", type=whole_number_between(3, MAX_TUNE_RUNS), default=10,
                      help="timed rounds per graph and backend (median; 3 to 1000)")
    tune.add_argument("--quiet", action="store_true", help="no progress lines")
    tune.add_argument("--json", action="store_true", help="machine-readable record")
    tune.set_defaults(func=cmd_tune)

    from mmedge import bench, demo, serve
    from mmedge.triton import cli as triton

    demo.add_parser(sub)
    bench.add_parser(sub, runtime_flags)
    triton.add_parser(sub)
    serve.add_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM (a job scheduler, `kill`, an out-of-memory supervisor), raised in the main thread so the work under way
    unwinds as on Ctrl-C: an export's staging and scratch folders are removed, nothing half-written stays."""


def terminated_in(pid: int):
    """The SIGTERM handler of process ``pid``: Terminated there. A process forked from it inherits the handler
    (OpenVINO's telemetry sender, multiprocessing's workers): there SIGTERM keeps its default action, so the child
    ends quietly instead of printing a Terminated traceback into the command's output."""
    def handler(signum, frame) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()

    return handler


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    try:
        args = build_parser().parse_args(argv)  # imports the subcommands' modules: a Ctrl-C may come meanwhile
    except KeyboardInterrupt:
        return _interrupted()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated_in(os.getpid())) if main_thread else None  # `serve`: its own
    try:
        return _run(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # output that fails to reach its file (a full disk) fails here, as one line, not at exit
        return code
    except Terminated:
        print("mmedge: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports it
    except MmedgeError as exc:
        print(f"mmedge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # the reader left (`mmedge doctor | head -3`): not an error of this command
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command whose reader left
    except OSError as exc:  # disk full, permission denied: the system's answer, as one line; 1 is for bugs
        if exc.filename is None:  # a write to standard output (> /dev/full): its unwritten rest is dropped
            _drop_stdout()
        print(f"mmedge: error: {_system_error(exc)}; expected paths this user can read and write, with free space; "
              "fix: check the path, free space and permissions.", file=sys.stderr)
        return 2
    except MemoryError:  # an allocation Python could not make (numpy, an import): the device, not a bug
        if os.environ.get("MMEDGE_DEBUG"):
            raise
        from mmedge.device import FREE_MEMORY, out_of_memory_error

        error = out_of_memory_error("mmedge ran out of memory", MemoryError("MemoryError"), FREE_MEMORY)
        print(f"mmedge: error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as exc:  # a bug: one line, the traceback on request
        if isinstance(exc.__context__, KeyboardInterrupt):  # a C extension's import cut by Ctrl-C: "init failed"
            return _interrupted()
        if os.environ.get("MMEDGE_DEBUG"):
            raise
        print(f"mmedge: internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}; "
              "this is a bug in mmedge: rerun with MMEDGE_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        return 1


def _interrupted() -> int:
    print("mmedge: interrupted", file=sys.stderr)
    return 130  # 128 + SIGINT, as a shell reports it


def _system_error(exc: OSError) -> str:
    where = f" ('{exc.filename}')" if exc.filename else " (writing the output)"
    return f"{exc.strerror or exc}{where}"


def _drop_stdout() -> None:
    """Point stdout at the null device: no second error when Python flushes it at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
