"""``mmedge run`` options checked against the artifact before it is loaded.

An option the artifact's task would not use (``--labels`` for a captioning model, ``--question`` for CLIP,
``--temperature`` without ``--sample``, ...) is refused with the reason, never ignored. Each rule says when its
option does something; the CLI applies them all from the manifest alone, and ``--llm-quantization`` (which depends on
the backend the decoder lands on) once the plan is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmedge.backend_option_args import DECODER_FLAGS, FLAG, flag_value
from mmedge.errors import InputError
from mmedge.families import FAMILIES
from mmedge.idle_options import Rule, refuse_idle

CAPTIONING = ("caption", "vqa")


@dataclass(frozen=True)
class Target:
    """What an artifact does with a run: its family, the task asked for, and whether its labels are baked in."""

    family: str
    task: str
    fused: bool

    @property
    def captions(self) -> bool:
        return self.task in CAPTIONING

    def __str__(self) -> str:
        baked = " with baked labels" if self.fused else ""
        row = FAMILIES.get(self.family)
        return f"{row.label if row else self.family} {self.task} artifact{baked}"


def _zero_shot_choice(args, target: Target) -> bool:
    return target.task == "zero-shot" and not target.fused


def _captions(args, target: Target) -> bool:
    return target.captions


def _sampling(args, target: Target) -> bool:
    return target.captions and bool(args.sample)


def _prompted(args, target: Target) -> bool:
    return target.captions and not args.interleaved


RULES = (
    Rule("--labels", lambda a: a.labels is not None, _zero_shot_choice,
         "a zero-shot artifact with two graphs (labels are chosen at run time)",
         "drop --labels (an artifact with baked labels classifies against those)"),
    Rule("--labels-file", lambda a: a.labels_file is not None, _zero_shot_choice,
         "a zero-shot artifact with two graphs", "drop --labels-file"),
    Rule("--templates", lambda a: a.templates is not None, _zero_shot_choice,
         "a zero-shot artifact with two graphs (baked labels keep their export templates)", "drop --templates"),
    Rule("--top-k", lambda a: a.top_k is not None, lambda a, t: t.task == "zero-shot",
         "a zero-shot artifact (--top-k is how many labels to show)", "drop --top-k (--top-k-tokens is for sampling)"),
    Rule("--question", lambda a: a.question is not None, _prompted,
         "a captioning artifact (BLIP-2, IDEFICS) without --interleaved", "drop --question"),
    Rule("--prompt", lambda a: a.prompt is not None, lambda a, t: _prompted(a, t) and a.question is None,
         "a captioning artifact without --question or --interleaved (they make the prompt)", "pass only one of them"),
    Rule("--interleaved", lambda a: a.interleaved, lambda a, t: t.family in FAMILIES and FAMILIES[t.family].interleaved,
         "a Flamingo-style (IDEFICS) captioning artifact", "drop --interleaved, or export an IDEFICS model"),
    Rule("--stream", lambda a: a.stream, lambda a, t: t.captions and not a.json,
         "a captioning artifact, without --json (which prints whole results)", "drop --stream or --json"),
    *(Rule(flag, given, _captions, "a captioning artifact (BLIP-2, IDEFICS)", f"drop {flag}")
      for flag, given in (("--max-new-tokens", lambda a: a.max_new_tokens is not None),
                          ("--num-beams", lambda a: a.num_beams is not None),
                          ("--sample", lambda a: a.sample),
                          ("--stop", lambda a: a.stop is not None))),
    *(Rule(flag, given, _sampling, "--sample on a captioning artifact (greedy and beam search draw nothing)",
           f"add --sample, or drop {flag}")
      for flag, given in (("--temperature", lambda a: a.temperature is not None),
                          ("--top-p", lambda a: a.top_p is not None),
                          ("--top-k-tokens", lambda a: a.top_k_tokens is not None),
                          ("--seed", lambda a: a.seed is not None))),
    Rule("--llm-quantization", lambda a: a.llm_quantization is not None, _captions,
         "a captioning artifact whose decoder runs on the torch backend", "drop --llm-quantization"),
    Rule("--openvino-weights", lambda a: a.openvino_weights is not None, _captions,
         "a captioning artifact whose decoder runs on the OpenVINO backend", "drop --openvino-weights"),
)

def target_of(manifest: dict, task: str | None) -> Target:
    """The run's target from a (checked) manifest; ``task`` None: the manifest's first task."""
    return Target(manifest["family"], task or manifest["tasks"][0], "zero_shot" in manifest.get("components", {}))


def remote_target_of(pipeline) -> Target:
    """The run's target from a served pipeline (``mmedge.triton_client``): the settings `mmedge triton` recorded."""
    settings = pipeline.settings
    return Target(settings.get("family", ""), pipeline.task, "zero_shot" in (settings.get("components") or {}))


def plan_flags_given(args) -> list[str]:
    """The options given that choose how this device runs an artifact (its plan): --backend, --device, --threads,
    --backend-option and the decoder flags (``mmedge.backend_option_args``)."""
    return [flag for flag, given in (("--backend", args.backend != "auto"), ("--device", args.device != "auto"),
                                     ("--threads", args.threads is not None),
                                     *((flag, flag_value(args, flag) is not None) for flag in (*DECODER_FLAGS, FLAG)))
            if given]


def check_served_run_options(args) -> None:
    """Options that choose how this device runs the model would change nothing for a model a server runs."""
    local = plan_flags_given(args)
    if local:
        raise InputError(f"{local[0]} would change nothing with --triton", "options for the model the server runs "
                         "(its backend, device and threads are the server's: mmedge triton --gpu, --threads)",
                         f"drop {local[0]}")


def check_run_options(args, target: Target) -> None:
    """Raise InputError naming the first option that would change nothing for ``target``."""
    refuse_idle(RULES, args, target, f"for this {target}")


def check_labels_given(args, target: Target) -> None:
    """A two-graph zero-shot artifact classifies against the labels of the command: refused without any, in the
    command's words (the pipeline's own refusal speaks of labels=[...])."""
    if _zero_shot_choice(args, target) and args.labels is None and args.labels_file is None:
        raise InputError(f"no labels were given for this {target}", "the labels to classify against",
                         "pass e.g. --labels cat dog bird, or --labels-file labels.txt (one label per line)")
