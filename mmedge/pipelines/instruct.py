"""InstructBLIP: captioning and VQA where the prompt (the instruction) also goes to the Q-Former, tokenized by its
own tokenizer (the manifest's ``qformer_tokenizer``, right-padded as ``InstructBlipProcessor`` pads). A caption
without a prompt uses the manifest's ``prompts.caption`` instruction. ``InstructCaptioner`` for a decoder-only LLM
(Vicuna: BLIP-2's ``Captioner``), ``InstructSeq2SeqCaptioner`` for Flan-T5 (``Seq2SeqCaptioner``)."""

from __future__ import annotations

import numpy as np

from mmedge.manifest import family_section
from mmedge.pipelines.captioner import Captioner
from mmedge.pipelines.seq2seq import Seq2SeqCaptioner
from mmedge.tokenizer import TextTokenizer


class _Instruction:
    """The Q-Former's tokens of the prompts, as the prefix's ``qformer_input_ids`` / ``qformer_attention_mask``."""

    def _load_qformer_tokenizer(self, artifact) -> None:
        entry = family_section(artifact.manifest)["qformer_tokenizer"]
        field = f"{artifact.manifest['family']}.qformer_tokenizer.file"
        self.qformer_tokenizer = TextTokenizer.from_file(artifact.verified_path(entry["file"], entry["sha256"], field),
                                                         entry)

    def _prefix_inputs(self, prompts: list) -> dict[str, np.ndarray]:
        ids, mask = self.qformer_tokenizer.encode(prompts)  # [batch, tokens] each, right-padded
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    def _default_prompt(self, prompt: str | None) -> str | None:
        return self.settings["prompts"]["caption"] if prompt is None else prompt


class InstructCaptioner(_Instruction, Captioner):
    def __init__(self, artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        self._load_qformer_tokenizer(artifact)
        super().__init__(artifact, runners, preprocessor, tokenizer, decoder, embeddings)


class InstructSeq2SeqCaptioner(_Instruction, Seq2SeqCaptioner):
    def __init__(self, artifact, runners: dict, preprocessor, tokenizer, decoder, embeddings):
        self._load_qformer_tokenizer(artifact)
        super().__init__(artifact, runners, preprocessor, tokenizer, decoder, embeddings)
