"""The CLIP family: which specs to export, what the manifest says, how quantized fidelity is measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.export.families.base import Family, encoder_fix, gate_fidelity
from mmedge.export.specs.clip import ClipText, ClipVision, ClipZeroShot, _FusedZeroShot, _ImageEmbeds, _TextEmbeds
from mmedge.metrics import cosine_rows, top1_agreement
from mmedge.pipelines.common import l2_normalize
from mmedge.pipelines.zero_shot import build_label_bank, check_label_tokens, check_labels, check_templates, softmax

# Labels used to measure top-1 agreement of quantized graphs when none were baked in.
FIDELITY_LABELS = ("person", "cat", "cup of coffee", "rocket", "galaxy", "eye", "grass", "stones", "clock", "camera")
# Labels whose prompts calibrate static INT8's text graph: none of FIDELITY_LABELS, so the text graph's fidelity is
# measured on prompts it was not calibrated on (held out, as the manifest says), whatever --templates are
CALIBRATION_LABELS = ("dog", "car", "tree", "bird", "chair", "flower", "house", "bicycle", "boat", "mountain")
TASKS = ("zero-shot", "embed")


class ClipFamily(Family):
    name, label = "clip", "CLIP"
    model_types = ("clip",)
    default_task, tasks = "zero-shot", TASKS
    has_llm = False
    extra_defaults: dict = {}  # no family settings

    @staticmethod
    def model_class():
        from transformers import CLIPModel

        return CLIPModel

    @staticmethod
    def synthetic_tokenizer(config):
        """A byte-level CLIP tokenizer with no merges, for --random-weights exports (no hub needed).

        Real tokenizers merge bytes into words; this one spells text byte by byte, so sequences are
        longer than with the real vocabulary. Special tokens sit at the config's ids.
        """
        from transformers import CLIPTokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        chars = list(bytes_to_unicode().values())
        vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + len(chars) for i, c in enumerate(chars)}
        text = config.text_config
        vocab["<|startoftext|>"] = text.bos_token_id
        vocab["<|endoftext|>"] = text.eos_token_id
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=text.max_position_embeddings)

    # --- what gets exported (options checked by mmedge.export.option_checks) ----------------------
    def specs(self, loaded, options) -> list:
        labels, templates = options.labels, options.templates
        if labels:
            labels, templates = check_labels(labels), check_templates(templates)
            check_label_tokens(self.device_tokenizer(loaded), labels, templates)  # the rule run-time labels follow
            bank = self.label_bank(loaded, labels, templates)
            return [ClipZeroShot(loaded.model, bank, self.logit_scale(loaded))]
        return [ClipVision(loaded.model), ClipText(loaded.model)]

    @staticmethod
    def logit_scale(loaded) -> float:
        return float(loaded.model.logit_scale.detach().exp())

    def max_length(self, loaded) -> int:
        return int(loaded.model.config.text_config.max_position_embeddings)

    @staticmethod
    def reference_module(name: str, model, manifest: dict, tensors: dict) -> torch.nn.Module:
        """The wrapper module the exporter traced for component ``name``, around a model loaded on the device
        (``mmedge.runtimes.torch_backend``); ``tensors``: the artifact's reference tensors of that component."""
        if name == "vision":
            return _ImageEmbeds(model).eval()
        if name == "text":
            return _TextEmbeds(model).eval()
        if name == "zero_shot":
            bank = tensors["label_bank"].float().cpu().numpy()  # [labels, dim]
            return _FusedZeroShot(model, bank, float(manifest["clip"]["logit_scale"])).eval()
        raise KeyError(name)

    @staticmethod
    def reference_language_model(model):
        """CLIP has no language model to decode with."""
        return None

    def torch_text_embeds(self, loaded):
        module = _TextEmbeds(loaded.model).eval()

        def embed(prompts: list[str]) -> np.ndarray:
            batch = loaded.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length(loaded),
                                     return_tensors="pt")
            with torch.no_grad():
                return module(batch["input_ids"], batch["attention_mask"]).numpy()  # [prompts, dim]

        return embed

    def device_tokenizer(self, loaded):
        """The checkpoint's tokenizer as a two-graph artifact's device would load it (``mmedge.tokenizer``), with the
        text encoder's length: the tokens the label bank's prompts are cut to."""
        from tokenizers import Tokenizer

        from mmedge.export.tokenization import tokenizer_settings_from_hf
        from mmedge.tokenizer import TextTokenizer

        settings = tokenizer_settings_from_hf(loaded.tokenizer, self.max_length(loaded))  # refuses a slow tokenizer
        return TextTokenizer(Tokenizer.from_str(loaded.tokenizer.backend_tokenizer.to_str()), settings)  # a copy

    def label_bank(self, loaded, labels, templates) -> np.ndarray:
        return build_label_bank(self.torch_text_embeds(loaded), labels, templates)  # [labels, dim]

    def manifest_extras(self, loaded, options, written: dict) -> dict:
        task, labels, templates = options.task, options.labels, options.templates
        fused = bool(labels)
        extras = {
            "tasks": ["zero-shot"] if fused else ([task] + [t for t in TASKS if t != task]),
            "clip": {"logit_scale": self.logit_scale(loaded),
                     "projection_dim": int(loaded.model.config.projection_dim)},
        }
        if fused:
            extras["zero_shot"] = {"labels": check_labels(labels), "templates": check_templates(templates)}
        return extras

    def needs_tokenizer(self, options) -> bool:
        return not options.labels

    def write_files(self, builder) -> dict:
        """Nothing beside the graphs but the tokenizer, which the builder writes."""
        return {}

    @staticmethod
    def calibrates(spec) -> bool:
        return True

    # --- fidelity of quantized graphs ------------------------------------------------------------
    def quantized_fidelity(self, run, fp32: dict[str, Path], quantized: dict[str, Path], builder) -> dict[str, dict]:
        """Per component: embedding cosine and zero-shot top-1 agreement, quantized vs FP32 ONNX, on held-out photos
        (and, for the text graph, on prompts of ``FIDELITY_LABELS``, which static INT8 does not calibrate it on).

        ``run(path, feeds)`` runs one graph in ONNX Runtime CPU. Past ``min_quantized_cosine`` the export fails.
        """
        from mmedge.export.calibration import fidelity_paths

        photos, _ = fidelity_paths(builder.options)
        measured = self._fidelity(run, fp32, quantized, builder.preprocessor, builder.tokenizer,
                                  builder.options.templates,
                                  photos)
        floor = builder.options.min_quantized_cosine
        return {name: gate_fidelity(name, figures, "embedding_cosine_mean", floor, "embeddings",
                                    encoder_fix(builder, name)) for name, figures in measured.items()}

    def _fidelity(self, run, fp32, quantized, preprocessor, tokenizer, templates, photos) -> dict[str, dict]:
        from mmedge.export.calibration import holdout_images

        pixels = preprocessor(holdout_images(photos))  # [views, 3, height, width]
        feeds = {"pixel_values": pixels}
        note = {"reference": "onnx-fp32", "held_out_images": int(len(pixels))}
        if "zero_shot" in fp32:
            ref, act = run(fp32["zero_shot"], feeds), run(quantized["zero_shot"], feeds)
            return {"zero_shot": {**note, **_embedding_stats(ref["image_embeds"], act["image_embeds"]),
                                  "top1_agreement": top1_agreement(ref["probs"], act["probs"]),
                                  "labels": int(ref["probs"].shape[1])}}
        labels = list(FIDELITY_LABELS)
        templates = check_templates(templates)

        def text_embeds(path):
            return lambda prompts: run(path,
                                       dict(zip(("input_ids", "attention_mask"),
                                                tokenizer.encode(prompts))))["text_embeds"]

        bank_ref = build_label_bank(text_embeds(fp32["text"]), labels, templates)  # [labels, dim]
        bank_act = build_label_bank(text_embeds(quantized["text"]), labels, templates)
        img_ref = l2_normalize(run(fp32["vision"], feeds)["image_embeds"])  # [views, dim]
        img_act = l2_normalize(run(quantized["vision"], feeds)["image_embeds"])
        agreement = top1_agreement(softmax(img_ref @ bank_ref.T), softmax(img_act @ bank_act.T))
        return {
            "vision": {**note, **_embedding_stats(img_ref, img_act), "top1_agreement": agreement, "labels": len(labels),
                       "agreement_text_graph": "quantized"},
            "text": {"reference": "onnx-fp32", "prompts": len(labels) * len(templates),
                     **_embedding_stats(bank_ref, bank_act), "top1_agreement": agreement, "labels": len(labels)},
        }

    def calibration_feeds(self, spec, builder, progress):
        """Feeds for static INT8 calibration of one component, and a note saying what they were."""
        from mmedge.export.calibration import calibration_paths, pixel_feeds

        options = builder.options
        if "pixel_values" in spec.inputs:
            paths, note = calibration_paths(options.calibration)
            return progress.items(pixel_feeds(builder.preprocessor, paths), len(paths), "calibration image"), note
        prompts = _calibration_prompts(options.templates)
        # One padded batch, fed row by row: the calibrator stacks activations, so lengths must agree.
        input_ids, attention_mask = builder.tokenizer.encode(prompts)  # [prompts, tokens] each
        feeds = ({"input_ids": input_ids[i:i + 1],
                  "attention_mask": attention_mask[i:i + 1]} for i in range(len(prompts)))
        return feeds, f"{len(prompts)} label prompts (other labels than the fidelity prompts)"

    # --- samples stored with the artifact for on-device `mmedge validate` --------------------------
    def validation_feeds(self, spec, builder) -> dict[str, np.ndarray]:
        from mmedge.export.calibration import bundled, load_calibration_image

        if "pixel_values" in spec.inputs:
            return {"pixel_values": builder.preprocessor([load_calibration_image(p) for p in bundled("holdout")[:2]])}
        input_ids, attention_mask = builder.tokenizer.encode(["a photo of a cat.",
                                                              "a diagram of a rocket engine on a table."])
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _embedding_stats(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    cos = cosine_rows(reference, actual)
    return {"embedding_cosine_min": float(cos.min()), "embedding_cosine_mean": float(cos.mean())}


def _calibration_prompts(templates) -> list[str]:
    """Static INT8's text-graph calibration prompts: ``CALIBRATION_LABELS`` in each template (default: the CLIP
    paper's ensemble). Only the two-graph export has a text graph, so no labels are baked in here."""
    from mmedge.pipelines.zero_shot import ENSEMBLE_TEMPLATES

    return [t.replace("{}", w) for w in CALIBRATION_LABELS for t in (templates or ENSEMBLE_TEMPLATES)]
