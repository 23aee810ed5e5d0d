"""Tiny, randomly initialised Hugging Face checkpoints for tests, built offline in about a second.

Each maker writes a folder laid out exactly like a published checkpoint (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json, preprocessor_config.json), so tests go
through the same loading path a real model takes. Nothing is downloaded.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import transformers

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


def _byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE stands bytes in for, in CLIP's vocab order (GPT-2's bytes_to_unicode).

    Printable bytes map to themselves and come first; the others map to chr(256 + n), in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def _learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges (words end in "</w>") on ``corpus`` with CLIP's pre-tokenization.

    A plain, deterministic BPE: repeatedly merge the most frequent adjacent pair, ties broken by
    the pair's text (``tokenizers``' BpeTrainer breaks ties differently from run to run).
    """
    words = Counter(tuple(word[:-1]) + (word[-1] + END_OF_WORD,) for word in _pre_tokenize(corpus))
    merges = []
    while len(merges) < num_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    return merges


def _pre_tokenize(corpus: str) -> list[str]:
    """Split ``corpus`` into byte-level words exactly as CLIPTokenizer does before BPE."""
    backend = transformers.CLIPTokenizer()._tokenizer  # CLIP's normalizer and pre-tokenizer
    normalized = backend.normalizer.normalize_str(corpus)
    return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``word`` with every occurrence of the adjacent ``pair`` joined into one symbol."""
    merged, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte characters, their end-of-word forms, merge results, then the two special tokens."""
    tokens = _byte_alphabet()
    tokens += [char + END_OF_WORD for char in tokens]
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}
