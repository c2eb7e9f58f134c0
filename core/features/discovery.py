"""The discovery driver: an SAE's features over a stream of batches, from the accumulator to
the written folder, with progress and cancellation."""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import torch

from core.errors import Cancelled
from core.features.accumulator import Accumulator
from core.features.config import Batch, DiscoverConfig, DiscoverySummary
from core.features.writer import write


@torch.no_grad()
def discover(
    sae,
    batches: Iterable[Batch],
    out_dir: str | os.PathLike,
    decode_tokens: Callable[[list[int]], list[str]],
    cfg: DiscoverConfig,
    total_tokens: int | None = None,
    progress: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> DiscoverySummary:
    """Exact per-latent top-k examples, quantile samples, histograms and firing statistics over
    every non-pad token of `batches`, written into the features folder `out_dir`."""
    acc = Accumulator(sae, cfg)
    t0 = time.perf_counter()
    for batch in batches:
        if should_cancel is not None and should_cancel():
            raise Cancelled("discovery cancelled")
        if acc.update(batch) and progress is not None:
            progress(_progress(acc, total_tokens, t0))
    return write(out_dir, acc.finalize(), decode_tokens, cfg)


def _progress(acc: Accumulator, total: int | None, t0: float) -> dict:
    elapsed = time.perf_counter() - t0
    seen = acc.seen
    rate = seen / elapsed if elapsed > 0 else 0.0
    held = acc.top["value"] > 0
    return {
        "phase": "discover",
        "done": seen,
        "total": total,
        "unit": "tokens",
        "samples_per_s": rate,
        "eta_s": (total - seen) / rate if total and rate else None,
        "batches": acc.n_batches,
        "features_in_heap": int(held.any(1).sum()),
        "heap_examples_count": int(held.sum()),
    }
