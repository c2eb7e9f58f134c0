"""Activation sources for training: cached activation folders or the model run on the fly,
datasets mixed, the held-out slice kept aside, and the token budget fixed from the pass size.

A source is a callable `source(start_chunk)` (see core.train); `cached_training` and
`live_training` build one with its held-out token count for a train job, and `train_runs`
trains and saves the SAEs of one pass.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from core import data, extract, hooks
from core.data import TokenBatch
from core.errors import UserError
from core.formats.saelens import save_saelens
from core.sae import SAEConfig
from core.train.checkpoints import CheckpointConfig
from core.train.config import RunSpec, TrainConfig, TrainResult
from core.train.loop import Source, replayable, train_saes
from core.train.prefetch import prefetched

Progress = Callable[[dict], None] | None
CancelCheck = Callable[[], bool] | None


def train_on_activations(hook_dir: Path, out_dir: Path, cfg: TrainConfig, meta: dict[str, Any],
                         progress: Progress = None, should_cancel: CancelCheck = None
                         ) -> tuple[TrainResult, SAEConfig]:
    """Train one SAE on cached activations and save it as a SAELens folder.

    `meta` fills the cfg.json metadata: model_name, hook_name, context_size, dataset_path.
    """
    hook = meta.get("hook_name") or "x"
    stats = extract.read_hook_stats(hook_dir)
    run = RunSpec("sae", hook, stats.d_model, _with_budget(cfg, stats.tokens))
    result = train_runs(cached_source({hook: [hook_dir]}), [run], {"sae": out_dir}, {"sae": meta},
                        progress=progress, should_cancel=should_cancel)["sae"]
    return result, result.sae.config(**meta)

def cached_training(hook_dirs: dict[str, list[Path]], runs: list[RunSpec], eval_rows: int
                    ) -> tuple[Source, list[RunSpec], int]:
    """Source, runs with their token budgets fixed, and held-out tokens for training on cached
    activations, holding out the first `eval_rows` rows of the first dataset."""
    holdout = holdout_tokens(hook_dirs[runs[0].hook_name][0], eval_rows)
    passes = {h: sum(extract.count_activations(d) for d in dirs) - holdout for h, dirs in hook_dirs.items()}
    runs = [r._replace(cfg=_with_budget(r.cfg, passes[r.hook_name])) for r in runs]
    return cached_source(hook_dirs, lead_tokens=holdout), runs, holdout

LIVE_PREFETCH = 1
"""Forward batches the model runs ahead of the trainer when training on the fly (the queue's
bound; with the batch being made and the one being trained on, 3 batches of activations at most)."""


def live_training(model, tokenizer, dataset_dirs: list[Path], runs: list[RunSpec], eval_rows: int,
                  batch_size: int = 8, max_tokens: int | None = None,
                  exclude_token_ids: Sequence[int] = (), prefetch: int = LIVE_PREFETCH,
                  forward_threads: int | None = None) -> tuple[Source, int]:
    """Source and held-out tokens for training on the fly (the model runs as the trainer reads).
    With `prefetch` > 0 the forward of the next batches runs in a background thread, at most
    `prefetch` batches ahead, while the SAEs step on the current one (core.train.prefetch);
    `forward_threads` sets that thread's torch threads. 0 runs the two one after the other."""
    holdout = row_tokens(dataset_dirs[0], eval_rows, exclude_token_ids)
    hook_names = list(dict.fromkeys(r.hook_name for r in runs))
    source = model_source(model, dataset_dirs, hook_names, tokenizer.pad_token_id, batch_size, max_tokens,
                          lead_tokens=holdout, exclude_token_ids=exclude_token_ids)
    if prefetch > 0:
        source = prefetched(source, prefetch, forward_threads)
    return source, holdout

def row_tokens(dataset_dir: Path, rows: int, exclude_token_ids: Sequence[int] = ()) -> int:
    """Real tokens in the dataset's first `rows` rows, not counting excluded token ids."""
    if rows <= 0:
        return 0
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
    return sum(int((b.attention_mask.bool() & ~torch.isin(b.input_ids, excluded)).sum())
               for b in data.iter_batches(dataset_dir, 256, 0, max_rows=rows))

def special_positions(dataset_dirs: Sequence[Path], max_tokens: int | None, exclude_token_ids: Sequence[int]) -> int:
    """Positions of `exclude_token_ids` in one pass over the datasets (each read up to
    `max_tokens`, as `model_source` reads them): what training on the fly leaves out. Reads
    token ids only, no forward."""
    if not exclude_token_ids:
        return 0
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)
    return sum(int((b.attention_mask.bool() & torch.isin(b.input_ids, excluded)).sum())
               for d in dataset_dirs for b in data.iter_batches(d, 256, 0, max_tokens=max_tokens))

def _with_budget(cfg: TrainConfig, pass_tokens: int) -> TrainConfig:
    """Fix total_tokens from a known pass size: spares the trainer a counting pass."""
    if cfg.total_tokens is None:
        cfg = dataclasses.replace(cfg, total_tokens=pass_tokens * cfg.epochs)
    return cfg

