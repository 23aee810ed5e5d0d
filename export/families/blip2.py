"""The BLIP-2 family: image prefix + causal LLM, for captioning and VQA.

Exported components (``ExportOptions.extra``):

- ``prefix`` (default, ``fused_prefix`` True): pixel_values → prefix_embeds, one graph (vision + Q-Former +
  projection); ``fused_prefix=False`` exports ``vision`` (pixel_values → image_embeds) and ``qformer``
  (image_embeds → prefix_embeds) instead, e.g. to run them on different devices or precisions.
- ``decoder``: the LLM over input embeddings with its KV cache (``DecoderWithPast``).
- ``embed_tokens.npz`` (manifest ``blip2.embeddings``): the LLM's token-embedding table, stored at the
  LLM's precision (float32, float16, INT8 per row or INT4 per block; see ``mmedge.export.int4``), since
  the decoder graph takes embeddings, not ids.

How a prompt enters the decoder, exactly as transformers 5 ``Blip2ForConditionalGeneration.generate``
does it: the processor writes ``num_query_tokens`` image tokens, then ``tokenizer(prompt)`` (which starts
with BOS ``</s>``); the model embeds the ids and overwrites the image-token rows with the prefix
(``masked_scatter``); with no prompt it uses the image tokens + ``[bos_token_id]``. The image tokens
always come first and are all replaced, so the device builds the same sequence as
``concat(prefix_embeds, embed(tokenizer(prompt)))``, mask all ones, positions ``cumsum(mask) - 1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.errors import ExportError, InputError, ModelLoadError
from mmedge.export.families.base import encoder_fix, gate_fidelity, llm_fix
from mmedge.export.families.common import EMBEDDINGS_FILE, GenerativeFamily, write_embedding_table
from mmedge.export.specs.blip2 import (
    Blip2Prefix,
    Blip2Vision,
    DecoderWithPast,
    QFormer,
    _DecoderWithPast,
    _FusedPrefix,
    _QFormerPrefix,
    _VisionEmbeds,
    decoder_feeds,
    kv_cache_layout,
    llm_input_width,
)
from mmedge.generation.config import GENERATION_NOT_RUN
from mmedge.metrics import common_prefix, cosine_rows

TASKS = ("caption", "vqa")
VQA_TEMPLATE = "Question: {} Answer:"
DEFAULT_MAX_NEW_TOKENS = 30
ENCODERS = ("prefix", "vision", "qformer")
ENCODER_DECODER_LLMS = ("t5",)  # text_config.model_type values exported by the blip2_t5 family instead
# Settings a user may pass in ExportOptions.extra, with their defaults.
EXTRA_DEFAULTS = {
    "fused_prefix": True,  # one prefix graph instead of vision + qformer
    # the decoder's attention as one com.microsoft.MultiHeadAttention node per layer (OPT; see decoder_attention)
    "fused_attention": False,
    "min_logits_cosine": 0.95,  # quantized decoder vs FP32 decoder, mean over held-out prefixes × prompts
    "fidelity_images": 8,  # held-out photos for the decoder's fidelity (one prompt batch each)
    "fidelity_max_new_tokens": 20,  # greedy tokens compared per caption / answer
}
# Prompts the quantized decoder is measured on (None: captioning, no prompt).
FIDELITY_PROMPTS = (None, "Question: what is in the picture? Answer:", "Question: what color is it? Answer:")
VALIDATION_PROMPT = "Question: what is in the picture? Answer:"
# transformers.GenerationConfig fields the device loop (mmedge.generation.GenerationConfig) reads.
GENERATION_FIELDS = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "min_new_tokens": 0, "num_beams": 1,
                     "length_penalty": 1.0, "early_stopping": False, "do_sample": False, "temperature": 1.0,
                     "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def decoder_attention(fused: bool, language_model) -> dict:
    """The decoder's ``attention`` manifest entry: one ``com.microsoft.MultiHeadAttention`` node per layer with
    ``fused_attention`` (an OPT LLM; ``mmedge.export.specs.fused_attention``), else transformers' ops."""
    from mmedge.export.specs.fused_attention import manifest_entry, standard_entry, unsupported_reason

    if not fused:
        return standard_entry()
    reason = unsupported_reason(language_model)
    if reason:
        raise InputError(f"--fused-attention cannot rewrite this checkpoint's LLM: {reason}", "an OPT language model",
                         "drop --fused-attention (the decoder keeps transformers' attention)")
    return manifest_entry(True, "asked for (--fused-attention): ONNX Runtime and OpenVINO run it, TensorRT cannot "
                                "parse it")


