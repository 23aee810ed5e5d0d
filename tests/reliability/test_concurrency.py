"""Concurrency: one loaded pipeline shared by 8 threads gives exactly the results of serial calls.

Classification runs the full 8 threads x 200 calls. Captioning runs 8 threads x 50 calls in CI: a
Captioner serializes generation (one KV cache), so 8 x 200 tiny captions (~3 ms each plus thread hand-offs)
would add ~6 s to CI while exercising nothing the 400 calls do not; MMEDGE_FULL_CONCURRENCY=1 runs 8 x 200
(benchmarks/RESULTS.md records that run). Inputs mix paths, encoded bytes, PIL images and arrays, several
label sets (built concurrently into the label-bank cache of a freshly loaded classifier) and every
generation mode (greedy, beam, sampling under a seed, VQA, streaming).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import mmedge

THREADS = 8
CLASSIFY_CALLS = 200
CAPTION_CALLS = 200 if os.environ.get("MMEDGE_FULL_CONCURRENCY") else 50
LABEL_SETS = [["cat", "dog", "car"], ["rocket", "astronaut", "moon", "star"], ["coffee", "tea"]]


def inputs(photos: list[str]) -> list:
    """Eight images in every source kind: two paths, then bytes, PIL images and arrays of small photos."""
    small = [Image.open(p).convert("RGB").resize((56, 40)) for p in photos[:6]]
    png = io.BytesIO()
    small[0].save(png, "PNG")
    return [photos[0], Path(photos[1]), png.getvalue(), small[1], small[2].convert("L"), np.asarray(small[3]),
            np.asarray(small[4]).astype(np.float32) / 255, small[5]]


def run_threads(work: Callable[[int, int], object], calls: int) -> list[list]:
    """``work(thread, call)`` from THREADS threads started together; the results per thread, errors re-raised."""
    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        try:
            start.wait()
            for call in range(calls):
                results[thread].append(work(thread, call))
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_classifier_shared_by_8_threads_equals_serial(clip_artifacts, photos):
    images = inputs(photos)
    cases = [(i, j) for i in range(len(images)) for j in range(len(LABEL_SETS))]

    def choose(thread: int, call: int) -> tuple[int, int]:
        return cases[(thread * 7 + call * 5) % len(cases)]

    with mmedge.load(clip_artifacts("fp32"), threads=1) as serial:
        expected = {(i, j): serial(images[i], labels=LABEL_SETS[j]) for i, j in cases}
    with mmedge.load(clip_artifacts("fp32"), threads=1) as shared:  # fresh: its label banks are built concurrently
        results = run_threads(lambda t, c: (choose(t, c), shared(images[choose(t, c)[0]],
                                                                 labels=LABEL_SETS[choose(t, c)[1]])), CLASSIFY_CALLS)
    assert sum(len(r) for r in results) == THREADS * CLASSIFY_CALLS
    for per_thread in results:
        for case, got in per_thread:
            assert got == expected[case], case  # exact: same labels, same float scores


def test_embedder_shared_by_8_threads_equals_serial(clip_artifacts, photos):
    images = inputs(photos)
    with mmedge.load(clip_artifacts("fp32"), task="embed", threads=1) as embedder:
        expected = [embedder.embed_images(image) for image in images]
        results = run_threads(lambda t,
                              c: ((t + c) % len(images), embedder.embed_images(images[(t + c) % len(images)])), 25)
    for per_thread in results:
        for index, got in per_thread:
            np.testing.assert_array_equal(got, expected[index])


MODES = {
    "greedy": lambda cap, image: cap.caption(image, max_new_tokens=6),
    "beam": lambda cap, image: cap.caption(image, max_new_tokens=5, num_beams=2),
    "sampled": lambda cap, image: cap.caption(image, max_new_tokens=5, do_sample=True, top_p=0.9, seed=3),
    "vqa": lambda cap, image: cap.ask(image, "what is it?", max_new_tokens=4),
    "stream": lambda cap, image: "".join(cap.stream(image, max_new_tokens=6)),
}


def test_captioner_shared_by_8_threads_equals_serial(blip2_artifact, photos):
    images = inputs(photos)
    cases = [(i, mode) for i in range(len(images)) for mode in MODES]

    def choose(thread: int, call: int) -> tuple[int, str]:
        return cases[(thread * 11 + call * 3) % len(cases)]

    with mmedge.load(blip2_artifact, threads=1) as captioner:
        expected = {(i, mode): MODES[mode](captioner, images[i]) for i, mode in cases}
        results = run_threads(lambda t, c: (choose(t, c), MODES[choose(t, c)[1]](captioner, images[choose(t, c)[0]])),
                              CAPTION_CALLS)
    assert sum(len(r) for r in results) == THREADS * CAPTION_CALLS
    for per_thread in results:
        for case, got in per_thread:
            assert got == expected[case], case


@pytest.mark.parametrize("task", ["zero-shot", "caption"])
def test_close_while_other_threads_call_gives_typed_errors_only(clip_artifacts, blip2_artifact, photos, task):
    """Closing a pipeline under running threads: calls either succeed or raise an mmedge error, never crash."""
    from mmedge.errors import MmedgeError

    path = clip_artifacts("fp32") if task == "zero-shot" else blip2_artifact
    pipeline = mmedge.load(path, threads=1)
    call = (lambda: pipeline(photos[0], labels=["cat", "dog"])) if task == "zero-shot" else (
        lambda: pipeline.caption(photos[0], max_new_tokens=3))
    outcomes: list[str] = []

    def work(thread: int, index: int) -> None:
        if thread == 0 and index == 5:
            pipeline.close()
        try:
            call()
            outcomes.append("ok")
        except MmedgeError:
            outcomes.append("typed error")

    run_threads(work, 20)
    assert "typed error" in outcomes and set(outcomes) <= {"ok", "typed error"}
