"""``export_model``: checkpoint → traced, validated, optionally quantized ONNX artifact, written atomically.

checkpoint ─load─▶ torch modules ─spec─▶ ONNX ─parity vs torch─▶ (fp16 | int8 dynamic | int8 static QDQ)
    ─fidelity vs FP32─▶ artifact folder (manifest.json last, then one rename)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import mmedge
from mmedge.artifact import atomic_folder, check_output_folder, sha256_file
from mmedge.errors import ExportError, InputError, MmedgeError, ModelLoadError, warn
from mmedge.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, RECIPE_REVISION, dump_manifest
from mmedge.metrics import compare_outputs
from mmedge.progress import Progress
from mmedge.versions import onnxruntime_version, tokenizers_version

PRECISIONS = ("fp32", "fp16", "int8")
LLM_PRECISIONS = ("fp32", "fp16", "int8", "int4")
QUANTIZATIONS = ("static", "dynamic")
OPENVINO_WEIGHTS = ("int8", "int4")  # NNCF weight compression of the decoder (mmedge.export.openvino_weights)
INT4_HEADS = ("int8", "fp32", "int4")  # the INT4 LLM's output projection (mmedge.export.int4.HEAD_PRECISIONS)
VALIDATION_FILE = "validation.npz"
TOKENIZER_FILE = "tokenizer.json"
FP16_MIN_COSINE = 0.999
FIDELITY_ROWS = 4  # rows per ONNX Runtime call when a large graph's fidelity is measured
# What an option left at None means (None marks "not given", so an option that would do nothing can be refused)
DEFAULTS = {"quantization": "dynamic", "int4_block_size": 32, "int4_accuracy_level": 4, "int4_head": "int8",
            "int4_symmetric": False,
            "calibration_method": "percentile", "seed": 0, "min_quantized_cosine": 0.98}


@dataclass
class ExportOptions:
    task: str | None = None  # None: the family's default task
    precision: str = "fp32"  # encoders: fp32 | fp16 | int8
    # with int8: dynamic (default; fastest on CPU) | static (calibrated QDQ, for TensorRT)
    quantization: str | None = None
    llm_precision: str | None = None  # decoder LLMs: fp32 | fp16 | int8 | int4 (None: same as precision)
    int4_block_size: int | None = None  # INT4 LLM: weights per scale (default 32)
    int4_accuracy_level: int | None = None  # MatMulNBits: 4 (default) = int8 activations on CPU
    int4_head: str | None = None  # INT4 LLM: its output projection (LM head) at int8 (default), fp32 or int4
    int4_symmetric: bool | None = None  # INT4 LLM: True = no zero points (default False: a zero point per block)
    labels: list[str] | None = None  # bake these into one zero-shot graph
    # the file ``labels`` were read from (the CLI's --labels-file): named in refusals, and never deleted by --overwrite
    labels_file: str | os.PathLike | None = None
    templates: list[str] | None = None
    calibration: str | None = None  # folder of images for static INT8; None = bundled photos
    calibration_method: str | None = None  # static INT8: percentile (default) | minmax | entropy
    # folder of images to measure quantized fidelity on (default: calibration, else bundled)
    fidelity: str | None = None
    # mean embedding cosine of quantized encoders vs FP32 on held-out photos (default 0.98)
    min_quantized_cosine: float | None = None
    random_weights: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    seed: int | None = None  # random_weights only: the seed of the random weights (default 0)
    threads: int | None = None
    with_pytorch: bool = False  # also write the checkpoint's safetensors weights (pytorch/) for the torch backend
    openvino_weights: str | None = None  # int8 | int4: also write the FP32 decoder NNCF-compressed for OpenVINO
    # FP32 image graphs: long-inner MatMuls split in two, faster on CPUs (mmedge.export.graph_rewrites)
    split_matmuls: bool = True
    extra: dict = field(default_factory=dict)  # family-specific settings

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision '{self.precision}' is not supported", f"one of {', '.join(PRECISIONS)}",
                              "pass --precision fp32, fp16 or int8")
        if self.llm_precision not in (None, *LLM_PRECISIONS):
            raise ExportError(f"LLM precision '{self.llm_precision}' is not supported",
                              f"one of {', '.join(LLM_PRECISIONS)}", "pass --llm-precision fp32, fp16, int8 or int4")
        if self.int4_head not in (None, *INT4_HEADS):
            raise ExportError(f"INT4 head precision '{self.int4_head}' is not supported",
                              f"one of {', '.join(INT4_HEADS)}", "pass --int4-head int8, fp32 or int4")
        if self.openvino_weights not in (None, *OPENVINO_WEIGHTS):
            raise ExportError(f"OpenVINO weights '{self.openvino_weights}' are not supported",
                              f"one of {', '.join(OPENVINO_WEIGHTS)}", "pass --openvino-weights int4 or int8")
        if self.openvino_weights is not None:
            _require_for_openvino_weights()
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ExportError(f"quantization '{self.quantization}' is not supported",
                              f"one of {', '.join(QUANTIZATIONS)}", "pass --quantization static or dynamic")
        if self.labels_file is not None and not self.labels:
            raise ExportError(f"labels_file '{self.labels_file}' was given without labels",
                              "labels_file only beside the labels read from it (it names their file; the export "
                              "does not read it)", "pass the file's labels as labels=[...], or drop labels_file")
        cosine = self.min_quantized_cosine
        if cosine is not None and (isinstance(cosine, bool) or not isinstance(cosine, (int, float))
                                   or not 0 < cosine <= 1):
            raise ExportError(f"min_quantized_cosine {cosine!r} is not a usable fidelity floor",
                              "a number in (0, 1]: the mean cosine a quantized encoder keeps vs FP32 (default 0.98)",
                              "pass a value such as 0.98, or leave min_quantized_cosine out")
        from mmedge.export.int4 import check_int4_settings

        # here, before anything is loaded: the INT4 embedding table and MatMulNBits would meet a bad block size only
        # after tracing, some as a bare numpy or ONNX Runtime error (whether INT4 is asked for: check_export_options)
        settled = self.settled(self.task)
        check_int4_settings(settled.int4_block_size, settled.int4_accuracy_level)

    def settled(self, task: str) -> "ExportOptions":
        """A copy with the task and every option left at None set to what it means (``DEFAULTS``); a numpy integer
        given for an INT4 setting becomes Python's (the manifest records it)."""
        ints = {k: int(getattr(self, k)) for k in ("int4_block_size", "int4_accuracy_level")
                if isinstance(getattr(self, k), np.integer)}
        return replace(self, task=task, **{k: v for k, v in DEFAULTS.items() if getattr(self, k) is None}, **ints)


