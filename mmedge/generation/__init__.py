"""Text generation for captioning and VQA, in numpy: greedy, beam search and sampling over a decoder
that owns its KV cache.

    from mmedge.generation import GenerationConfig, generate, generate_text, stream
    config = GenerationConfig.from_dict(manifest["generation"])
    ids = generate(decoder, inputs_embeds, attention_mask, config)          # [[new token ids], ...]
    for piece in stream(decoder, inputs_embeds, None, config, tokenizer):   # text as it arrives
        print(piece, end="")

``decoder`` is any :class:`Decoder`: the one its backend opened (``OrtDecoder`` on ONNX Runtime, ``RunnerDecoder`` over
a TensorRT engine, ``TorchDecoder`` on torch; see ``mmedge.backends.Backend.open_decoder``).
"""

from mmedge.generation.config import MAX_NEW_TOKENS_CAP, GenerationConfig
from mmedge.generation.decoder import Decoder, position_ids
from mmedge.generation.search import StreamEnd, TextDecoder, TextStream, generate, generate_text, pad_rows, stream

__all__ = [
    "MAX_NEW_TOKENS_CAP",
    "Decoder",
    "GenerationConfig",
    "StreamEnd",
    "TextDecoder",
    "TextStream",
    "generate",
    "generate_text",
    "pad_rows",
    "position_ids",
    "stream",
]
