"""``mmedge run`` options checked against the artifact before it is loaded.

An option the artifact's task would not use (``--labels`` for a captioning model, ``--question`` for CLIP,
``--temperature`` without ``--sample``, ...) is refused with the reason, never ignored. Each rule says when its
option does something; the CLI applies them all from the manifest alone, and ``--llm-quantization`` (which depends on
the backend the decoder lands on) once the plan is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
    """Raise InputError naming the first option that would change nothing for ``target``, or a VQA run without the
    question it answers (it would caption quietly)."""
    refuse_idle(RULES, args, target, f"for this {target}")
    if target.task == "vqa" and args.question is None and not args.interleaved:
        raise InputError("--task vqa was given without --question", "the question to answer",
                         "add e.g. --question 'what is in the picture?', or drop --task vqa to caption")


def check_task(args, manifest: dict) -> None:
    """A --task the artifact was not exported for, refused before any other option is judged for it."""
    tasks = manifest["tasks"]
    if args.task is not None and args.task not in tasks:
        raise InputError(f"task '{args.task}' is not one this artifact was exported for", f"one of {', '.join(tasks)}",
                         f"pass --task {tasks[0]}, or drop --task"
                         + (" (or re-export with --task)" if manifest["family"] == "clip" else ""))


# generation setting -> the `mmedge run` flag that sets it
GENERATION_FLAGS = {"max_new_tokens": "--max-new-tokens", "num_beams": "--num-beams", "temperature": "--temperature",
                    "top_p": "--top-p", "top_k": "--top-k-tokens", "seed": "--seed", "stop_strings": "--stop"}


def generation_args(args) -> dict:
    """The generation settings of the command line, as the captioner's calls take them (None: the manifest's)."""
    return {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.sample or None,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k_tokens, "seed": args.seed,
            "stop_strings": args.stop}


def check_generation(args, manifest: dict, target: Target) -> None:
    """The generation flags judged against the manifest's settings and its decoder's positions, as the captioner
    judges them, before anything is loaded; refused in the flags' words."""
    if not target.captions:
        return
    from mmedge.generation import GenerationConfig
    from mmedge.manifest import family_section
    from mmedge.pipelines.captioner import unusable_default
    from mmedge.pipelines.prefix_inputs import least_prompt_positions

    given = {name: value for name, value in generation_args(args).items() if value is not None}
    section = family_section(manifest)
    positions = (section.get("decoder") or {}).get("max_positions")
    least_prompt = least_prompt_positions(section)  # as the captioner's input builder counts it
    try:  # a bad manifest is the artifact's fault, said as loading it says it
        config = GenerationConfig.from_dict(dict(manifest.get("generation") or {}))
        config.validate(max_positions=positions, prompt_length=least_prompt, least_prompt=True)
    except InputError as error:
        raise unusable_default(error) from None
    try:
        config.replace(**given).validate(max_positions=positions, prompt_length=least_prompt,
                                          least_prompt=True)
    except InputError as error:
        raise InputError(*(generation_flag_words(part) for part in (error.what, error.expected, error.fix))) from None


def generation_flag_words(text: str | None) -> str | None:
    """A generation check's words for the Python API ("max_new_tokens=30", "set do_sample=False") as `mmedge run`
    takes them ("--max-new-tokens 30", "drop --sample")."""
    if text is None:
        return None
    text = text.replace("generation setting ", "").replace("None or an integer", "an integer")
    text = re.sub(r"\b(?:set |use )?do_sample=False\b", "drop --sample", text)
    text = re.sub(r"\bdo_sample=True\b", "--sample", text)
    names = "|".join(GENERATION_FLAGS)
    return re.sub(rf"(?<![\w-])({names})(?:=([^\s,;)]+))?",
                  lambda m: GENERATION_FLAGS[m[1]] + (f" {m[2]}" if m[2] else ""), text)


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a text no file can be named (a label past the file system's name length)."""
    try:
        return path.is_file()
    except (OSError, ValueError):  # ENAMETOOLONG; ValueError: an embedded NUL
        return False


LIST_FLAGS = (("--labels", "labels"), ("--stop", "stop"), ("--templates", "templates"))


def check_list_values(args) -> None:
    """A list option takes every argument after it: an image path there (``--labels cat dog b.png``) would be a label
    or a stop string, and the image would not run. Refused: an existing image file among the labels, stop strings
    and templates (a label that merely names another file in the folder, 'dog' beside a file dog, is a label)."""
    from PIL import Image

    suffixes = Image.registered_extensions()
    for flag, dest in LIST_FLAGS:
        for value in getattr(args, dest, None) or ():
            path = Path(value)
            if path.suffix.lower() in suffixes and _is_file(path):
                raise InputError(f"{flag} value '{value}' names an image file",
                                 f"{flag} values, then nothing but options",
                                 f"put the images before {flag} (mmedge run ARTIFACT IMAGE... {flag} ...), or end "
                                 f"its list with -- and put every image after that")


def check_labels_given(args, target: Target) -> None:
    """A two-graph zero-shot artifact classifies against the labels of the command: refused without any, in the
    command's words (the pipeline's own refusal speaks of labels=[...])."""
    if _zero_shot_choice(args, target) and args.labels is None and args.labels_file is None:
        raise InputError(f"no labels were given for this {target}", "the labels to classify against",
                         "pass e.g. --labels cat dog bird, or --labels-file labels.txt (one label per line)")
