"""Export options checked against the model's family before anything is loaded.

An option that would change nothing (``--llm-precision`` for CLIP, ``--quantization static`` at FP32, ``--labels``
for a captioning model, ...) is refused with the reason, never ignored. Each rule says when its option does
something; ``check_export_options`` applies them all, with the task and the family's own settings.
"""

from __future__ import annotations

from mmedge.errors import InputError
from mmedge.idle_options import Rule, refuse_idle

# ExportOptions.extra settings the CLI sets with a flag of its own
EXTRA_FLAGS = {"fused_prefix": "--split-prefix", "cached_cross_kv": "--recompute-cross-kv",
               "fused_image_context": "--split-image-graphs", "fused_attention": "--fused-attention"}
# what takes each of them, for the refusal
EXTRA_FLAG_MODELS = {"fused_prefix": "a BLIP-2 model", "cached_cross_kv": "an IDEFICS model",
                     "fused_image_context": "an IDEFICS model",
                     "fused_attention": "a BLIP-2 or InstructBLIP model with an OPT LLM"}
# text_config.model_type of the LLMs whose attention --fused-attention rewrites (specs.fused_attention.SUPPORTED:
# OPTAttention); a config without one is OPT, as transformers defaults
FUSABLE_LLMS = ("opt",)


def _llm(options) -> str | None:
    return options.llm_precision or options.precision


def _quantized(options, family) -> bool:
    return options.precision == "int8" or (family.has_llm and _llm(options) in ("int8", "int4"))


def _static(options, family) -> bool:
    return options.precision == "int8" and options.quantization == "static"


def _encoders_gated(options, family) -> bool:
    """Whether the export measures its encoders' fidelity (``min_quantized_cosine``): they are lowered (FP16 or INT8)
    and some graph is quantized, which is when the family's fidelity checks run."""
    return options.precision != "fp32" and _quantized(options, family)


def _decoder_gated(options, family) -> bool:
    """Whether the export measures its LLM's fidelity against the FP32 one (``min_logits_cosine`` and the settings
    of that measurement): the LLM is lowered and some graph is quantized."""
    return family.has_llm and _llm(options) != "fp32" and _quantized(options, family)


# ExportOptions.extra settings of the LLM's fidelity measurement (Python API only), and when each is used:
# min_logits_cosine also gates the --openvino-weights IR of the FP32 decoder
DECODER_FIDELITY_SETTINGS = {
    "min_logits_cosine": lambda o, f: _decoder_gated(o, f) or (f.has_llm and o.openvino_weights is not None),
    "fidelity_images": _decoder_gated, "fidelity_max_new_tokens": _decoder_gated, "fidelity_prompts": _decoder_gated,
}


def _bakes_labels(options, family) -> bool:
    return family.name == "clip" and options.task == "zero-shot"


RULES = (
    Rule("--llm-precision", lambda o: o.llm_precision is not None, lambda o, f: f.has_llm,
         "a model with a language model (BLIP-2, IDEFICS)", "drop --llm-precision: --precision sets every graph"),
    Rule("--quantization static", lambda o: o.quantization == "static", lambda o, f: o.precision == "int8",
         "--precision int8 (static calibration quantizes the encoders; an INT8 LLM is always dynamic)",
         "add --precision int8, or drop --quantization"),
    Rule("--quantization dynamic", lambda o: o.quantization == "dynamic", lambda o, f: "int8" in (o.precision, _llm(o)),
         "an INT8 graph (--precision int8 or --llm-precision int8)", "add --precision int8, or drop --quantization"),
    Rule("--int4-block-size", lambda o: o.int4_block_size is not None, lambda o, f: f.has_llm and _llm(o) == "int4",
         "an INT4 LLM (--llm-precision int4)", "add --llm-precision int4, or drop --int4-block-size"),
    Rule("--int4-accuracy-level", lambda o: o.int4_accuracy_level is not None,
         lambda o, f: f.has_llm and _llm(o) == "int4", "an INT4 LLM (--llm-precision int4)",
         "add --llm-precision int4, or drop --int4-accuracy-level"),
    Rule("--int4-head", lambda o: o.int4_head is not None, lambda o, f: f.has_llm and _llm(o) == "int4",
         "an INT4 LLM (--llm-precision int4)", "add --llm-precision int4, or drop --int4-head"),
    Rule("--int4-symmetric", lambda o: o.int4_symmetric is not None, lambda o, f: f.has_llm and _llm(o) == "int4",
         "an INT4 LLM (--llm-precision int4)", "add --llm-precision int4, or drop --int4-symmetric"),
    Rule("--no-split-matmuls", lambda o: not o.split_matmuls, lambda o, f: o.precision == "fp32",
         "FP32 image graphs (--precision fp32, the default): quantized and FP16 graphs keep their MatMuls whole",
         "drop --no-split-matmuls"),
    Rule("--calibration", lambda o: o.calibration is not None, _static,
         "static INT8 (--precision int8 --quantization static); dynamic INT8 needs no calibration",
         "add --quantization static, or pass the folder as --fidelity-images to measure fidelity on it"),
    Rule("--calibration-method", lambda o: o.calibration_method is not None, _static,
         "static INT8 (--precision int8 --quantization static)",
         "add --quantization static, or drop --calibration-method"),
    Rule("--fidelity-images", lambda o: o.fidelity is not None, _quantized,
         "a quantized graph (--precision int8, or --llm-precision int8/int4): FP32 and FP16 exports measure no "
         "fidelity", "add --precision int8, or drop --fidelity-images"),
    # labels read from --labels-file are refused under that flag's name (the CLI passes labels_file with them)
    Rule("--labels", lambda o: bool(o.labels) and o.labels_file is None, _bakes_labels,
         "a CLIP model exported for --task zero-shot",
         "drop --labels, or export a CLIP checkpoint with --task zero-shot"),
    Rule("--labels-file", lambda o: o.labels_file is not None, _bakes_labels,
         "a CLIP model exported for --task zero-shot",
         "drop --labels-file, or export a CLIP checkpoint with --task zero-shot"),
    Rule("--templates", lambda o: bool(o.templates), lambda o, f: f.name == "clip"
         and (bool(o.labels) or o.precision == "int8"),
         "CLIP with --labels (the templates are baked in) or at --precision int8 (its calibration and "
         "fidelity prompts)",
         "add --labels, or pass the templates at run time (mmedge run --templates)"),
    Rule("--openvino-weights", lambda o: o.openvino_weights is not None,
         lambda o, f: f.has_llm and _llm(o) == "fp32",
         "a model with a language model exported at FP32 (NNCF compresses the FP32 decoder's weights itself)",
         "drop --llm-precision (or --precision) to keep the decoder FP32, or drop --openvino-weights"),
    Rule("--allow-pickle", lambda o: o.allow_pickle, lambda o, f: not o.random_weights,
         "a checkpoint whose weights are loaded (with --random-weights none are)", "drop --allow-pickle"),
    Rule("seed", lambda o: o.seed is not None, lambda o, f: o.random_weights,
         "random_weights=True (the seed draws the random weights; a checkpoint's own are loaded as stored)",
         "drop seed, or pass random_weights=True"),
    Rule("min_quantized_cosine", lambda o: o.min_quantized_cosine is not None, _encoders_gated,
         "encoders lowered to FP16 or INT8 in an export with a quantized graph (--precision int8, or --precision "
         "fp16 with --llm-precision int8/int4): only then is their fidelity vs FP32 measured and gated",
         "drop min_quantized_cosine, or pass precision='int8'"),
    *(Rule(f"extra setting {key}", lambda o, key=key: key in o.extra, works,
           "a language model lowered below FP32 in an export with a quantized graph (--llm-precision int8/int4, "
           "or --precision int8)" + (", or --openvino-weights" if key == "min_logits_cosine" else "")
           + ": only then is the LLM's fidelity vs FP32 measured",
           f"drop {key}, or pass llm_precision='int8' or 'int4'")
      for key, works in DECODER_FIDELITY_SETTINGS.items()),
    *(Rule(flag, lambda o, key=key: key in o.extra, lambda o, f, key=key: key in f.extra_defaults,
           EXTRA_FLAG_MODELS[key], f"drop {flag}")
      for key, flag in EXTRA_FLAGS.items()),
)


