"""What every generative family (BLIP-2, IDEFICS) shares: settings, per-component precision.

Their options are checked with every family's by ``mmedge.export.option_checks`` before anything is loaded."""

from __future__ import annotations


class GenerativeFamily:
    """Base of the captioning families. Subclasses set ``label`` (for messages), ``tasks`` and ``extra_defaults``
    (the ``ExportOptions.extra`` settings they accept, with defaults)."""

    default_task = "caption"
    has_llm = True
    label: str
    tasks: tuple[str, ...]
    extra_defaults: dict

    def setting(self, options, key: str):
        return options.extra.get(key, self.extra_defaults[key])

    def needs_tokenizer(self, options) -> bool:
        return True

    @staticmethod
    def precision_of(spec, options) -> str:
        """The decoder takes ``--llm-precision`` (default: ``--precision``); the encoders ``--precision``."""
        return (options.llm_precision or options.precision) if spec.name == "decoder" else options.precision
