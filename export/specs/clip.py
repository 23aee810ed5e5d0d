"""CLIP (dual encoder, contrastive): image tower, text tower, and the fused zero-shot graph."""

from __future__ import annotations

import numpy as np
import torch

from mmedge.export.specs.base import ComponentSpec, TensorSpec


class _ImageEmbeds(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # [batch, vision_width]
        return self.visual_projection(pooled)  # [batch, projection_dim]


class _TextEmbeds(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # [batch, width]
        return self.text_projection(pooled)  # [batch, projection_dim]


class _FusedZeroShot(torch.nn.Module):
    """Image tower + a baked label bank: pixels in, label probabilities out."""

    def __init__(self, model, label_bank: np.ndarray, logit_scale: float):
        super().__init__()
        self.image = _ImageEmbeds(model)
        # [dim, labels]
        self.register_buffer("label_bank", torch.from_numpy(np.ascontiguousarray(label_bank.T)).float())
        self.logit_scale = float(logit_scale)

    def forward(self, pixel_values: torch.Tensor):
        embeds = self.image(pixel_values)  # [batch, dim]
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        logits = self.logit_scale * (embeds @ self.label_bank)  # [batch, labels]
        return logits.softmax(dim=-1), embeds


def _pixel_spec(model) -> TensorSpec:
    size = model.config.vision_config.image_size
    return TensorSpec("float32", ("batch", 3, size, size))


def _random_pixels(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=generator)  # [batch, 3, height, width]


class ClipVision(ComponentSpec):
    """pixel_values → image_embeds (projected, not normalized)."""

    name = "vision"

    def __init__(self, model):
        self.model = model
        dim = model.config.projection_dim
        self.inputs = {"pixel_values": _pixel_spec(model)}
        self.outputs = {"image_embeds": TensorSpec("float32", ("batch", dim))}

    def module(self):
        return _ImageEmbeds(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        return {"pixel_values": _random_pixels(self.model, batch, generator)}


class ClipText(ComponentSpec):
    """input_ids, attention_mask → text_embeds (projected, not normalized)."""

    name = "text"

    def __init__(self, model):
        self.model = model
        dim = model.config.projection_dim
        self.inputs = {
            "input_ids": TensorSpec("int64", ("batch", "sequence")),
            "attention_mask": TensorSpec("int64", ("batch", "sequence")),
        }
        self.outputs = {"text_embeds": TensorSpec("float32", ("batch", dim))}

    def module(self):
        return _TextEmbeds(self.model).eval()

    def sample_inputs(self, batch, sequence, generator):
        vocab = self.model.config.text_config.vocab_size
        ids = torch.randint(0, vocab, (batch, sequence), generator=generator)  # [batch, tokens]
        lengths = torch.randint(2, sequence + 1, (batch,), generator=generator)
        lengths[0] = sequence  # one full row, the others padded
        mask = (torch.arange(sequence)[None, :] < lengths[:, None]).long()  # [batch, tokens]
        return {"input_ids": ids, "attention_mask": mask}


class ClipZeroShot(ComponentSpec):
    """pixel_values → probs over baked labels, plus the normalized image embedding."""

    name = "zero_shot"

    def __init__(self, model, label_bank: np.ndarray, logit_scale: float):
        self.model = model
        self.label_bank = label_bank  # [labels, dim], rows L2-normalized
        self.logit_scale = logit_scale
        self.inputs = {"pixel_values": _pixel_spec(model)}
        self.outputs = {
            "probs": TensorSpec("float32", ("batch", int(label_bank.shape[0]))),
            "image_embeds": TensorSpec("float32", ("batch", int(label_bank.shape[1]))),
        }

    def module(self):
        return _FusedZeroShot(self.model, self.label_bank, self.logit_scale).eval()

    def reference_tensors(self):
        # [labels, dim]
        return {"label_bank": torch.from_numpy(np.ascontiguousarray(self.label_bank, dtype=np.float32))}

    def sample_inputs(self, batch, sequence, generator):
        return {"pixel_values": _random_pixels(self.model, batch, generator)}
