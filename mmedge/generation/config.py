"""Generation settings: the manifest's ``generation`` section, checked before any decoding starts.

Field names and defaults follow ``transformers.GenerationConfig`` so a setting means the same thing
here as in ``model.generate(...)`` (``top_k`` defaults to 50 and only applies when sampling, as there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmedge.errors import InputError

# No caption or answer needs more; a larger value is almost always a unit mistake (characters, not tokens).
MAX_NEW_TOKENS_CAP = 4096
EARLY_STOPPING_MODES = (True, False, "never")
MIN_TEMPERATURE = 1e-5  # below it the scores overflow float32 (inf - inf: NaN draws); it is greedy decoding anyway
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "seed")  # settings greedy decoding and beam search never read
BEAM_ONLY = ("length_penalty", "early_stopping")  # settings only beam search reads
# transformers.GenerationConfig settings that change which tokens come out and that mmedge's loop does not run (the
# rest are carried, as GenerationConfig's fields, the token ids and stop_strings are, or do not change the answer:
# use_cache, output_*, cache and compile settings, assisted decoding's speed knobs): the export records a checkpoint's
# (export.generation_not_carried), a call's are refused as not run, not as misspelt
GENERATION_NOT_RUN = (
    "max_length", "min_length", "max_time", "num_return_sequences", "num_beam_groups", "diversity_penalty",
    "penalty_alpha", "dola_layers", "min_p", "typical_p", "top_h", "epsilon_cutoff", "eta_cutoff",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "force_words_ids", "constraints", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "token_healing", "guidance_scale", "watermarking_config")
# settings a call never changes anything with: the manifest's values serve the loop, and a caller's would not show
MODEL_OWNED = {
    "pad_token_id": "no pad_token_id: a finished row's padding is never returned (the text ends at its end token), "
                    "so no padding id changes an answer",
    "bos_token_id": "no bos_token_id: the prompt's start token is the model's own, put in by its input builder",
}


@dataclass
class GenerationConfig:
    """How to pick tokens. Call :meth:`validate` (the loop does) before use.

    ``eos_token_id`` may be one id or a list; generation of a row ends at the first of them. An empty list: no
    end-of-sequence token (every row runs to ``max_new_tokens`` or a stop string), even where the model's own
    settings name one (None there means the model's).
    ``pad_token_id`` fills finished rows while other rows go on (``None``: the first EOS id, as
    transformers does). ``bos_token_id`` is informational for the loop (the prompt, BOS included, is
    the caller's). Both are the model's (the manifest's): a pipeline call that gives either is refused
    (:meth:`refuse_idle`), since neither changes its text. ``stop_strings`` end a row once its decoded text contains
    one; the text returned is cut just before it (token ids are returned as generated, like transformers).
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: list[str] = field(default_factory=list)

    # --- derived values the loop uses --------------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids as a tuple (empty when there is none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def fill_token_id(self) -> int | None:
        """The token fed for (and padding) finished rows: ``pad_token_id``, else the first EOS id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # --- checking ------------------------------------------------------------------------------------
    def validate(self, max_positions: int | None = None, vocab_size: int | None = None,
                 prompt_length: int = 0, positions_note: str | None = None,
                 least_prompt: bool = False) -> "GenerationConfig":
        """Raise InputError for a setting that cannot work; return ``self`` otherwise.

        ``max_positions`` (the decoder's position limit) and ``prompt_length`` bound
        ``prompt_length + max_new_tokens``; ``least_prompt``: ``prompt_length`` is the least any prompt takes (judged
        before the prompt is known), so the advice names no count a longer prompt would refuse; ``positions_note``
        says where a limit below the model's comes from (a TensorRT engine's profile) and how to raise it;
        ``vocab_size`` bounds the special token ids.
        """
        self._check_types()
        cap = MAX_NEW_TOKENS_CAP
        if self.max_new_tokens <= 0:
            raise _bad("max_new_tokens", self.max_new_tokens, "an integer of at least 1",
                       "ask for one or more new tokens, e.g. max_new_tokens=30")
        if self.max_new_tokens > cap:
            raise _bad("max_new_tokens", self.max_new_tokens, f"at most {cap}",
                       "lower max_new_tokens (captions need 20-60 tokens)")
        if max_positions is not None and positions_taken(prompt_length, self.max_new_tokens) > max_positions:
            raise self._too_many_new_tokens(max_positions, prompt_length, positions_note, least_prompt)
        if self.min_new_tokens < 0:
            raise _bad("min_new_tokens", self.min_new_tokens, "0 or more", "use min_new_tokens=0 for no minimum")
        if self.min_new_tokens > self.max_new_tokens:
            raise _bad("min_new_tokens", self.min_new_tokens, f"at most max_new_tokens ({self.max_new_tokens})",
                       "lower min_new_tokens or raise max_new_tokens")
        if self.num_beams < 1:
            raise _bad("num_beams", self.num_beams, "1 (greedy or sampling) or more (beam search)",
                       "use num_beams=1 for greedy decoding")
        if self.num_beams > 1 and self.do_sample:
            raise _bad("num_beams", self.num_beams, "num_beams=1 when do_sample=True (beam sampling is not supported)",
                       "set do_sample=False for beam search, or num_beams=1 for sampling")
        odd = isinstance(self.early_stopping, int) and not isinstance(self.early_stopping, bool)
        if self.early_stopping not in EARLY_STOPPING_MODES or odd:
            raise _bad("early_stopping", self.early_stopping, "True, False or \"never\"",
                       "use early_stopping=False (transformers' default)")
        if not _finite(self.length_penalty):
            raise _bad("length_penalty", self.length_penalty, "a finite number",
                       "use 1.0 (no preference), > 1 for longer, < 1 for shorter beams")
        if self.do_sample and not (self.temperature >= MIN_TEMPERATURE and _finite(self.temperature)):
            raise _bad("temperature", self.temperature,
                       f"a finite number of at least {MIN_TEMPERATURE:g} when sampling",
                       "use temperature=1.0, or do_sample=False for greedy decoding (what a temperature near 0 is)")
        if self.top_k < 0:
            raise _bad("top_k", self.top_k, "0 (off) or more",
                       "use top_k=50 (transformers' default) or 0 to turn it off")
        if not (0.0 <= self.top_p <= 1.0):  # 0 keeps the one best token, as transformers' TopPLogitsWarper
            raise _bad("top_p", self.top_p, "a number in [0, 1]",
                       "use top_p=1.0 to turn nucleus sampling off, or e.g. 0.9")
        if not (self.repetition_penalty > 0 and _finite(self.repetition_penalty)):
            raise _bad("repetition_penalty", self.repetition_penalty, "a finite number above 0 (1.0 = off)",
                       "use 1.0 for no penalty, or about 1.2 to discourage repeats")
        if self.seed is not None and self.seed < 0:
            raise _bad("seed", self.seed, "None or an integer of 0 or more", "pass a non-negative seed")
        for name, ids in (("eos_token_id", self.eos_token_ids), ("pad_token_id", _opt(self.pad_token_id)),
                          ("bos_token_id", _opt(self.bos_token_id))):
            for token in ids:
                if token < 0 or (vocab_size is not None and token >= vocab_size):
                    bound = f"below the vocabulary size {vocab_size}" if vocab_size is not None else "0 or more"
                    raise _bad(name, token, f"token ids {bound}",
                               "use the ids from the model's tokenizer / generation_config.json")
        for text in self.stop_strings:
            if not text:
                raise _bad("stop_strings", self.stop_strings, "non-empty strings", "remove the empty string")
        return self

    def _too_many_new_tokens(self, max_positions: int, prompt_length: int, positions_note: str | None,
                             least_prompt: bool) -> InputError:
        note = f" ({positions_note})" if positions_note else ""
        most = max(most_new_tokens(max_positions, prompt_length), 0)
        taken = (f"prompt length {prompt_length} + max_new_tokens - 1 (the last new token is never fed back) within "
                 f"the decoder's {max_positions} positions")
        if least_prompt:  # the prompt is not known yet: ``most`` fits the shortest prompt only (its rows and BOS)
            rows = prompt_length - 1  # an image prefix's query rows, beside the prompt's tokens (BOS included)
            return _bad("max_new_tokens", self.max_new_tokens, f"{taken}, {prompt_length} being the shortest prompt's "
                        "length (a longer prompt leaves fewer)", f"lower max_new_tokens to {most} for the shortest "
                        f"prompt, or to {max_positions + 1 - rows} minus the prompt's tokens (BOS included) for a "
                        f"longer one{note}")
        return _bad("max_new_tokens", self.max_new_tokens, taken, f"lower max_new_tokens to {most} or shorten the "
                    f"prompt{note}")

    def refuse_idle(self, given: dict[str, Any]) -> "GenerationConfig":
        """Raise InputError for a setting in ``given`` (what the caller passed) that these settings never read:
        sampling's settings without ``do_sample``, beam search's with one beam, and the model's own token ids
        (``MODEL_OWNED``). Return ``self`` otherwise."""
        idle = [(name, why, f"drop {name} (the artifact's own serves)") for name, why in MODEL_OWNED.items()
                if given.get(name) is not None]
        idle += [(name, "do_sample=True (greedy decoding and beam search draw nothing)",
                  f"pass do_sample=True, or drop {name}")
                 for name in SAMPLING_ONLY if not self.do_sample and given.get(name) is not None]
        idle += [(name, "num_beams above 1 (only beam search reads it)", f"pass e.g. num_beams=3, or drop {name}")
                 for name in BEAM_ONLY if self.num_beams == 1 and given.get(name) is not None]
        if given.get("min_new_tokens") and not self.eos_token_ids:  # it holds the end tokens off, and there are none
            off = "eos_token_id=[] turned them off" if given.get("eos_token_id") is not None else "the model has none"
            idle.append(("min_new_tokens", f"an end token to hold off ({off})",
                         "drop min_new_tokens" + (", or leave eos_token_id unset" if "[]" in off else "")))
        if idle:
            name, needs, fix = idle[0]
            raise InputError(f"generation setting {name}={given[name]!r} would change nothing", needs, fix)
        return self

    def _check_types(self) -> None:
        for item in dataclasses.fields(self):  # numpy scalars (values read from an array) as Python's own
            value = getattr(self, item.name)
            if isinstance(value, np.generic):
                setattr(self, item.name, value.item())
            elif isinstance(value, (list, tuple)):
                setattr(self, item.name, type(value)(v.item() if isinstance(v, np.generic) else v for v in value))
        ints = ("max_new_tokens", "min_new_tokens", "num_beams", "top_k")
        for name in ints:
            if not _is_int(getattr(self, name)):
                raise _bad(name, getattr(self, name), "an integer", f"pass {name} as a whole number")
        for name in ("seed", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise _bad(name, value, "an integer or None", f"pass {name} as a whole number")
        for name in ("length_penalty", "temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _bad(name, value, "a number", f"pass {name} as a float")
        if not isinstance(self.do_sample, bool):
            raise _bad("do_sample", self.do_sample, "True or False", "pass a bool")
        eos = self.eos_token_id
        if eos is not None and not _is_int(eos) and not (isinstance(eos,
                                                                    (list, tuple)) and all(_is_int(t) for t in eos)):
            raise _bad("eos_token_id", eos, "an integer, a list of integers, or None",
                       "use the id(s) from generation_config.json")
        if isinstance(eos, tuple):
            self.eos_token_id = list(eos)
        if isinstance(self.stop_strings, str) or not isinstance(self.stop_strings, (list, tuple)) \
                or not all(isinstance(s, str) for s in self.stop_strings):
            raise _bad("stop_strings", self.stop_strings, "a list of strings",
                       'wrap a single stop string in a list: ["\\n"]')
        self.stop_strings = list(self.stop_strings)

    # --- manifest round trip -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """Build from the manifest's ``generation`` object (missing keys take defaults); validated."""
        if not isinstance(data, dict):
            raise InputError(
                f"the generation settings are a {type(data).__name__}", "a JSON object of generation settings",
                "write the generation section as an object, e.g. {\"max_new_tokens\": 30}",
            )
        _refuse_unknown(data, cls)
        config = cls(**data)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready (the inverse of :meth:`from_dict`)."""
        out = dataclasses.asdict(self)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some settings changed (unknown names refused)."""
        _refuse_unknown(changes, type(self))
        return dataclasses.replace(self, **changes)


def positions_taken(prompt_length: int, max_new_tokens: int) -> int:
    """Decoder positions a generation of up to ``max_new_tokens`` takes after a prompt of ``prompt_length``: every new
    token but the last is fed back (the last is returned, never fed), so a model of N positions gives a prompt of P
    up to N - P + 1 new tokens, as transformers' ``generate`` does."""
    return prompt_length + max(max_new_tokens - 1, 0)


def most_new_tokens(max_positions: int, prompt_length: int) -> int:
    """The largest ``max_new_tokens`` whose generation fits ``max_positions`` after the prompt (0 or less: none)."""
    return max_positions - prompt_length + 1


def _refuse_unknown(settings: dict[str, Any], config_class: type) -> None:
    """InputError naming the settings ``config_class`` has no field for: one wording wherever they are given (a
    call's keywords, the manifest, a request to a server)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    not_run = sorted(set(settings) & set(GENERATION_NOT_RUN))
    if not_run:
        raise InputError(f"generation setting(s) {not_run} are transformers' but mmedge's generation loop does not run "
                         "them", f"only {sorted(known)}", "drop them (greedy decoding, beam search and sampling run "
                         "with the settings listed)")
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown generation setting(s) {unknown}", f"only {sorted(known)}",
                         "check the spelling, or remove them (names follow transformers.GenerationConfig)")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    """``math.isfinite`` that says False (not OverflowError) for an int too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _opt(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)


def _bad(name: str, value: Any, expected: str, fix: str) -> InputError:
    return InputError(f"generation setting {name}={value!r} is not usable", expected, fix)
