"""What every generative family (BLIP-2, IDEFICS) shares: option checks, settings, per-component precision."""

from __future__ import annotations

from mmedge.errors import ExportError


def check_generative_options(options, family_label: str, tasks: tuple[str, ...], extra_defaults: dict) -> None:
    """A captioning/VQA task, no CLIP label options, and only the family's own ``extra`` settings."""
    if options.task not in tasks:
        raise ExportError(f"task '{options.task}' is not a {family_label} task", f"one of {', '.join(tasks)}",
                          "pass --task " + " or --task ".join(tasks))
    if options.labels or options.templates:
        raise ExportError(f"--labels/--templates were given for a {family_label} model", "label options only for CLIP",
                          "drop --labels and --templates")
    unknown = sorted(set(options.extra) - set(extra_defaults))
    if unknown:
        raise ExportError(f"unknown {family_label} export setting(s) {unknown}", f"only {sorted(extra_defaults)}",
                          "check the spelling of the extra settings")


class GenerativeFamily:
    """Base of the captioning families. Subclasses set ``label`` (for messages), ``tasks`` and ``extra_defaults``
    (the ``ExportOptions.extra`` settings they accept, with defaults)."""

    default_task = "caption"
    label: str
    tasks: tuple[str, ...]
    extra_defaults: dict

    def check_options(self, options) -> None:
        check_generative_options(options, self.label, self.tasks, self.extra_defaults)

    def setting(self, options, key: str):
        return options.extra.get(key, self.extra_defaults[key])

    def needs_tokenizer(self, options) -> bool:
        return True

    @staticmethod
    def precision_of(spec, options) -> str:
        """The decoder takes ``--llm-precision`` (default: ``--precision``); the encoders ``--precision``."""
        return (options.llm_precision or options.precision) if spec.name == "decoder" else options.precision
