"""What the torch-backend tests share: loading a random-weight artifact without its warning, a captioner's prompt
as the decoder sees it, and the tiny BLIP-2's decoder on torch beside its ONNX Runtime reference."""

from __future__ import annotations

import warnings

import mmedge
from mmedge.artifact import Artifact


def load_quietly(path, **kwargs):
    """``mmedge.load`` without the random-weights warning (the tiny artifacts come from random weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mmedge.load(path, **kwargs)


def prompt(captioner, photos, rows: int = 2):
    """(inputs_embeds [rows, seq, hidden], attention_mask [rows, seq]) of the captioner's caption prompt."""
    built = captioner.inputs.for_images(photos[:rows], None, 0)
    return built["embeds"], built["mask"]


def blip2_decoder_pair(folder):
    """The tiny BLIP-2 on ONNX Runtime (the reference) and its decoder on torch (CPU FP32, cache blocks of 8)."""
    from mmedge.runtimes.torch_decoder import create_decoder

    return load_quietly(folder), create_decoder(Artifact.open(folder), device="cpu", cache_block=8)
