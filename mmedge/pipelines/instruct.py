"""InstructBLIP: captioning and VQA where the prompt (the instruction) also goes to the Q-Former, tokenized by its
own tokenizer (the manifest's ``qformer_tokenizer``, right-padded as ``InstructBlipProcessor`` pads). A caption
without a prompt uses the manifest's ``prompts.caption`` instruction. The input builders: ``InstructPrefixInputs``
for a decoder-only LLM (Vicuna: BLIP-2's ``PrefixInputs``), ``InstructSeq2SeqInputs`` for Flan-T5
(``Seq2SeqInputs``); ``InstructCaptioner`` is the ``Captioner`` that gives them the Q-Former's tokenizer."""

from __future__ import annotations

import numpy as np

from mmedge.pipelines.captioner import Captioner
from mmedge.pipelines.prefix_inputs import PrefixInputs
from mmedge.pipelines.seq2seq import Seq2SeqInputs
from mmedge.tokenizer import TextTokenizer


class _Instruction:
    """The Q-Former's tokens of the prompts, as the prefix's ``qformer_input_ids`` / ``qformer_attention_mask``;
    ``qformer_tokenizer`` beside the parent builder's arguments."""

    def __init__(self, *args, qformer_tokenizer: TextTokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.qformer_tokenizer = qformer_tokenizer

    def prefix_inputs(self, prompts: list) -> dict[str, np.ndarray]:
        texts = [self.default_prompt(p) for p in prompts]
        ids, mask = self.qformer_tokenizer.encode(texts)  # [batch, tokens] each, right-padded
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}


class InstructPrefixInputs(_Instruction, PrefixInputs):
    pass


class InstructSeq2SeqInputs(_Instruction, Seq2SeqInputs):
    pass


class InstructCaptioner(Captioner):
    """A ``Captioner`` whose input builder also gets the Q-Former's tokenizer (the manifest's ``qformer_tokenizer``,
    its file checked against its sha256)."""

    def _input_builder(self, settings: dict, tokenizer, preprocessor, embeddings, **extra):
        entry = settings["qformer_tokenizer"]
        field = f"{self.artifact.manifest['family']}.qformer_tokenizer.file"
        qformer = TextTokenizer.from_file(self.artifact.verified_path(entry["file"], entry["sha256"], field), entry)
        return super()._input_builder(settings, tokenizer, preprocessor, embeddings, qformer_tokenizer=qformer, **extra)
