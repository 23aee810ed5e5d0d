"""BLIP-2 with an encoder-decoder LLM (Flan-T5): the image prefix as for BLIP-2 with OPT, then the T5 encoder and
the T5 decoder with its KV cache.

    pixel_values ─prefix─▶ prefix_embeds ─┐
    prompt ids ─embed (numpy table)────────┴▶ concat ─encoder─▶ cross_key_values.%d.key|value (once per prompt)
    decoder start id, generated ids ─embed (same table)─▶ decoder(+self-attention KV cache, cross K/V) ─▶ logits

``T5Encoder`` runs the encoder stack over ``[prefix rows ; embedded prompt]`` with its attention mask and projects its
output into every decoder layer's cross-attention keys and values (``EncDecAttention.k`` / ``.v``, exactly what the
decoder computes from the encoder output on its first step), so the decoder never recomputes them.
``T5DecoderWithPast`` is the decoder stack and LM head fed those as inputs: its only growing state is the
self-attention cache. T5 has relative positions computed from the cache length, so the decoder takes no position ids.
"""

from __future__ import annotations

import torch

from mmedge.export.specs.base import ComponentSpec, TensorSpec
from mmedge.export.specs.blip2 import KV_KINDS, PAST_NAME, PRESENT_NAME, cache_kwarg

CROSS_NAME = "cross_key_values.%d.%s"
# The decoder is traced and checked at other sizes, so a shape baked into the graph shows up.
TRACE_SIZES = {"batch": 2, "sequence": 3, "past": 5, "encoder": 9}
CHECK_SIZES = {"batch": 3, "sequence": 4, "past": 6, "encoder": 13}


def t5_layout(language_model) -> dict:
    """The decoder's self-attention KV-cache layout as the manifest records it (cross K/V: the same heads and
    head_dim, one pair per decoder layer, named ``cross``)."""
    config = language_model.config
    return {"layers": int(config.num_decoder_layers), "heads": int(config.num_heads), "head_dim": int(config.d_kv),
            "past": PAST_NAME, "present": PRESENT_NAME, "cross": CROSS_NAME, "dtype": "float32",
            "layout": ["batch", "heads", "tokens", "head_dim"]}


def _cross_attentions(language_model) -> list:
    return [block.layer[1].EncDecAttention for block in language_model.decoder.block]


class _EncoderCrossKV(torch.nn.Module):
    """(inputs_embeds, attention_mask) → the cross-attention key and value of every decoder layer."""

    def __init__(self, language_model):
        super().__init__()
        self.encoder = language_model.encoder
        self.cross = torch.nn.ModuleList(_cross_attentions(language_model))
        self.heads, self.head_dim = int(language_model.config.num_heads), int(language_model.config.d_kv)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              return_dict=True).last_hidden_state  # [batch, tokens, d_model]
        shape = (hidden.shape[0], hidden.shape[1], self.heads, self.head_dim)
        out = []
        for attention in self.cross:  # as T5Attention computes them from key_value_states
            out += [attention.k(hidden).view(shape).transpose(1, 2),  # [batch, heads, tokens, head_dim]
                    attention.v(hidden).view(shape).transpose(1, 2)]
        return tuple(out)


