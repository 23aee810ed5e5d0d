"""The host side of a family: what the exporter asks of every model family (CLIP, BLIP-2, IDEFICS, the next one).

``mmedge.export.pipeline`` calls these members in this order: ``specs`` (the components to trace) → an
``ArtifactBuilder`` that calls ``needs_tokenizer`` / ``max_length`` and ``write_files`` (files beside the graphs;
what it returns is the family's build state) → per component ``validation_feeds``, ``precision_of`` and, for static
INT8, ``calibrates`` / ``calibration_feeds`` → ``quantized_fidelity`` for lowered graphs → ``manifest_extras``, given
that build state as an argument. The torch backend on the device rebuilds components with ``reference_module`` and
decodes with ``reference_language_model``. The family's options (``ExportOptions.extra``) are ``extra_defaults``,
checked by ``mmedge.export.option_checks`` before anything is loaded.

A new family subclasses ``Family`` (a captioning one ``GenerativeFamily``), adds its specs under
``mmedge.export.specs`` and its row to ``FAMILIES`` here and in ``mmedge.families`` on the device.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable

from mmedge.errors import ParityError


class Family(abc.ABC):
    name: str  # the manifest's "family"
    label: str  # for messages ("BLIP-2")
    model_types: tuple[str, ...]  # the transformers config.model_type values it exports
    tasks: tuple[str, ...]
    default_task: str
    has_llm: bool = False  # whether --llm-precision applies
    # why --task would change nothing (one artifact serves every task), or None where it shapes the export
    tasks_alike: str | None = None
    extra_defaults: dict = {}  # the ExportOptions.extra settings it accepts, with defaults

    def generation_not_carried(self, loaded) -> dict:
        """The checkpoint's generation settings that the artifact cannot carry (none for an encoder-only family)."""
        return {}

    # --- the checkpoint ---------------------------------------------------------------------------
    @staticmethod
    def claims(config: dict) -> bool:
        """Whether it exports this checkpoint, given its config (``config.json`` as a dict) whose ``model_type`` is one
        of ``model_types``: families sharing a model type (BLIP-2 with OPT, with Flan-T5) tell theirs apart here."""
        return True

    @staticmethod
    @abc.abstractmethod
    def model_class() -> type:
        """The transformers class that loads its checkpoints."""

    @staticmethod
    @abc.abstractmethod
    def synthetic_tokenizer(config) -> Any:
        """A tokenizer built from the config alone, for --random-weights exports (no hub)."""

    # --- what gets exported -------------------------------------------------------------------------
    @abc.abstractmethod
    def specs(self, loaded, options) -> list:
        """The component specs to trace (``mmedge.export.specs``), for these options."""

    @abc.abstractmethod
    def max_length(self, loaded) -> int:
        """The longest token sequence its tokenizer settings allow."""

    def needs_tokenizer(self, options) -> bool:
        return True

    def setting(self, options, key: str):
        """A family setting from ``ExportOptions.extra``, else its default."""
        return options.extra.get(key, self.extra_defaults[key])

    def precision_of(self, spec, options) -> str:
        return options.precision

    def calibrates(self, spec) -> bool:
        """Whether static INT8 calibrates this component (else it is quantized dynamically)."""
        return True

    def write_files(self, builder) -> dict:
        """Write files beside the graphs into ``builder.stage``; return the build state later steps read
        (``manifest_extras``'s ``written``, ``builder.written`` for the fidelity checks)."""
        return {}

    @abc.abstractmethod
    def validation_feeds(self, spec, builder) -> dict:
        """Real inputs for the component, stored with the artifact for `mmedge validate`."""

    @abc.abstractmethod
    def calibration_feeds(self, spec, builder, progress) -> tuple:
        """(feeds iterable, note) that calibrate the component's static INT8 quantization."""

    @abc.abstractmethod
    def quantized_fidelity(self, run: Callable, fp32: dict[str, Path], quantized: dict[str, Path],
                           builder) -> dict[str, dict]:
        """Per lowered component: its fidelity vs the FP32 graphs (``run(path, feeds)`` runs one in ONNX Runtime);
        below the floor it raises ParityError (``gate_fidelity``)."""

    @abc.abstractmethod
    def manifest_extras(self, loaded, options, written: dict) -> dict:
        """The manifest's family fields (tasks, its own section, generation settings); ``written``: what
        ``write_files`` returned."""

    # --- the device's torch backend -------------------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def reference_module(name: str, model, manifest: dict, tensors: dict):
        """The wrapper module the exporter traced for component ``name``, around a model loaded on the device."""

    @staticmethod
    def reference_language_model(model):
        """The causal LM the torch backend's KV-cached decoder runs, or None (no decoder it can run)."""
        return None


def gate_fidelity(name: str, figures: dict, key: str, floor: float, output: str, fix: str) -> dict:
    """ParityError when ``figures[key]`` (a quantized component's measured fidelity) is below ``floor``."""
    if figures[key] < floor:
        raise ParityError(name, output, "cosine", figures[key], floor, fix)
    return figures


def encoder_fix(builder, name: str) -> str:
    """What to try when the lowered encoder (image or text graph) ``name`` misses its fidelity floor: only what
    differs from how it was lowered, and only what would change that component."""
    spec, options = builder.traced[name], builder.options
    # --precision alone would set a generative family's LLM too: keep the LLM's precision as it was
    precision = "--precision {}" + (f" with --llm-precision {options.llm_precision or options.precision}"
                                    if builder.family.has_llm else "")
    if builder.entries[name]["precision"] == "fp16":
        return "pass " + precision.format("fp32")
    fp16 = precision.format("fp16")
    on_images = "input_ids" not in spec.inputs  # calibrated on images (CLIP's text graph: on label prompts)
    if builder.int8_recipe(spec) == "static":
        images = "more representative --calibration images, " if on_images else ""
        return f"pass {images}--quantization dynamic, or {fp16}"
    if builder.family.calibrates(spec):
        images = " with --calibration images of the model's domain" if on_images else ""
        return f"pass --quantization static{images}, or {fp16}"
    return f"pass {fp16}"


def llm_fix(options) -> str:
    """What to try when the lowered LLM misses its fidelity floor, given the (settled) options it was lowered with:
    a more precise LLM, and for INT4 only the settings that exist and differ from those used."""
    from mmedge.export.int4 import BLOCK_SIZES

    precision = options.llm_precision or options.precision
    if precision == "int4":
        tries = ["--llm-precision int8"]
        smaller = [str(size) for size in BLOCK_SIZES if size < options.int4_block_size]
        if smaller:
            tries.append(f"a smaller --int4-block-size ({' or '.join(smaller)})")
        if options.int4_head == "int4":
            tries.append("--int4-head int8")
        *first, last = tries
        return "pass " + (", ".join(first) + " or " if first else "") + last
    return "pass --llm-precision fp16 or fp32" if precision == "int8" else "pass --llm-precision fp32"


__all__ = ["Family", "encoder_fix", "gate_fidelity", "llm_fix"]
