"""Read a source's next chunks in a background thread while the trainer steps on the current one.

Training on the fly alternates two compute-bound stages: the LLM forward that makes a chunk of
activations and the SAE steps that consume it. Run one after the other, their rates combine as
a harmonic mean; `prefetched` runs the source in a thread (torch releases the GIL inside its
kernels) so the forward of the next chunk overlaps the steps on this one, and tokens/s
approaches the slower stage's rate where there are cores for both.

The queue holds at most `depth` chunks: with the one being made and the one being trained on,
memory stays bounded at depth + 2 chunks however fast the producer is. A producer exception
is raised in the consumer (the trainer sees the source's own error, never a hang); closing the
consumer (a finished, cancelled or paused training) stops the producer after its current chunk
and closes the underlying iterator, so Parquet readers and the model are released.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import torch

_ITEM, _END, _ERROR = "item", "end", "error"
_POLL_S = 0.1  # how often a producer blocked on a full queue checks whether the consumer left


def prefetched(source: Callable[[int], Iterable[Any]], depth: int = 1, threads: int | None = None
               ) -> Callable[[int], Iterator[Any]]:
    """`source` (a callable `source(start)` yielding chunks, see core.train.Source) with its chunks
    made in a background thread, at most `depth` ahead of the consumer, in the same order.
    `threads` sets torch's intra-op threads of the producer thread (None: torch's default):
    on a CPU both stages compete for the same cores, see README "Training on the fly"."""
    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")

    def src(start: int) -> Iterator[Any]:
        return ahead(lambda: source(start), depth, threads)

    return src


def ahead(make: Callable[[], Iterable[Any]], depth: int = 1, threads: int | None = None) -> Iterator[Any]:
    """The items of `make()`, produced in a background thread at most `depth` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(msg: tuple[str, Any]) -> bool:
        """Hand `msg` over, waiting for room; False when the consumer has gone."""
        while not stop.is_set():
            try:
                q.put(msg, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = None
        try:
            if threads is not None:
                torch.set_num_threads(threads)  # per thread under OpenMP: the consumer keeps its own
            it = iter(make())
            for item in it:
                if not put((_ITEM, item)):
                    return
            put((_END, None))
        except BaseException as e:  # noqa: BLE001 - every failure goes to the consumer, who raises it
            put((_ERROR, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - the stream is over; its own error was handed over
                    pass

    worker = threading.Thread(target=produce, name="mistudio-prefetch", daemon=True)
    return _consume(q, stop, worker)


def _consume(q: queue.Queue, stop: threading.Event, worker: threading.Thread) -> Iterator[Any]:
    worker.start()
    try:
        while True:
            kind, item = q.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