def _require_for_openvino_weights() -> None:
    """--openvino-weights compresses the decoder with NNCF and writes an OpenVINO IR: refused before any work where
    openvino or nncf is missing (it had been refused after the export's tracing, as a graph OpenVINO could not read,
    with advice to use a --backend the exporter has no such flag for)."""
    from mmedge.device import importable
    from mmedge.errors import BackendUnavailableError

    missing = [name for name in ("openvino", "nncf") if not importable(name)]
    if missing:
        raise BackendUnavailableError(f"--openvino-weights needs the Python package(s) {', '.join(missing)}, which "
                                      f"{'is' if len(missing) == 1 else 'are'} not installed",
                                      "openvino and nncf importable (NNCF compresses the decoder's weights at export)",
                                      'pip install "mmedge[openvino]", or drop --openvino-weights (the device can '
                                      "compress them at first load: backend option openvino.weights)")


EXPORT_MODULES = ("torch", "transformers", "onnx", "safetensors")  # what the exporter imports, from mmedge[export]


def require_export_tools(what: str, expected_note: str = "") -> None:
    """MmedgeError naming ``pip install "mmedge[export]"`` where a module the exporter imports is missing (``what``:
    who needs them). ``mmedge.export`` itself imports without them, so this is asked before any work."""
    from mmedge.device import importable

    missing = [name for name in EXPORT_MODULES if not importable(name)]
    if missing:
        raise MmedgeError(f"{what} needs the host-side tools, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed",
                          f"{', '.join(EXPORT_MODULES)} installed{expected_note}", 'pip install "mmedge[export]"')


