"""IDEFICS (the open Flamingo): vision tower, Perceiver Resampler, cross-attention K/V, and the LLM with
gated cross-attention layers and a KV cache.

    pixel_values ─vision─▶ image_features ─resampler─▶ visual_tokens ─cross_kv─▶ K/V per cross layer ─┐
    prompt ids (text + <fake_token_around_image><image> markers) ─embed (numpy table)─▶ inputs_embeds ┴▶
        decoder(+ self-attention KV cache, image_attention_mask) ─▶ logits

transformers recomputes the resampler and every cross-attention key/value projection from the image
features at each generated token (``generate`` passes the vision output back in as
``image_encoder_embeddings``). They depend only on the images, so mmedge computes them once per image
set (``cross_kv``) and feeds them to every decode step. ``cached_cross_kv=False`` exports a decoder
that takes ``visual_tokens`` and projects them itself at every call, to measure what caching saves.

The decoder re-states ``IdeficsModel.forward`` around the same submodules (decoder layers, gated
cross-attention blocks, attention interface), so the numbers are the model's own:

- image mask ``[batch, sequence, images]`` → additive bias ``[batch, 1, sequence, images * tokens_per_image]``
  (0 where a token may see an image token, the dtype's minimum elsewhere);
- cross-attention gate: 1 for tokens that may see at least one image, else the block's attention output is 0;
- causal self-attention mask from ``create_causal_mask`` over the padding mask and the cache.
"""

from __future__ import annotations

import torch

from mmedge.export.specs.base import ComponentSpec, TensorSpec
from mmedge.export.specs.blip2 import (
    CHECK_SIZES,
    KV_KINDS,
    PAST_NAME,
    PRESENT_NAME,
    TRACE_SIZES,
    _image_size,
    _image_tokens,
    cache_kwarg,
    every_position,
    kv_cache_layout,
    rows_at,
)
from mmedge.generation.kv_layout import LOGITS_POSITIONS

CROSS_NAME = "cross_key_values.%d.%s"
CHECK_IMAGES, TRACE_IMAGES = 3, 2


# --- layout --------------------------------------------------------------------------------------
def image_size(model) -> int:
    return _image_size(model)


def patch_tokens(model) -> int:
    """Patches plus the class token."""
    return _image_tokens(model)


def tokens_per_image(model) -> int:
    """Visual tokens one image becomes: the resampler's latents, or the vision tower's patches + class token."""
    if model.config.use_resampler:
        return int(model.config.perceiver_config.resampler_n_latents)
    return patch_tokens(model)


def vision_width(model) -> int:
    return int(model.config.vision_config.embed_dim)


def cross_layers(model) -> int:
    return len(model.model.gated_cross_attn_layers)


def cross_kv_layout(model) -> dict:
    """The cross-attention K/V tensors as the manifest records them."""
    config = model.config
    heads = int(config.num_attention_heads)
    return {"layers": cross_layers(model), "heads": heads, "head_dim": int(config.hidden_size) // heads,
            "names": CROSS_NAME, "tokens_per_image": tokens_per_image(model),
            "layout": ["batch", "heads", "images * tokens_per_image", "head_dim"], "dtype": "float32"}


# --- wrapper modules -----------------------------------------------------------------------------
class _Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values).last_hidden_state  # [images, patches + 1, vision_width]


