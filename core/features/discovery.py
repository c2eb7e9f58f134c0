"""The discovery driver: an SAE's features over a stream of batches, from the accumulator to
the written folder, with progress and cancellation."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from core.errors import UserError
from core.features.accumulator import Accumulator
from core.features.batch import to_device
from core.features.config import Batch, DiscoverConfig, DiscoverySummary
from core.features.writer import write
from core.progress import check_cancel, rate


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
    excluded_special: Callable[[], int] | None = None,
) -> DiscoverySummary:
    """Exact per-latent top-k examples, quantile samples, histograms and firing statistics over
    every non-pad token of `batches`, written into the features folder `out_dir`.
    `excluded_special()`, asked once the batches are spent, is how many positions the batches
    masked out by token id; discovery.json and the summary record it."""
    acc = Accumulator(sae, cfg)
    t0 = time.perf_counter()
    last = -float("inf")
    reported = 0
    for batch in batches:
        check_cancel(should_cancel, "discovery")
        # the counts read the whole top table (and sync a GPU): at most every PROGRESS_EVERY_S
        if acc.update(batch) and progress is not None and time.perf_counter() - last >= PROGRESS_EVERY_S:
            progress(_progress(acc, total_tokens, t0))
            last, reported = time.perf_counter(), acc.seen
    if progress is not None and acc.seen > reported:
        progress(_progress(acc, total_tokens, t0))
    return write(out_dir, acc.finalize(), decode_tokens, cfg, excluded_special() if excluded_special else 0)


DISCOVERY_BYTES_PER_TOKEN = 4096
"""A token's share of discovery's per-batch working set besides its activations (its firing
pairs, their keys and sort orders, window gathers): an upper bound for k up to ~64."""
PROGRESS_EVERY_S = 1.0
"""Seconds between progress reports (the first batch and the last are always reported)."""


def _progress(acc: Accumulator, total: int | None, t0: float) -> dict:
    """The live numbers: tokens done, rate, and `features_in_heap` (latents holding at least one
    top example) and `heap_examples_count` (top examples held), as the finished summary counts them."""
    held = acc.top["value"] > 0
    return {"phase": "discover", "done": acc.seen, "total": total, "unit": "tokens", **rate(acc.seen, total, t0),
            "batches": acc.n_batches, "features_in_heap": int(held.any(1).sum()),
            "heap_examples_count": int(held.sum())}
def discover_features(model, tokenizer, sae_dir: Path, dataset_dir: Path, out_dir: Path,
                      cfg: DiscoverConfig, batch_size: int = 8, max_tokens: int | None = None,
                      progress: Callable[[dict], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      exclude_token_ids: Sequence[int] = ()) -> DiscoverySummary:
    """Top activating contexts, quantile samples, histograms, co-active latents, frequency and
    max/mean activation for every latent of an SAE.

    Positions holding an `exclude_token_ids` token (BOS, EOS, pad) are no candidates and not in
    the statistics (the model still reads them); the summary's `excluded_special` counts them."""
    from core import data, hooks  # the model side of discovery; the rest of this module needs neither
    from core.formats.saelens import load_saelens
    from core.models.memory import gpu_batch_size

    sae, sae_cfg = load_saelens(sae_dir)
    hook_name = sae_cfg.hook_name
    hooks.validate_hooks(model, [hook_name])
    d_model = model.config.hidden_size
    if sae_cfg.d_in != d_model:
        raise UserError(f"SAE d_in={sae_cfg.d_in} does not match {hook_name} of this model (d_model={d_model}); "
                        "pick the model the SAE was trained on")
    device = next(model.parameters()).device
    sae = sae.to(device)
    total = data.total_tokens(dataset_dir, max_tokens)
    # on a GPU, rows per forward from its free memory: the forward, the hooked copy, and a dense
    # SAE's [tokens, d_sae] activations (a TopK SAE's are encoded in fixed-size blocks)
    per_token = 4 * d_model + (0 if hasattr(sae, "encode_topk") else 4 * sae_cfg.d_sae) + DISCOVERY_BYTES_PER_TOKEN
    batch_size = gpu_batch_size(model, batch_size, data.read_stats(dataset_dir).context_length,
                                hooks.parse_hook_name(hook_name)[0], per_token)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
    special = [0]

    def hooked_batches():
        for b in data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens):
            ids, mask = to_device(b.input_ids, device), to_device(b.attention_mask, device)
            acts = hooks.run_hooked(model, ids, mask, [hook_name])[hook_name]
            is_special = torch.isin(b.input_ids, excluded)
            special[0] += int((b.attention_mask.bool() & is_special).sum())
            yield b.input_ids, b.attention_mask * ~is_special, b.row_ids, acts, b.doc_ids

    with torch.no_grad():
        return discover(sae, hooked_batches(), out_dir, lambda ids: data.decode_tokens(tokenizer, ids), cfg,
                        total_tokens=total, progress=progress, should_cancel=should_cancel,
                        excluded_special=lambda: special[0])
