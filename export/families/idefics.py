"""The IDEFICS family (open Flamingo): interleaved image/text prompts → LLM with gated cross-attention.

Exported components (see ``mmedge.export.specs.idefics``), ``ExportOptions.extra``:

- ``image_context`` (default, ``fused_image_context`` True): one graph from each prompt's images ``[batch, images,
  3, H, W]`` through the vision tower and Perceiver Resampler to the cross-attention keys/values of every gated
  cross-attention layer, computed once per image set. ``fused_image_context=False`` exports the same chain as
  ``vision``, ``resampler`` (when the checkpoint has one) and ``cross_kv`` graphs instead (``--split-image-graphs``).
- ``decoder``: the LLM with its KV cache, fed the cross K/V. ``cached_cross_kv=False`` exports a decoder that
  recomputes the cross K/V from ``visual_tokens`` at every call instead (what transformers does), for comparison;
  the image graph then ends at the visual tokens.

The token-embedding table (base + IDEFICS' additional embeddings for ``<fake_token_around_image>`` and
``<image>``) is stored beside the graphs as for BLIP-2; prompts are built on the device exactly as
``IdeficsProcessor`` builds them (``mmedge.pipelines.interleaved``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.errors import ModelLoadError
from mmedge.export.families.base import encoder_fix, gate_fidelity, llm_fix
from mmedge.export.families.blip2 import (
    GENERATION_FIELDS,
    VQA_TEMPLATE,
    _load_table,
    _session,
    generation_settings,
)
from mmedge.export.families.common import EMBEDDINGS_FILE, GenerativeFamily, write_embedding_table
from mmedge.export.specs.blip2 import decoder_feeds, every_position, kv_cache_layout
from mmedge.export.specs.idefics import (
    CROSS_NAME,
    CrossKV,
    FlamingoVision,
    ImageContext,
    PerceiverResampler,
    XAttnDecoderWithPast,
    _CrossKV,
    _ImageContext,
    _Resampler,
    _Vision,
    _XAttnDecoderWithPast,
    cross_kv_layout,
    image_size,
    vision_width,
)
from mmedge.metrics import common_prefix, cosine_rows

TASKS = ("caption", "vqa")
ENCODERS = ("image_context", "vision", "resampler", "cross_kv")
FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN = "<fake_token_around_image>", "<image>", "<end_of_utterance>"
EXTRA_DEFAULTS = {
    "fused_image_context": True,  # one image graph (vision → resampler → cross K/V) instead of three
    "cached_cross_kv": True,  # decoder takes cross K/V (computed once per image set) instead of visual tokens
    "min_logits_cosine": 0.95,
    "fidelity_images": 6,
    "fidelity_max_new_tokens": 16,
    "fidelity_prompts": None,  # None: FIDELITY_PROMPTS; else a list of prompts in their form, for in-domain figures
}
# The prompts the quantized decoder is measured on; "{image}" marks where a held-out photo goes (successive "{image}"
# items of one prompt take successive photos).
FIDELITY_PROMPTS = (("{image}",), ("{image}", "An image of"), ("{image}", "Question: what is in the picture? Answer:"))
VALIDATION_PROMPT = ("{image0}", "An image of two cats.", "{image1}", "An image of")


def check_cross_layers(config) -> None:
    """Every ``cross_layer_interval``-th layer reads gated cross-attention block ``layer // interval``, and there are
    ``num_hidden_layers // interval`` blocks: a layer count that is not a multiple of the interval leaves the last
    such layer without its block (transformers' own forward fails on it with an IndexError)."""
    layers, interval = int(config.num_hidden_layers), int(config.cross_layer_interval)
    needed, built = (layers - 1) // interval + 1, layers // interval
    if needed > built:
        raise ModelLoadError(f"the config's {layers} layers with cross_layer_interval {interval} need {needed} gated "
                             f"cross-attention blocks (layers 0, {interval}, ...), and the model builds {built}",
                             "num_hidden_layers a multiple of cross_layer_interval",
                             "fix config.json (transformers cannot run this model either)")


class IdeficsFamily(GenerativeFamily):
    label, tasks, extra_defaults = "IDEFICS", TASKS, EXTRA_DEFAULTS
    name = "idefics"
    model_types = ("idefics",)

    @staticmethod
    def model_class():
        from transformers import IdeficsForVisionText2Text

        return IdeficsForVisionText2Text

    @staticmethod
    def synthetic_tokenizer(config):
        """A Llama-style tokenizer with one token per byte character and no merges, for --random-weights
        exports: ``<unk>``=0, ``<s>``=1, ``</s>``=2, then characters up to ``vocab_size``; the image tokens
        are the additional vocabulary, as in HuggingFaceM4/idefics-9b."""
        from transformers import AddedToken, LlamaTokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
        for char in bytes_to_unicode().values():
            if len(vocab) < config.vocab_size:
                vocab.setdefault(char, len(vocab))
        while len(vocab) < config.vocab_size:  # unused fillers, so the image tokens land on the additional rows
            vocab[f"<unused{len(vocab)}>"] = len(vocab)
        tokenizer = LlamaTokenizer(vocab=vocab, merges=[], pad_token="<unk>")
        extra = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN][: max(int(config.additional_vocab_size), 0)]
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in extra], special_tokens=True)
        return tokenizer

    # --- what gets exported ----------------------------------------------------------------------
    def specs(self, loaded, options) -> list:
        model = loaded.model
        check_cross_layers(model.config)
        fidelity_prompts(self.setting(options, "fidelity_prompts"))  # a malformed list is refused before any export
        cached = bool(self.setting(options, "cached_cross_kv"))
        if self.setting(options, "fused_image_context"):
            return [ImageContext(model, cached_cross_kv=cached), XAttnDecoderWithPast(model, cached_cross_kv=cached)]
        encoders = [FlamingoVision(model)]
        if model.config.use_resampler:
            encoders.append(PerceiverResampler(model))
        if cached:
            encoders.append(CrossKV(model))
        return [*encoders, XAttnDecoderWithPast(model, cached_cross_kv=cached)]

    def max_length(self, loaded) -> int:
        return int(loaded.model.config.max_position_embeddings)

    @staticmethod
    def reference_module(name: str, model, manifest: dict, tensors: dict) -> torch.nn.Module:
        """The wrapper module the exporter traced for component ``name``, around a model loaded on the device."""
        cached = manifest["idefics"]["decoder"].get("cross_kv", "inputs") == "inputs"
        builders = {"vision": _Vision, "resampler": _Resampler, "cross_kv": _CrossKV,
                    "image_context": lambda m: _ImageContext(m, cached_cross_kv=cached),
                    "decoder": lambda m: _XAttnDecoderWithPast(m, cached_cross_kv=cached)}
        return builders[name](model).eval()

    @staticmethod
    def reference_language_model(model):
        """None: the gated cross-attention decoder takes image context the torch backend's KV-cached decoder does
        not feed; its decoder runs on ONNX Runtime (the flat decoder module still runs as a plain torch runner)."""
        return None

    @staticmethod
    def calibrates(spec) -> bool:
        return spec.name in ("vision", "resampler", "image_context")

    # --- manifest --------------------------------------------------------------------------------
    def manifest_extras(self, loaded, options, written: dict) -> dict:
        model, tokenizer = loaded.model, loaded.tokenizer
        config = model.config
        generation = generation_settings(loaded)
        cached = bool(self.setting(options, "cached_cross_kv"))
        fused = bool(self.setting(options, "fused_image_context"))
        chain = ["vision", *(["resampler"] if config.use_resampler else []), *(["cross_kv"] if cached else [])]
        components = ["image_context", "decoder"] if fused else [*chain, "decoder"]
        size = image_size(model)
        additional = tokenizer.special_tokens_map.get("additional_special_tokens", []) or []
        return {
            "tasks": [options.task] + [t for t in TASKS if t != options.task],
            "generation": generation,
            "idefics": {
                "components": components,
                "image_size": image_size(model),
                "vision_width": vision_width(model),
                "cross_kv": {"component": ("image_context" if fused else "cross_kv") if cached else None,
                             **cross_kv_layout(model)},
                # the fused image graph: its outputs are the decoder's image inputs, by name; absent: the split chain
                "image_context": {"component": "image_context", "input": "pixel_values",
                                  "shape": ["batch", "images", 3, size, size],
                                  "outputs": "cross_key_values" if cached else "visual_tokens",
                                  "padding": "prompts with fewer images than the batch's most: zero pixels (the "
                                  "image_attention_mask hides them)", "replaces": chain} if fused else None,
                "decoder": {"component": "decoder", "llm": "llama",
                            "max_positions": int(config.max_position_embeddings),
                            "position_ids": "cumsum(attention_mask, axis=1) - 1 (padding slots: any value, "
                            "they are masked)",
                            "position_offset": 0, "kv_cache": kv_cache_layout(model),
                            "cross_kv": "inputs" if cached else "computed",
                            "cross_layer_interval": int(config.cross_layer_interval),
                            "image_attention_mask": "[batch, sequence, images]; decode steps repeat the "
                            "prompt's last row"},
                "bos_token_id": generation["bos_token_id"],
                "eos_token_id": generation["eos_token_id"],
                "pad_token_id": generation["pad_token_id"],
                "prompt_format": {
                    "bos_token": tokenizer.bos_token, "image_token": IMAGE_TOKEN, "fake_image_token": FAKE_IMAGE_TOKEN,
                    "end_of_utterance_token": END_OF_UTTERANCE_TOKEN if END_OF_UTTERANCE_TOKEN in additional else None,
                    "image_token_id": int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)),
                    "eos_token_id": int(tokenizer.eos_token_id),
                    "hf_equivalent": "IdeficsProcessor(text=[items]) with add_special_tokens=False, "
                    "add_eos_token=False",
                },
                "prompts": {"caption": None, "vqa": VQA_TEMPLATE},
                "embeddings": written["embeddings"],  # write_files' entry for embed_tokens.npz
            },
        }

    # --- files and samples -----------------------------------------------------------------------
    def write_files(self, builder) -> dict:
        """``embed_tokens.npz``: base + additional embeddings, at the LLM's precision. Returns ``{"embeddings": its
        manifest entry, "fp32_table": the FP32 table}`` (the FP32 side of the decoder's fidelity)."""
        options = builder.options
        table = embedding_table(builder.loaded.model)  # [vocab + additional, hidden]

        def describe(storage: str, arrays: dict) -> dict:
            entry = {"shape": list(table.shape), "storage": storage,
                     "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in arrays.items()},
                     "tied_to_lm_head": False,
                     "rows": "embed_tokens.weight, then embed_tokens.additional_embedding.weight"}
            if storage == "int4-block":
                entry["block_size"] = int(options.int4_block_size)
            return entry

        return {"embeddings": write_embedding_table(builder, table, describe), "fp32_table": table}

    def validation_feeds(self, spec, builder) -> dict[str, np.ndarray]:
        """Two held-out photos in one interleaved prompt (the decoder: its prefill, cross K/V from PyTorch)."""
        from mmedge.export.calibration import bundled, load_calibration_image

        model = builder.loaded.model
        photos = [load_calibration_image(p) for p in bundled("holdout")[:2]]
        pixels = builder.preprocessor(photos)  # [2, 3, H, W]
        if spec.name == "vision":
            return {"pixel_values": pixels}
        if spec.name == "image_context":
            return {"pixel_values": pixels[None]}  # [1 prompt, 2 images, 3, H, W]
        with torch.no_grad():
            features = _Vision(model).eval()(torch.from_numpy(pixels))  # [2, patches + 1, width]
            if spec.name == "resampler":
                return {"image_features": features.numpy()}
            tokens = _Resampler(model).eval()(features) if model.config.use_resampler else features
            visual = tokens.reshape(1, -1, tokens.shape[-1])  # [1, 2 * tokens_per_image, width]
            if spec.name == "cross_kv":
                return {"visual_tokens": visual.numpy()}
            inputs = host_prompt(builder, [photos[0], VALIDATION_PROMPT[1], photos[1], VALIDATION_PROMPT[3]])
            feeds = decoder_feeds(torch.from_numpy(inputs["embeds"]), torch.from_numpy(inputs["mask"]), None,
                                  spec.kv_cache)
            feeds = {k: v.numpy() for k, v in feeds.items()}
            context = {"image_attention_mask": inputs["image_attention_mask"]}
            if spec.cached:
                kv = _CrossKV(model).eval()(visual)
                context |= {CROSS_NAME % (i // 2, "key" if i % 2 == 0 else "value"): t.numpy() for i,
                            t in enumerate(kv)}
            else:
                context["visual_tokens"] = visual.numpy()
        merged = {**feeds, **context}
        return {name: merged[name] for name in spec.inputs}

    def calibration_feeds(self, spec, builder, progress):
        from mmedge.export.calibration import calibration_paths, pixel_feeds

        paths, note = calibration_paths(builder.options.calibration)
        feeds = progress.items(pixel_feeds(builder.preprocessor, paths), len(paths), "calibration image")
        if spec.name == "vision":
            return feeds, note
        if spec.name == "image_context":  # one prompt of one image per calibration image
            return ({"pixel_values": feed["pixel_values"][None]} for feed in feeds), note
        vision = _session(builder.fp32_paths["vision"], builder.options.threads)
        return ({"image_features": vision.run(["image_features"],
                                              feed)[0]} for feed in feeds), note + " through FP32 vision"

    # --- fidelity of quantized graphs ------------------------------------------------------------
    def quantized_fidelity(self, run, fp32: dict[str, Path], quantized: dict[str, Path], builder) -> dict[str, dict]:
        """Encoders: output cosine on held-out photos. Decoder: prefill logits cosine and greedy identity vs
        FP32 on held-out photos × prompts, both fed the FP32 encoders' cross K/V."""
        from mmedge.export.calibration import fidelity_paths, holdout_images

        options = builder.options
        photos, _ = fidelity_paths(options)
        measured: dict[str, dict] = {}
        pixels = builder.preprocessor(holdout_images(photos))  # [views, 3, height, width]
        if "image_context" in fp32:
            feeds = {"image_context": {"pixel_values": pixels[:4][None]}}  # [1 prompt, 4 images, 3, H, W]
        else:
            feeds = {"vision": {"pixel_values": pixels}}
            features = run(fp32["vision"], feeds["vision"])["image_features"]
            feeds["resampler"] = {"image_features": features}
            tokens = run(fp32["resampler"], feeds["resampler"])["visual_tokens"] if "resampler" in fp32 else features
            feeds["cross_kv"] = {"visual_tokens": tokens[:4].reshape(1, -1, tokens.shape[-1])}
        for name in (n for n in ENCODERS if n in quantized):
            measured[name] = gate_fidelity(name, _encoder_fidelity_of(name, run, fp32[name], quantized[name],
                                                                      feeds[name]),
                                           "embedding_cosine_mean", options.min_quantized_cosine, "outputs",
                                           encoder_fix(builder, name))
        if "decoder" in quantized:
            measured["decoder"] = gate_fidelity("decoder", self._decoder_fidelity(fp32, quantized, builder, photos),
                                                "logits_cosine_mean", float(self.setting(options, "min_logits_cosine")),
                                                "logits", llm_fix(options))
        return measured

    def _decoder_fidelity(self, fp32, quantized, builder, paths) -> dict:
        from mmedge.export.calibration import load_calibration_image
        from mmedge.generation import GenerationConfig, generate

        options, loaded = builder.options, builder.loaded
        photos = [load_calibration_image(p) for p in paths[: int(self.setting(options, "fidelity_images"))]]
        entry, fp32_table = builder.written["embeddings"], builder.written["fp32_table"]
        table = _load_table(builder.stage / EMBEDDINGS_FILE, entry)
        sessions = {name: _session(path, options.threads) for name, path in fp32.items() if name != "decoder"}
        inputs = host_inputs(builder, lambda name, feeds: _outputs(sessions[name], feeds))  # FP32 encoders, both sides
        decoders = [(host_decoder(builder, fp32["decoder"], fp32_table), fp32_table),
                    (host_decoder(builder, quantized["decoder"], table), table)]
        config = GenerationConfig(**{k: v for k, v in generation_settings(loaded).items()
                                     if k in GENERATION_FIELDS or k.endswith("_token_id")}
                                  | {"max_new_tokens": int(self.setting(options, "fidelity_max_new_tokens")),
                                     "num_beams": 1, "do_sample": False})
        cosines, identical, common = [], [], []
        prompts = fidelity_prompts(self.setting(options, "fidelity_prompts"))
        for prompt in prompts:
            built = inputs.build([_with_photos(prompt, photos, start) for start in range(len(photos))])
            runs = []
            for decoder, rows in decoders:  # each side embeds the prompt with its own table
                embeds = np.asarray(rows[built["ids"]], dtype=np.float32)  # [batch, tokens, hidden]
                logits = _prefill_logits(decoder, built | {"embeds": embeds})  # [batch, tokens, vocab]
                decoder.set_context(built["prefill"], built["step"])
                runs.append((logits, generate(decoder, embeds, built["mask"], config)))
            (ref_logits, ref_tokens), (act_logits, act_tokens) = runs
            cosines += cosine_rows(ref_logits, act_logits).tolist()
            for a, b in zip(ref_tokens, act_tokens):
                identical.append(a == b)
                common.append(common_prefix(a, b) / max(len(a), 1))
        return {"reference": "onnx-fp32", "precision": options.llm_precision or options.precision,
                "held_out_images": len(photos), "prompts": [" ".join(p) for p in prompts],
                "sequences": len(identical), "logits_cosine_min": float(min(cosines)),
                "logits_cosine_mean": float(np.mean(cosines)), "greedy_identical_share": float(np.mean(identical)),
                "greedy_common_prefix_share": float(np.mean(common)), "max_new_tokens": config.max_new_tokens,
                "embeddings": entry["storage"], "generation_loop": "mmedge.generation"}


# --- helpers -------------------------------------------------------------------------------------
def fidelity_prompts(value) -> tuple:
    """The decoder's fidelity prompts (``fidelity_prompts`` setting, None: ``FIDELITY_PROMPTS``), checked."""
    from mmedge.errors import InputError

    if value is None:
        return FIDELITY_PROMPTS
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(p, (list, tuple)) and p and all(isinstance(i, str) for i in p) for p in value)
            or not all("{image}" in p for p in value)):
        raise InputError(f"fidelity_prompts is {value!r}",
                         'a non-empty list of prompts, each a list of strings with at least one "{image}" item',
                         'pass e.g. [["{image}", "An image of"]], or leave the setting out')
    return tuple(tuple(p) for p in value)


