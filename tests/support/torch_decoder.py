"""TEST-ONLY helpers for the generation loop: a tiny random OPT, an ONNX decoder-with-past export of it,
and ``TorchDecoder``, the ``mmedge.generation.Decoder`` protocol over the transformers model itself.

Nothing here ships to devices (it imports torch); the BLIP-2 exporter in ``export/`` has its own
decoder spec. This module exists so ``tests/test_generation.py`` can compare mmedge's numpy loop with
``model.generate`` token for token, through torch and through ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, OPTConfig, OPTForCausalLM


def make_tiny_opt(*, seed: int = 0, vocab_size: int = 260, hidden: int = 32, layers: int = 2, heads: int = 4,
                  max_positions: int = 128, init_std: float = 0.3) -> OPTForCausalLM:
    """A random-weight OPT (eager attention, eval mode) small enough to run in milliseconds.

    ``init_std`` is far above OPT's 0.02 so the next-token distributions are peaked: decisions then do
    not hinge on float rounding, and beam search sees real differences between candidates. The
    model's generation_config carries no EOS, so ``generate`` runs to ``max_new_tokens`` unless a test
    passes ``eos_token_id``.
    """
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
        ffn_dim=2 * hidden, num_attention_heads=heads, max_position_embeddings=max_positions, init_std=init_std,
        dropout=0.0, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        attn_implementation="eager",
    )
    model = OPTForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 1
    return model


def kv_layout(model: OPTForCausalLM) -> dict:
    """The manifest's ``kv_cache`` entry for ``model``'s decoder graph."""
    config = model.config
    return {"layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "head_dim": config.hidden_size // config.num_attention_heads,
            "past": "past_key_values.%d.%s", "present": "present.%d.%s"}


class DecoderWithPast(torch.nn.Module):
    """(inputs_embeds, attention_mask, position_ids, *flat past) -> (logits, *flat present), for export.

    The pasts arrive as plain tensors ``[batch, heads, past, head_dim]`` (key, value per layer) and are
    wrapped in a ``DynamicCache`` (transformers 5 has no ``from_legacy_cache``; the constructor takes the
    per-layer pairs). The 4-D additive attention mask is built here from the 2-D one with plain tensor
    ops, so the traced graph has no data-dependent branch from transformers' mask helpers: position q of
    the new tokens (absolute ``past + q``) sees key k when ``k <= past + q`` and ``attention_mask[k] == 1``.
    """

    def __init__(self, model: OPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        layers = len(past) // 2
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)])
        seq, total = inputs_embeds.shape[1], attention_mask.shape[1]
        query = torch.arange(seq, device=inputs_embeds.device).unsqueeze(1) + (total - seq)  # [seq, 1]
        key = torch.arange(total, device=inputs_embeds.device).unsqueeze(0)  # [1, total]
        allowed = (key <= query).unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [batch, seq, total]
        additive = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        # [batch, 1, seq, total]
        additive = additive.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min).unsqueeze(1)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=additive, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_decoder(model: OPTForCausalLM, path: str | Path) -> dict:
    """Export ``model`` as a decoder-with-past ONNX graph at ``path``; returns its kv_cache layout.

    Traced (TorchScript, opset 17) with a past of length 3 and a left-padded mask, so the traced
    graph keeps the concat-with-past and masking paths; a zero-length past works at run time.
    """
    layout = kv_layout(model)
    wrapper = DecoderWithPast(model).eval()  # export restores the wrapper's mode onto the model: keep eval
    batch, past, seq = 2, 3, 4
    names_past = [layout["past"] % (i, k) for i in range(layout["layers"]) for k in ("key", "value")]
    names_present = [layout["present"] % (i, k) for i in range(layout["layers"]) for k in ("key", "value")]
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
    pasts = [torch.randn(batch, layout["heads"], past, layout["head_dim"]) for _ in names_past]
    embeds = torch.randn(batch, seq, model.config.hidden_size)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in names_past})
    axes.update({n: {0: "batch", 2: "total"} for n in names_present})
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (embeds, mask, positions, *pasts), str(path),
            input_names=["inputs_embeds", "attention_mask", "position_ids", *names_past],
            output_names=["logits", *names_present], dynamic_axes=axes, opset_version=17, dynamo=False,
        )
    model.eval()
    return layout


def embedding_table(model: OPTForCausalLM) -> np.ndarray:
    """``get_input_embeddings().weight`` as float32 numpy ``[vocab, hidden]``."""
    return model.get_input_embeddings().weight.detach().numpy().astype(np.float32)


def embed(model: OPTForCausalLM, ids) -> np.ndarray:
    """Token ids ``[batch, seq]`` -> float32 embeddings ``[batch, seq, hidden]``, as BLIP-2 embeds its prompt."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.as_tensor(np.asarray(ids), dtype=torch.long)).numpy()


class TorchDecoder:
    """``mmedge.generation.Decoder`` over the transformers model, with a ``DynamicCache``.

    Positions come from the attention mask inside OPT itself, exactly as in ``model.generate``.
    """

    def __init__(self, model: OPTForCausalLM):
        self.model = model.eval()
        self.vocab_size = model.config.vocab_size
        self.max_positions = None
        self.cache: DynamicCache | None = None

    @torch.no_grad()
    def start(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=torch.from_numpy(np.ascontiguousarray(inputs_embeds, dtype=np.float32)),
                         attention_mask=torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
                         cache=self.cache, use_cache=True)
        return out.logits[:, -1, :].float().numpy()

    @torch.no_grad()
    def step(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1))
        out = self.model(input_ids=ids, attention_mask=torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
                         cache=self.cache, use_cache=True)
        return out.logits[:, -1, :].float().numpy()

    def reorder(self, rows: np.ndarray) -> None:
        self.cache.reorder_cache(torch.as_tensor(np.asarray(rows, dtype=np.int64)))


def hf_generate(model: OPTForCausalLM, inputs_embeds: np.ndarray, attention_mask: np.ndarray, **kwargs) -> np.ndarray:
    """``model.generate`` on a prompt given as embeddings -> the new tokens ``[batch, new]`` (int64)."""
    with torch.no_grad():
        out = model.generate(inputs_embeds=torch.from_numpy(inputs_embeds),
                             attention_mask=torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)), **kwargs)
    return out.numpy()