def export_model(model: str, out: str | Path, options: ExportOptions | None = None, **overrides) -> Path:
    """Export ``model`` (hub id, folder, or bundled config name with random_weights) to the folder ``out``."""
    require_export_tools("mmedge.export")
    options = options or ExportOptions(**overrides)
    options.check()
    # cheap checks first, nothing is loaded yet: --overwrite replaces only an artifact, never the checkpoint it reads
    check_output_folder(out, overwrite=options.overwrite, sources=_local_sources(model, options))
    from mmedge.export.loading import check_weight_files, checkpoint_config, family_of_config
    from mmedge.export.option_checks import check_export_options

    config = checkpoint_config(model, random_weights=options.random_weights)  # the config alone, no weights
    name = family_of_config(config)
    check_weight_files(model, random_weights=options.random_weights, allow_pickle=options.allow_pickle)  # names only
    from mmedge.export.families import FAMILIES

    family = FAMILIES[name]
    check_export_options(options, family, config)
    options = options.settled(options.task or family.default_task)
    from mmedge.export.memory import check_memory

    estimate = check_memory(model, options, family)  # from the config on the meta device: still nothing loaded
    with _quiet_libraries(not options.progress):
        return _export(model, Path(out), options, family, estimate)


def _local_sources(model: str, options: ExportOptions) -> list[Path]:
    """What the export reads from this disk, which --overwrite must not delete with the old artifact: the checkpoint
    folder ``model`` names if it is one here (a hub id or a bundled config name is not), the calibration and fidelity
    image folders, and the file the labels were read from."""
    paths = (model, options.calibration, options.fidelity, options.labels_file)
    return [Path(path) for path in paths if path is not None and os.path.lexists(path)]


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """With progress off, transformers' and the hub's own progress bars and notices stay off too."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars:
            enable_progress_bars()


def _export(model: str, out: Path, options: ExportOptions, family, estimate=None) -> Path:
    from mmedge.export.loading import load_checkpoint, upcast_to_fp32
    from mmedge.export.memory import MeteredProgress

    progress = MeteredProgress(6 if options.openvino_weights else 5, enabled=options.progress)
    with progress.step(f"loading {model}" + (" (random weights)" if options.random_weights else "")):
        loaded = load_checkpoint(model, random_weights=options.random_weights, allow_pickle=options.allow_pickle,
                                 seed=options.seed)
    with progress.step("building export specs" + (f" with {len(options.labels)} baked labels" if options.labels
                                                  else "")):
        specs = family.specs(loaded, options)
    with (atomic_folder(out, overwrite=options.overwrite, sources=_local_sources(model, options)) as stage,
          _scratch(out, stage) as scratch):
        builder = ArtifactBuilder(stage, scratch, loaded, family, options)
        builder.memory = {"estimate": estimate.as_manifest() if estimate else None, "steps": progress.steps}
        with progress.step(f"tracing {', '.join(s.name for s in specs)} and checking parity against PyTorch"):
            for spec in specs:  # PyTorch outputs of every component first: a large model frees towers as it goes
                upcast_to_fp32(spec.module())  # a BF16/FP16 checkpoint is loaded as stored, each part made FP32 here
                builder.validation_sample(spec)
            for i, spec in enumerate(progress.items(specs, len(specs), "component")):
                builder.trace(spec, later=specs[i + 1:])
            builder.check_kept_matmuls()
        lowered = [s for s in specs if builder.precision_of(s) != "fp32"]
        with progress.step(_describe_precision(builder, lowered)):
            builder.free_torch_weights(specs)  # every PyTorch output is taken: quantizers and sessions get the memory
            builder.lower_precision(lowered, progress)
        if options.openvino_weights:
            with progress.step(f"compressing the decoder's weights to {options.openvino_weights} with NNCF "
                               "for OpenVINO, and checking them against PyTorch"):
                builder.compress_for_openvino(specs)
        with progress.step("writing manifest and validation samples"):
            builder.finish(specs)
    return out


def fit_default_max_new_tokens(manifest: dict) -> None:
    """The manifest's default ``max_new_tokens`` (the checkpoint's, else 30) lowered, with a warning, to what the
    decoder's positions leave after the shortest prompt (an LLM of 16 positions after BLIP-2's 32 query rows: the
    Captioner refuses a default that cannot work, so the artifact would never load); an LLM with no room for one new
    token is refused."""
    from mmedge.generation.config import most_new_tokens
    from mmedge.manifest import family_section
    from mmedge.pipelines.prefix_inputs import least_prompt_positions

    generation, section = manifest.get("generation"), family_section(manifest)
    positions = (section.get("decoder") or {}).get("max_positions")
    if not generation or not positions:
        return
    least = least_prompt_positions(section)
    most = most_new_tokens(positions, least)
    if most < 1:
        raise ModelLoadError(f"the LLM's {positions} positions leave no room for a new token after the shortest "
                             f"prompt ({least} positions: the image rows and BOS)",
                             "an LLM whose max_position_embeddings exceed the image rows and a prompt",
                             "export a checkpoint whose language model has more positions")
    if generation["max_new_tokens"] > most:
        warn(f"the default max_new_tokens {generation['max_new_tokens']} does not fit the LLM's {positions} positions "
             f"after the shortest prompt ({least}): the artifact's default is {most} (fewer for a longer prompt)")
        generation["max_new_tokens"] = most
        if (generation.get("min_new_tokens") or 0) > most:
            generation["min_new_tokens"] = most


@contextlib.contextmanager
def _scratch(out: Path, stage: Path):
    """A folder for the FP32 graphs that get lowered (gigabytes for a large model): beside the staging folder and
    named as ``atomic_folder`` names it (``.OUT.partial-PID-scratch-*``), so that after a killed export the next
    export to OUT removes it with the abandoned staging folder."""
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-{os.getpid()}-scratch-", dir=stage.parent) as scratch:
        yield Path(scratch)


_TEMPDIR_LOCK = threading.Lock()


@contextlib.contextmanager
def _library_temporaries(folder: Path):
    """ONNX Runtime's quantizers copy the graph they work on into ``tempfile``'s folder, which no argument moves: for
    the call it is the export's scratch, so a killed export leaves nothing in the system's temporary folder.
    ``tempfile.tempdir`` is the process's: one quantization at a time swaps it, and what was there is put back."""
    with _TEMPDIR_LOCK:
        before, tempfile.tempdir = tempfile.tempdir, str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = before


