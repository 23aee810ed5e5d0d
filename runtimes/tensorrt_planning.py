"""What a TensorRT engine for a component will be, decided without TensorRT: which components can be built,
at which precision, over which shapes (the optimization profile), and whether the device has the memory.

Everything here is pure Python over the manifest, the user's limits and the device probe, so it is tested
on machines without a GPU; ``mmedge.runtimes.tensorrt`` turns the answers into engines.

**Profiles.** TensorRT needs, for every input with a dynamic axis, the smallest, the typical ("opt",
what kernels are tuned for) and the largest shape it will see. The manifest names each dynamic axis;
each name has one rule (``AXIS_RULES``), bounded by the user's limits (``ProfileLimits``):

====================  =====================================  ==============================================
axis                  (min, opt, max)                         notes
====================  =====================================  ==============================================
``batch``             (1, opt_batch, max_batch)               opt 1: a camera frame, a caption at a time
``images``            (1, 1, max_images)                      images in one call (default: max_batch)
``sequence``          (1, min(32, S), S)                      S = max_sequence; a text encoder fed by a
                                                              tokenizer that pads to max_length gets (S, S, S)
``tokens``            as ``sequence``
``past_sequence``     (0, S // 2, S - 1)                      0: the first step has no past yet
``total_sequence``    (1, S // 2, S)                          past + new tokens
``logits_sequence``   (1, 1, S)                               the positions a decoder computes logits for (the
                                                              loop asks for 1; the exporter's checks for all)
``image_tokens``      (u, u, u * max_images)                  u = visual tokens per image (from the manifest)
====================  =====================================  ==============================================

An axis name without a rule is refused (``InputError``): a profile is never guessed. ``mmedge build`` also refuses a
``--max-sequence`` that fits no call (``refuse_max_sequence``): past the decoder's positions or the tokenizer's
length, or below the positions every prompt takes (BLIP-2's query rows and BOS). A value read back from an earlier
build's ``build.json`` is taken as it was (engines built with it stay loadable).

**KV-cached decoders** (a component with a ``past_sequence`` axis) get their three sequence axes together:
TensorRT checks the graph's shape constraints at each profile point (the mask covers past + new tokens, the
presents concatenate past and new keys) and refuses an engine whose opt point breaks them ("kOPT values for
profile 0 violate shape constraints"). So at every point ``total_sequence = past_sequence + sequence``:

=========  ==========  ==============  ===============  =============================================
point      sequence    past_sequence   total_sequence
=========  ==========  ==============  ===============  =============================================
min        1           0               1                the prefill feeds a zero-length past
opt        1           P               P + 1            a decode step (the hot loop); P = S // 2
max        S           S - 1           2S - 1           the longest prompt and the longest past
=========  ==========  ==============  ===============  =============================================

(P = ``opt_sequence`` when given, at most S - 1.) Real calls stay within S positions: the decoder on TensorRT reports
``max_positions`` = min(the manifest's, S) (``engine_positions``, ``usable_positions``), so the generation loop refuses
prompt + new tokens past S before the first step; the max point only has to be a valid shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from mmedge.errors import BackendUnavailableError, InputError, InsufficientMemoryError
from mmedge.manifest import decoder_settings, family_section

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQUENCE = 512  # when the artifact names no limit (no tokenizer max_length, no decoder max_positions)
OPT_SEQUENCE = 32  # typical prompt / label length a free-length text input is tuned for
CUDA_RUNTIME_MB = 512  # CUDA context, cuDNN/cuBLAS handles and TensorRT's runtime, roughly
MIB = 1 << 20
_WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}  # bytes per weight, by precision
_DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class ProfileLimits:
    """User limits on the shapes an engine accepts. ``None``: the artifact's own limit (tokenizer
    ``max_length``, the decoder's ``max_positions``) or mmedge's default."""

    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = 1
    max_sequence: int | None = None
    opt_sequence: int | None = None
    max_images: int | None = None

    def checked(self) -> "ProfileLimits":
        for name in ("max_batch", "opt_batch", "max_sequence", "opt_sequence", "max_images"):
            value = getattr(self, name)
            if value is None and name not in ("max_batch", "opt_batch"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} is {value!r}", "a positive integer",
                                 f"pass e.g. --{name.replace('_', '-')} 8")
        if self.opt_batch > self.max_batch:
            return replace(self, opt_batch=self.max_batch)
        return self


# --- which components, at which precision ------------------------------------------------------------
def is_qdq(component: Mapping) -> bool:
    """An INT8 graph with explicit QuantizeLinear/DequantizeLinear pairs (static calibration): the INT8 recipe
    TensorRT builds from (explicit quantization)."""
    quant = component.get("quantization") or {}
    return component.get("precision") == "int8" and (quant.get("format") == "QDQ"
                                                     or "qdq" in str(quant.get("method", "")))


def unbuildable_reason(name: str, component: Mapping) -> str | None:
    """Why TensorRT cannot build this component, or None when it can: graphs with ONNX Runtime-only operators
    (INT4 ``com.microsoft.MatMulNBits``; dynamic INT8's ``MatMulInteger`` / ``DynamicQuantizeLinear``; a fused
    ``com.microsoft.MultiHeadAttention``) stay on ONNX Runtime. Float and static-QDQ graphs are built, the KV-cached
    decoder's included."""
    precision = component.get("precision")
    method = str((component.get("quantization") or {}).get("method", ""))
    attention = (component.get("attention") or {}).get("op", "standard")
    if attention != "standard":
        return (f"component '{name}' writes its attention as {attention} (export --fused-attention), an ONNX Runtime "
                "operator TensorRT cannot parse; export without --fused-attention for TensorRT")
    if precision == "int4":
        return (f"component '{name}' is INT4 weight-only (ONNX Runtime's com.microsoft MatMulNBits), which TensorRT "
                "cannot parse")
    if precision == "int8" and not is_qdq(component):
        return (f"component '{name}' is dynamic INT8 ({method or 'ONNX Runtime integer ops'}: MatMulInteger, "
                "DynamicQuantizeLinear), which TensorRT cannot build; TensorRT builds INT8 from static QDQ graphs "
                "(mmedge export --precision int8 --quantization static)")
    return None