class Blip2Family(GenerativeFamily):
    label, tasks, extra_defaults = "BLIP-2", TASKS, EXTRA_DEFAULTS
    name = "blip2"
    model_types = ("blip-2",)

    @staticmethod
    def claims(config: dict) -> bool:
        """A decoder-only LLM (OPT when the config names none, as transformers defaults)."""
        return (config.get("text_config") or {}).get("model_type", "opt") not in ENCODER_DECODER_LLMS

    @staticmethod
    def model_class():
        from transformers import Blip2ForConditionalGeneration

        return Blip2ForConditionalGeneration

    @staticmethod
    def synthetic_tokenizer(config):
        """A byte-level OPT tokenizer with no merges, for --random-weights exports (no hub needed).

        Ids follow OPT: ``<s>``=0, ``<pad>``=1, ``</s>``=2 (BOS, prepended to every text), ``<unk>``=3,
        then the 256 byte characters; ``<image>`` sits at ``config.image_token_index``. Text is spelled
        byte by byte, so sequences are longer than with the real vocabulary.
        """
        from transformers import AddedToken, GPT2Tokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        vocab |= {c: i + 4 for i, c in enumerate(bytes_to_unicode().values())}
        if config.image_token_index is not None:
            vocab["<image>"] = int(config.image_token_index)
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", add_bos_token=True, add_prefix_space=False)
        if config.image_token_index is not None:
            tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        return tokenizer

    # --- what gets exported ----------------------------------------------------------------------
    def specs(self, loaded, options) -> list:
        model = loaded.model
        if not model.config.use_decoder_only_language_model:
            raise ExportError("this BLIP-2 checkpoint uses an encoder-decoder LLM (Flan-T5)",
                              "a decoder-only LLM (OPT, Llama-family)", "export a blip2-opt checkpoint")
        check_prefix_width(model)
        encoders = [Blip2Prefix(model)] if self.setting(options,
                                                        "fused_prefix") else [Blip2Vision(model), QFormer(model)]
        llm = model.language_model
        attention = decoder_attention(bool(self.setting(options, "fused_attention")), llm)
        return [*encoders, DecoderWithPast(llm, attention)]

    @staticmethod
    def reference_module(name: str, model, manifest: dict, tensors: dict) -> torch.nn.Module:
        """The wrapper module the exporter traced for component ``name`` (the decoder: flat KV cache in and out),
        around a model loaded on the device by ``mmedge.runtimes.torch_backend``."""
        builders = {"vision": _VisionEmbeds, "qformer": _QFormerPrefix, "prefix": _FusedPrefix,
                    "decoder": lambda m: _DecoderWithPast(m.language_model,
                                                          kv_cache_layout(m.language_model)["layers"])}
        return builders[name](model).eval()

    @staticmethod
    def reference_language_model(model):
        """The causal LM the torch backend's KV-cached decoder runs (fed input embeddings, as the decoder graph is)."""
        return model.language_model

    def max_length(self, loaded) -> int:
        """Prompt tokens (BOS included) that fit beside the prefix in the LLM's positions."""
        config = loaded.model.config
        positions = getattr(config.text_config, "max_position_embeddings", None) or 2048
        return int(positions) - int(config.num_query_tokens)

    @staticmethod
    def calibrates(spec) -> bool:
        return spec.name in ENCODERS

    # --- manifest --------------------------------------------------------------------------------
    def manifest_extras(self, loaded, options, written: dict) -> dict:
        model = loaded.model
        text = model.config.text_config
        generation = generation_settings(loaded)
        fused = bool(self.setting(options, "fused_prefix"))
        embeddings = written["embeddings"]  # write_files' entry for embed_tokens.npz
        return {
            "tasks": [options.task] + [t for t in TASKS if t != options.task],
            "generation": generation,
            self.name: {
                "num_query_tokens": int(model.config.num_query_tokens),
                "prefix": {"components": ["prefix"] if fused else ["vision", "qformer"], "output": "prefix_embeds",
                           "shape": ["batch", int(model.config.num_query_tokens),
                                     int(model.language_model.get_input_embeddings().embedding_dim)]},
                "decoder": {"component": "decoder", "llm": text.model_type,
                            "max_positions": int(getattr(text, "max_position_embeddings", 0) or 0) or None,
                            "position_ids": "cumsum(attention_mask, axis=1) - 1 (padding slots: any value, "
                            "they are masked)",
                            "position_offset": 0, "kv_cache": kv_cache_layout(model.language_model)},
                "bos_token_id": generation["bos_token_id"],
                "eos_token_id": generation["eos_token_id"],
                "pad_token_id": generation["pad_token_id"],
                "image_tokens": image_tokens_entry(model, "prefix_embeds (num_query_tokens rows), then "
                                                          "embed(prompt_ids)",
                                                   "tokenizer(prompt), which starts with bos_token_id; [bos_token_id] "
                                                   "when there is no prompt"),
                "prompts": {"caption": None, "vqa": VQA_TEMPLATE},
                "embeddings": embeddings,
            },
        }

    # --- the image prefix, as the decoder's fidelity and samples run it ---------------------------------
    def prefix_inputs(self, builder, prompts: list) -> dict[str, np.ndarray]:
        """The prefix's inputs beyond ``pixel_values`` for these prompts (one per image): none for BLIP-2."""
        return {}

    @staticmethod
    def prefix_module(model) -> torch.nn.Module:
        """The fused prefix wrapper: (pixel_values, *prefix_inputs) → prefix_embeds."""
        return _FusedPrefix(model).eval()

    @staticmethod
    def onnx_prefix(fp32: dict[str, Path], pixels: np.ndarray, extra: dict[str, np.ndarray],
                    threads: int | None) -> np.ndarray:
        """prefix_embeds from the FP32 prefix graph (or vision then Q-Former), fed ``extra`` beside the pixels."""
        if "prefix" in fp32:
            return _session(fp32["prefix"], threads).run(["prefix_embeds"], {"pixel_values": pixels, **extra})[0]
        image_embeds = _session(fp32["vision"], threads).run(["image_embeds"], {"pixel_values": pixels})[0]
        return _session(fp32["qformer"], threads).run(["prefix_embeds"], {"image_embeds": image_embeds, **extra})[0]

    # --- samples stored with the artifact for on-device `mmedge validate` ------------------------
    def write_files(self, builder) -> dict:
        """Files beside the graphs: the LLM's token-embedding table. Returns ``{"embeddings": its manifest entry,
        "fp32_table": the FP32 table}`` (the FP32 side of the decoder's fidelity, kept before a large LLM's weights
        are freed; None when the LLM stays FP32)."""
        llm = builder.loaded.model.language_model
        options = builder.options
        table = embedding_table(llm)  # [vocab, width]
        entry = write_embedding_table(builder, table, lambda storage, arrays: embedding_entry(
            llm, storage, arrays, options.int4_block_size))
        fp32 = (options.llm_precision or options.precision) == "fp32"
        return {"embeddings": entry, "fp32_table": None if fp32 else table}

    def validation_feeds(self, spec, builder) -> dict[str, np.ndarray]:
        """Two held-out photos; for the decoder, a VQA prompt after one photo's cached prefix (past > 0, 10+ tokens).

        Called once per component: the builder keeps the feeds with their PyTorch outputs.
        """
        from mmedge.export.calibration import bundled, load_calibration_image

        pixels = builder.preprocessor([load_calibration_image(p) for p in bundled("holdout")[:2]])  # [2, 3, H, W]
        if "pixel_values" in spec.inputs:
            return {"pixel_values": pixels}
        model = builder.loaded.model
        with torch.no_grad():
            if spec.name == "qformer":
                return {"image_embeds": _VisionEmbeds(model).eval()(torch.from_numpy(pixels)).numpy()}
            # One image: a real LLM's cache is large (OPT-2.7B: 21 MB for a 32-token prefix), and is stored twice.
            extra = self.prefix_inputs(builder, [VALIDATION_PROMPT])
            prefix = self.prefix_module(model)(torch.from_numpy(pixels[:1]), *(torch.from_numpy(v) for v in
                                                                              extra.values()))  # [1, queries, width]
            ids = torch.from_numpy(builder.tokenizer.encode([VALIDATION_PROMPT])[0])  # [1, tokens]
            embeds = model.language_model.get_input_embeddings()(ids)  # [1, tokens, width]
            past = _prefill(model.language_model, prefix, spec.kv_cache)
            mask = torch.ones(1, prefix.shape[1] + ids.shape[1], dtype=torch.long)  # [1, queries + tokens]
            feeds = decoder_feeds(embeds, mask, past, spec.kv_cache)
        return {k: v.numpy() for k, v in feeds.items()}

    # --- static INT8 calibration -----------------------------------------------------------------
    def calibration_feeds(self, spec, builder, progress):
        """Calibration images as pixel feeds; for the Q-Former, the FP32 vision graph's image_embeds of them."""
        from mmedge.export.calibration import calibration_paths, pixel_feeds

        paths, note = calibration_paths(builder.options.calibration)
        feeds = progress.items(pixel_feeds(builder.preprocessor, paths), len(paths), "calibration image")
        if "pixel_values" in spec.inputs:
            return feeds, note
        vision = _session(builder.fp32_paths["vision"], builder.options.threads)
        return ({"image_embeds": vision.run(["image_embeds"],
                                            feed)[0]} for feed in feeds), note + " through FP32 vision"

    # --- fidelity of quantized graphs ------------------------------------------------------------
    def quantized_fidelity(self, run, fp32: dict[str, Path], quantized: dict[str, Path], builder) -> dict[str, dict]:
        """Encoders: embedding cosine on held-out photos. Decoder: logits cosine and greedy agreement vs FP32.

        The decoder is fed FP32 prefixes, so its figures are its own; each side embeds prompt and
        generated tokens with its own table (the quantized one with the stored quantized table).
        """
        from mmedge.export.calibration import fidelity_paths, holdout_images

        options = builder.options
        photos, _ = fidelity_paths(options)
        measured: dict[str, dict] = {}
        encoders = [name for name in ENCODERS if name in quantized]
        if encoders:
            pixels = builder.preprocessor(holdout_images(photos))  # [views, 3, height, width]
            for name in encoders:
                measured[name] = gate_fidelity(name, _encoder_fidelity(name, run, fp32, quantized, pixels),
                                               "embedding_cosine_mean", options.min_quantized_cosine, "embeddings",
                                               encoder_fix(builder, name))
        if "decoder" in quantized:
            measured["decoder"] = gate_fidelity("decoder", self._decoder_fidelity(fp32, quantized, builder, photos),
                                                "logits_cosine_mean", float(self.setting(options, "min_logits_cosine")),
                                                "logits", llm_fix(options))
        return measured

    def _decoder_fidelity(self, fp32, quantized, builder, photos) -> dict:
        from mmedge.export.calibration import load_calibration_image

        options, llm = builder.options, builder.loaded.model.language_model
        count = int(self.setting(options, "fidelity_images"))
        pixels = builder.preprocessor([load_calibration_image(p) for p in photos[:count]])
        # [images, queries, width] per prompt (one for all when the prefix reads no text)
        prefixes = [self.onnx_prefix(fp32, pixels, extra, options.threads) if extra else None
                    for extra in (self.prefix_inputs(builder, [p] * len(pixels)) for p in FIDELITY_PROMPTS)]
        if any(prefix is None for prefix in prefixes):
            prefixes = [self.onnx_prefix(fp32, pixels, {}, options.threads)] * len(FIDELITY_PROMPTS)
        precision = options.llm_precision or options.precision
        entry = builder.written["embeddings"]
        new_tokens = int(self.setting(options, "fidelity_max_new_tokens"))
        config = generation_settings(builder.loaded) | {"max_new_tokens": new_tokens, "num_beams": 1,
                                                        "do_sample": False}
        prompts = [_prompt_ids(builder.tokenizer, p, config["bos_token_id"], len(pixels)) for p in FIDELITY_PROMPTS]

        def side(path: Path, table: np.ndarray) -> list:  # one decoder session at a time (full size FP32: 10.6 GB)
            greedy = _Greedy(path, table, kv_cache_layout(llm), options.threads)
            return [(greedy.prefill_logits(prefix, ids), greedy.generate(prefix, ids, config))
                    for prefix, ids in zip(prefixes, prompts)]

        reference = side(fp32["decoder"], builder.written["fp32_table"])
        candidate = side(quantized["decoder"], _load_table(builder.stage / EMBEDDINGS_FILE, entry))
        cosines, identical, common = [], [], []
        for (ref_logits, ref_tokens), (act_logits, act_tokens) in zip(reference, candidate):
            cosines += cosine_rows(ref_logits, act_logits).tolist()  # one per image: all prompt positions
            for a, b in zip(ref_tokens, act_tokens):
                identical.append(a == b)
                common.append(common_prefix(a, b) / max(len(a), 1))
        return {"reference": "onnx-fp32", "precision": precision, "held_out_images": int(len(pixels)),
                "prompts": [p or "" for p in FIDELITY_PROMPTS], "sequences": len(identical),
                "logits_cosine_min": float(min(cosines)), "logits_cosine_mean": float(np.mean(cosines)),
                "greedy_identical_share": float(np.mean(identical)),
                "greedy_common_prefix_share": float(np.mean(common)),
                "max_new_tokens": config["max_new_tokens"], "embeddings": entry["storage"],
                "generation_loop": "mmedge.generation"}


