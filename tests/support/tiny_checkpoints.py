"""Tiny, randomly initialised Hugging Face checkpoints for tests, built offline in about a second.

Each maker writes a folder laid out exactly like a published checkpoint (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json, preprocessor_config.json), so tests go
through the same loading path a real model takes. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from train_demo_models import byte_alphabet, learn_merges  # noqa: E402  (the demo tokenizers' BPE pieces)

# English caption-like text the tiny BPE learns its merges from: common words become one or a few
# pieces, rarer words split into several.
CAPTION_CORPUS = """
a photo of a cat sitting on a wooden table next to a cup of coffee
a photo of a dog running across the green grass in a sunny park
two people riding bicycles down a city street at night
an astronaut floating in space above the blue earth
a red brick wall with a small window and a white door
a horse standing in a field of tall yellow grass
a rocket launching into the sky with a cloud of smoke
a close up photo of coins on a dark background
a plate of food with rice, vegetables and grilled chicken
a clock on the tower of an old stone building
a bowl of fruit on the kitchen counter beside the window
children playing football on the beach near the ocean
a black and white photo of a train station in the rain
the quick brown fox jumps over the lazy dog
this is a picture of a bird flying over the water
a person holding an umbrella while walking in the snow
there is a car parked in front of the house
a group of friends eating pizza at a restaurant
the mountains are covered with snow under a clear sky
a painting of flowers in a glass vase
"""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def make_tiny_clip(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    projection_dim: int = 16,
    layers: int = 2,
    heads: int = 2,
    max_position_embeddings: int = 77,
) -> Path:
    """Write a random-weight CLIP checkpoint (model, CLIP tokenizer, image processor) into ``path``.

    Returns the folder. Loadable offline with ``CLIPModel.from_pretrained``,
    ``AutoTokenizer.from_pretrained`` and ``AutoImageProcessor.from_pretrained``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_clip_tokenizer()
    config = transformers.CLIPConfig(
        text_config=_text_config(tokenizer, hidden, layers, heads, max_position_embeddings),
        vision_config=dict(
            hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(path)
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def make_tiny_clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` laid out like openai/clip-vit-base-patch32's, with a small vocab.

    Vocab order follows the real one: the 256 byte-level characters, the same with "</w>", one token
    per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last. Padding uses ``<|endoftext|>``.
    """
    merges = _learn_merges(CAPTION_CORPUS, num_merges=300)
    vocab = _build_vocab(merges)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _text_config(tokenizer, hidden: int, layers: int, heads: int, max_positions: int) -> dict:
    """The text tower's config, with vocab size and special ids taken from ``tokenizer``."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges (words end in "</w>") on ``corpus`` with CLIP's pre-tokenization.

    A plain, deterministic BPE: repeatedly merge the most frequent adjacent pair, ties broken by
    the pair's text (``tokenizers``' BpeTrainer breaks ties differently from run to run).
    """
    return learn_merges(Counter(tuple(word[:-1]) + (word[-1] + END_OF_WORD,) for word in _pre_tokenize(corpus)),
                        num_merges)


def _pre_tokenize(corpus: str) -> list[str]:
    """Split ``corpus`` into byte-level words exactly as CLIPTokenizer does before BPE."""
    backend = transformers.CLIPTokenizer()._tokenizer  # CLIP's normalizer and pre-tokenizer
    normalized = backend.normalizer.normalize_str(corpus)
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte characters, their end-of-word forms, merge results, then the two special tokens."""
    tokens = byte_alphabet()
    tokens += [char + END_OF_WORD for char in tokens]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


# --- BLIP-2 --------------------------------------------------------------------------------------
# Layout of OPT's vocabulary (fairseq order): four special tokens first, then the byte-level BPE.
OPT_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
OPT_BOS = OPT_EOS_TOKEN = "</s>"  # OPT starts every text with </s>
OPT_PAD, OPT_UNK = "<pad>", "<unk>"
IMAGE_TOKEN = "<image>"
NEWLINE_TOKEN = "Ċ"  # GPT-2's byte-level "\n"; BLIP-2 OPT checkpoints stop generating at it (eos 50118)
VQA_CORPUS = """
Question: what is it? Answer: a cat
Question: what is in the picture? Answer: a dog on the grass
Question: what color is the sky? Answer: blue
Question: how many people are there? Answer: two
"""


def make_tiny_blip2(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    qformer_hidden: int = 32,
    llm_hidden: int = 64,
    llm_layers: int = 2,
    llm_heads: int = 4,
    num_query_tokens: int = 6,
    max_position_embeddings: int = 128,
) -> Path:
    """Write a random-weight BLIP-2 (ViT, Q-Former, OPT) laid out like Salesforce/blip2-opt-2.7b into ``path``.

    As in the published checkpoint (transformers ≥ 4.47 layout): the tokenizer is OPT's GPT-2 byte-level
    BPE with ``<s>``=0, ``<pad>``=1, ``</s>``=2 (also bos), ``<unk>``=3 and an added special ``<image>``
    token whose id is ``config.image_token_index``; the processor inserts ``num_query_tokens`` of them
    before ``</s>`` + prompt; text generation stops at the newline token (as 50118 does for OPT) and
    the embedding matrix is padded past the tokenizer to a multiple of 64. Loads offline with
    ``Blip2ForConditionalGeneration``, ``Blip2Processor``, ``AutoTokenizer`` and ``AutoImageProcessor``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_opt_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    newline_id = tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size, initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=qformer_hidden, intermediate_size=qformer_hidden * 4, num_hidden_layers=2,
            num_attention_heads=2,
            cross_attention_frequency=2, max_position_embeddings=64, vocab_size=32,
        ),
        text_config=transformers.OPTConfig(
            vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=llm_hidden, word_embed_proj_dim=llm_hidden,
            ffn_dim=llm_hidden * 4, num_hidden_layers=llm_layers, num_attention_heads=llm_heads,
            max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=newline_id, pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    _spread_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=newline_id, pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    image_processor = transformers.BlipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3,  # bicubic, as BLIP-2 checkpoints
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    image_processor.save_pretrained(path)
    processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            num_query_tokens=num_query_tokens)
    processor.save_pretrained(path)
    return path


def make_tiny_opt_tokenizer():
    """A GPT-2 byte-level BPE tokenizer laid out like facebook/opt's, plus BLIP-2's ``<image>`` token.

    Vocab: ``<s> <pad> </s> <unk>``, the 256 byte characters, one token per learned merge, then
    ``<image>`` as an added special token. ``</s>`` is prepended to every text, as OPT's tokenizer does.
    """
    merges = _learn_byte_level_merges(CAPTION_CORPUS + VQA_CORPUS, num_merges=300)
    tokens = list(OPT_SPECIAL_TOKENS) + byte_alphabet()
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = transformers.GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token=OPT_BOS, eos_token=OPT_EOS_TOKEN, unk_token=OPT_UNK,
        pad_token=OPT_PAD, add_bos_token=True, add_prefix_space=False, errors="replace",
    )
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tokenizer


def _learn_byte_level_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges (GPT-2 style: spaces become "Ġ" and start words, no end-of-word suffix)."""
    from tokenizers import pre_tokenizers

    words = [w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(corpus)]
    return learn_merges(Counter(tuple(word) for word in words), num_merges)


def _spread_weights(model, seed: int, encoder_std: float = 0.2, llm_std: float = 0.3) -> None:
    """Re-draw every weight matrix wider than HF's init, so the tiny model behaves like a trained one.

    With HF's init (std 0.02, vision 1e-10, zero query tokens) the prefix barely depends on the image
    and greedy decoding repeats one token; with these the prefix differs per image, captions vary,
    and the top two logits are far apart (0.2 to 2 at the first step), so float noise does not flip greedy choices.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "query_tokens":
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() == 2:
                std = llm_std if name.startswith("language_model.") else encoder_std
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _write_separate_lm_head(path: Path, seed: int, std: float) -> None:
    """Give the saved T5 checkpoint in ``path`` an LM head of its own (``language_model.lm_head.weight``), as every
    Flan-T5 has: transformers 5 builds T5 with the head tied to the shared embeddings whatever
    ``tie_word_embeddings`` says, so ``save_pretrained`` writes none; loading a checkpoint that holds both, with
    different values, keeps them apart (transformers warns and does not tie), as it does for the published models."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(str(file))
    shared = weights["language_model.shared.weight"]  # [vocab, d_model]
    generator = torch.Generator().manual_seed(seed + 1)
    weights["language_model.lm_head.weight"] = torch.randn(shared.shape, generator=generator) * std
    save_file(weights, str(file), metadata={"format": "pt"})


IDEFICS_SPECIAL_TOKENS = ("<fake_token_around_image>", "<image>")  # ids vocab_size, vocab_size + 1 (additional vocab)
IDEFICS_CORPUS = CAPTION_CORPUS + VQA_CORPUS + """
an image of two cats. an image of a dog. an image of
"""


def make_tiny_llama_tokenizer(corpus: str = IDEFICS_CORPUS, num_merges: int = 200):
    """A Llama-style tokenizer (``<unk>``=0, ``<s>``=1, ``</s>``=2, metaspace "▁" words, byte fallback off)
    with a small BPE learned from ``corpus``, and IDEFICS' image tokens added after the base vocabulary."""
    words = [w.replace(" ", "▁") for w in corpus.replace("\n", " ").split(" ") if w]
    counts = Counter(tuple("▁" + w) for w in words)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in counts:
        for ch in word:
            vocab.setdefault(ch, len(vocab))
    merges = learn_merges(counts, num_merges)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = transformers.LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<unk>")
    tokenizer.add_tokens([transformers.AddedToken(t, normalized=False, special=True) for t in IDEFICS_SPECIAL_TOKENS],
                         special_tokens=True)
    return tokenizer


def make_tiny_idefics(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    cross_layer_interval: int = 2,
    latents: int = 6,
    qk_layer_norms: bool = True,
    max_position_embeddings: int = 256,
) -> Path:
    """Write a random-weight IDEFICS (Flamingo-style: CLIP-like ViT, Perceiver Resampler, Llama with gated
    cross-attention every ``cross_layer_interval`` layers) laid out like HuggingFaceM4/idefics-9b.

    The tokenizer's base vocabulary is the model's ``vocab_size``; ``<fake_token_around_image>`` and
    ``<image>`` are the two additional (decoupled) embeddings, as in the published checkpoint. The
    cross-attention gates start at random values instead of the published init's zeros, so the images
    change the text. Loads offline with ``IdeficsForVisionText2Text`` and ``IdeficsProcessor``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_llama_tokenizer()
    base_vocab = len(tokenizer) - len(IDEFICS_SPECIAL_TOKENS)
    config = transformers.IdeficsConfig(
        vocab_size=base_vocab, additional_vocab_size=len(IDEFICS_SPECIAL_TOKENS), hidden_size=hidden,
        intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=heads,
        cross_layer_interval=cross_layer_interval, qk_layer_norms=qk_layer_norms,
        alpha_initializer="normal", alpha_type="vector", alphas_initializer_range=1.0,
        max_position_embeddings=max_position_embeddings, use_resampler=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        vision_config=dict(embed_dim=vision_hidden, image_size=image_size, patch_size=patch_size,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=vision_hidden * 4),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=latents, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=16),
    )
    torch.manual_seed(seed)
    model = transformers.IdeficsForVisionText2Text(config).eval()
    _spread_idefics_weights(model, seed)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(path)
    image_processor = transformers.IdeficsImageProcessor(image_size=image_size)
    processor = transformers.IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(path)
    return path


def _spread_idefics_weights(model, seed: int, std: float = 0.15) -> None:
    """Wider weights than HF's init (as ``_spread_weights``), so images and text both move the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 or name.endswith("latents"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "alpha" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


# --- BLIP-2 with Flan-T5 ---------------------------------------------------------------------------
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in google/flan-t5-*


def make_tiny_t5_tokenizer(corpus: str = CAPTION_CORPUS + VQA_CORPUS):
    """A ``transformers.T5Tokenizer`` (SentencePiece Unigram in tokenizers' format) laid out like google/flan-t5's:
    ``<pad>``=0, ``</s>``=1 (appended to every text), ``<unk>``=2, then "▁"-prefixed words and single characters of
    ``corpus``, scored by frequency so whole words win over their pieces."""
    words = Counter("▁" + w for w in corpus.split())
    chars = Counter(ch for word, n in words.items() for ch in word for _ in range(n))
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in T5_SPECIAL_TOKENS]
    pieces += [(word, -1.0 - 1.0 / n) for word, n in sorted(words.items())]
    pieces += [(ch, -8.0 - 1.0 / n) for ch, n in sorted(chars.items()) if ch not in words]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def make_tiny_blip2_t5(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    qformer_hidden: int = 32,
    d_model: int = 64,
    layers: int = 2,
    heads: int = 4,
    num_query_tokens: int = 6,
) -> Path:
    """Write a random-weight BLIP-2 with a Flan-T5 language model (ViT, Q-Former, T5 encoder-decoder with gated-GELU
    feed-forward, untied LM head) laid out like Salesforce/blip2-flan-t5-xl into ``path``.

    As in the published checkpoint: a T5 tokenizer (``</s>`` appended, no BOS, right padding) with BLIP-2's
    ``<image>`` added, ``config.image_token_index`` its id; the decoder starts from ``<pad>`` (0) and stops at
    ``</s>`` (1). Loads offline with ``Blip2ForConditionalGeneration`` and ``Blip2Processor``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_t5_tokenizer()
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size, initializer_range=0.02,
        ),
        qformer_config=dict(
            hidden_size=qformer_hidden, intermediate_size=qformer_hidden * 4, num_hidden_layers=2,
            num_attention_heads=2, cross_attention_frequency=2, max_position_embeddings=64, vocab_size=32,
        ),
        text_config=transformers.T5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 2,
            num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, tie_word_embeddings=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    # T5 attention has no 1/sqrt(d) scaling (its init shrinks the queries instead): narrower LLM weights than OPT's
    # keep the attention from being near one-hot, which no trained model is and which BF16 rounding cannot follow
    _spread_weights(model, seed, llm_std=0.12)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    model.save_pretrained(path)
    _write_separate_lm_head(path, seed, std=0.12)
    image_processor = transformers.BlipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = transformers.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                            num_query_tokens=num_query_tokens)
    processor.save_pretrained(path)
    return path


# --- InstructBLIP with Flan-T5 ---------------------------------------------------------------------------
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_tiny_bert_tokenizer(corpus: str = CAPTION_CORPUS + VQA_CORPUS):
    """A ``transformers.BertTokenizer`` (WordPiece, lower case) laid out like bert-base-uncased's, the Q-Former's
    tokenizer: ``[PAD]``=0 then the special tokens, the corpus' words, and single characters as "##" pieces."""
    words = sorted({w.strip("?:,.").lower() for w in corpus.split()} - {""})
    chars = sorted({c for w in corpus.lower().split() for c in w})
    tokens = list(BERT_SPECIAL_TOKENS) + words + chars + ["##" + c for c in chars if "##" + c not in words]
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))})


def make_tiny_instructblip_t5(path: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                              vision_hidden: int = 32, qformer_hidden: int = 32, d_model: int = 64, layers: int = 2,
                              heads: int = 4, num_query_tokens: int = 6) -> Path:
    """Write a random-weight InstructBLIP with Flan-T5 (ViT, a Q-Former that also reads the instruction's BERT
    tokens, T5) laid out like Salesforce/instructblip-flan-t5-xl into ``path``: the LLM's T5 tokenizer with
    ``<image>`` at the root, the Q-Former's BERT tokenizer in ``qformer_tokenizer/``, as ``InstructBlipProcessor``
    saves them. Loads offline with ``InstructBlipForConditionalGeneration`` and ``InstructBlipProcessor``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_t5_tokenizer()
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    qformer_tokenizer = make_tiny_bert_tokenizer()
    config = transformers.InstructBlipConfig(
        **_instructblip_encoders(image_size, patch_size, vision_hidden, qformer_hidden, len(qformer_tokenizer)),
        text_config=transformers.T5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_model * 2,
            num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, tie_word_embeddings=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    _spread_weights(model, seed, llm_std=0.12)  # as make_tiny_blip2_t5
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    model.save_pretrained(path)
    _write_separate_lm_head(path, seed, std=0.12)
    _save_instructblip_processor(path, image_size, tokenizer, qformer_tokenizer, num_query_tokens)
    return path


def make_tiny_instructblip(path: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                           vision_hidden: int = 32, qformer_hidden: int = 32, hidden: int = 64, layers: int = 2,
                           heads: int = 4, num_query_tokens: int = 6) -> Path:
    """Write a random-weight InstructBLIP with a Llama-family LLM (as Salesforce/instructblip-vicuna-7b: Llama
    tokenizer with BOS, ``<image>`` added; the Q-Former's BERT tokenizer in ``qformer_tokenizer/``) into ``path``.
    Loads offline with ``InstructBlipForConditionalGeneration`` and ``InstructBlipProcessor``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_llama_tokenizer()
    tokenizer.add_tokens([transformers.AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    qformer_tokenizer = make_tiny_bert_tokenizer()
    config = transformers.InstructBlipConfig(
        **_instructblip_encoders(image_size, patch_size, vision_hidden, qformer_hidden, len(qformer_tokenizer)),
        text_config=transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False,
        ),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(seed)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    _spread_weights(model, seed, llm_std=0.12)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(path)
    _save_instructblip_processor(path, image_size, tokenizer, qformer_tokenizer, num_query_tokens)
    return path


def _instructblip_encoders(image_size: int, patch_size: int, vision_hidden: int, qformer_hidden: int,
                           qformer_vocab: int) -> dict:
    """The tiny InstructBLIP vision tower and instruction-reading Q-Former configs (both LLM kinds share them)."""
    return {
        "vision_config": dict(
            hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size, initializer_range=0.02,
        ),
        "qformer_config": dict(
            hidden_size=qformer_hidden, intermediate_size=qformer_hidden * 4, num_hidden_layers=2,
            num_attention_heads=2, cross_attention_frequency=2, max_position_embeddings=64,
            vocab_size=qformer_vocab, pad_token_id=0,
        ),
    }


def _save_instructblip_processor(path: Path, image_size: int, tokenizer, qformer_tokenizer,
                                 num_query_tokens: int) -> None:
    """``InstructBlipProcessor.save_pretrained``: the LLM tokenizer at the root, the Q-Former's BERT tokenizer in
    ``qformer_tokenizer/``, BLIP's image processor with CLIP's normalisation."""
    image_processor = transformers.BlipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    transformers.InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       qformer_tokenizer=qformer_tokenizer,
                                       num_query_tokens=num_query_tokens).save_pretrained(path)