def is_kv_decoder(component: Mapping) -> bool:
    """A KV-cached decoder: some input has a ``past_sequence`` axis (or the entry names a ``kv_cache`` layout)."""
    return component.get("kv_cache") is not None or any(
        "past_sequence" in spec.get("shape", ()) for spec in component.get("inputs", {}).values())


# LLMs whose FP32 graphs overflow at FP16 (their feed-forward outputs and residual stream pass 65504: inf, then NaN),
# by the model type the family section records (``manifest[family][section]["llm"]``). An FP16 export of them keeps
# the overflowing nodes FP32 (``quantization.fp32_nodes``, found by the export's range guard on validation inputs);
# an FP32 graph carries no such record, so TensorRT builds it at FP32 rather than let FP16 layers overflow.
FP16_OVERFLOWING_LLMS = ("t5", "mt5", "umt5")


def fp16_overflow(manifest: Mapping | None, name: str, component: Mapping) -> str | None:
    """Why an FP16 engine of this FP32 graph would overflow (an LLM of ``FP16_OVERFLOWING_LLMS``), or None."""
    if manifest is None or component.get("precision") != "fp32":
        return None
    for entry in family_section(manifest).values():
        if isinstance(entry, Mapping) and entry.get("component") == name and entry.get("llm") in FP16_OVERFLOWING_LLMS:
            return (f"component '{name}' is an FP32 {entry['llm']} graph, whose activations pass FP16's range (inf, "
                    "then NaN, in an FP16 engine)")
    return None


FP16_EXPORT = ("re-export with `mmedge export MODEL OUT --llm-precision fp16` (its range guard keeps the overflowing "
               "nodes FP32, and the engine obeys them)")