def train_runs(source: Source, runs: list[RunSpec], out_dirs: dict[str, Path], metas: dict[str, dict[str, Any]], *,
               holdout_tokens: int = 0, checkpoint: CheckpointConfig | None = None,
               progress: Progress = None, should_cancel: CancelCheck = None,
               requested: Callable[[], str] | None = None) -> dict[str, TrainResult]:
    """Train several SAEs from one pass of `source`; save each as a SAELens folder in out_dirs[name],
    its cfg.json stating the norm threshold when the norm guard was on.
    `requested` may pause or finalize the training (see core.train.train_saes)."""
    results = train_saes(source, runs, progress=progress, should_cancel=should_cancel,
                         holdout_tokens=holdout_tokens, checkpoint=checkpoint, requested=requested)
    for name, result in results.items():
        threshold = result.final.get("outlier_norm_threshold")
        guard = {"outlier_norm_threshold": threshold} if threshold is not None and math.isfinite(threshold) else {}
        save_saelens(result.sae, result.sae.config(**(metas[name] | guard)), out_dirs[name])
    return results

def cached_source(hook_dirs: dict[str, list[Path]], chunk_tokens: int = 4096, lead_tokens: int = 0) -> Source:
    """A training source over cached activations: {hook: [one folder per dataset]}.

    Datasets are mixed chunk by chunk, round-robin, after the first `lead_tokens` tokens of the
    first dataset (the held-out slice, so it comes from one dataset's first rows). The folders
    of one dataset must come from the same extraction, so their tokens line up across hooks.
    """
    hooks_ = list(hook_dirs)
    n_sets = {len(dirs) for dirs in hook_dirs.values()}
    if len(n_sets) != 1:
        raise UserError("every hook needs activations from the same datasets; extract each hook on each dataset")
    n = n_sets.pop()
    for i in range(n):
        counts = {h: extract.count_activations(hook_dirs[h][i]) for h in hooks_}
        if len(set(counts.values())) != 1:
            raise UserError(f"the activation sets of dataset {i + 1} hold different token counts {counts}; "
                            "use hooks extracted together in one extraction job")

    def dataset(i: int) -> Iterator[dict[str, np.ndarray]]:
        its = [extract.iter_activations(hook_dirs[h][i], chunk_tokens) for h in hooks_]
        for arrays in zip(*its):
            yield dict(zip(hooks_, arrays))

    return replayable(lambda: _interleave([dataset(i) for i in range(n)], lead_tokens))

def model_source(model, dataset_dirs: list[Path], hook_names: list[str], pad_token_id: int, batch_size: int = 8,
                 max_tokens: int | None = None, lead_tokens: int = 0,
                 exclude_token_ids: Sequence[int] = ()) -> Source:
    """A training source that runs the model on the fly (no activation cache): one chunk per
    token batch, datasets mixed batch by batch like `cached_source`. Skipped chunks on resume
    cost no forward pass."""
    hooks.validate_hooks(model, hook_names)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)

    def dataset(d: Path) -> Iterator[TokenBatch]:
        return data.iter_batches(d, batch_size, pad_token_id, max_tokens=max_tokens)

    def src(start: int) -> Iterator[dict[str, np.ndarray]]:
        batches = _interleave([dataset(d) for d in dataset_dirs], lead_tokens, size=_batch_tokens)
        for i, b in enumerate(batches):
            if i < start:
                continue
            mask = b.attention_mask.bool() & ~torch.isin(b.input_ids, excluded)
            with torch.no_grad():
                acts = hooks.run_hooked(model, b.input_ids, b.attention_mask, hook_names)
            yield {h: a[mask.to(a.device)].cpu().numpy() for h, a in acts.items()}

    return src

def _batch_tokens(b: TokenBatch) -> int:
    return int(b.attention_mask.sum())

def _first_len(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values())))

def _interleave(iterators: list[Iterator], lead_tokens: int, size: Callable[[Any], int] = _first_len) -> Iterator:
    """The first iterator until `lead_tokens` have passed, then all of them round-robin."""
    if not iterators:
        raise UserError("no datasets to train on; give at least one")
    first, led = iterators[0], 0
    while led < lead_tokens:
        item = next(first, None)
        if item is None:
            break
        led += size(item)
        yield item
    live = list(iterators)
    while live:
        for it in list(live):
            item = next(it, None)
            if item is None:
                live.remove(it)
            else:
                yield item

def holdout_tokens(hook_dir: Path, rows: int) -> int:
    """Cached tokens that belong to the first `rows` rows of the dataset (the held-out slice)."""
    n = 0
    if rows <= 0:
        return 0
    for shard in sorted(Path(hook_dir).glob("shard-*.parquet")):
        ids = pq.read_table(shard, columns=["row_id"]).column(0).to_numpy()
        n += int((ids < rows).sum())
        if len(ids) and ids[-1] >= rows:
            break
    return n

def default_eval_rows(dataset_rows: int) -> int:
    """Rows held out for evaluation: 5% of the dataset, at least 1 and at most 64."""
    return max(1, min(64, dataset_rows // 20))
