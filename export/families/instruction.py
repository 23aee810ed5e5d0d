"""What every InstructBLIP family shares, whatever its LLM: the Q-Former also reads the instruction, tokenized by its
own (BERT) tokenizer.

``InstructionFamily`` goes before a BLIP-2 family in the bases (``class F(InstructionFamily, Blip2T5Family)``): it
exports the prefix that takes the instruction's tokens (``prefix``: pixel_values + ``qformer_input_ids`` +
``qformer_attention_mask`` → prefix_embeds; ``fused_prefix=False``: ``vision`` and ``qformer``, the Q-Former taking
the instruction), saves the Q-Former's tokenizer beside the LLM's as ``qformer_tokenizer.json`` (manifest
``<family>.qformer_tokenizer``), and feeds the instruction wherever the prefix runs at export (validation samples,
calibration, fidelity). The device tokenizes each prompt twice, as ``InstructBlipProcessor`` does: the LLM's tokens
after the prefix rows, the Q-Former's (right-padded batch) into the prefix. InstructBLIP always has an instruction:
a caption without a prompt uses ``CAPTION_PROMPT``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.errors import ModelLoadError
from mmedge.export.families.base import encoder_fix, gate_fidelity
from mmedge.export.families.blip2 import ENCODERS, _VisionEmbeds
from mmedge.export.specs.blip2 import Blip2Vision
from mmedge.export.specs.instructblip import (
    InstructPrefix,
    InstructQFormer,
    _InstructFusedPrefix,
    _InstructQFormerPrefix,
)
from mmedge.metrics import cosine_rows
from mmedge.versions import tokenizers_version

QFORMER_TOKENIZER_FILE = "qformer_tokenizer.json"
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts it
CAPTION_PROMPT = "A short image description:"  # InstructBLIP's captioning instruction
INSTRUCTION = "What is in the picture?"  # what calibration and the prefix's fidelity feed the Q-Former


class InstructionFamily:
    """The instruction-reading prefix of InstructBLIP, over a BLIP-2 family (see the module docstring)."""

    model_types = ("instructblip",)

    @staticmethod
    def model_class():
        from transformers import InstructBlipForConditionalGeneration

        return InstructBlipForConditionalGeneration

    def prefix_specs(self, model, options) -> list:
        return [InstructPrefix(model)] if self.setting(options, "fused_prefix") else [Blip2Vision(model),
                                                                                      InstructQFormer(model)]

    def specs(self, loaded, options) -> list:
        llm = [s for s in super().specs(loaded, options) if s.name not in ENCODERS]  # the parent's LLM components
        return [*self.prefix_specs(loaded.model, options), *llm]

    @classmethod
    def reference_module(cls, name: str, model, manifest: dict, tensors: dict) -> torch.nn.Module:
        builders = {"vision": _VisionEmbeds, "qformer": _InstructQFormerPrefix, "prefix": _InstructFusedPrefix}
        if name in builders:
            return builders[name](model).eval()
        return super().reference_module(name, model, manifest, tensors)

    @staticmethod
    def prefix_module(model) -> torch.nn.Module:
        return _InstructFusedPrefix(model).eval()

    # --- the Q-Former's tokenizer ----------------------------------------------------------------------
    def write_files(self, builder) -> dict:
        """The LLM's embedding table (BLIP-2's), and the Q-Former's tokenizer as ``qformer_tokenizer.json``."""
        from mmedge.artifact import sha256_file
        from mmedge.export.tokenization import save_tokenizer_json, tokenizer_settings_from_hf
        from mmedge.tokenizer import TextTokenizer

        written = super().write_files(builder)
        hf = qformer_tokenizer(builder.loaded)
        path = save_tokenizer_json(hf, builder.stage / QFORMER_TOKENIZER_FILE)
        limit = int(builder.loaded.model.config.qformer_config.max_position_embeddings)
        settings = tokenizer_settings_from_hf(hf, min(limit, int(getattr(hf, "model_max_length", limit) or limit)))
        settings |= {"file": QFORMER_TOKENIZER_FILE, "sha256": sha256_file(path),
                     "tokenizers_version": tokenizers_version()}
        builder.qformer_tokenizer = TextTokenizer.from_file(path, settings)
        return written | {"qformer_tokenizer": settings}

    def prefix_inputs(self, builder, prompts: list) -> dict[str, np.ndarray]:
        """The instructions' Q-Former tokens, right-padded: ``qformer_input_ids``, ``qformer_attention_mask``."""
        ids, mask = builder.qformer_tokenizer.encode([CAPTION_PROMPT if p is None else p for p in prompts])
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    # --- manifest --------------------------------------------------------------------------------
    def manifest_extras(self, loaded, options, written: dict) -> dict:
        extras = super().manifest_extras(loaded, options, written)
        section = extras[self.name]
        section["prompts"] = {"caption": CAPTION_PROMPT, "vqa": "{}"}
        section["qformer_tokenizer"] = written["qformer_tokenizer"]
        section["prefix"]["instruction_inputs"] = ["qformer_input_ids", "qformer_attention_mask"]
        section["image_tokens"]["instruction"] = "the prompt is also the Q-Former's instruction (qformer_tokenizer, " \
                                                 "right-padded); no prompt: prompts.caption"
        return extras

    # --- samples, calibration and fidelity of the prefix --------------------------------------------------
    def validation_feeds(self, spec, builder) -> dict[str, np.ndarray]:
        feeds = super().validation_feeds(spec, builder)
        if spec.name in ("prefix", "qformer"):  # BLIP-2's image feeds, two rows: plus two instructions
            feeds |= self.prefix_inputs(builder, ["What is in the picture?", "Describe the image in detail."])
        return feeds

    def calibration_feeds(self, spec, builder, progress):
        feeds, note = super().calibration_feeds(spec, builder, progress)
        if spec.name == "vision":
            return feeds, note

        def with_instruction(feed):
            return feed | self.prefix_inputs(builder, [INSTRUCTION] * len(next(iter(feed.values()))))

        return (with_instruction(feed) for feed in feeds), note + f", instruction {INSTRUCTION!r}"

    def quantized_fidelity(self, run, fp32: dict[str, Path], quantized: dict[str, Path], builder) -> dict[str, dict]:
        """The image components with the instruction fed (embedding cosine vs FP32 on held-out photos); the LLM as
        for BLIP-2 with Flan-T5."""
        from mmedge.export.calibration import fidelity_paths, holdout_images

        image_parts = [name for name in ENCODERS if name in quantized]
        measured = super().quantized_fidelity(run, fp32, {k: v for k, v in quantized.items() if k not in ENCODERS},
                                              builder)
        if image_parts:
            photos, _ = fidelity_paths(builder.options)
            pixels = builder.preprocessor(holdout_images(photos))  # [views, 3, height, width]
            instruction = self.prefix_inputs(builder, [INSTRUCTION] * len(pixels))
            for name in image_parts:
                feeds = {"pixel_values": pixels} if name != "qformer" else {
                    "image_embeds": run(fp32["vision"], {"pixel_values": pixels})["image_embeds"]}
                if name != "vision":
                    feeds |= instruction
                output = "image_embeds" if name == "vision" else "prefix_embeds"
                cos = cosine_rows(run(fp32[name], feeds)[output], run(quantized[name], feeds)[output])
                figures = {"reference": "onnx-fp32", "held_out_images": int(len(pixels)), "output": output,
                           "instruction": INSTRUCTION, "embedding_cosine_min": float(cos.min()),
                           "embedding_cosine_mean": float(cos.mean())}
                measured[name] = gate_fidelity(name, figures, "embedding_cosine_mean",
                                               builder.options.min_quantized_cosine, "embeddings",
                                               encoder_fix(builder, name))
        return measured


