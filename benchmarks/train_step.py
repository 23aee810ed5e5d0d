"""One BLIP-2 training step of `examples/train_demo_models.py`, two ways, on the same batches, in one run:

- full sequences: every caption and question runs whole through the LLM, [query prefix rows, embed(ids)];
- prefix once (what the script does): each image's query rows run once and its sequences continue from copies
  of their KV cache (same loss and gradients; `tests/test_demo.py` checks that).

Each step is forward, backward, gradient clipping and AdamW, as in training, with the demo BLIP-2's shapes and
random weights. Prints the median step time of each and their ratio.

    python benchmarks/train_step.py            # 20 timed steps each, 2 threads
    python benchmarks/train_step.py --quick    # 3 steps each
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from _common import markdown_table, time_call
from mmedge.cli_args import count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_demo_models as training  # noqa: E402


def batches(tokenizer, count: int, images_per_batch: int = 64) -> list[tuple]:
    """``count`` batches as the training loop builds them (``train_demo_models.blip2_batch``): a caption and three
    questions per image."""
    train = training.render("train", 2000)
    rng = np.random.default_rng(0)
    return [training.blip2_batch(tokenizer, train, rng.choice(2000, size=images_per_batch), 3,
                                 rng) for _ in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=count, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    tokenizer = training.make_opt_tokenizer()
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(training.blip2_config(tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batches(tokenizer, 4)
    runs = 3 if args.quick else 20
    rows, medians = [], {}
    for name, loss_fn in (("full sequences", training.full_sequences_loss),
                          ("prefix once per image", training.blip2_loss)):
        position = itertools.count()

        def step():
            loss = loss_fn(model, *data[next(position) % len(data)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        timing = time_call(step, warmup=2, runs=runs)
        medians[name] = timing.median_ms
        rows.append([name, f"{timing.median_ms:.1f} ms", f"{timing.min_ms:.1f} ms"])
    width = data[0][2].shape[1]
    print(f"BLIP-2 training step (demo shapes, 64 images × 4 sequences, ids {width} wide; {args.threads} threads, "
          f"{runs} runs)\n")
    print(markdown_table(["loss", "median step", "fastest step"], rows))
    ratio = medians["full sequences"] / medians["prefix once per image"]
    print(f"\nprefix once per image: {ratio:.2f}× faster per step "
          f"(LLM rows per step {64 * 8 + 256 * width} instead of {256 * (8 + width)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