# --- helpers -------------------------------------------------------------------------------------
def image_tokens_entry(model, sequence: str, prompt_ids: str) -> dict:
    """The manifest's ``image_tokens``: how the prefix rows and the prompt's ids enter the LLM (``sequence``,
    ``prompt_ids`` describe the family's order), and what HF does instead (placeholder ids it overwrites)."""
    return {"hf_image_token_id": None if model.config.image_token_index is None
            else int(model.config.image_token_index),
            "in_prompt_ids": False, "sequence": sequence, "prompt_ids": prompt_ids,
            "hf_equivalent": "processor puts num_query_tokens <image> ids before tokenizer(prompt); "
                             "generate() replaces exactly those rows with the prefix (masked_scatter)"}


def check_prefix_width(model) -> None:
    """The image prefix's rows (``language_projection``'s output) must be as wide as the LLM's input embeddings:
    an OPT whose ``word_embed_proj_dim`` differs from ``hidden_size`` (opt-350m's layout) takes narrower rows, which
    transformers' generate silently cuts (its masked_scatter drops half of each row)."""
    projection = getattr(model, "language_projection", None)
    rows, width = getattr(projection, "out_features", None), llm_input_width(model.language_model)
    if rows is not None and rows != width:
        raise ModelLoadError(f"the image prefix's rows are {rows} wide (language_projection) but the LLM takes "
                             f"{width}-wide input embeddings (its word_embed_proj_dim)",
                             "language_projection's out_features equal to the LLM's input embedding width",
                             "export a checkpoint whose LLM takes the projection's width (an OPT with "
                             "word_embed_proj_dim == hidden_size); this one cannot caption, in transformers either")


