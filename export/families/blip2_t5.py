"""The BLIP-2 family with an encoder-decoder LLM (Flan-T5): image prefix → T5 encoder → T5 decoder, for captioning
and VQA.

Exported components (``ExportOptions.extra`` as for BLIP-2 with OPT):

- ``prefix`` (or ``vision`` + ``qformer`` with ``fused_prefix=False``): pixel_values → prefix_embeds, as for OPT.
- ``encoder`` (``T5Encoder``): [prefix rows ; embedded prompt] + mask → every decoder layer's cross-attention K/V,
  once per prompt.
- ``decoder`` (``T5DecoderWithPast``): the decoder stack and LM head with its self-attention KV cache, fed the cross
  K/V and the encoder mask as context (``mmedge.generation.kv_layout.context_inputs``).
- ``embed_tokens.npz``: T5's shared token-embedding table (encoder prompt and decoder tokens alike), stored at the
  LLM's precision. ``--llm-precision`` applies to the encoder and the decoder.

How a prompt enters the model, exactly as transformers 5 ``Blip2ForConditionalGeneration.generate`` does it for an
encoder-decoder LLM: the processor writes ``num_query_tokens`` image tokens, then ``tokenizer(prompt)`` (T5 appends
``</s>``, adds no BOS, pads on the right); ``generate`` embeds them, overwrites the image rows with the prefix and
passes ``inputs_embeds`` + ``attention_mask`` to the T5 encoder; the decoder starts from ``decoder_start_token_id``.
With no prompt the encoder input is the image tokens + ``[bos_token_id]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.export.families.base import gate_fidelity, llm_fix
from mmedge.export.families.blip2 import (
    ENCODER_DECODER_LLMS,
    ENCODERS,
    EXTRA_DEFAULTS,
    FIDELITY_PROMPTS,
    GENERATION_FIELDS,
    VQA_TEMPLATE,
    Blip2Family,
    _FusedPrefix,
    _load_table,
    _QFormerPrefix,
    _session,
    _VisionEmbeds,
    generation_settings,
    image_tokens_entry,
)
from mmedge.export.families.common import EMBEDDINGS_FILE
from mmedge.export.specs.blip2 import Blip2Prefix, Blip2Vision, QFormer
from mmedge.export.specs.blip2_t5 import (
    T5DecoderWithPast,
    T5Encoder,
    _EncoderCrossKV,
    _T5DecoderWithPast,
    t5_decoder_feeds,
    t5_layout,
)
from mmedge.metrics import common_prefix, cosine_rows
from mmedge.pipelines.seq2seq import encoder_inputs

LLM_COMPONENTS = ("encoder", "decoder")  # take --llm-precision
VALIDATION_PROMPTS = ("Question: what is in the picture? Answer:", "a photo of")  # two lengths: right padding


class Blip2T5Family(Blip2Family):
    label = "BLIP-2 (Flan-T5)"
    name = "blip2_t5"
    # the T5 decoder's attention is not rewritten (its relative position bias): no fused_attention setting
    extra_defaults = {k: v for k, v in EXTRA_DEFAULTS.items() if k != "fused_attention"}
    model_types = ("blip-2",)

    @staticmethod
    def claims(config: dict) -> bool:
        return (config.get("text_config") or {}).get("model_type") in ENCODER_DECODER_LLMS

    @staticmethod
    def synthetic_tokenizer(config):
        """A T5 (SentencePiece Unigram) tokenizer with one piece per byte character and no words, for
        --random-weights exports: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in google/flan-t5, ``<image>`` at
        ``config.image_token_index``. Text is spelled character by character."""
        from transformers import AddedToken, T5Tokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
        pieces += [(c, -5.0) for c in bytes_to_unicode().values() if c != "▁"]
        tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
        if config.image_token_index is not None:
            # unused fillers up to the image token's id (Flan-T5: its 100 extra ids)
            tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), int(config.image_token_index))])
            tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        return tokenizer

    # --- what gets exported ----------------------------------------------------------------------
    def specs(self, loaded, options) -> list:
        model = loaded.model
        encoders = [Blip2Prefix(model)] if self.setting(options,
                                                        "fused_prefix") else [Blip2Vision(model), QFormer(model)]
        return [*encoders, T5Encoder(model.language_model), T5DecoderWithPast(model.language_model)]

    def precision_of(self, spec, options) -> str:
        """The T5 encoder and decoder take ``--llm-precision`` (default: ``--precision``); the image prefix
        ``--precision``."""
        return (options.llm_precision or options.precision) if spec.name in LLM_COMPONENTS else options.precision

    @staticmethod
    def reference_module(name: str, model, manifest: dict, tensors: dict) -> torch.nn.Module:
        builders = {"vision": _VisionEmbeds, "qformer": _QFormerPrefix, "prefix": _FusedPrefix,
                    "encoder": lambda m: _EncoderCrossKV(m.language_model),
                    "decoder": lambda m: _T5DecoderWithPast(m.language_model)}
        return builders[name](model).eval()

    @staticmethod
    def reference_language_model(model):
        return None  # the torch backend's KV-cached decoder runs causal LMs only

    def max_length(self, loaded) -> int:
        """Prompt tokens beside the prefix: T5 has relative positions, so the tokenizer's own limit."""
        limit = getattr(loaded.tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 2 <= limit <= 100_000 else 512

    # --- manifest --------------------------------------------------------------------------------
    def manifest_extras(self, loaded, options, written: dict) -> dict:
        model = loaded.model
        text = model.config.text_config
        generation = generation_settings(loaded)
        fused = bool(self.setting(options, "fused_prefix"))
        layout = t5_layout(model.language_model)
        padding_side = getattr(loaded.tokenizer, "padding_side", "right")
        return {
            "tasks": [options.task] + [t for t in self.tasks if t != options.task],
            "generation": generation,
            self.name: {
                "num_query_tokens": int(model.config.num_query_tokens),
                "prefix": {"components": ["prefix"] if fused else ["vision", "qformer"], "output": "prefix_embeds",
                           "shape": ["batch", int(model.config.num_query_tokens), int(text.d_model)]},
                "encoder": {"component": "encoder", "llm": text.model_type, "padding_side": padding_side,
                            "inputs": "inputs_embeds = prefix_embeds rows, then embed(prompt_ids); attention_mask "
                                      f"(prompts of different lengths padded on the {padding_side})",
                            "outputs": "cross_key_values.%d.key|value per decoder layer, computed once per prompt"},
                "decoder": {"component": "decoder", "llm": text.model_type, "max_positions": None,
                            "position_ids": "none: T5's relative positions come from the cache length",
                            "decoder_start_token_id": _decoder_start(model),
                            "context": ["encoder_attention_mask", "cross_key_values.%d.key|value (the encoder's)"],
                            "kv_cache": layout},
                "bos_token_id": _prompt_start(model, generation),
                "eos_token_id": generation["eos_token_id"],
                "pad_token_id": generation["pad_token_id"],
                "image_tokens": image_tokens_entry(model, "prefix_embeds (num_query_tokens rows), then "
                                                          "embed(prompt_ids), into the encoder",
                                                   "tokenizer(prompt), which ends with </s>; [bos_token_id] when "
                                                   "there is no prompt"),
                "prompts": {"caption": None, "vqa": VQA_TEMPLATE},
                "embeddings": written["embeddings"],
            },
        }

    # --- samples stored with the artifact for on-device `mmedge validate` ------------------------
    def validation_feeds(self, spec, builder) -> dict[str, np.ndarray]:
        """Image components as for BLIP-2; the encoder: two photos with two prompts of different lengths (padded);
        the decoder: one more token after four, with those prompts' cross K/V."""
        if spec.name not in LLM_COMPONENTS:
            return super().validation_feeds(spec, builder)
        from mmedge.export.calibration import bundled, load_calibration_image

        model = builder.loaded.model
        pixels = builder.preprocessor([load_calibration_image(p) for p in bundled("holdout")[:2]])  # [2, 3, H, W]
        extra = self.prefix_inputs(builder, list(VALIDATION_PROMPTS))
        with torch.no_grad():
            prefix = self.prefix_module(model)(torch.from_numpy(pixels), *(torch.from_numpy(v) for v in
                                                                           extra.values())).numpy()  # [2, queries, w]
        table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
        ids = [builder.tokenizer.encode_all(p) for p in VALIDATION_PROMPTS]
        embeds, mask = encoder_inputs(prefix, ids, table, getattr(builder.loaded.tokenizer, "padding_side", "right"))
        if spec.name == "encoder":
            return {"inputs_embeds": embeds, "attention_mask": mask}
        llm, layout = model.language_model, spec.kv_cache
        with torch.no_grad():
            cross = list(_EncoderCrossKV(llm).eval()(torch.from_numpy(embeds), torch.from_numpy(mask)))
            tokens = torch.tensor([[_decoder_start(model), 5, 6, 7], [_decoder_start(model), 8, 9, 10]])  # [2, 4]
            first = t5_decoder_feeds(llm.get_input_embeddings()(tokens), torch.from_numpy(mask), cross, None, layout)
            past = list(_T5DecoderWithPast(llm).eval()(*first.values())[1:])
            step = llm.get_input_embeddings()(torch.tensor([[11], [12]]))  # [2, 1, width]
            feeds = t5_decoder_feeds(step, torch.from_numpy(mask), cross, past, layout)
        return {k: v.numpy() for k, v in feeds.items()}

    # --- fidelity of quantized graphs ------------------------------------------------------------
    def quantized_fidelity(self, run, fp32: dict[str, Path], quantized: dict[str, Path], builder) -> dict[str, dict]:
        """Image components as for BLIP-2. The LLM (encoder and decoder together, each side with its own table):
        teacher-forced logits cosine along the FP32 greedy tokens, and greedy agreement, vs the FP32 graphs."""
        image_parts = {k: v for k, v in quantized.items() if k in ENCODERS}
        measured = super().quantized_fidelity(run, fp32, image_parts, builder) if image_parts else {}
        lowered = [name for name in LLM_COMPONENTS if name in quantized]
        if lowered:  # measured and gated together: the decoder's logits are the encoder's output too
            figures = self._llm_fidelity(fp32, quantized, builder) | {"components": lowered}
            floor = float(self.setting(builder.options, "min_logits_cosine"))
            gate_fidelity("+".join(lowered), figures, "logits_cosine_mean", floor, "logits", llm_fix(builder.options))
            measured.update({name: figures for name in lowered})
        return measured

    def _llm_fidelity(self, fp32, quantized, builder) -> dict:
        from mmedge.export.calibration import fidelity_paths, load_calibration_image

        options, model = builder.options, builder.loaded.model
        photos, _ = fidelity_paths(options)
        count = int(self.setting(options, "fidelity_images"))
        pixels = builder.preprocessor([load_calibration_image(p) for p in photos[:count]])
        new_tokens = int(self.setting(options, "fidelity_max_new_tokens"))
        config = generation_settings(builder.loaded) | {"max_new_tokens": new_tokens, "num_beams": 1,
                                                        "do_sample": False}
        fields = {k: v for k, v in config.items() if k in GENERATION_FIELDS or k.endswith("_token_id")}
        bos, start = _prompt_start(model, config), _decoder_start(model)
        padding = getattr(builder.loaded.tokenizer, "padding_side", "right")
        prompts = [[np.array([bos])] * len(pixels) if p is None else [builder.tokenizer.encode_all(p)] * len(pixels)
                   for p in FIDELITY_PROMPTS]
        layout = t5_layout(model.language_model)

        prefixes = [self.onnx_prefix(fp32, pixels, self.prefix_inputs(builder, [p] * len(pixels)), options.threads)
                    for p in FIDELITY_PROMPTS]  # each [images, queries, width], from the FP32 prefix graphs

        def side(encoder: Path, decoder: Path, table: np.ndarray) -> list:
            llm = _Seq2Seq(encoder, decoder, table, layout, start, options.threads)
            return [llm.run(*encoder_inputs(prefix, ids, table, padding), fields)
                    for prefix, ids in zip(prefixes, prompts)]

        entry = builder.written["embeddings"]
        fp32_table = builder.written["fp32_table"]
        reference = side(fp32["encoder"], fp32["decoder"], fp32_table)
        table = _load_table(builder.stage / EMBEDDINGS_FILE, entry)
        candidate = side(quantized.get("encoder", fp32["encoder"]), quantized.get("decoder", fp32["decoder"]), table)
        cosines, identical, common = [], [], []
        for (ref_tokens, _), (act_tokens, _) in zip(reference, candidate):
            for a, b in zip(ref_tokens, act_tokens):
                identical.append(a == b)
                common.append(common_prefix(a, b) / max(len(a), 1))
        for (ref_tokens, (ref_llm, ref_context)), (_, (act_llm, act_context)) in zip(reference, candidate):
            cosines += cosine_rows(ref_llm.forced_logits(ref_tokens, ref_context),  # both along the FP32 tokens
                                   act_llm.forced_logits(ref_tokens, act_context)).tolist()
        return {"reference": "onnx-fp32", "precision": options.llm_precision or options.precision,
                "held_out_images": int(len(pixels)), "prompts": [p or "" for p in FIDELITY_PROMPTS],
                "sequences": len(identical), "logits_cosine_min": float(min(cosines)),
                "logits_cosine_mean": float(np.mean(cosines)),
                "logits": "teacher-forced along the FP32 greedy tokens, all positions of each row",
                "greedy_identical_share": float(np.mean(identical)),
                "greedy_common_prefix_share": float(np.mean(common)),
                "max_new_tokens": new_tokens, "embeddings": entry["storage"], "generation_loop": "mmedge.generation"}


# --- helpers -------------------------------------------------------------------------------------
def _decoder_start(model) -> int:
    text = model.config.text_config
    value = getattr(model.generation_config, "decoder_start_token_id", None)
    value = getattr(text, "decoder_start_token_id", None) if value is None else value
    return int(text.pad_token_id if value is None else value)


def _prompt_start(model, generation: dict) -> int:
    """The encoder's one text token when there is no prompt: ``text_config.bos_token_id`` as transformers uses it;
    T5 configs without one get ``</s>`` (what ``tokenizer("")`` gives)."""
    bos = getattr(model.config.text_config, "bos_token_id", None)
    if bos is None:
        bos = generation["eos_token_id"]
    return int(bos[0] if isinstance(bos, (list, tuple)) else bos)


class _Seq2Seq:
    """An encoder and a decoder graph with one embedding table: greedy continuations through the device's own loop
    (``mmedge.generation.generate`` over ``OrtDecoder``), then teacher-forced logits along given tokens."""

    def __init__(self, encoder: Path, decoder: Path, table: np.ndarray, layout: dict, start: int,
                 threads: int | None):
        self.encoder, self.decoder = _session(encoder, threads), _session(decoder, threads)
        self.table, self.layout, self.start = table, layout, start

    def run(self, embeds: np.ndarray, mask: np.ndarray, fields: dict):
        from mmedge.generation import GenerationConfig, generate
        from mmedge.generation.kv_layout import context_inputs
        from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

        names = [o.name for o in self.encoder.get_outputs()]
        cross = dict(zip(names, self.encoder.run(names, {"inputs_embeds": embeds, "attention_mask": mask})))
        context = {"encoder_attention_mask": mask, **cross}
        inputs = [i.name for i in self.decoder.get_inputs()]
        decoder = OrtDecoder(self.decoder, self.table, self.layout, io_binding=False,
                             context_inputs=context_inputs(inputs, self.layout))
        decoder.set_context(context, context)
        starts = np.full((len(embeds), 1), self.start, dtype=np.int64)
        tokens = generate(decoder, self.table[starts], None, GenerationConfig(**fields), prompt_ids=starts)
        return tokens, (self, context)

    def forced_logits(self, tokens: list[list[int]], context: dict[str, np.ndarray]) -> np.ndarray:
        """``[rows, positions * vocab]``: the decoder's logits fed [start] + each row's tokens (shorter rows padded
        with the start id; their extra positions are left out by cutting every row to the shortest)."""
        width = min(len(t) for t in tokens)
        ids = np.array([[self.start] + list(t[:width - 1]) if width else [self.start] for t in tokens])
        feeds = t5_decoder_feeds(torch.from_numpy(self.table[ids]), torch.from_numpy(context[
            "encoder_attention_mask"]), [torch.from_numpy(context[self.layout["cross"] % (layer, kind)])
                                         for layer in range(self.layout["layers"]) for kind in ("key", "value")],
            None, self.layout)
        logits = self.decoder.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]  # [rows, tokens, vocab]
        return logits.reshape(len(ids), -1)