def _with_photos(prompt: tuple, photos: list, start: int) -> list:
    """``prompt`` with its k-th "{image}" replaced by photo ``start + k`` (cyclically)."""
    items, k = [], 0
    for item in prompt:
        if item == "{image}":
            items.append(photos[(start + k) % len(photos)])
            k += 1
        else:
            items.append(item)
    return items


def _encoder_fidelity_of(name: str, run, fp32: Path, quantized: Path, feeds: dict) -> dict:
    """Cosine of every output of the quantized encoder vs FP32 on the same inputs (rows: first axis)."""
    reference, actual = run(fp32, feeds), run(quantized, feeds)
    cosines = np.concatenate([cosine_rows(reference[k].reshape(len(reference[k]), -1),
                                          actual[k].reshape(len(actual[k]), -1)) for k in reference])
    return {"reference": "onnx-fp32", "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "outputs": sorted(reference), "embedding_cosine_min": float(cosines.min()),
            "embedding_cosine_mean": float(cosines.mean())}


def _prefill_logits(decoder, inputs: dict) -> np.ndarray:
    """Logits at every prompt position ``[batch, tokens, vocab]`` (the decoder graph run once, empty cache)."""
    from mmedge.generation.decoder import position_ids
    from mmedge.generation.kv_layout import LOGITS_POSITIONS

    layout, mask = decoder.kv, inputs["mask"]
    empty = np.zeros((mask.shape[0], layout["heads"], 0, layout["head_dim"]), dtype=np.float32)
    feeds = {"inputs_embeds": inputs["embeds"], "attention_mask": mask,
             "position_ids": position_ids(mask, mask.shape[1]), LOGITS_POSITIONS: every_position(*mask.shape).numpy(),
             **inputs["prefill"]}
    feeds |= {layout["past"] % (i, kind): empty for i in range(layout["layers"]) for kind in ("key", "value")}
    return decoder.session.run(["logits"], feeds)[0]