def engine_precision(name: str, component: Mapping, requested: str | None, default: str = "fp16",
                     manifest: Mapping | None = None) -> str:
    """The precision of the engine built for ``component``.

    A static QDQ graph is built as INT8 (explicit quantization: its scales come from calibration at export);
    an FP16 graph at FP16 (its own types, FP32 islands included: a strongly typed network, ``network_typing``);
    an FP32 graph at ``requested`` or the device default (FP16), except one that overflows at FP16
    (``fp16_overflow``, judged from ``manifest``): FP32 by default, and FP16 asked for is refused. Asking for INT8
    from a float graph, or for a float engine from a QDQ graph, is refused: the precision is fixed by the export's
    recipe.
    """
    if requested is not None and requested not in PRECISIONS:
        raise InputError(f"precision '{requested}' is not one TensorRT engines are built at",
                         f"one of {', '.join(PRECISIONS)}",
                         "pass --precision fp16, fp32 or int8")
    if is_qdq(component):
        if requested not in (None, "int8"):
            raise InputError(f"component '{name}' is an INT8 QDQ graph, so its engine is INT8; {requested} "
                             "was asked for",
                             "--precision int8 (or no --precision) for an INT8 artifact",
                             "drop --precision, or re-export at fp32/fp16 for a float engine")
        return "int8"
    if requested == "int8":
        raise InputError(f"component '{name}' is a {component.get('precision')} graph; an INT8 engine is built only "
                         "from a static QDQ graph (explicit quantization)",
                         "an artifact exported with --precision int8 "
                         "--quantization static", "re-export with `mmedge export MODEL OUT --precision int8 "
                         "--quantization static`, or build at --precision fp16")
    if component.get("precision") == "fp16":
        return requested or "fp16"
    overflow = fp16_overflow(manifest, name, component)
    if overflow and requested == "fp16":
        raise InputError(f"{overflow}; an FP16 engine was asked for",
                         "an FP32 engine of this graph, or an FP16 export whose overflowing nodes stay FP32",
                         f"drop --precision (such components are built at FP32, the others at FP16), or {FP16_EXPORT}")
    return requested or ("fp32" if overflow else default)


def provider_fp16(manifest: Mapping | None, name: str, component: Mapping, default: str = "fp16") -> bool:
    """Whether ONNX Runtime's TensorRT provider may get ``trt_fp16_enable`` for this component (``default``: the
    device's, ``tensorrt_defaults``). The provider builds weakly typed networks, where the flag lets TensorRT run any
    layer at FP16: so only for an FP32 graph that does not overflow at FP16 (``fp16_overflow``) and an FP16 graph
    without FP32 islands (``quantization.fp32_nodes``); never for INT8 graphs."""
    if default != "fp16":
        return False
    if component.get("precision") == "fp16":
        return not (component.get("quantization") or {}).get("fp32_nodes")
    return component.get("precision") == "fp32" and fp16_overflow(manifest, name, component) is None


def network_typing(graph_precision: str | None, precision: str) -> tuple[bool, bool]:
    """(strongly typed, FP16 flag) of the TensorRT network an engine at ``precision`` is built as, from a graph
    exported at ``graph_precision`` (the manifest's). A graph whose types the export chose (static QDQ INT8; FP16 with
    its FP32 islands, ``quantization.fp32_nodes``) is built ``STRONGLY_TYPED``, with no precision flag: TensorRT obeys
    its types. An FP32 graph built at FP16 is weakly typed with ``BuilderFlag.FP16`` (TensorRT picks each layer's
    precision); at FP32, and an FP16 graph built at FP32, weakly typed without it."""
    if precision == "int8" or (precision == "fp16" and graph_precision == "fp16"):
        return True, False
    return False, precision == "fp16"


def key_precision(component: Mapping, precision: str) -> str:
    """The precision an engine's key records: a strongly typed FP16 network is keyed apart from a weakly typed one
    (engines of an FP16 graph cached before it was built strongly typed are stale)."""
    strong, _ = network_typing(component.get("precision"), precision)
    return f"{precision}-strongly-typed" if strong and precision == "fp16" else precision


