"""InstructBLIP's image prefix: as BLIP-2's, but the Q-Former also reads the instruction (its own BERT tokens) beside
the learned queries, so the prefix depends on the prompt:

    pixel_values ─vision─▶ image_embeds ─┐
    qformer_input_ids, qformer_attention_mask ─┴▶ qformer (queries + instruction) ─projection─▶ prefix_embeds

The LLM side is BLIP-2's (``mmedge.export.specs.blip2_t5`` for Flan-T5).
"""

from __future__ import annotations

import torch

from mmedge.export.specs.base import ComponentSpec, TensorSpec
from mmedge.export.specs.blip2 import _image_embeds_spec, _pixel_spec, _prefix_spec, _random_pixels, _VisionEmbeds

INSTRUCTION_INPUTS = ("qformer_input_ids", "qformer_attention_mask")


class _InstructQFormerPrefix(torch.nn.Module):
    """Queries and instruction tokens through the Q-Former (cross-attending to the image), the query rows projected
    into the LLM's embedding space, as ``InstructBlipModel.get_image_features``."""

    def __init__(self, model):
        super().__init__()
        self.query_tokens = model.query_tokens  # [1, queries, qformer_width]
        self.qformer = model.qformer
        self.language_projection = model.language_projection

    def forward(self, image_embeds, qformer_input_ids, qformer_attention_mask) -> torch.Tensor:
        batch, queries = image_embeds.shape[0], self.query_tokens.shape[1]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_mask = torch.ones(batch, queries, dtype=torch.long, device=image_embeds.device)
        output = self.qformer(input_ids=qformer_input_ids,
                              attention_mask=torch.cat([query_mask, qformer_attention_mask], dim=1),
                              query_embeds=self.query_tokens.expand(batch, -1, -1),
                              encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                              return_dict=True).last_hidden_state[:, :queries, :]  # [batch, queries, qformer_width]
        if output.dtype != self.language_projection.weight.dtype:
            output = output.to(self.language_projection.weight.dtype)
        return self.language_projection(output)  # [batch, queries, llm_width]


class _InstructFusedPrefix(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision = _VisionEmbeds(model)
        self.qformer = _InstructQFormerPrefix(model)

    def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask) -> torch.Tensor:
        return self.qformer(self.vision(pixel_values), qformer_input_ids, qformer_attention_mask)


def _instruction_specs() -> dict[str, TensorSpec]:
    return {name: TensorSpec("int64", ("batch", "tokens")) for name in INSTRUCTION_INPUTS}


def _instruction(model, batch: int, sequence: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random instruction ids (``[CLS]``-like id first) and a right-padded mask, row 0 full."""
    vocab = int(model.config.qformer_config.vocab_size)
    ids = torch.randint(5, vocab, (batch, sequence), generator=generator)
    lengths = torch.randint(max(sequence // 2, 1), sequence + 1, (batch,), generator=generator)
    lengths[0] = sequence
    mask = (torch.arange(sequence)[None, :] < lengths[:, None]).long()
    return {"qformer_input_ids": ids * mask, "qformer_attention_mask": mask}


class InstructQFormer(ComponentSpec):
    """image_embeds + the instruction's Q-Former tokens → prefix_embeds."""

    name = "qformer"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        self.inputs = {"image_embeds": _image_embeds_spec(model), **_instruction_specs()}
        self.outputs = {"prefix_embeds": _prefix_spec(model)}

    def module(self):
        return _InstructQFormerPrefix(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        shape = (batch, *self.inputs["image_embeds"].shape[1:])
        return {"image_embeds": torch.randn(*shape, generator=generator),
                **_instruction(self.model, batch, sequence, generator)}


class InstructPrefix(ComponentSpec):
    """pixel_values + the instruction's Q-Former tokens → prefix_embeds in one graph."""

    name = "prefix"
    max_abs = 1e-3

    def __init__(self, model):
        self.model = model
        self.inputs = {"pixel_values": _pixel_spec(model), **_instruction_specs()}
        self.outputs = {"prefix_embeds": _prefix_spec(model)}

    def module(self):
        return _InstructFusedPrefix(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"pixel_values": _random_pixels(self.model, batch, generator),
                **_instruction(self.model, batch, sequence, generator)}
