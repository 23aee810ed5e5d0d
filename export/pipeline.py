"""``export_model``: checkpoint → traced, validated, optionally quantized ONNX artifact, written atomically.

checkpoint ─load─▶ torch modules ─spec─▶ ONNX ─parity vs torch─▶ (fp16 | int8 dynamic | int8 static QDQ)
    ─fidelity vs FP32─▶ artifact folder (manifest.json last, then one rename)
"""

from __future__ import annotations

import datetime
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import mmedge
from mmedge.artifact import atomic_folder, sha256_file
from mmedge.errors import ExportError, ParityError
from mmedge.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, dump_manifest
from mmedge.metrics import compare_outputs
from mmedge.progress import Progress

PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZATIONS = ("static", "dynamic")
VALIDATION_FILE = "validation.npz"
TOKENIZER_FILE = "tokenizer.json"
FP16_MIN_COSINE = 0.999


@dataclass
class ExportOptions:
    task: str = "zero-shot"
    precision: str = "fp32"  # fp32 | fp16 | int8
    quantization: str = "static"  # with int8: static (QDQ, calibrated) | dynamic
    labels: list[str] | None = None  # bake these into one zero-shot graph
    templates: list[str] | None = None
    calibration: str | None = None  # folder of images; None = bundled photos
    calibration_method: str = "percentile"
    min_quantized_cosine: float = 0.98  # mean embedding cosine vs FP32 on held-out photos
    random_weights: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision '{self.precision}' is not supported", f"one of {', '.join(PRECISIONS)}",
                              "pass --precision fp32, fp16 or int8")
        if self.quantization not in QUANTIZATIONS:
            raise ExportError(f"quantization '{self.quantization}' is not supported",
                              f"one of {', '.join(QUANTIZATIONS)}", "pass --quantization static or dynamic")


def export_model(model: str, out: str | Path, options: ExportOptions | None = None, **overrides) -> Path:
    """Export ``model`` (hub id, folder, or bundled config name with random_weights) to the folder ``out``."""
    options = options or ExportOptions(**overrides)
    options.check()
    from mmedge.export.families import FAMILIES
    from mmedge.export.loading import load_checkpoint

    quantized = options.precision != "fp32"
    progress = Progress(4 + int(quantized), enabled=options.progress)
    with progress.step(f"loading {model}" + (" (random weights)" if options.random_weights else "")):
        loaded = load_checkpoint(model, random_weights=options.random_weights, allow_pickle=options.allow_pickle,
                                 seed=options.seed)
    family = FAMILIES[loaded.family]
    with progress.step("building export specs" + (f" with {len(options.labels)} baked labels" if options.labels else "")):
        specs = family.specs(loaded, options.task, options.labels, options.templates)
    with atomic_folder(out, overwrite=options.overwrite) as stage, tempfile.TemporaryDirectory() as scratch:
        writer = _ArtifactBuilder(stage, Path(scratch), loaded, family, options)
        with progress.step(f"tracing {', '.join(s.name for s in specs)} and checking parity against PyTorch"):
            for spec in progress.items(specs, len(specs), "component"):
                writer.trace(spec)
        if quantized:
            with progress.step(_describe_precision(options)):
                writer.lower_precision(specs, progress)
        with progress.step("writing manifest and validation samples"):
            writer.finish(specs)
    return Path(out)


def _describe_precision(options: ExportOptions) -> str:
    if options.precision == "fp16":
        return "converting to FP16"
    if options.quantization == "dynamic":
        return "quantizing to INT8 (dynamic)"
    return f"calibrating and quantizing to INT8 (static QDQ, {options.calibration or 'bundled images'})"