def embedding_table(model) -> np.ndarray:
    """Base + additional token embeddings as one float32 ``[vocab + additional, hidden]`` table."""
    embed = model.model.embed_tokens
    rows = [embed.weight.detach().float().cpu().numpy()]
    if getattr(embed, "additional_embedding", None) is not None:
        rows.append(embed.additional_embedding.weight.detach().float().cpu().numpy())
    return np.concatenate(rows, axis=0)


def _prompt_settings(builder) -> dict:
    """The manifest's ``idefics`` settings the device prompt builder reads (before the manifest exists)."""
    return IdeficsFamily().manifest_extras(builder.loaded, builder.options, builder.written)["idefics"]


def host_inputs(builder, run=None):
    """The device's own prompt builder (``FlamingoInputs``) on the host, with the FP32 table; ``run(name, feeds)``
    runs an encoder (not needed for ``prompt_ids``)."""
    from mmedge.pipelines.interleaved import FlamingoInputs

    settings = _prompt_settings(builder)
    return FlamingoInputs(settings, builder.tokenizer, builder.preprocessor, run, builder.written["fp32_table"],
                          settings["decoder"]["max_positions"])


def host_prompt(builder, items: list) -> dict:
    """Token ids, mask, embeddings (FP32 table) and image mask of one prompt, as the device builds them."""
    from mmedge.pipelines.interleaved import image_attention_mask

    inputs = host_inputs(builder)
    ids, images = inputs.prompt_ids(items)
    fmt = inputs.format
    seen = image_attention_mask(ids, fmt["image_token_id"], fmt["eos_token_id"], max(len(images), 1))
    return {"ids": ids[None], "mask": np.ones((1, ids.shape[0]), dtype=np.int64),
            "embeds": inputs.embeddings[ids][None].astype(np.float32), "image_attention_mask": seen[None]}


def _outputs(session, feeds: dict) -> dict:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def host_decoder(builder, path: Path, table: np.ndarray):
    """An ``OrtDecoder`` over a decoder graph (no IO binding), fed the graph's own context inputs."""
    from mmedge.generation.kv_layout import context_inputs
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    layout = _prompt_settings(builder)["decoder"]["kv_cache"]
    session = _session(path, builder.options.threads)
    return OrtDecoder(session, table, layout, io_binding=False,
                      context_inputs=context_inputs([i.name for i in session.get_inputs()], layout))