class _Resampler(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.resampler = model.model.perceiver_resampler

    def forward(self, image_features):
        return self.resampler(image_features)  # [images, latents, vision_width]


class _CrossKV(torch.nn.Module):
    """visual_tokens ``[batch, image_tokens, vision_width]`` → key, value per gated cross-attention layer,
    each ``[batch, heads, image_tokens, head_dim]`` (k_layer_norm applied, as the layer does)."""

    def __init__(self, model):
        super().__init__()
        self.blocks = model.model.gated_cross_attn_layers

    def forward(self, visual_tokens):
        batch, tokens, _ = visual_tokens.shape
        out = []
        for block in self.blocks:
            attn = block.cross_attn
            key = attn.k_proj(visual_tokens).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
            value = attn.v_proj(visual_tokens).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
            if attn.qk_layer_norms:
                key = attn.k_layer_norm(key)
            out += [key, value]
        return tuple(out)


def _gated_cross_block(block, hidden, key, value, bias, gate, attention):
    """``IdeficsGatedCrossAttentionLayer.forward`` with precomputed key/value."""
    attn = block.cross_attn
    batch, sequence, _ = hidden.shape
    residual = hidden
    hidden = block.input_layernorm(hidden)
    query = attn.q_proj(hidden).view(batch, sequence, attn.num_heads, attn.head_dim).transpose(1, 2)
    if attn.qk_layer_norms:
        query = attn.q_layer_norm(query)
    out, _ = attention(attn, query, key, value, bias, dropout=0.0, scaling=attn.scaling)
    out = attn.o_proj(out.reshape(batch, sequence, -1).contiguous())  # [batch, sequence, hidden]
    out = out.masked_fill((gate == 0)[:, :, None], 0.0)  # tokens that see no image get no cross-attention
    hidden = residual + block.act_cross_attn(block.alpha_cross_attn) * out
    residual = hidden
    hidden = block.mlp(block.post_attention_layernorm(hidden))
    return residual + block.act_dense(block.alpha_dense) * hidden


class _ImageContext(torch.nn.Module):
    """The fused image graph: pixel_values ``[batch, images, 3, H, W]`` → vision → resampler → the decoder's image
    context for each prompt: the cross K/V of every gated cross-attention layer (``cached``), else the visual tokens
    ``[batch, images * tokens_per_image, vision_width]``. One call per prompt batch instead of three."""

    def __init__(self, model, cached_cross_kv: bool = True):
        super().__init__()
        self.vision = _Vision(model)
        self.resampler = _Resampler(model) if model.config.use_resampler else None
        self.cross_kv = _CrossKV(model) if cached_cross_kv else None

    def forward(self, pixel_values):
        batch, images = pixel_values.shape[0], pixel_values.shape[1]
        tokens = self.vision(pixel_values.flatten(0, 1))  # [batch * images, patches + 1, vision_width]
        if self.resampler is not None:
            tokens = self.resampler(tokens)  # [batch * images, latents, vision_width]
        visual = tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])  # [batch, image_tokens, width]
        return visual if self.cross_kv is None else self.cross_kv(visual)


class _XAttnDecoderWithPast(torch.nn.Module):
    """(embeds, mask, positions, logits_positions, image_attention_mask, *cross K/V | visual_tokens, *past) →
    (logits of those positions, *present)."""

    def __init__(self, model, cached_cross_kv: bool = True):
        super().__init__()
        # Only the LLM's modules are registered, so a streaming export can free the vision tower first.
        self.decoder_layers = model.model.layers
        self.blocks = model.model.gated_cross_attn_layers
        self.norm, self.lm_head = model.model.norm, model.lm_head
        self.config = model.config
        self.interval = int(model.model.cross_layer_interval)
        self.cached = cached_cross_kv
        self.cross_kv = None if cached_cross_kv else _CrossKV(model)
        self.layers = int(model.config.num_hidden_layers)
        self.cross = cross_layers(model)
        self.per_image = tokens_per_image(model)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions, image_attention_mask, *rest):
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.idefics.modeling_idefics import eager_attention_forward

        config = self.config
        if self.cached:
            cross, past = rest[: 2 * self.cross], rest[2 * self.cross:]
        else:
            cross, past = self.cross_kv(rest[0]), rest[1:]
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)], config=config)
        causal = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, **{cache_kwarg(create_causal_mask): cache})
        layer_cache = {cache_kwarg(self.decoder_layers[0]): cache}
        batch, sequence, images = image_attention_mask.shape
        seen = image_attention_mask[..., None].expand(-1, -1, -1, self.per_image).reshape(batch, sequence, -1)
        # the bias in the queries' dtype and on their device: a float32 bias beside FP16 queries promoted the mask to
        # float32, which PyTorch's cuDNN attention (the default on sm90) reads as FP16 (pytorch#191612: IDEFICS' FP16
        # decoder on an H200 came out at logits cosine 0.80), and host scalars cannot be copied inside a CUDA graph
        blocked = torch.full((), torch.finfo(inputs_embeds.dtype).min, dtype=inputs_embeds.dtype,
                             device=inputs_embeds.device)
        allowed = torch.zeros((), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        bias = torch.where(seen[:, None, :, :].bool(), allowed, blocked)  # [batch, 1, sequence, image_tokens]
        gate = (bias == 0.0).any(dim=-1).to(inputs_embeds.dtype).squeeze(1)  # [batch, sequence]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        hidden = inputs_embeds  # [batch, sequence, hidden]
        for index, layer in enumerate(self.decoder_layers):
            if index % self.interval == 0:
                c = index // self.interval
                hidden = _gated_cross_block(self.blocks[c], hidden, cross[2 * c], cross[2 * c + 1], bias, gate,
                                            attention)
            hidden = layer(hidden, attention_mask=causal, position_ids=position_ids, **layer_cache)
        logits = self.lm_head(self.norm(rows_at(hidden, logits_positions)))  # [batch, n, vocab + additional]
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]  # each [batch, heads, past + sequence, head_dim]
        return (logits, *present)