# --- optimization profiles --------------------------------------------------------------------------
AXIS_RULES = ("batch", "images", "sequence", "tokens", "past_sequence", "total_sequence", "logits_sequence",
              "image_tokens")


def tokens_per_image(manifest: Mapping) -> int | None:
    """Visual tokens per image: a component's declared ``axis_units.image_tokens`` (a fused image graph), else the
    fixed second axis of a component output shaped ``[images, N, width]`` (the last such in the manifest, e.g. a
    Perceiver Resampler's latents after the vision tower's patches)."""
    found = None
    for comp in manifest.get("components", {}).values():
        unit = (comp.get("axis_units") or {}).get("image_tokens")
        if isinstance(unit, int) and not isinstance(unit, bool):
            return unit
        for spec in comp.get("outputs", {}).values():
            shape = spec.get("shape", [])
            if len(shape) == 3 and shape[0] == "images" and isinstance(shape[1], int):
                found = shape[1]
    return found


def sequence_limit(manifest: Mapping, component: Mapping, limits: ProfileLimits) -> tuple[int, bool]:
    """(S, fixed): the longest sequence an input takes, and whether it is always exactly S long.

    A component fed token ids straight from the tokenizer (an ``input_ids`` input) never sees more than the
    tokenizer's ``max_length``, and exactly that many when the tokenizer pads to ``max_length``. Otherwise S is
    ``max_sequence``, else the decoder's ``max_positions`` (capped at the default), else the default.
    """
    tokenizer = manifest.get("tokenizer") or {}
    if "input_ids" in component.get("inputs", {}) and isinstance(tokenizer.get("max_length"), int):
        length = tokenizer["max_length"]
        if tokenizer.get("padding") == "max_length":
            return length, True
        return min(length, limits.max_sequence or length), False
    if limits.max_sequence:
        return limits.max_sequence, False
    positions = decoder_settings(manifest).get("max_positions")
    if isinstance(positions, int) and positions > 0:
        return min(positions, DEFAULT_MAX_SEQUENCE), False
    return DEFAULT_MAX_SEQUENCE, False


def max_sequence_range(manifest: Mapping, component: Mapping) -> tuple[tuple[int, str], tuple[int, str] | None]:
    """((least, why), (most, why) or None): the ``max_sequence`` values that fit a component whose sequence axes it
    bounds. A text encoder fed by the tokenizer: up to the tokenizer's ``max_length`` (it never sends more). A
    generative family's graphs: from the positions every prompt takes (an image prefix's query rows and BOS,
    ``least_prompt_positions``) to the decoder's ``max_positions`` (no most where they are unbounded: Flan-T5's
    relative positions)."""
    from mmedge.pipelines.prefix_inputs import least_prompt_positions

    tokenizer = manifest.get("tokenizer") or {}
    if "input_ids" in component.get("inputs", {}) and isinstance(tokenizer.get("max_length"), int):
        length = tokenizer["max_length"]
        return (1, "one token"), (length, f"the {length} tokens the tokenizer sends at most (its max_length)")
    decoder = decoder_settings(manifest)
    if not decoder:
        return (1, "one token"), None
    least = least_prompt_positions(dict(family_section(manifest)))
    rows = f"the image's {least - 1} query rows and BOS" if least > 1 else "BOS"
    positions = decoder.get("max_positions")
    most = (positions, f"the decoder's {positions} positions (its max_positions)") if isinstance(
        positions, int) and positions > 0 else None
    return (least, f"the {least} positions every prompt takes ({rows})"), most


