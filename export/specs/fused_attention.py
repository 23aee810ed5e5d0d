"""The decoder's self-attention as one ONNX Runtime ``com.microsoft.MultiHeadAttention`` node per layer.

Traced as transformers writes it, one attention layer of a KV-cached decoder is some 30 ONNX nodes: the head
split (Reshape and Transpose, each with its own Shape / Gather / Unsqueeze / Concat arithmetic on the dynamic
sizes), the cache Concat, two MatMuls, the mask's Where and the safe softmax's IsNaN around the Softmax, and the
merge back. On a CPU a decode step is a few milliseconds and every one of those small kernels costs its launch, so
``fused_attention`` swaps each supported attention layer's forward, for the trace only, for:

    q = q_proj(h) · scaling, k = k_proj(h), v = v_proj(h)        # each [batch, sequence, heads·head_dim]
    out, present_key, present_value = MultiHeadAttention(q, k, v, attention_bias, past_key, past_value)
    return out_proj(out)

``MultiHeadAttention`` splits the heads, appends the new keys and values to the past ones (its ``present``
outputs, laid out ``[batch, heads, past + sequence, head_dim]`` as the manifest's KV cache already is) and applies
the additive mask transformers builds once per call (``eager`` mask: 0 or the dtype's minimum, ``[batch, 1,
sequence, total]``). ONNX Runtime's CPU provider and OpenVINO's ONNX front end run the op (tested; ONNX Runtime's CUDA
provider has it too, not run here); TensorRT cannot parse it.

Opt-in (``export --fused-attention``): on a 2-core Xeon the INT4 decoder's graph has half the nodes but decodes only
1.01x faster in the generation loop, a step after 1000 cached tokens is 0.95x (the op copies the cache into its
present output as Concat did, and MatMulNBits is ~85% of a step) and a 300-token prefill 1.08x
(``benchmarks/int4_decoder_cpu.py``, ``benchmarks/caption_cpu.py``; RESULTS.md).

Supported: OPT's attention (no rotary embedding, as many key/value heads as query heads). Other decoders keep
transformers' attention (``unsupported_reason`` says why).
"""

from __future__ import annotations

import contextlib

import torch

OP = "com.microsoft.MultiHeadAttention"
SUPPORTED = ("OPTAttention",)  # attention classes whose forward ``_fused_opt_forward`` replaces


class MultiHeadAttention(torch.autograd.Function):
    """``com.microsoft.MultiHeadAttention`` with a KV cache: eager maths in PyTorch, one node in the ONNX trace."""

    @staticmethod
    def forward(ctx, query, key, value, attention_bias, past_key, past_value, heads: int, scale: float):
        # query, key, value [batch, sequence, heads·head_dim]; attention_bias [batch, 1, sequence, total];
        # past_key, past_value [batch, heads, past, head_dim]
        batch, sequence, width = query.shape

        def split(x):  # [batch, sequence, width] → [batch, heads, sequence, head_dim]
            return x.view(batch, sequence, heads, width // heads).transpose(1, 2)

        keys = torch.cat([past_key, split(key)], dim=2)  # [batch, heads, total, head_dim]
        values = torch.cat([past_value, split(value)], dim=2)
        weights = torch.softmax(split(query) @ keys.transpose(-1, -2) * scale + attention_bias, dim=-1)
        out = (weights @ values).transpose(1, 2).reshape(batch, sequence, width)  # [batch, sequence, width]
        return out, keys, values

    @staticmethod
    def symbolic(g, query, key, value, attention_bias, past_key, past_value, heads: int, scale: float):
        absent = g.op("prim::Constant")  # an optional input left out: the bias of the projections, key padding mask
        absent.setType(torch._C.OptionalType.ofTensor())
        out, present_key, present_value = g.op(
            "com.microsoft::MultiHeadAttention", query, key, value, absent, absent, attention_bias, past_key,
            past_value, num_heads_i=heads, scale_f=scale, outputs=3)
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def _fused_opt_forward(self, hidden_states, cache=None, attention_mask=None, output_attentions=False, **kwargs):
    """``OPTAttention.forward`` over ``MultiHeadAttention``; the layer's cache entry becomes the present keys and
    values (the decoder wrapper returns them)."""
    layer = cache.layers[self.layer_idx]
    query = self.q_proj(hidden_states) * self.scaling  # [batch, sequence, width]; OPT scales before the product
    out, layer.keys, layer.values = MultiHeadAttention.apply(
        query, self.k_proj(hidden_states), self.v_proj(hidden_states), attention_mask, layer.keys, layer.values,
        self.num_heads, 1.0)
    return self.out_proj(out), None


def attention_layers(language_model) -> list[torch.nn.Module]:
    return [m for m in language_model.modules() if type(m).__name__.endswith("Attention")
            and hasattr(m, "layer_idx")]


def unsupported_reason(language_model) -> str | None:
    """Why ``fused_attention`` cannot rewrite this decoder's attention, or None when it can."""
    layers = attention_layers(language_model)
    names = sorted({type(m).__name__ for m in layers})
    if not layers or any(name not in SUPPORTED for name in names):
        return (f"its attention ({', '.join(names) or 'none found'}) is not one mmedge fuses (supported: "
                f"{', '.join(SUPPORTED)}; rotary position embeddings are applied between the projections and "
                "the product)")
    return None


@contextlib.contextmanager
def fused_attention(language_model):
    """Within the block, every attention layer of ``language_model`` runs ``MultiHeadAttention`` and the model builds
    additive (eager) masks; everything is restored on the way out, so the module stays transformers' own."""
    reason = unsupported_reason(language_model)
    if reason:
        raise ValueError(f"cannot fuse the attention of this decoder: {reason}")
    layers = attention_layers(language_model)
    config = language_model.config
    implementation = config._attn_implementation
    for layer in layers:
        layer.forward = _fused_opt_forward.__get__(layer)  # an instance attribute shadows the class's forward
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        config._attn_implementation = implementation


def manifest_entry(fused: bool, why: str) -> dict:
    """The decoder's ``attention`` entry in the manifest."""
    return {"op": OP if fused else "standard", "why": why}


def standard_entry() -> dict:
    """The entry of a decoder traced with transformers' attention ops (the default)."""
    return manifest_entry(False, "transformers' attention ops (the default: every backend, TensorRT included, builds "
                                 "them; --fused-attention writes one node per layer)")