# --- specs ---------------------------------------------------------------------------------------
class FlamingoVision(ComponentSpec):
    """pixel_values ``[images, 3, H, W]`` → image_features ``[images, patches + 1, vision_width]``."""

    name = "vision"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        size = image_size(model)
        self.inputs = {"pixel_values": TensorSpec("float32", ("images", 3, size, size))}
        self.outputs = {"image_features": TensorSpec("float32", ("images", patch_tokens(model), vision_width(model)))}

    def module(self):
        return _Vision(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        size = image_size(self.model)
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


class PerceiverResampler(ComponentSpec):
    """image_features → visual_tokens ``[images, latents, vision_width]`` (a fixed count per image)."""

    name = "resampler"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        width = vision_width(model)
        self.inputs = {"image_features": TensorSpec("float32", ("images", patch_tokens(model), width))}
        self.outputs = {"visual_tokens": TensorSpec("float32", ("images", tokens_per_image(model), width))}

    def module(self):
        return _Resampler(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"image_features": torch.randn(batch, patch_tokens(self.model), vision_width(self.model),
                                              generator=generator)}


class CrossKV(ComponentSpec):
    """visual_tokens of each prompt ``[batch, image_tokens, vision_width]`` → ``cross_key_values.%d.key|value``."""

    name = "cross_kv"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        self.layout = cross_kv_layout(model)
        kv = TensorSpec("float32", ("batch", self.layout["heads"], "image_tokens", self.layout["head_dim"]))
        self.inputs = {"visual_tokens": TensorSpec("float32", ("batch", "image_tokens", vision_width(model)))}
        self.outputs = {CROSS_NAME % (i, kind): kv for i in range(self.layout["layers"]) for kind in KV_KINDS}

    def module(self):
        return _CrossKV(self.model).eval()

    def trace_inputs(self):
        return self.sample_inputs(2, TRACE_IMAGES, torch.Generator().manual_seed(0))

    def check_inputs(self):
        return self.sample_inputs(3, CHECK_IMAGES, torch.Generator().manual_seed(1))

    def sample_inputs(self, batch, sequence, generator):
        """``sequence`` here is the number of images per prompt."""
        tokens = self.layout["tokens_per_image"] * sequence
        return {"visual_tokens": torch.randn(batch, tokens, vision_width(self.model), generator=generator)}


class ImageContext(ComponentSpec):
    """The fused image graph (the default): pixel_values of each prompt's images ``[batch, images, 3, H, W]`` →
    ``cross_key_values.%d.key|value [batch, heads, images * tokens_per_image, head_dim]`` (or, for a decoder that
    projects them itself, ``visual_tokens [batch, images * tokens_per_image, vision_width]``). Prompts with fewer
    images than the batch's most are padded with any pixels (zeros): the decoder's image mask hides them."""

    name = "image_context"
    max_abs = 1e-3

    def __init__(self, model, cached_cross_kv: bool = True):
        self.model, self.cached = model, cached_cross_kv
        self.layout = cross_kv_layout(model)
        size = image_size(model)
        self.inputs = {"pixel_values": TensorSpec("float32", ("batch", "images", 3, size, size))}
        if cached_cross_kv:
            kv = TensorSpec("float32", ("batch", self.layout["heads"], "image_tokens", self.layout["head_dim"]))
            self.outputs = {CROSS_NAME % (i, kind): kv for i in range(self.layout["layers"]) for kind in KV_KINDS}
        else:
            self.outputs = {"visual_tokens": TensorSpec("float32", ("batch", "image_tokens", vision_width(model)))}

    def module(self):
        return _ImageContext(self.model, self.cached).eval()

    def manifest_io(self) -> dict:
        """``axis_units``: ``image_tokens`` is a whole number of images of this many tokens (engine profiles)."""
        return {**super().manifest_io(), "axis_units": {"image_tokens": self.layout["tokens_per_image"]}}

    def trace_inputs(self):
        return self.sample_inputs(2, TRACE_IMAGES, torch.Generator().manual_seed(0))

    def check_inputs(self):
        return self.sample_inputs(3, CHECK_IMAGES, torch.Generator().manual_seed(1))

    def sample_inputs(self, batch, sequence, generator):
        """``sequence`` here is the number of images per prompt."""
        size = image_size(self.model)
        return {"pixel_values": torch.randn(batch, sequence, 3, size, size, generator=generator)}


class XAttnDecoderWithPast(ComponentSpec):
    """The LLM with gated cross-attention and a KV cache.

    Inputs: ``inputs_embeds [batch, sequence, hidden]``, ``attention_mask [batch, total_sequence]``,
    ``position_ids [batch, sequence]`` (``cumsum(mask) - 1``, rotary), ``logits_positions [batch, logits_sequence]``
    (the positions that get logits: the loop asks for the last), ``image_attention_mask
    [batch, sequence, images]`` (1: the token may see that image; the processor's mask), then the cross
    K/V (``cross_key_values.%d.key|value [batch, heads, images * tokens_per_image, head_dim]``) or, with
    ``cached_cross_kv=False``, ``visual_tokens [batch, images * tokens_per_image, vision_width]``, then
    ``past_key_values.%d.key|value``. Outputs: logits over the base + additional vocabulary, presents.
    """

    name = "decoder"
    max_abs = 1e-3

    def __init__(self, model, cached_cross_kv: bool = True):
        self.model = model
        self.cached = cached_cross_kv
        self.kv_cache = kv_cache_layout(model)
        self.cross = cross_kv_layout(model)
        config = model.config
        self.hidden = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size) + int(config.additional_vocab_size)
        kv = TensorSpec("float32", ("batch", self.kv_cache["heads"], "past_sequence", self.kv_cache["head_dim"]))
        present = TensorSpec("float32", ("batch", self.kv_cache["heads"], "total_sequence", self.kv_cache["head_dim"]))
        cross = TensorSpec("float32", ("batch", self.cross["heads"], "image_tokens", self.cross["head_dim"]))
        self.inputs = {
            "inputs_embeds": TensorSpec("float32", ("batch", "sequence", self.hidden)),
            "attention_mask": TensorSpec("int64", ("batch", "total_sequence")),
            "position_ids": TensorSpec("int64", ("batch", "sequence")),
            LOGITS_POSITIONS: TensorSpec("int64", ("batch", "logits_sequence")),
            "image_attention_mask": TensorSpec("int64", ("batch", "sequence", "images")),
        }
        if cached_cross_kv:
            self.inputs |= {CROSS_NAME % (i, kind): cross for i in range(self.cross["layers"]) for kind in KV_KINDS}
        else:
            self.inputs["visual_tokens"] = TensorSpec("float32", ("batch", "image_tokens", vision_width(model)))
        self.outputs = {"logits": TensorSpec("float32", ("batch", "logits_sequence", self.vocab_size))}
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                self.inputs[PAST_NAME % (layer, kind)] = kv
                self.outputs[PRESENT_NAME % (layer, kind)] = present

    def module(self):
        return _XAttnDecoderWithPast(self.model, self.cached).eval()

    def manifest_io(self) -> dict:
        return {**super().manifest_io(), "kv_cache": dict(self.kv_cache), "cross_kv": "inputs" if self.cached
                else "computed"}

    def trace_inputs(self):
        return self.sample_inputs(TRACE_SIZES["batch"], TRACE_SIZES["sequence"], torch.Generator().manual_seed(0),
                                  past=TRACE_SIZES["past"], images=TRACE_IMAGES)

    def check_inputs(self):
        return self.sample_inputs(CHECK_SIZES["batch"], CHECK_SIZES["sequence"], torch.Generator().manual_seed(1),
                                  past=CHECK_SIZES["past"], images=CHECK_IMAGES)

    def sample_inputs(self, batch, sequence, generator, past: int = 0, images: int = 2):
        """Random embeddings, cache and cross K/V; rows after the first are left-padded inside the past,
        and each token sees a random subset of the images (some none: their cross-attention is gated off)."""
        heads, head_dim = self.kv_cache["heads"], self.kv_cache["head_dim"]
        total = past + sequence
        pads = torch.randint(0, past + 1, (batch,), generator=generator)
        pads[0] = 0
        mask = (torch.arange(total)[None, :] >= pads[:, None]).long()  # [batch, total]
        feeds = {
            "inputs_embeds": torch.randn(batch, sequence, self.hidden, generator=generator),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:],  # [batch, sequence]
            LOGITS_POSITIONS: every_position(batch, sequence),
            "image_attention_mask": torch.randint(0, 2, (batch, sequence, images), generator=generator),
        }
        tokens = images * self.cross["tokens_per_image"]
        if self.cached:
            for i in range(self.cross["layers"]):
                for kind in KV_KINDS:
                    feeds[CROSS_NAME % (i, kind)] = torch.randn(batch, heads, tokens, head_dim, generator=generator)
        else:
            feeds["visual_tokens"] = torch.randn(batch, tokens, vision_width(self.model), generator=generator)
        for layer in range(self.kv_cache["layers"]):
            for kind in KV_KINDS:
                feeds[PAST_NAME % (layer, kind)] = torch.randn(batch, heads, past, head_dim, generator=generator)
        return feeds