class _T5DecoderWithPast(torch.nn.Module):
    """(embeds, self mask, encoder mask, *past, *cross) → (logits, *present): the decoder stack and LM head with the
    cross-attention K/V given (marked computed, so no layer projects the encoder output again)."""

    def __init__(self, language_model):
        super().__init__()
        self.decoder = language_model.decoder
        self.lm_head = language_model.lm_head
        self.layers = len(language_model.decoder.block)
        self.width = int(language_model.config.d_model)
        self.scale = bool(getattr(language_model.config, "scale_decoder_outputs",
                                  getattr(language_model.config, "tie_word_embeddings", True)))
        self.cache_kwarg = cache_kwarg(language_model.decoder)

    def forward(self, inputs_embeds, attention_mask, encoder_attention_mask, *caches):
        from transformers import DynamicCache, EncoderDecoderCache

        layers, config = self.layers, self.decoder.config
        past = [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]  # each [batch, heads, past, head_dim]
        cross = [(caches[2 * layers + 2 * i], caches[2 * layers + 2 * i + 1]) for i in range(layers)]
        cache = EncoderDecoderCache(DynamicCache(past, config=config), DynamicCache(cross, config=config))
        for layer in range(layers):
            cache.is_updated[layer] = True  # cross K/V are given: never recomputed from encoder_hidden_states
        key = cross[0][0]  # [batch, heads, encoder_tokens, head_dim]
        # Only its shape is read (the encoder mask's size); the values are never used since the cross K/V are given.
        encoder_states = key.new_zeros(key.shape[0], key.shape[2], self.width)  # [batch, encoder_tokens, d_model]
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           encoder_hidden_states=encoder_states, encoder_attention_mask=encoder_attention_mask,
                           use_cache=True, return_dict=True, **{self.cache_kwarg: cache})
        hidden = out.last_hidden_state  # [batch, sequence, d_model]
        if self.scale:
            hidden = hidden * (self.width ** -0.5)
        present = []
        for layer in cache.self_attention_cache.layers:
            present += [layer.keys, layer.values]  # each [batch, heads, past + sequence, head_dim]
        return (self.lm_head(hidden), *present)  # logits [batch, sequence, vocab]