def run_in_batches(path: Path, feeds: dict[str, np.ndarray], threads: int | None, rows: int = FIDELITY_ROWS):
    """``run_onnx``, a large graph's (weights in ``.onnx.data``) at most ``rows`` rows at a time: full-size encoders'
    activations for the 32 fidelity views take gigabytes. Outputs are concatenated along the batch axis; a graph
    whose outputs do not follow the inputs' batch runs whole."""
    from mmedge.export.onnx_export import OnnxSession, external_data_path, run_onnx

    sizes = {v.shape[0] for v in feeds.values() if np.ndim(v)}
    total = sizes.pop() if len(sizes) == 1 else 0
    if external_data_path(Path(path)) is None or total <= rows:
        return run_onnx(path, feeds, threads)
    session = OnnxSession(path, threads)
    parts = []
    for start in range(0, total, rows):
        chunk = {k: v[start:start + rows] for k, v in feeds.items()}  # [rows, ...]
        out = session.run(chunk)
        if any(np.ndim(v) == 0 or v.shape[0] != len(next(iter(chunk.values()))) for v in out.values()):
            return session.run(feeds)
        parts.append(out)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _describe_precision(builder: "ArtifactBuilder", lowered) -> str:
    if not lowered:
        return "keeping FP32 (no quantization asked for)"
    parts = []
    for spec in lowered:
        precision = builder.precision_of(spec)
        recipe = {"int8": f"INT8 {builder.int8_recipe(spec)}", "int4": "INT4 weight-only", "fp16": "FP16"}[precision]
        parts.append(f"{spec.name} → {recipe}")
    return "lowering precision: " + ", ".join(parts)


