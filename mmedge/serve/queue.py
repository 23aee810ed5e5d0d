"""The requests each artifact takes: at most ``--workers`` run at once, at most ``--max-queue`` wait for a turn, and
the next is answered 503 with ``Retry-After`` (an estimate from recent durations), whatever the artifact's kind.

- A captioning artifact (``GenerationQueue``): a ``Captioner`` owns one KV cache and serializes its generations, so an
  artifact served with ``--workers N`` has N captioners, each generating in its own thread. A generation runs
  ``pipeline.stream(...)`` in a worker thread that hands each piece of text to the event loop. When the request goes
  away (the client disconnected mid-stream, or the handler failed) the thread stops at the next token and closes the
  stream, which frees its captioner for the next request in the queue.
- A CLIP artifact (``CallQueue``): its one pipeline may be called by any number of threads at once, but each call holds
  its request's decoded images (up to --max-images of --max-image-pixels each), so its calls are bounded alike: left
  unbounded, a few concurrent requests of large images took gigabytes.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from mmedge.serve.errors import ApiError

Call = Callable[[object], Iterator[str]]  # pipeline -> the pieces of its answer (a Captioner's stream())
T = TypeVar("T")


class Admission:
    """One artifact's turns (``slots``: its captioners, or numbered turns of its shared CLIP pipeline): a request takes
    a free one, or waits for one if fewer than ``max_queue`` wait already, or is refused 503 ``queue_full``."""

    doing = "running"  # what a request holding a slot does, in the 503's message

    def __init__(self, model_id: str, slots: list, max_queue: int):
        self.model_id = model_id
        self.slots = list(slots)
        self.max_queue = max_queue
        self.waiting = 0
        self._free: asyncio.Queue = asyncio.Queue()
        for slot in self.slots:
            self._free.put_nowait(slot)
        self._seconds = 1.0  # moving average of a request's duration, for Retry-After

    @property
    def running(self) -> int:
        return len(self.slots) - self._free.qsize()

    async def _take(self):
        """A free slot, once there is one; 503 at once when the queue is full."""
        if self._free.empty() and self.waiting >= self.max_queue:
            raise self._full()
        self.waiting += 1
        try:
            return await self._free.get()  # a cancelled wait leaves the queue as it was
        finally:
            self.waiting -= 1

    def _give(self, slot, seconds: float) -> None:
        self._seconds = 0.8 * self._seconds + 0.2 * seconds
        self._free.put_nowait(slot)

    def _full(self) -> ApiError:
        retry = max(1, math.ceil(self._seconds * (self.waiting + 1) / len(self.slots)))
        return ApiError(503, f"model '{self.model_id}' is busy: {self.running} {self.doing}, {self.waiting} waiting",
                        f"at most {self.max_queue} waiting requests (this server's --max-queue)",
                        f"retry after {retry} s, or start the server with more --workers or a longer --max-queue",
                        code="queue_full", headers={"Retry-After": str(retry)})


class GenerationQueue(Admission):
    """A captioning artifact's requests: each generates on a captioner of its own, in that captioner's thread."""

    doing = "generating"

    def __init__(self, model_id: str, pipelines: list, max_queue: int):
        super().__init__(model_id, pipelines, max_queue)
        self.pipelines = self.slots
        self._threads = ThreadPoolExecutor(max_workers=len(self.pipelines), thread_name_prefix=f"mmedge-{model_id}")
        self.on_done: Callable[[str], None] = lambda outcome: None  # "finished", "cancelled" or "failed" (metrics)

    async def stream(self, call: Call) -> AsyncIterator[str]:
        """The pieces of one generation, after waiting for a captioner; 503 at once when the queue is full."""
        pipeline = await self._take()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(kind: str, value) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        started = time.perf_counter()
        job = loop.run_in_executor(self._threads, _produce, pipeline, call, emit, stop)
        job.add_done_callback(lambda done: self._release(pipeline, time.perf_counter() - started, done.result()))
        try:
            while True:
                kind, value = await events.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()  # the request is over (done, failed or gone): the thread stops at its next token

    def _release(self, pipeline, seconds: float, outcome: str) -> None:
        self._give(pipeline, seconds)
        self.on_done(outcome)

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for pipeline in self.pipelines:
            pipeline.close()


class CallQueue(Admission):
    """A CLIP artifact's requests: ``workers`` calls of its shared pipeline run at once, each in a worker thread."""

    def __init__(self, model_id: str, workers: int, max_queue: int):
        super().__init__(model_id, list(range(workers)), max_queue)

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` in a worker thread once a turn is free; 503 at once when the queue is full."""
        slot = await self._take()
        started = time.perf_counter()
        try:  # the thread is not abandoned on cancellation (anyio's default): the turn is given back once it ends
            return await run_in_threadpool(call)
        finally:
            self._give(slot, time.perf_counter() - started)


def _produce(pipeline, call: Call, emit: Callable[[str, object], None], stop: threading.Event) -> str:
    """Worker thread: run one generation, hand over its pieces, stop early when asked; returns how it ended."""
    outcome = "finished"
    try:
        pieces = call(pipeline)
        try:
            for piece in pieces:
                emit("piece", piece)
                if stop.is_set():
                    outcome = "cancelled"
                    break
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # a Captioner's stream() releases its decoder here
        emit("end", None)
    except Exception as exc:  # handed to the request, which answers it; the thread serves the next one
        emit("error", exc)
        outcome = "failed"
    return outcome