def _mask(batch: int, total: int, generator: torch.Generator, right: bool = True) -> torch.Tensor:
    """``[batch, total]`` attention mask, row 0 full, the others padded at the end (T5's tokenizer pads right)."""
    lengths = torch.randint(max(total // 2, 1), total + 1, (batch,), generator=generator)
    lengths[0] = total
    return (torch.arange(total)[None, :] < lengths[:, None]).long()


class T5Encoder(ComponentSpec):
    """inputs_embeds [batch, tokens, d_model] + attention_mask [batch, tokens] → cross_key_values.%d.key|value
    [batch, heads, tokens, head_dim] for every decoder layer."""

    name = "encoder"
    max_abs = 1e-3

    def __init__(self, language_model):
        self.language_model = language_model
        self.layout = t5_layout(language_model)
        self.width = int(language_model.config.d_model)
        self.inputs = {"inputs_embeds": TensorSpec("float32", ("batch", "tokens", self.width)),
                       "attention_mask": TensorSpec("int64", ("batch", "tokens"))}
        cross = TensorSpec("float32", ("batch", self.layout["heads"], "tokens", self.layout["head_dim"]))
        self.outputs = {CROSS_NAME % (layer, kind): cross
                        for layer in range(self.layout["layers"]) for kind in KV_KINDS}

    def module(self):
        return _EncoderCrossKV(self.language_model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"inputs_embeds": torch.randn(batch, sequence, self.width, generator=generator),
                "attention_mask": _mask(batch, sequence, generator)}


class T5DecoderWithPast(ComponentSpec):
    """The T5 decoder over input embeddings with its self-attention KV cache in and out, and the encoder's cross K/V.

    Inputs: ``inputs_embeds [batch, sequence, d_model]``, ``attention_mask [batch, total_sequence]`` (past + sequence,
    all ones: generated tokens are never padding), ``encoder_attention_mask [batch, tokens]``,
    ``past_key_values.%d.key|value [batch, heads, past_sequence, head_dim]``, ``cross_key_values.%d.key|value
    [batch, heads, tokens, head_dim]`` (the encoder component's outputs; ``tokens``: the encoder's input
    length, an axis TensorRT profiles know).
    Outputs: ``logits [batch, sequence, vocab]``, ``present.%d.key|value [batch, heads, total_sequence, head_dim]``.
    """

    name = "decoder"
    max_abs = 1e-3

    def __init__(self, language_model):
        self.language_model = language_model
        self.kv_cache = t5_layout(language_model)
        self.width = int(language_model.config.d_model)
        self.vocab_size = int(language_model.lm_head.weight.shape[0])
        heads, head_dim = self.kv_cache["heads"], self.kv_cache["head_dim"]
        self.inputs = {
            "inputs_embeds": TensorSpec("float32", ("batch", "sequence", self.width)),
            "attention_mask": TensorSpec("int64", ("batch", "total_sequence")),
            "encoder_attention_mask": TensorSpec("int64", ("batch", "tokens")),
        }
        self.outputs = {"logits": TensorSpec("float32", ("batch", "sequence", self.vocab_size))}
        past = TensorSpec("float32", ("batch", heads, "past_sequence", head_dim))
        present = TensorSpec("float32", ("batch", heads, "total_sequence", head_dim))
        cross = TensorSpec("float32", ("batch", heads, "tokens", head_dim))
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                self.inputs[PAST_NAME % (layer, kind)] = past
                self.outputs[PRESENT_NAME % (layer, kind)] = present
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                self.inputs[CROSS_NAME % (layer, kind)] = cross

    def module(self):
        return _T5DecoderWithPast(self.language_model).eval()

    def manifest_io(self) -> dict:
        return {**super().manifest_io(), "kv_cache": dict(self.kv_cache)}

    def trace_inputs(self):
        return self.sample_inputs(TRACE_SIZES["batch"], TRACE_SIZES["sequence"], torch.Generator().manual_seed(0),
                                  past=TRACE_SIZES["past"], encoder=TRACE_SIZES["encoder"])

    def check_inputs(self):
        return self.sample_inputs(CHECK_SIZES["batch"], CHECK_SIZES["sequence"], torch.Generator().manual_seed(1),
                                  past=CHECK_SIZES["past"], encoder=CHECK_SIZES["encoder"])

    def sample_inputs(self, batch, sequence, generator, past: int = 0, encoder: int = 7):
        heads, head_dim = self.kv_cache["heads"], self.kv_cache["head_dim"]
        feeds = {
            "inputs_embeds": torch.randn(batch, sequence, self.width, generator=generator),
            "attention_mask": torch.ones(batch, past + sequence, dtype=torch.long),
            "encoder_attention_mask": _mask(batch, encoder, generator),
        }
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                feeds[PAST_NAME % (layer, kind)] = torch.randn(batch, heads, past, head_dim, generator=generator)
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                feeds[CROSS_NAME % (layer, kind)] = torch.randn(batch, heads, encoder, head_dim, generator=generator)
        return feeds


def t5_decoder_feeds(embeds: torch.Tensor, encoder_mask: torch.Tensor, cross: list[torch.Tensor],
                     past: list[torch.Tensor] | None, layout: dict) -> dict[str, torch.Tensor]:
    """Decoder inputs for ``embeds [batch, sequence, d_model]`` after ``past`` (flat key, value per layer; None =
    the first step), with the encoder's ``cross`` K/V (flat key, value per layer) and ``encoder_mask``."""
    batch, sequence = embeds.shape[:2]
    done = 0 if past is None else past[0].shape[2]
    feeds = {"inputs_embeds": embeds, "attention_mask": torch.ones(batch, done + sequence, dtype=torch.long),
             "encoder_attention_mask": encoder_mask}
    empty = torch.zeros(batch, layout["heads"], 0, layout["head_dim"])  # [batch, heads, 0, head_dim]
    for layer in range(layout["layers"]):
        for k, kind in enumerate(KV_KINDS):
            feeds[layout["past"] % (layer, kind)] = empty if past is None else past[2 * layer + k]
    for layer in range(layout["layers"]):
        for k, kind in enumerate(KV_KINDS):
            feeds[layout["cross"] % (layer, kind)] = cross[2 * layer + k]
    return feeds