def generation_settings(loaded) -> dict:
    """The manifest's ``generation`` object: mmedge.generation.GenerationConfig fields, from the checkpoint."""
    model = loaded.model
    text = getattr(model.config, "text_config", None) or model.config  # IDEFICS keeps the LLM settings at the top level
    hf = model.generation_config
    settings = {}
    for key, default in GENERATION_FIELDS.items():
        value = getattr(hf, key, None)
        settings[key] = default if value is None else value
    if getattr(hf, "max_new_tokens", None) is None:
        settings["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS  # HF's max_length=20 default counts the prompt too
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf, key, None)
        settings[key] = getattr(text, key, None) if value is None else value
    stops = getattr(hf, "stop_strings", None)
    if stops:  # mmedge's loop runs them (on the generated text)
        settings["stop_strings"] = [stops] if isinstance(stops, str) else [str(stop) for stop in stops]
    if isinstance(settings["eos_token_id"], (list, tuple)):
        settings["eos_token_id"] = [int(t) for t in settings["eos_token_id"]]
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        if isinstance(settings[key], (int, np.integer)):
            settings[key] = int(settings[key])
    return settings


def generation_not_carried(loaded) -> dict:
    """The checkpoint's generation settings away from transformers' defaults that change the answer and that mmedge's
    generation loop does not run (``GENERATION_NOT_RUN``: ``no_repeat_ngram_size``, ``bad_words_ids``, ``max_length``
    counting the prompt, ...). transformers' ``generate`` applies them by default, so the artifact's answers can
    differ from it: the export warns and records them (``export.generation_not_carried``) rather than dropping them
    unsaid."""
    import json

    found = {}
    for key, value in loaded.model.generation_config.to_diff_dict().items():
        if key not in GENERATION_NOT_RUN:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        found[key] = value
    return found