def refuse_max_sequence(manifest: Mapping, names: Iterable[str], limits: ProfileLimits) -> None:
    """InputError for a ``--max-sequence`` given to ``mmedge build`` outside ``max_sequence_range`` of a component
    ``names`` that reads it: a profile past the decoder's positions or the tokenizer's length builds for shapes no
    call has, and one below a prompt's least length fits no call."""
    value = limits.max_sequence
    if value is None:
        return
    for name in names:
        component = manifest["components"][name]
        if not reads_max_sequence(manifest, component, limits):
            continue
        (least, least_why), most = max_sequence_range(manifest, component)
        if value < least:
            problem = f"fewer than {least_why}"
        elif most is not None and value > most[0]:
            problem = f"more than {most[1]}"
        else:
            continue
        fits = f"from {least} to {most[0]}" if most else f"of at least {least}"
        raise InputError(f"--max-sequence {value} is {problem} (component '{name}')", f"a value {fits}",
                         "pass one in that range, or drop --max-sequence for the artifact's own limit")


def axis_range(axis: str, manifest: Mapping, component: Mapping, limits: ProfileLimits) -> tuple[int, int, int]:
    """(min, opt, max) of one named dynamic axis; InputError for a name without a rule."""
    limits = limits.checked()
    images = limits.max_images or limits.max_batch
    if axis == "batch":
        return 1, limits.opt_batch, limits.max_batch
    if axis == "images":
        return 1, 1, images
    if axis in ("sequence", "tokens"):
        length, fixed = sequence_limit(manifest, component, limits)
        if fixed:
            return length, length, length
        return 1, min(limits.opt_sequence or OPT_SEQUENCE, length), length
    if axis == "past_sequence":
        length, _ = sequence_limit(manifest, component, limits)
        return 0, min(limits.opt_sequence or length // 2, length - 1), max(length - 1, 1)
    if axis == "total_sequence":
        length, _ = sequence_limit(manifest, component, limits)
        return 1, min(limits.opt_sequence or max(length // 2, 1), length), length
    if axis == "logits_sequence":
        length, _ = sequence_limit(manifest, component, limits)
        return 1, 1, length
    if axis == "image_tokens":
        unit = tokens_per_image(manifest)
        if unit is None:
            raise InputError("dynamic axis 'image_tokens' has no per-image token count in this manifest",
                             "a component output shaped [images, tokens, width] (vision tower or resampler)",
                             "re-export the artifact with this mmedge version")
        return unit, unit, unit * images
    raise InputError(f"dynamic axis '{axis}' has no TensorRT profile rule", f"one of {', '.join(AXIS_RULES)}",
                     "re-export with this mmedge version, or run this artifact with --backend onnxruntime")


def decoder_axes(manifest: Mapping, component: Mapping, limits: ProfileLimits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of a KV-cached decoder's ``sequence``, ``past_sequence`` and ``total_sequence`` axes, with
    total = past + sequence at every point (see the module docstring): min is the prefill's first token, opt a
    decode step halfway through the sequence, max the longest prompt beside the longest past."""
    limits = limits.checked()
    length, _ = sequence_limit(manifest, component, limits)
    longest_past = max(length - 1, 1)
    past = min(limits.opt_sequence or length // 2, longest_past)
    return {"sequence": (1, 1, length), "past_sequence": (0, past, longest_past),
            "total_sequence": (1, past + 1, length + longest_past), "logits_sequence": (1, 1, length)}


SEQUENCE_AXES = frozenset({"sequence", "tokens", "past_sequence", "total_sequence", "logits_sequence"})
IMAGE_AXES = frozenset({"images", "image_tokens"})


def idle_limit(manifest: Mapping, names: Iterable[str], limits: ProfileLimits) -> str | None:
    """The first of ``max_sequence`` and ``max_images`` set in ``limits`` that no profile of the components ``names``
    reads (none has a token-sequence axis that is not fixed by the tokenizer's padding; none an images axis), or None
    where each one set is read: ``mmedge build`` refuses an option that would change nothing."""
    read = {"max_sequence": False, "max_images": False}
    for name in names:
        component = manifest["components"][name]
        if reads_max_sequence(manifest, component, limits):
            read["max_sequence"] = True
        if _named_axes(component) & IMAGE_AXES:
            read["max_images"] = True
    return next((limit for limit, used in read.items() if getattr(limits, limit) is not None and not used), None)


def reads_max_sequence(manifest: Mapping, component: Mapping, limits: ProfileLimits) -> bool:
    """Whether ``max_sequence`` shapes the component's profile: it has a token-sequence axis that the tokenizer's
    padding does not fix."""
    return bool(_named_axes(component) & SEQUENCE_AXES) and not sequence_limit(manifest, component, limits)[1]


def _named_axes(component: Mapping) -> set[str]:
    return {d for spec in component["inputs"].values() for d in spec["shape"] if isinstance(d, str)}


def derive_profile(manifest: Mapping, name: str, limits: ProfileLimits | None = None) -> Profile:
    """The optimization profile of component ``name``: (min, opt, max) shapes of every input with a named
    dynamic axis. Inputs of fixed shape need none and get none."""
    component = manifest["components"][name]
    limits = (limits or ProfileLimits()).checked()
    joint = decoder_axes(manifest, component, limits) if is_kv_decoder(component) else {}
    profile: Profile = {}
    for tensor, spec in component["inputs"].items():
        shape = spec["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        ranges = [(d, d, d) if isinstance(d, int) else joint.get(d) or axis_range(d, manifest, component, limits)
                  for d in shape]
        lo, opt, hi = (tuple(r[i] for r in ranges) for i in range(3))
        profile[tensor] = (lo, opt, hi)
    return profile


def engine_positions(component: Mapping, longest: Mapping[str, Sequence[int]]) -> int | None:
    """The most positions (prompt + generated tokens) a KV-cached decoder's engine takes, from ``longest`` (input ->
    its largest shape in the engine's profile): the longest new sequence, and one more than the longest past (the last
    step reads that past and adds a token), whichever is fewer. None when no input has such an axis."""
    limits = []
    for tensor, spec in component.get("inputs", {}).items():
        for axis, dim in enumerate(spec.get("shape", ())):
            if tensor in longest and dim in ("sequence", "past_sequence"):
                limits.append(int(longest[tensor][axis]) + (dim == "past_sequence"))
    return min(limits, default=None)


def usable_positions(declared: int | None, engine: int | None) -> int | None:
    """A decoder's position limit on an engine: the model's (``declared``, the manifest's ``max_positions``) or the
    engine profile's (``engine_positions``), whichever is smaller; None when neither is known."""
    return min((p for p in (declared, engine) if p is not None), default=None)


def profile_text(profile: Mapping) -> str:
    return ", ".join(f"{name} {list(lo)}..{list(hi)} (opt {list(opt)})" for name,
                     (lo, opt, hi) in profile.items()) or "static shapes"


# --- memory ------------------------------------------------------------------------------------------
@dataclass
class MemoryNeed:
    """What building and holding the engines is estimated to take, in bytes, with the parts named."""

    engines: dict[str, int]
    workspace: int
    kv_cache: int
    runtime: int = CUDA_RUNTIME_MB * MIB

    @property
    def total(self) -> int:
        return sum(self.engines.values()) + self.workspace + self.kv_cache + self.runtime

    def describe(self) -> str:
        parts = [f"engines {_mb(sum(self.engines.values()))} "
                 f"({', '.join(f'{n} {_mb(b)}' for n, b in self.engines.items())})",
                 f"builder workspace {_mb(self.workspace)}"]
        if self.kv_cache:
            parts.append(f"KV cache {_mb(self.kv_cache)}")
        parts.append(f"CUDA runtime {_mb(self.runtime)}")
        return f"about {_mb(self.total)}: " + ", ".join(parts)


def _mb(nbytes: int) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


def engine_bytes(component: Mapping, graph_bytes: int, precision: str) -> int:
    """An engine holds the graph's weights at the engine's precision: the graph's size (graph + external
    data) scaled from the component's weight width to the engine's."""
    source = _WEIGHT_BYTES.get(component.get("precision", "fp32"), 4)
    target = _WEIGHT_BYTES[precision] if not is_qdq(component) else source
    return int(graph_bytes * target / source)


# a decoder run by TensorRT: its staging buffers (profile's longest past), the pasts a step reads, the presents it
# writes
ENGINE_KV_COPIES = 3


def kv_cache_bytes(manifest: Mapping, limits: ProfileLimits) -> int:
    """The decoder's self-attention KV cache at ``max_batch`` sequences of the longest length:
    layers x (key, value) x batch x heads x sequence x head_dim x dtype bytes. 0 without a decoder."""
    decoder = decoder_settings(manifest)
    kv = decoder.get("kv_cache")
    component = manifest.get("components", {}).get(decoder.get("component", "decoder"))
    if not kv or not component:
        return 0
    limits = limits.checked()
    length, _ = sequence_limit(manifest, component, limits)
    past = kv["past"] % (0, "key")
    dtype = component.get("inputs", {}).get(past, {}).get("dtype", "float32")
    return kv["layers"] * 2 * limits.max_batch * kv["heads"] * length * kv["head_dim"] * _DTYPE_BYTES.get(dtype, 4)


def kv_cache_need(manifest: Mapping, limits: ProfileLimits, built: Iterable[str]) -> int:
    """GPU memory the KV cache takes when the components ``built`` are TensorRT engines: one cache when another
    backend runs the decoder (its cache lives on the same GPU), ``ENGINE_KV_COPIES`` when TensorRT runs it (the
    runner's input buffers at the profile's largest past, plus the pasts and presents of a step, both on the GPU)."""
    copies = ENGINE_KV_COPIES if decoder_settings(manifest).get("component", "decoder") in set(built) else 1
    return copies * kv_cache_bytes(manifest, limits)


def available_memory(probe, device_id: int = 0) -> tuple[int | None, str]:
    """(bytes free for engines, where that number comes from). On a Jetson the GPU shares system memory
    (MemAvailable); on a discrete GPU its free memory (nvidia-smi). (None, why) when unknown."""
    if probe.jetson:
        if probe.memory_available_mb is None:
            return None, "the Jetson's available memory could not be read"
        return probe.memory_available_mb * MIB, "available unified memory on this Jetson"
    if len(probe.gpus) > device_id and probe.gpus[device_id].memory_free_mb is not None:
        gpu = probe.gpus[device_id]
        return gpu.memory_free_mb * MIB, f"free memory on GPU {device_id} ({gpu.name})"
    return None, "the GPU's free memory could not be read"


def check_memory(probe, need: MemoryNeed, device_id: int = 0) -> str:
    """Refuse (InsufficientMemoryError) when ``need`` exceeds what the device has free; else a line saying
    what was compared. Unknown free memory is not a refusal: the line says the check was skipped."""
    free, where = available_memory(probe, device_id)
    if free is None:
        return f"memory check skipped: {where}"
    if need.total > free:
        device = "this Jetson" if probe.jetson else f"GPU {device_id}"
        raise InsufficientMemoryError(
            f"the TensorRT engines need {need.describe()}, but {device} has {_mb(free)} ({where})",
            f"at most {_mb(free)}",
            "lower --max-batch / --max-sequence, build fewer components (--components), use an INT8 (QDQ) or FP16 "
            "export, a smaller --workspace-mb, or free memory (close other processes; on a Jetson add swap or "
            "disable the desktop); or run with --backend onnxruntime")
    return f"memory: need {need.describe()}; {where}: {_mb(free)}"


@dataclass(frozen=True)
class TensorRTDefaults:
    """Engine settings for a device: the precision of engines built from float graphs, the builder's
    workspace limit, and the largest batch an engine's profile accepts (larger calls are split)."""

    precision: str
    workspace_mb: int
    max_batch: int
    why: str


def tensorrt_defaults(probe) -> TensorRTDefaults:
    """Jetson: FP16 engines, a workspace of 1/16 of the shared memory capped at 1 GiB (at least 256 MiB), batch 4:
    the GPU shares memory with the CPU, and everything else on the board needs it too. Desktop GPU: FP16, a quarter of
    the free GPU memory capped at 4 GiB, batch 16; FP32 on a GPU below sm 7.0 (no TensorRT 10 engines there, see
    ``unsupported_gpu``; what ONNX Runtime's TensorRT provider gets: a GTX 1080, sm 6.1, has no fast FP16)."""
    if probe.jetson:
        total = probe.memory_total_mb or 8192
        workspace = max(256, min(1024, total // 16))
        return TensorRTDefaults("fp16", workspace, 4,
                                f"Jetson ({total} MiB shared memory): FP16, workspace {workspace} MiB")
    gpu = probe.gpus[0] if probe.gpus else None
    free = (gpu.memory_free_mb or gpu.memory_total_mb) if gpu else None
    workspace = min(4096, max(256, free // 4)) if free else 2048
    precision = "fp32" if unsupported_gpu(probe) else "fp16"
    name = f"{gpu.name} (sm {gpu.compute_capability})" if gpu else "GPU"
    return TensorRTDefaults(precision, workspace, 16, f"{name}: {precision.upper()}, workspace {workspace} MiB")


MIN_COMPUTE_CAPABILITY = (7, 0)  # TensorRT 10 supports Volta (sm 7.0) and newer GPUs only


def unsupported_gpu(probe, device_id: int = 0) -> str | None:
    """Why TensorRT 10 cannot run on the probed GPU (compute capability below ``MIN_COMPUTE_CAPABILITY``, e.g. a GTX
    1080 at sm 6.1), or None (supported, or its compute capability unknown)."""
    if len(probe.gpus) <= device_id:
        return None
    gpu = probe.gpus[device_id]
    try:
        capability = tuple(int(part) for part in str(gpu.compute_capability).split(".")[:2])
    except ValueError:
        return None
    if len(capability) == 2 and capability < MIN_COMPUTE_CAPABILITY:
        least = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return (f"GPU {device_id} ({gpu.name}) has compute capability {gpu.compute_capability}, below the sm {least} "
                "TensorRT 10 supports")
    return None


def require_gpu(probe, device: str = "auto") -> None:
    """BackendUnavailableError unless the probe shows an NVIDIA GPU (discrete or Jetson) that TensorRT 10 supports and
    device allows it."""
    if device == "cpu":
        raise BackendUnavailableError("backend 'tensorrt' runs on the GPU, but device=cpu was requested",
                                      "--device auto or cuda with --backend tensorrt",
                                      "drop --device cpu, or use --backend onnxruntime for the CPU")
    if not probe.gpus and not probe.jetson:
        raise BackendUnavailableError("backend 'tensorrt' needs an NVIDIA GPU, and none was found (no nvidia-smi GPU, "
                                      "not a Jetson)",
                                      "a CUDA GPU with its driver, or a Jetson with JetPack",
                                      "run on a GPU machine, or use --backend onnxruntime (CPU)")
    old = unsupported_gpu(probe)
    if old:
        least = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise BackendUnavailableError(f"backend 'tensorrt' cannot run here: {old}",
                                      f"an NVIDIA GPU of compute capability {least} or newer",
                                      "use --backend onnxruntime (its CUDA provider runs on this GPU), or --backend "
                                      "auto")


__all__ = ["AXIS_RULES", "FP16_OVERFLOWING_LLMS", "MIN_COMPUTE_CAPABILITY", "MemoryNeed", "ProfileLimits",
           "available_memory", "axis_range", "check_memory", "decoder_axes", "derive_profile", "engine_bytes",
           "engine_positions", "engine_precision", "fp16_overflow", "is_kv_decoder", "is_qdq", "key_precision",
           "kv_cache_bytes", "kv_cache_need", "max_sequence_range", "network_typing", "profile_text", "provider_fp16",
           "refuse_max_sequence", "require_gpu",
           "sequence_limit", "tensorrt_defaults", "tokens_per_image", "TensorRTDefaults", "unbuildable_reason",
           "unsupported_gpu", "usable_positions"]