def check_export_options(options, family, config: dict | None = None) -> None:
    """Raise InputError for a task the family lacks (or any --task where one artifact serves every task), an unknown
    family setting, an option that would do nothing, or one this checkpoint's ``config`` (as in config.json) cannot
    take; then the values of those left (labels, templates, image folders; CalibrationError for --calibration).

    ``options.task`` may be None (the family's default task); ``family`` is the exporter's family object
    (``name``, ``label``, ``tasks``, ``tasks_alike``, ``has_llm``, ``extra_defaults``)."""
    task = options.task or family.default_task
    if task not in family.tasks:
        raise InputError(f"task '{task}' is not a {family.label} task", f"one of {', '.join(family.tasks)}",
                         f"drop --task: {family.tasks_alike}" if family.tasks_alike
                         else "pass --task " + " or --task ".join(family.tasks))
    if options.task is not None and family.tasks_alike:
        raise InputError(f"--task {task} would change nothing for {family.label}: {family.tasks_alike}",
                         f"no --task for {family.label} (its artifact serves {' and '.join(family.tasks)})",
                         "drop --task")
    unknown = sorted(set(options.extra) - set(family.extra_defaults) - set(EXTRA_FLAGS))
    if unknown:
        raise InputError(f"unknown {family.label} export setting(s) {unknown}",
                         f"only {sorted(family.extra_defaults)}" if family.extra_defaults else "no extra settings",
                         "check the spelling of the extra settings")
    settled = _with_task(options, task)
    refuse_idle(RULES, settled, family, f"in this {family.label} export ({_settings(settled, family)})")
    if config is not None:
        _check_for_checkpoint(settled, family, config)
    _check_values(settled)


def _check_for_checkpoint(options, family, config: dict) -> None:
    """Options the family takes that only some of its checkpoints can: --fused-attention needs an OPT LLM."""
    llm = (config.get("text_config") or {}).get("model_type", "opt")
    if options.extra.get("fused_attention") and llm not in FUSABLE_LLMS:
        raise InputError(f"--fused-attention cannot rewrite this {family.label} checkpoint's LLM ('{llm}', "
                         "text_config.model_type in config.json): mmedge fuses OPT's attention only (other LLMs "
                         "apply rotary position embeddings between the projections and the product)",
                         f"{EXTRA_FLAG_MODELS['fused_attention']}",
                         "drop --fused-attention (the decoder keeps transformers' attention)")


def _check_values(options) -> None:
    """The values of the options that do something here, with the checks the export itself runs later (after
    loading and tracing): labels and templates, the image folders."""
    from mmedge.export.calibration import check_image_folders
    from mmedge.pipelines.zero_shot import check_labels, check_templates

    if options.labels:
        check_labels(options.labels)
    if options.templates is not None:
        check_templates(options.templates)
    check_image_folders(options)


def _with_task(options, task: str):
    from dataclasses import replace

    return replace(options, task=task)


def _settings(options, family) -> str:
    parts = [] if family.tasks_alike else [f"--task {options.task}"]  # else no --task is taken
    parts.append(f"--precision {options.precision}")
    if family.has_llm:
        parts.append(f"LLM {_llm(options)}")
    return ", ".join(parts)
