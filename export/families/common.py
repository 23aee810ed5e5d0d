"""Checks every generative family (BLIP-2, IDEFICS) makes on export options."""

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