def qformer_tokenizer(loaded):
    """The Q-Former's tokenizer saved with the checkpoint (``qformer_tokenizer/``, where InstructBlipProcessor saves
    it)."""
    model = loaded.source.get("model", "")
    if loaded.source.get("random_weights") and not Path(model).is_dir():  # a bundled config: no tokenizer files
        return synthetic_qformer_tokenizer(loaded.model.config.qformer_config)
    return checkpoint_qformer_tokenizer(model, loaded.model.config.qformer_config)


def checkpoint_qformer_tokenizer(model: str, qformer_config):
    """The Q-Former's tokenizer in checkpoint ``model`` (a folder or a hub id), refused without its vocabulary: read
    with the LLM's tokenizer, before any weight loads, and again when the family saves it."""
    import transformers

    folder = _qformer_folder(model)
    if not folder.is_dir():
        local = Path(model).is_dir()
        raise ModelLoadError(f"'{model}' has no {QFORMER_TOKENIZER_FOLDER}/ folder for the Q-Former's tokenizer"
                             + ("" if local else " in the local Hugging Face cache"),
                             f"the Q-Former's tokenizer in {QFORMER_TOKENIZER_FOLDER}/ beside the weights, where "
                             "InstructBlipProcessor.save_pretrained puts it",
                             "save the checkpoint's InstructBlipProcessor into the folder (save_pretrained)" if local
                             else "fetch the model where the hub can be reached (it fetches that folder too)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the Q-Former's tokenizer of '{model}' ({str(exc).splitlines()[0][:200]})",
                             f"a tokenizer in {QFORMER_TOKENIZER_FOLDER}/ beside the weights",
                             "save the checkpoint's InstructBlipProcessor into the folder (save_pretrained)") from None
    from mmedge.export.checkpoint_checks import check_tokenizer

    where = Path(model) / QFORMER_TOKENIZER_FOLDER if Path(model).is_dir() else f"{model}/{QFORMER_TOKENIZER_FOLDER}"
    check_tokenizer(where, tokenizer, qformer_config.vocab_size)
    return tokenizer


def _qformer_folder(model: str) -> Path:
    """The folder of the Q-Former's tokenizer: in a checkpoint folder, or in a hub id's snapshot (fetched alone when
    the hub answers; from the local cache offline). AutoTokenizer's ``subfolder=`` asked for a config.json in the
    subfolder, which hub repos do not have, and offline refused a snapshot that held the tokenizer whole."""
    if Path(model).is_dir():
        return Path(model) / QFORMER_TOKENIZER_FOLDER
    from huggingface_hub import snapshot_download

    from mmedge.export.hub import hub_options

    snapshot = snapshot_download(model, allow_patterns=[f"{QFORMER_TOKENIZER_FOLDER}/*"], **hub_options(model))
    return Path(snapshot) / QFORMER_TOKENIZER_FOLDER


def synthetic_qformer_tokenizer(qformer_config):
    """A WordPiece tokenizer laid out like bert-base-uncased (the Q-Former's), for --random-weights exports of a
    bundled config: ``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103 as in bert-base-uncased,
    then one piece per lower-case printable character (and its ``##`` continuation); no words, so text is spelled
    character by character. Every id is below the config's vocabulary size."""
    from transformers import BertTokenizer

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({chr(c).lower() for c in range(33, 127)})
    tokens += chars + ["##" + c for c in chars]
    if len(tokens) > int(qformer_config.vocab_size):
        raise ModelLoadError(f"the Q-Former's vocabulary ({qformer_config.vocab_size}) is too small for a "
                             "synthetic tokenizer", f"at least {len(tokens)} ids",
                             "export a checkpoint folder with its tokenizer")
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
