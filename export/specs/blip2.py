"""BLIP-2 (image → Q-Former prefix → causal LLM): vision tower, Q-Former, fused prefix, and the decoder.

The prefix is ``num_query_tokens`` LLM input embeddings computed from the image; the decoder is the
language model alone, fed ``inputs_embeds`` so the prefix and embedded prompt tokens enter the same way:

    pixel_values ─vision─▶ image_embeds ─qformer─▶ prefix_embeds ─┐
    prompt ids ─embed_tokens (numpy table, outside the graphs)──────┴▶ concat ─decoder(+KV cache)─▶ logits

``DecoderWithPast`` is written against the transformers 5 cache API and works for any causal LM
whose forward takes ``inputs_embeds``, ``attention_mask``, ``position_ids`` and a ``DynamicCache``
(OPT, Llama-family), with key/value tensors laid out ``[batch, kv_heads, tokens, head_dim]``.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from mmedge.export.specs.base import ComponentSpec, TensorSpec
from mmedge.generation.kv_layout import LOGITS_POSITIONS

PAST_NAME = "past_key_values.%d.%s"
PRESENT_NAME = "present.%d.%s"
KV_KINDS = ("key", "value")

# Sizes used to trace and to check the decoder; the check uses other sizes than the trace, so a
# shape baked into the graph shows up as a failure. Prefill (past 0) and single-token steps are
# checked separately, by the family's validation samples and the tests.
TRACE_SIZES = {"batch": 2, "sequence": 3, "past": 5}
CHECK_SIZES = {"batch": 3, "sequence": 4, "past": 6}


# --- wrapper modules ---------------------------------------------------------------------------
class _VisionEmbeds(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state  # [batch, tokens, vision_width]


class _QFormerPrefix(torch.nn.Module):
    """Learned queries cross-attend to the image tokens, then project into the LLM's embedding space."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens  # [1, queries, qformer_width]
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        # [batch, tokens]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [batch, queries, qformer_width]
        query_output = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
        if query_output.dtype != self.language_projection.weight.dtype:  # FP16 on the device: the Q-Former stays FP32
            query_output = query_output.to(self.language_projection.weight.dtype)
        return self.language_projection(query_output)  # [batch, queries, llm_width]


class _FusedPrefix(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision = _VisionEmbeds(model)
        self.qformer = _QFormerPrefix(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.qformer(self.vision(pixel_values))  # [batch, queries, llm_width]


class _DecoderWithPast(torch.nn.Module):
    """The LLM with its KV cache as flat tensors: (embeds, mask, positions, logits_positions, *past) → (logits of those
    positions, *present)."""

    def __init__(self, language_model, layers: int, fused_attention: bool = False):
        super().__init__()
        self.language_model = language_model
        # the LM without its head (OPT, Llama: ``.model``): the head runs on the rows logits_positions names
        self.base_model = getattr(language_model, language_model.base_model_prefix)
        self.layers = layers
        self.cache_kwarg = cache_kwarg(self.base_model)
        self.fused_attention = fused_attention  # one MultiHeadAttention node per layer (specs.fused_attention)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions, *past):
        from transformers import DynamicCache

        from mmedge.export.specs.fused_attention import fused_attention

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]  # each [batch, heads, past, head_dim]
        cache = DynamicCache(pairs, config=self.language_model.config)
        with fused_attention(self.language_model) if self.fused_attention else contextlib.nullcontext():
            out = self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=True, return_dict=True,
                                  **{self.cache_kwarg: cache})
        hidden = out.last_hidden_state  # [batch, sequence, width]
        logits = self.language_model.get_output_embeddings()(rows_at(hidden, logits_positions))  # [batch, n, vocab]
        cache = getattr(out, "cache", None) or out.past_key_values
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]  # each [batch, heads, past + sequence, head_dim]
        return (logits, *present)


# --- shapes ------------------------------------------------------------------------------------
def _image_size(model) -> int:
    size = model.config.vision_config.image_size
    return int(size if isinstance(size, int) else size[0])