class ArtifactBuilder:
    """Accumulates component files and manifest entries inside the staging folder.

    Families read ``stage``, ``options``, ``loaded``, ``preprocessor``, ``tokenizer`` and ``written`` (what their
    ``write_files`` returned) from it.
    """

    def __init__(self, stage: Path, scratch: Path, loaded, family, options: ExportOptions):
        from mmedge.export.preprocessing import preprocess_config_from_hf
        from mmedge.export.tokenization import save_tokenizer_json, tokenizer_settings_from_hf
        from mmedge.preprocess import ImagePreprocessor
        from mmedge.tokenizer import TextTokenizer

        self.stage, self.scratch, self.loaded, self.family, self.options = stage, scratch, loaded, family, options
        self.kept_whole: dict[str, int] = {}  # FP32 image graph -> the MatMuls --no-split-matmuls kept whole
        processor = loaded.image_processor
        self.preprocess = processor if isinstance(processor, dict) else preprocess_config_from_hf(processor)
        self.preprocessor = ImagePreprocessor(self.preprocess)
        self.tokenizer_settings = None
        self.tokenizer = None
        if family.needs_tokenizer(options):
            save_tokenizer_json(loaded.tokenizer, stage / TOKENIZER_FILE)
            self.tokenizer_settings = tokenizer_settings_from_hf(loaded.tokenizer, family.max_length(loaded))
            self.tokenizer_settings["file"] = TOKENIZER_FILE
            self.tokenizer_settings["sha256"] = sha256_file(stage / TOKENIZER_FILE)  # verified before it is parsed
            self.tokenizer_settings["tokenizers_version"] = tokenizers_version()  # what wrote the file
            self.tokenizer = TextTokenizer.from_file(stage / TOKENIZER_FILE, self.tokenizer_settings)
        self.fp32_paths: dict[str, Path] = {}
        self.traced: dict[str, object] = {}  # the specs traced, by name (the fidelity advice reads them)
        self.entries: dict[str, dict] = {}
        self._samples: dict[str, tuple[dict, dict]] = {}  # validation inputs and PyTorch outputs per component
        self._sample_parity: dict[str, dict] = {}  # each final graph's parity on those samples
        self.written = family.write_files(self)  # the family's build state: manifest_extras and fidelity read it
        if options.with_pytorch:  # before tracing: a large export frees each tower's weights once it is checked
            from mmedge.export.pytorch_weights import PYTORCH_FOLDER, save_pytorch_weights

            save_pytorch_weights(loaded, stage / PYTORCH_FOLDER, progress=options.progress)

    def precision_of(self, spec) -> str:
        return self.family.precision_of(spec, self.options)

    def int8_recipe(self, spec) -> str:
        """How INT8 lowers ``spec``: "static" (calibrated QDQ) under --quantization static where the family
        calibrates it, else "dynamic" (an LLM always)."""
        return "static" if self.options.quantization == "static" and self.family.calibrates(spec) else "dynamic"

    def trace(self, spec, later=()) -> None:
        """Export ``spec`` at FP32 and check it against PyTorch on fresh shapes and on the validation samples.

        For models past the streaming threshold, the weights no spec in ``later`` needs are freed once
        the PyTorch outputs are taken, before ONNX Runtime loads the graph.
        """
        from mmedge.export.onnx_export import (
            EXTERNAL_DATA_THRESHOLD,
            OnnxSession,
            export_spec,
            gate_parity,
            torch_reference,
        )
        from mmedge.export.streaming import free_weights, module_bytes

        final_fp32 = self.precision_of(spec) == "fp32"
        folder = self.stage if final_fp32 else self.scratch
        path = export_spec(spec, folder / f"{spec.name}.onnx")
        self.fp32_paths[spec.name] = path
        self.traced[spec.name] = spec
        rewrites = {}
        if final_fp32 and "pixel_values" in spec.inputs:  # image graphs only
            from mmedge.export.graph_rewrites import count_long_inner_matmuls, split_long_inner_matmuls

            if self.options.split_matmuls:
                rewrites = {"split_long_inner_matmuls": split_long_inner_matmuls(path)}
            else:  # what --no-split-matmuls keeps whole (check_kept_matmuls)
                self.kept_whole[spec.name] = count_long_inner_matmuls(path)
        fresh = spec.check_inputs()  # dynamic sizes unlike the traced ones: a baked-in shape shows up
        fresh_reference = torch_reference(spec, fresh)
        sample_feeds, sample_reference = self.validation_sample(spec)
        if module_bytes(self.loaded.model) > EXTERNAL_DATA_THRESHOLD:
            free_weights(spec.module(), [s.module() for s in later])
        session = OnnxSession(path, self.options.threads)
        fresh = {k: v.numpy() for k, v in fresh.items()}
        parity = {"reference": "torch-fp32", "inputs": {n: list(v.shape) for n, v in fresh.items()},
                  "outputs": compare_outputs(fresh_reference, session.run(fresh))}
        self.entries[spec.name] = {
            "precision": "fp32", "quantization": None, **spec.manifest_io(), "opset": spec.opset,
            "parity": gate_parity(spec.name, parity, spec.max_abs, spec.min_cosine,
                                  "this is an exporter bug for this model; report it with the model id"),
            **({"rewrites": rewrites} if any(rewrites.values()) else {}),  # measured above, after the rewrite
        }
        self._sample_parity[spec.name] = compare_outputs(sample_reference, session.run(sample_feeds))
        del session  # a large decoder's session holds gigabytes

    def check_kept_matmuls(self) -> None:
        """Refuse ``--no-split-matmuls`` where the FP32 image graphs have nothing it would keep whole (MLPs shorter
        than ``graph_rewrites.MIN_INNER``): the option would change nothing. Known only once the graphs are traced;
        nothing is written yet."""
        if not self.kept_whole or any(self.kept_whole.values()):  # filled only under --no-split-matmuls
            return
        from mmedge.export.graph_rewrites import MIN_INNER

        graphs = ", ".join(f"'{name}'" for name in self.kept_whole)
        several = len(self.kept_whole) > 1
        raise InputError(f"--no-split-matmuls changes nothing in this export: its FP32 image graph{'s' * several} "
                         f"({graphs}) {'have' if several else 'has'} no MatMul whose inner dimension is at least "
                         f"{MIN_INNER} and twice its columns, so none would be split",
                         "a model with long MLPs in its image graph (a ViT-B's 3072 -> 768) for --no-split-matmuls",
                         "drop --no-split-matmuls")

    def free_torch_weights(self, specs) -> int:
        """Free what is left of the exported modules' PyTorch weights in a model past the streaming threshold
        (``trace`` freed each tower it was done with; references and validation samples are taken, the embedding
        tables written); returns the bytes freed. Small models keep theirs, and so do weights outside the specs
        (a family's manifest may read them, e.g. CLIP's logit scale)."""
        from mmedge.export.onnx_export import EXTERNAL_DATA_THRESHOLD
        from mmedge.export.streaming import free_weights, module_bytes

        if module_bytes(self.loaded.model) <= EXTERNAL_DATA_THRESHOLD:
            return 0
        return sum(free_weights(spec.module(), []) for spec in specs)

    def lower_precision(self, specs, progress: Progress) -> None:
        """Quantize or convert each spec's FP32 graph, measure parity, then the family's fidelity checks."""
        from mmedge.export.onnx_export import gate_parity, measure_parity

        final: dict[str, Path] = {}
        for spec in specs:
            precision = self.precision_of(spec)
            dest = self.stage / f"{spec.name}.onnx"
            with _library_temporaries(self.scratch):
                recipe = self._quantize(spec, precision, self.fp32_paths[spec.name], dest, progress)
            final[spec.name] = dest
            entry = self.entries[spec.name]
            feeds, reference = self.validation_sample(spec)
            parity = measure_parity(spec, dest, feeds, reference)
            self._sample_parity[spec.name] = parity["outputs"]  # the final graph on the stored samples
            parity["fp32_export"] = entry["parity"]
            if precision == "fp16":
                gate_parity(spec.name, parity, None, FP16_MIN_COSINE,
                            "FP16 overflows in this model: export at fp32 (TensorRT then builds FP16 engines of the "
                            "graphs that stay in FP16's range, and T5's encoder and decoder at FP32)")
            entry.update(precision=precision, quantization=recipe, parity=parity)
        if any(self.precision_of(s) in ("int8", "int4") for s in specs):
            from mmedge.export.calibration import fidelity_on_calibration, fidelity_paths

            run = lambda path, feeds: run_in_batches(path, feeds, self.options.threads)  # noqa: E731
            _, images = fidelity_paths(self.options)
            held_out = not fidelity_on_calibration(self.options)  # else the photos static INT8 calibrated on
            for name, measured in self.family.quantized_fidelity(run, self.fp32_paths, final, self).items():
                self.entries[name]["parity"]["fidelity"] = {**measured, "images": images, "held_out": held_out}

    def compress_for_openvino(self, specs) -> None:
        """``--openvino-weights``: the decoder's IR with NNCF-compressed weights beside its FP32 ONNX graph."""
        from mmedge.export.openvino_weights import compress_decoder

        weights = self.options.openvino_weights
        for spec in specs:
            if spec.name == "decoder":  # the LLM over input embeddings, with its KV cache
                min_cosine = float(self.family.setting(self.options, "min_logits_cosine"))
                entry = compress_decoder(self, spec, weights, min_cosine)
                self.entries[spec.name]["openvino"] = {weights: entry}

    def _quantize(self, spec, precision: str, source: Path, dest: Path, progress: Progress) -> dict:
        from mmedge.export import quantize

        options = self.options
        if precision == "fp16":  # nodes whose activations pass FP16's range on the validation inputs stay FP32
            return quantize.convert_fp16(source, dest, self.validation_sample(spec)[0], options.threads)
        if precision == "int4":
            return quantize.quantize_int4_weights(source, dest, block_size=options.int4_block_size,
                                                  accuracy_level=options.int4_accuracy_level, head=options.int4_head,
                                                  symmetric=options.int4_symmetric)
        if self.int8_recipe(spec) == "dynamic":
            return quantize.quantize_int8_dynamic(source, dest)
        feeds, note = self.family.calibration_feeds(spec, self, progress)
        return quantize.quantize_int8_static(source, dest, feeds, method=options.calibration_method, samples_note=note)

    def validation_sample(self, spec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The stored validation inputs of ``spec`` and PyTorch's outputs for them, computed once."""
        if spec.name not in self._samples:
            import torch

            from mmedge.export.onnx_export import torch_reference

            feeds = self.family.validation_feeds(spec, self)
            self._samples[spec.name] = feeds, torch_reference(spec, {k: torch.from_numpy(v) for k, v in feeds.items()})
        return self._samples[spec.name]

    def finish(self, specs) -> None:
        from mmedge.export.onnx_export import external_data_path, keep_weights_apart

        arrays: dict[str, np.ndarray] = {}
        for spec in specs:
            feeds, reference = self.validation_sample(spec)
            arrays.update({f"{spec.name}/inputs/{k}": v for k, v in feeds.items()})
            arrays.update({f"{spec.name}/reference/{k}": v for k, v in reference.items()})
            path = self.stage / f"{spec.name}.onnx"
            keep_weights_apart(path)  # the graph as measured, its weights stored apart (a smaller heap at load)
            entry = self.entries[spec.name]
            entry["file"] = path.name
            entry["sha256"] = sha256_file(path)
            entry["size_bytes"] = path.stat().st_size
            data = external_data_path(path)
            if data is not None:
                entry["external_data"] = {"file": data.name, "sha256": sha256_file(data),
                                          "size_bytes": data.stat().st_size}
            entry["parity"]["validation_samples"] = self._sample_parity[spec.name]
        np.savez(self.stage / VALIDATION_FILE, **arrays)
        export_entry = {"memory": self._memory_entry(), "recipe_revision": RECIPE_REVISION,
                        "validated_with": {"onnxruntime": onnxruntime_version()}}  # where the parity was measured
        not_carried = self.family.generation_not_carried(self.loaded)
        if not_carried:
            export_entry["generation_not_carried"] = not_carried
            listed = ", ".join(f"{k}={v!r}" for k, v in not_carried.items())
            warn(f"the checkpoint's generation settings {listed} are not run by mmedge's generation loop "
                          "(transformers' generate applies them by default, so answers may differ from its); recorded "
                          "in the manifest's export.generation_not_carried")
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mmedge_version": mmedge.__version__,
            "family": self.family.name,
            **self.family.manifest_extras(self.loaded, self.options, self.written),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": self.loaded.source,
            "preprocess": self.preprocess,
            "tokenizer": self.tokenizer_settings,
            "components": {spec.name: self.entries[spec.name] for spec in specs},
            **({"pytorch": self._pytorch_entry(specs)} if self.options.with_pytorch else {}),
            "export": export_entry,
            "validation": {"file": VALIDATION_FILE, "sha256": sha256_file(self.stage / VALIDATION_FILE),
                           "reference": "torch-fp32"},
        }
        fit_default_max_new_tokens(manifest)
        # Order the keys the way people read them: identity first, family settings, components last.
        first = ["format", "format_version", "mmedge_version", "family", "tasks", "created", "source", "preprocess",
                 "tokenizer"]
        last = ["components", "pytorch", "validation"]
        middle = [k for k in manifest if k not in first + last]
        manifest = {k: manifest[k] for k in first + middle + last if k in manifest}
        (self.stage / MANIFEST_FILE).write_text(dump_manifest(manifest))

    def _memory_entry(self) -> dict:
        """Peak RSS of each step before this one (this step's own figure is on its progress line), and the
        estimate the export was checked against."""
        memory = getattr(self, "memory", None) or {"estimate": None, "steps": []}
        steps = [dict(s) for s in memory["steps"]]
        return {"peak_rss_bytes": max((s["peak_rss_bytes"] for s in steps), default=None), "steps": steps,
                "estimate": memory["estimate"], "measured": "VmHWM per step (Linux), else the process peak so far"}

    def _pytorch_entry(self, specs) -> dict:
        from mmedge.export.pytorch_weights import PYTORCH_FOLDER, pytorch_entry

        return pytorch_entry(self.loaded, self.stage / PYTORCH_FOLDER, specs)