def embedding_table(language_model) -> np.ndarray:
    """The LLM's input embedding matrix as float32 ``[vocab, width]``."""
    return language_model.get_input_embeddings().weight.detach().float().cpu().numpy()


def embedding_entry(language_model, storage: str, arrays: dict[str, np.ndarray], block_size: int) -> dict:
    vocab, width = language_model.get_input_embeddings().weight.shape
    output = language_model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == language_model.get_input_embeddings().weight.data_ptr()
    formulas = {
        "float32": "weight",
        "float16": "weight.astype(float32)",
        "int8-per-row": "weight.astype(float32) * scales",
        "int4-block": "q = [weight & 15, weight >> 4] interleaved (even column low nibble) - 8; "
                      "(q.reshape(rows, blocks, block_size) * scales[..., None]).reshape(rows, -1)[:, :width]",
    }
    entry = {"shape": [int(vocab), int(width)], "storage": storage,
             "arrays": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in arrays.items()},
             "dequantize": formulas[storage], "tied_to_lm_head": bool(tied)}
    if storage == "int4-block":
        entry["block_size"] = int(block_size)
    return entry


def _load_table(path: Path, entry: dict) -> np.ndarray:
    from mmedge.export.int4 import dequantize_rows

    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    return dequantize_rows(arrays, entry["storage"], entry["shape"][1], entry.get("block_size"))