def _image_tokens(model) -> int:
    """Patches plus the class token."""
    vision = model.config.vision_config
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return (_image_size(model) // patch) ** 2 + 1


def _pixel_spec(model) -> TensorSpec:
    size = _image_size(model)
    return TensorSpec("float32", ("batch", 3, size, size))


def _random_pixels(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    size = _image_size(model)
    return torch.randn(batch, 3, size, size, generator=generator)  # [batch, 3, height, width]


def _prefix_spec(model) -> TensorSpec:
    return TensorSpec("float32", ("batch", int(model.config.num_query_tokens), llm_input_width(model.language_model)))


def _image_embeds_spec(model) -> TensorSpec:
    return TensorSpec("float32", ("batch", _image_tokens(model), int(model.config.vision_config.hidden_size)))


def cache_kwarg(takes_cache) -> str:
    """The keyword a transformers model, layer or function (``create_causal_mask``) takes its KV cache by: ``cache``
    (transformers ≥ 5.2x) or ``past_key_values`` (earlier 5.x; a decoder layer given ``cache`` there would take it
    into ``**kwargs`` and silently leave its cache alone)."""
    forward = getattr(takes_cache, "forward", takes_cache)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def llm_input_width(language_model) -> int:
    """Width of the LLM's input embeddings (OPT's word_embed_proj_dim; the hidden size elsewhere)."""
    return int(language_model.get_input_embeddings().embedding_dim)


def kv_cache_layout(language_model) -> dict:
    """The decoder's KV-cache layout as the manifest records it."""
    config = language_model.config
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return {"layers": int(config.num_hidden_layers), "heads": heads, "head_dim": head_dim,
            "past": PAST_NAME, "present": PRESENT_NAME, "dtype": "float32",
            "layout": ["batch", "heads", "tokens", "head_dim"]}


# --- specs -------------------------------------------------------------------------------------
class Blip2Vision(ComponentSpec):
    """pixel_values → image_embeds (the vision tower's last hidden state, class token first)."""

    name = "vision"
    max_abs = 1e-3  # deep ViTs (39 layers) accumulate more float noise than CLIP's towers

    def __init__(self, model):
        self.model = model
        self.inputs = {"pixel_values": _pixel_spec(model)}
        self.outputs = {"image_embeds": _image_embeds_spec(model)}

    def module(self):
        return _VisionEmbeds(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"pixel_values": _random_pixels(self.model, batch, generator)}


class QFormer(ComponentSpec):
    """image_embeds → prefix_embeds: query tokens, Q-Former, language projection."""

    name = "qformer"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        self.inputs = {"image_embeds": _image_embeds_spec(model)}
        self.outputs = {"prefix_embeds": _prefix_spec(model)}

    def module(self):
        return _QFormerPrefix(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        shape = (batch, *self.inputs["image_embeds"].shape[1:])
        return {"image_embeds": torch.randn(*shape, generator=generator)}  # [batch, tokens, vision_width]


class Blip2Prefix(ComponentSpec):
    """pixel_values → prefix_embeds in one graph (vision tower + Q-Former + projection)."""

    name = "prefix"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        self.inputs = {"pixel_values": _pixel_spec(model)}
        self.outputs = {"prefix_embeds": _prefix_spec(model)}

    def module(self):
        return _FusedPrefix(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"pixel_values": _random_pixels(self.model, batch, generator)}


class DecoderWithPast(ComponentSpec):
    """The causal LLM over input embeddings, with the KV cache in and out as named tensors.

    Inputs: ``inputs_embeds [batch, sequence, width]``, ``attention_mask [batch, total_sequence]``
    (past + sequence, 1 = attend), ``position_ids [batch, sequence]`` (``cumsum(mask) - 1``; OPT adds
    its offset of 2 inside the graph), ``logits_positions [batch, logits_sequence]`` (which of the new positions get
    logits: the generation loop asks for the last, so a prefill runs the LM head once, not once per prompt token),
    ``past_key_values.%d.key|value [batch, heads, past_sequence, head_dim]``.
    Outputs: ``logits [batch, logits_sequence, vocab]``, ``present.%d.key|value [batch, heads, total_sequence,
    head_dim]``.
    A past of length 0 is the prefill.

    ``attention``: the manifest's ``attention`` entry (``fused_attention.manifest_entry``); with the fused op the
    graph's attention is one ``com.microsoft.MultiHeadAttention`` node per layer, checked against transformers' own.
    """

    name = "decoder"
    max_abs = 1e-3  # logits reach tens in real LLMs; the cosine bound is the real gate

    def __init__(self, language_model, attention: dict | None = None):
        from mmedge.export.specs.fused_attention import OP, standard_entry

        self.language_model = language_model
        self.attention = attention or standard_entry()
        self.fused_attention = self.attention["op"] == OP
        self.kv_cache = kv_cache_layout(language_model)
        config = language_model.config
        self.vocab_size = int(language_model.get_output_embeddings().weight.shape[0])
        self.width = llm_input_width(language_model)
        kv = TensorSpec("float32", ("batch", self.kv_cache["heads"], "past_sequence", self.kv_cache["head_dim"]))
        present = TensorSpec("float32", ("batch", self.kv_cache["heads"], "total_sequence", self.kv_cache["head_dim"]))
        self.inputs = {
            "inputs_embeds": TensorSpec("float32", ("batch", "sequence", self.width)),
            "attention_mask": TensorSpec("int64", ("batch", "total_sequence")),
            "position_ids": TensorSpec("int64", ("batch", "sequence")),
            LOGITS_POSITIONS: TensorSpec("int64", ("batch", "logits_sequence")),
        }
        self.outputs = {"logits": TensorSpec("float32", ("batch", "logits_sequence", self.vocab_size))}
        for layer in range(int(config.num_hidden_layers)):
            for kind in KV_KINDS:
                self.inputs[PAST_NAME % (layer, kind)] = kv
                self.outputs[PRESENT_NAME % (layer, kind)] = present

    def module(self):
        return _DecoderWithPast(self.language_model, self.kv_cache["layers"]).eval()

    def traced_module(self):
        return _DecoderWithPast(self.language_model, self.kv_cache["layers"], self.fused_attention).eval()

    def manifest_io(self) -> dict:
        return {**super().manifest_io(), "kv_cache": dict(self.kv_cache), "attention": dict(self.attention)}

    def trace_inputs(self):
        return self.sample_inputs(TRACE_SIZES["batch"], TRACE_SIZES["sequence"], torch.Generator().manual_seed(0),
                                  past=TRACE_SIZES["past"])

    def check_inputs(self):
        return self.sample_inputs(CHECK_SIZES["batch"], CHECK_SIZES["sequence"], torch.Generator().manual_seed(1),
                                  past=CHECK_SIZES["past"])

    def sample_inputs(self, batch, sequence, generator, past: int = 0):
        """Random embeddings and cache; rows after the first are left-padded inside the past only,
        so every new token sees at least itself (a fully masked row has no defined output)."""
        heads, head_dim = self.kv_cache["heads"], self.kv_cache["head_dim"]
        total = past + sequence
        pads = torch.randint(0, past + 1, (batch,), generator=generator)
        pads[0] = 0
        mask = (torch.arange(total)[None, :] >= pads[:, None]).long()  # [batch, total]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]  # [batch, sequence]
        feeds = {
            "inputs_embeds": torch.randn(batch, sequence, self.width, generator=generator),  # [batch, sequence, width]
            "attention_mask": mask,
            "position_ids": positions,
            LOGITS_POSITIONS: every_position(batch, sequence),
        }
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                feeds[PAST_NAME % (layer, kind)] = torch.randn(batch, heads, past, head_dim, generator=generator)
        return feeds


def rows_at(hidden: torch.Tensor, logits_positions: torch.Tensor) -> torch.Tensor:
    """The rows of ``hidden [batch, sequence, width]`` that ``logits_positions [batch, n]`` names: ``[batch, n,
    width]``, what a decoder's LM head runs on (one Gather in the graph)."""
    return hidden.gather(1, logits_positions[..., None].expand(-1, -1, hidden.shape[-1]))


def every_position(batch: int, sequence: int) -> torch.Tensor:
    """``logits_positions`` asking for every new position's logits: ``[batch, sequence]`` rows of 0..sequence-1."""
    return torch.arange(sequence).expand(batch, -1).contiguous()


def decoder_feeds(embeds: torch.Tensor, attention_mask: torch.Tensor, past: list[torch.Tensor] | None,
                  layout: dict) -> dict[str, torch.Tensor]:
    """Decoder inputs for ``embeds [batch, sequence, width]`` after ``past`` (flat key, value per layer; None =
    prefill).

    Positions follow HF: ``cumsum(attention_mask) - 1`` over past + new tokens, padded slots at 0; logits for every
    new position.
    """
    batch, sequence = embeds.shape[:2]
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -sequence:]  # [batch, sequence]
    feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions,
             LOGITS_POSITIONS: every_position(batch, sequence)}
    empty = torch.zeros(batch, layout["heads"], 0, layout["head_dim"])  # [batch, heads, 0, head_dim]
    for layer in range(layout["layers"]):
        for k, kind in enumerate(KV_KINDS):
            feeds[layout["past"] % (layer, kind)] = empty if past is None else past[2 * layer + k]
    return feeds