class _ArtifactBuilder:
    """Accumulates component files and manifest entries inside the staging folder."""

    def __init__(self, stage: Path, scratch: Path, loaded, family, options: ExportOptions):
        from mmedge.export.preprocessing import preprocess_config_from_hf
        from mmedge.export.tokenization import save_tokenizer_json, tokenizer_settings_from_hf
        from mmedge.preprocess import ImagePreprocessor
        from mmedge.tokenizer import TextTokenizer

        self.stage, self.scratch, self.loaded, self.family, self.options = stage, scratch, loaded, family, options
        processor = loaded.image_processor
        self.preprocess = processor if isinstance(processor, dict) else preprocess_config_from_hf(processor)
        self.preprocessor = ImagePreprocessor(self.preprocess)
        self.tokenizer_settings = None
        self.tokenizer = None
        if family.needs_tokenizer(options.labels):
            save_tokenizer_json(loaded.tokenizer, stage / TOKENIZER_FILE)
            self.tokenizer_settings = tokenizer_settings_from_hf(loaded.tokenizer, family.max_length(loaded))
            self.tokenizer_settings["file"] = TOKENIZER_FILE
            self.tokenizer = TextTokenizer.from_file(stage / TOKENIZER_FILE, self.tokenizer_settings)
        self.fp32_paths: dict[str, Path] = {}
        self.entries: dict[str, dict] = {}

    def trace(self, spec) -> None:
        from mmedge.export.onnx_export import check_parity, export_spec

        folder = self.stage if self.options.precision == "fp32" else self.scratch
        path = export_spec(spec, folder / f"{spec.name}.onnx")
        self.fp32_paths[spec.name] = path
        self.entries[spec.name] = {
            "precision": "fp32", "quantization": None, **spec.manifest_io(), "opset": spec.opset,
            "parity": check_parity(spec, path),
        }

    def lower_precision(self, specs, progress: Progress) -> None:
        from mmedge.export.onnx_export import gate_parity, measure_parity, run_onnx
        from mmedge.export.quantize import convert_fp16, quantize_int8_dynamic, quantize_int8_static

        options = self.options
        final: dict[str, Path] = {}
        for spec in specs:
            dest = self.stage / f"{spec.name}.onnx"
            source = self.fp32_paths[spec.name]
            if options.precision == "fp16":
                recipe = convert_fp16(source, dest)
            elif options.quantization == "dynamic":
                recipe = quantize_int8_dynamic(source, dest)
            else:
                feeds, note = self.family.calibration_feeds(spec, self.preprocessor, self.tokenizer, options, progress)
                recipe = quantize_int8_static(source, dest, feeds, method=options.calibration_method, samples_note=note)
            final[spec.name] = dest
            entry = self.entries[spec.name]
            fp32_parity = entry["parity"]
            parity = measure_parity(spec, dest, self.family.validation_feeds(spec, self.preprocessor, self.tokenizer))
            parity["fp32_export"] = fp32_parity
            if options.precision == "fp16":
                gate_parity(spec.name, parity, None, FP16_MIN_COSINE,
                            "FP16 overflows in this model; export fp32 and let TensorRT pick FP16 layers")
            entry.update(precision=options.precision, quantization=recipe, parity=parity)
        if options.precision == "int8":
            fidelity = self.family.quantized_fidelity(
                lambda path, feeds: run_onnx(path, feeds, options.threads), self.fp32_paths, final,
                self.preprocessor, self.tokenizer, options.labels, options.templates)
            for name, measured in fidelity.items():
                self.entries[name]["parity"]["fidelity"] = measured
                if measured["embedding_cosine_mean"] < options.min_quantized_cosine:
                    raise ParityError(name, "embeddings", "cosine", measured["embedding_cosine_mean"],
                                      options.min_quantized_cosine,
                                      "use more representative --calibration images, --quantization dynamic, "
                                      "or --precision fp16")

    def finish(self, specs) -> None:
        import torch

        from mmedge.export.onnx_export import run_onnx, torch_reference

        arrays: dict[str, np.ndarray] = {}
        for spec in specs:
            feeds = self.family.validation_feeds(spec, self.preprocessor, self.tokenizer)
            reference = torch_reference(spec, {k: torch.from_numpy(v) for k, v in feeds.items()})
            arrays.update({f"{spec.name}/inputs/{k}": v for k, v in feeds.items()})
            arrays.update({f"{spec.name}/reference/{k}": v for k, v in reference.items()})
            path = self.stage / f"{spec.name}.onnx"
            entry = self.entries[spec.name]
            entry["file"] = path.name
            entry["sha256"] = sha256_file(path)
            entry["size_bytes"] = path.stat().st_size
            if (path.parent / (path.name + ".data")).exists():
                raise ExportError(f"component '{spec.name}' needs external weight data", "graphs under 2 GB",
                                  "not supported for CLIP-size models yet; report the model id")
            entry["parity"]["validation_samples"] = compare_outputs(reference, run_onnx(path, feeds, self.options.threads))
        np.savez(self.stage / VALIDATION_FILE, **arrays)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mmedge_version": mmedge.__version__,
            "family": self.family.name,
            **self.family.manifest_extras(self.loaded, self.options.task, self.options.labels, self.options.templates),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": self.loaded.source,
            "preprocess": self.preprocess,
            "tokenizer": self.tokenizer_settings,
            "components": {spec.name: self.entries[spec.name] for spec in specs},
            "validation": {"file": VALIDATION_FILE, "sha256": sha256_file(self.stage / VALIDATION_FILE),
                           "reference": "torch-fp32"},
        }
        # Order the keys the way people read them: identity first, components last.
        order = ["format", "format_version", "mmedge_version", "family", "tasks", "created", "source", "preprocess",
                 "tokenizer", "clip", "zero_shot", "components", "validation"]
        manifest = {k: manifest[k] for k in order if k in manifest} | {k: v for k, v in manifest.items() if k not in order}
        (self.stage / MANIFEST_FILE).write_text(dump_manifest(manifest))
