"""Where IDEFICS-mid's time to first token goes, HF vs mmedge FP32, stage by stage, in one run (issue 19).

HF (PyTorch eager, the model ``flamingo_cpu.py`` measures): the processor, the vision tower over the prompt's two
images, the Perceiver Resampler, and the language model's prefill (the forward given the vision features, minus the
resampler); also the whole first forward as ``generate`` runs it (logits of the last position only). mmedge: the
preprocessing, the fused image graph (vision, resampler and every gated cross-attention layer's K/V) and the decoder's
prefill. A decoder exported since 2026-12-06 takes ``logits_positions`` and the loop asks for the last position only,
as HF's ``logits_to_keep=1`` (an older export computed the logits of every prompt position; the benchmark's export is
redone when it predates the exporter's recipe revision); the output says which the measured graph does. mmedge runs
on ONNX Runtime (``backend="onnxruntime"``), whatever a ``mmedge tune`` record in the shared export would make
``auto`` pick (``flamingo_cpu.py --openvino`` tunes it); the output and JSON name each component's backend. Median
of 7 calls after one warm-up, ``--threads`` each side.

    python benchmarks/flamingo_ttft_split.py      # exports mmedge/idefics-mid FP32 into benchmarks/out once (~30 s)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from flamingo_cpu import MODEL, OUT, photos_and_fp32_export, prompt

from _common import backends_used, machine_info, markdown_table, package_versions, time_call, write_json
from mmedge.cli_args import count


def median_ms(call) -> float:
    return time_call(call, warmup=1, runs=7).median_ms


def measure_hf(photos, threads: int) -> dict[str, float]:
    import torch
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    from mmedge.export.loading import load_checkpoint

    torch.set_num_threads(threads)
    model = (loaded := load_checkpoint(MODEL, random_weights=True, seed=0)).model.eval()
    processor = IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=224), tokenizer=loaded.tokenizer)
    inputs = processor(text=[prompt(photos)], return_tensors="pt")
    pixels = inputs["pixel_values"][0]  # [images, 3, 224, 224]
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_attention_mask")}
    with torch.no_grad():
        features = model.model.vision_model(pixel_values=pixels).last_hidden_state  # [images, patches + 1, width]
        times = {
            "processor": median_ms(lambda: processor(text=[prompt(photos)], return_tensors="pt")),
            "vision": median_ms(lambda: model.model.vision_model(pixel_values=pixels)),
            "resampler": median_ms(lambda: model.model.perceiver_resampler(features)),
            "resampler + prefill": median_ms(lambda: model(**text, image_encoder_embeddings=features[None],
                                                           use_cache=True, logits_to_keep=1)),
            "first forward": median_ms(lambda: model(**inputs, use_cache=True, logits_to_keep=1)),
        }
    times["prefill"] = times["resampler + prefill"] - times["resampler"]
    return times


BACKEND = "onnxruntime"  # pinned: ``auto`` would follow any ``mmedge tune`` record left in the shared export


def measure_mmedge(folder: Path, photos, threads: int) -> tuple[dict[str, float], dict]:
    """(ms per stage, what ran: each component's backend and which prompt positions the prefill's logits cover)."""
    import mmedge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        captioner = mmedge.load(folder, threads=threads, backend=BACKEND)
    with captioner:
        decoder_inputs = captioner.artifact.manifest["components"]["decoder"]["inputs"]
        ran = {"backends": backends_used(captioner),
               "prefill_logits": "last position only" if "logits_positions" in decoder_inputs
               else "every prompt position (an export from before 2026-12-06)"}
        inputs = captioner.inputs
        built = inputs.build([prompt(photos)])
        fused = inputs.settings["image_context"]
        pixels = inputs.prompt_pixels([photos], len(photos))  # [1, images, 3, 224, 224]

        def prefill():
            captioner.decoder.set_context(built["prefill"], built["step"])
            captioner.decoder.start(built["embeds"], built["mask"])

        return {"preprocessing": median_ms(lambda: captioner.preprocessor(photos)),
                "image graph": median_ms(lambda: captioner.runners[fused["component"]].infer({fused["input"]: pixels})),
                "inputs (preprocessing + image graph + embeddings)": median_ms(lambda: inputs.build([prompt(photos)])),
                "prefill": median_ms(prefill)}, ran


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=count, default=2)
    args = parser.parse_args(argv)
    ready = photos_and_fp32_export(args.threads)
    if ready is None:
        return 1
    photos, folder = ready
    hf = measure_hf(photos, args.threads)
    mm, ran = measure_mmedge(folder, photos, args.threads)
    hf_total = hf["processor"] + hf["first forward"]
    mm_total = mm["inputs (preprocessing + image graph + embeddings)"] + mm["prefill"]
    rows = [["preprocessing", f"{hf['processor']:.1f}", f"{mm['preprocessing']:.1f}"],
            ["image side (HF: vision + resampler; mmedge: the fused graph, with the cross K/V)",
             f"{hf['vision'] + hf['resampler']:.1f}", f"{mm['image graph']:.1f}"],
            ["language model prefill", f"{hf['prefill']:.1f}", f"{mm['prefill']:.1f}"],
            ["to the first logits (HF: processor + first forward; mmedge: inputs + prefill)", f"{hf_total:.1f}",
             f"{mm_total:.1f} ({mm_total / hf_total:.2f}x HF)"]]
    print(f"{MODEL}, 2 images, threads={args.threads}; ms, median of 7")
    print(f"mmedge: {ran['backends']}; the prefill's logits: {ran['prefill_logits']}\n")
    print(markdown_table(["stage", "HF PyTorch FP32", "mmedge FP32"], rows))
    write_json(OUT / "flamingo_ttft_split.json", {"model": MODEL, "threads": args.threads, "machine": machine_info(),
                                                  "versions": package_versions(["torch", "transformers",
                                                                                "onnxruntime"]),
                                                  "mmedge": ran, "hf_ms": hf, "mmedge_ms": mm})
    return 0


if __name__ == "__main__":
    sys.exit(main())