def _session(path: Path, threads: int | None):
    """A CPU ONNX Runtime session over an exported graph (``threads`` None or 0: all cores); a large graph's runs
    without ONNX Runtime's memory arena (see ``ort_session``)."""
    from mmedge.export.onnx_export import ort_session

    return ort_session(path, threads)


def _prefill(language_model, prefix: torch.Tensor, layout: dict) -> list[torch.Tensor]:
    """The KV cache (flat key, value per layer) after running ``prefix [batch, queries, width]`` in PyTorch."""
    mask = torch.ones(prefix.shape[:2], dtype=torch.long)
    feeds = decoder_feeds(prefix, mask, None, layout)
    out = _DecoderWithPast(language_model, layout["layers"]).eval()(*feeds.values())
    return list(out[1:])


def _encoder_fidelity(name: str, run, fp32, quantized, pixels: np.ndarray) -> dict:
    """Cosine of the quantized encoder's output vs FP32, on the same inputs (the Q-Former: FP32 image_embeds)."""
    feeds = {"pixel_values": pixels}
    if name == "qformer":
        feeds = {"image_embeds": run(fp32["vision"], feeds)["image_embeds"]}
    output = "image_embeds" if name == "vision" else "prefix_embeds"
    cos = cosine_rows(run(fp32[name], feeds)[output], run(quantized[name], feeds)[output])
    return {"reference": "onnx-fp32", "held_out_images": int(len(pixels)), "output": output,
            "embedding_cosine_min": float(cos.min()), "embedding_cosine_mean": float(cos.mean())}


def _prompt_ids(tokenizer, prompt: str | None, bos_token_id: int, batch: int) -> np.ndarray:
    """``[batch, tokens]`` ids of ``prompt`` (BOS first); just ``[bos]`` for captioning."""
    if prompt is None:
        return np.full((batch, 1), bos_token_id, dtype=np.int64)
    return tokenizer.encode([prompt] * batch)[0]


class _Greedy:
    """One decoder graph + its embedding table: prefill logits, and greedy continuations through the
    device's own loop (``mmedge.generation.generate`` over ``OrtDecoder``)."""

    def __init__(self, path: Path, table: np.ndarray, layout: dict, threads: int | None):
        self.session = _session(path, threads)
        self.table, self.layout = table, layout

    def embeds(self, prefix: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.concatenate([prefix, self.table[ids]], axis=1).astype(np.float32)  # [batch, queries + tokens, width]

    def prefill_logits(self, prefix: np.ndarray, ids: np.ndarray) -> np.ndarray:
        embeds = self.embeds(prefix, ids)
        feeds = decoder_feeds(torch.from_numpy(embeds), torch.ones(embeds.shape[:2], dtype=torch.long), None,
                              self.layout)
        return self.session.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]  # [batch, tokens, vocab]

    def generate(self, prefix: np.ndarray, ids: np.ndarray, settings: dict) -> list[list[int]]:
        from mmedge.generation import GenerationConfig, generate
        from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

        decoder = OrtDecoder(self.session, self.table, self.layout, io_binding=False)
        fields = {k: v for k, v in settings.items() if k in GENERATION_FIELDS or k.endswith("_token_id")}
        return generate(decoder, self.embeds(prefix, ids), None, GenerationConfig(**fields))
