"""Discovery's running state over a stream of batches: per latent its exact top-k examples, a
uniform sample of its firing tokens (the quantile reservoir), an exact activation histogram and
firing counts — with `update(batch)`, `merge(other)` and `finalize()`.

Every non-pad token position is a candidate (not one example per sequence). Tokens whose
activation norm is an outlier (see DESIGN.md: a handful of SmolLM2 tokens have norms ~100× the
median) are kept out of the tables and the statistics and listed separately.

Merging is associative: the tables keep "the n largest keys of everything seen" (see
core/features/tables.py), the histogram and counts add, the maximum takes the maximum and the
outliers concatenate. Two accumulators over the two halves of a stream therefore merge into the
state of one pass over the whole stream, with two precise caveats:
* the quantile reservoir's keys are random numbers drawn from one seeded stream in batch
  order. The merge is exact for the keys drawn — the reservoir of the union is the top-S keys
  of the two reservoirs — so when the second half continues the first half's key stream
  (`key_state`), the merged reservoir is the one-pass reservoir; with independently seeded
  halves it is a different, equally uniform sample of the firing tokens;
* the activation sums are float64 additions in another order, equal to the last bits only up
  to rounding (the written mean is float32).
Both halves must use the same outlier cut: pass `max_norm` (jobs pass training's cut) rather
than a cut measured on each half's first batch.

Memory is bounded whatever the token count (`state_bytes` gives the figure). The state is
allocated once, at the start: with S = top_k + n_quantiles·quantile_examples slots per latent,
W = window_before + 1 + window_after and M = n_coactive + 1, the tables hold
d_sae · S · (28 + 8·W + 8·M) bytes, and the histogram and counts d_sae · (8·(len(HIST_EDGES)+1) + 20).
The defaults (S 70, W 13, M 9: 204 bytes a slot) give ≈ 14.9 KB a latent: 69 MB at 4,608
latents, 0.97 GB at 65,536. On top, per batch: one block of a TopK SAE's pre-activations
(`batch.ENCODE_BLOCK_BYTES`, 128 MiB; a dense SAE's whole [tokens, d_sae] z instead) and
O(tokens · k) for its firing pairs; while writing, one block of `writer.WRITE_LATENTS` latents'
rows. Only the outlier list grows with the data (a few numbers per excluded token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from core.errors import UserError
from core.features.batch import Acts, BatchView, as_tensors, best_per_row, gather, outlier_rows, token_index
from core.features.config import Batch, DiscoverConfig
from core.features.schema import HIST_EDGES
from core.features.tables import (Table, by_key, contenders, empty_table, merge_documents, merge_tables, merge_winners,
                                  per_token_top, slot_bytes)


class Discovered(NamedTuple):
    """The finished state, what the writer turns into the feature tables."""

    top: Table
    """Top examples, each latent's slots in descending activation."""
    sample: Table | None
    """The quantile reservoir (None when quantiles are off); slots in no particular order."""
    n_fired: torch.Tensor
    """[d_sae] firing tokens per latent."""
    sum_act: torch.Tensor
    """[d_sae] float64 sum of activations over firing tokens."""
    max_act: torch.Tensor
    """[d_sae] largest activation."""
    hist: torch.Tensor
    """[d_sae, len(HIST_EDGES) + 1] exact activation counts per bin."""
    tokens: int
    """Token positions scored (non-pad, outliers excluded)."""
    seen: int
    """Non-pad token positions, outliers included."""
    outliers: list[dict]
    """Per batch with outliers, the excluded tokens and their strongest latents (numpy arrays)."""


def state_bytes(d_sae: int, cfg: DiscoverConfig) -> int:
    """Bytes of an accumulator's running state for `d_sae` latents (see the module docstring)."""
    w = cfg.window_before + 1 + cfg.window_after
    m = min(cfg.n_coactive + 1, d_sae) if cfg.n_coactive else 1
    slots = cfg.top_k + cfg.reservoir
    return d_sae * slots * slot_bytes(w, m) + d_sae * (8 * (len(HIST_EDGES) + 1) + 8 + 8 + 4)


class Accumulator:
    """The running state of discovery for one SAE and config."""

    def __init__(self, sae, cfg: DiscoverConfig, key_state: torch.Tensor | None = None):
        """`key_state`: a generator state (`key_state()` of another accumulator) to continue its
        stream of reservoir keys instead of starting from `cfg.seed`."""
        cfg.check()
        self.sae, self.cfg = sae, cfg
        self.device = device = next(sae.parameters()).device
        self.d_sae = d_sae = int(sae.W_dec.shape[0])
        w = cfg.window_before + 1 + cfg.window_after
        # +1: the latent itself is among its token's strongest
        self.m = m = min(cfg.n_coactive + 1, d_sae) if cfg.n_coactive else 1
        self.top = empty_table(d_sae, cfg.top_k, w, m, device)
        self.sample = empty_table(d_sae, cfg.reservoir, w, m, device) if cfg.reservoir else None
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        if key_state is not None:
            self.gen.set_state(key_state)
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        self.hist = torch.zeros(d_sae * (len(HIST_EDGES) + 1), dtype=torch.long, device=device)
        self.n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.sum_act = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(d_sae, device=device)
        self.threshold = cfg.max_norm
        self.outliers: list[dict] = []
        self.scratch: dict = {}  # buffers reused from batch to batch (the encoder's pre-activations)
        self.tokens = self.seen = self.n_batches = 0

    def key_state(self) -> torch.Tensor:
        """Where this accumulator's stream of reservoir keys stands (see `__init__`)."""
        return self.gen.get_state()

    @torch.no_grad()
    def update(self, batch: Batch) -> int:
        """Score one batch; returns its non-pad token count (0: nothing to score)."""
        input_ids, mask, row_ids, acts, doc_ids = as_tensors(batch, self.device)
        self.n_batches += 1
        b_idx, t_idx, pos_map, whole = token_index(batch[1], self.device)
        if len(b_idx) == 0:
            return 0
        # rows without padding (the usual case) are a view, not a copy
        x = (acts.reshape(-1, acts.shape[-1]) if whole else acts[b_idx, t_idx]).float()
        acts_z = Acts(self.sae, x, self.scratch)
        norms = x.norm(dim=1)
        if self.threshold is None:
            multiple = self.cfg.outlier_norm_multiple
            self.threshold = float(norms.median()) * multiple if multiple else float("inf")
        ok = norms <= self.threshold  # NaN norms compare False: non-finite tokens are excluded too
        self.seen += len(x)
        cand = ok.nonzero().squeeze(1)
        if len(cand) < len(x):
            self.outliers.append(outlier_rows(acts_z.rows(~ok), ~ok, norms, b_idx, t_idx, input_ids, row_ids))
        if len(cand):
            self._score(acts_z, cand, (b_idx, t_idx, pos_map, input_ids, row_ids, doc_ids))
        return len(b_idx)

    def _score(self, acts_z: Acts, cand: torch.Tensor, tokens: tuple) -> None:
        """Fold the candidate tokens `cand` of a batch into the tables and the statistics."""
        cfg, device = self.cfg, self.device
        # Everything below reads only the firing (token, latent) entries: a TopK SAE has
        # k per token, so this is O(n·k) work instead of passes over [n, d_sae].
        tok, lat, val = acts_z.pairs(cand)
        n = len(tokens[0])
        if cfg.n_coactive:
            co_i, co_v = per_token_top(tok, lat, val, n, self.m)
        else:
            co_i, co_v = torch.full((n, 1), -1, dtype=torch.int32, device=device), torch.zeros((n, 1), device=device)
        view = BatchView(acts_z, *tokens, co_i, co_v)
        win = (cfg.window_before, cfg.window_after)
        if cfg.one_per_document:
            keys, flat = best_per_row(view, tok, lat, val, cfg.top_k)
            every = torch.arange(self.d_sae, device=device)[:, None].expand_as(flat)
            self.top = merge_documents(self.top, {"key": keys, **gather(view, every, flat, *win)}, cfg.top_k)
        else:
            rows, keys, entry = contenders(self.top["key"], lat, val, cfg.top_k)
            self.top = merge_winners(self.top, rows, keys, tok[entry.clamp_min(0)], view, *win)
        if self.sample is not None:
            # uniform random keys on firing pairs: the reservoir keeps the top-S keys
            rand = torch.rand(val.shape, generator=self.gen, device=device)
            rows, rk, entry = contenders(self.sample["key"], lat, rand, cfg.reservoir)
            self.sample = merge_winners(self.sample, rows, rk, tok[entry.clamp_min(0)], view, *win)
        self.n_fired += torch.bincount(lat, minlength=self.d_sae)
        self.sum_act.index_add_(0, lat, val.double())
        self.max_act = self.max_act.scatter_reduce(0, lat, val, "amax")
        bins = torch.bucketize(val, self.edges)
        self.hist.index_add_(0, lat * (len(HIST_EDGES) + 1) + bins, torch.ones_like(bins))
        self.tokens += len(cand)

    @torch.no_grad()
    def merge(self, other: Accumulator) -> Accumulator:
        """Fold in the state of `other` (the same SAE width and config, a later or disjoint part of
        the stream); returns self. Reservoir keys drawn after a merge continue self's stream."""
        if other.cfg != self.cfg or other.d_sae != self.d_sae:
            raise UserError("only accumulators of the same SAE width and discovery config merge")
        if self.threshold is None:
            self.threshold = other.threshold
        elif other.threshold is not None and other.threshold != self.threshold:
            raise UserError(f"accumulators with different outlier cuts ({self.threshold} and {other.threshold}) "
                            "do not merge: give both the same max_norm")
        if self.cfg.one_per_document:
            self.top = merge_documents(self.top, other.top, self.cfg.top_k)
        else:
            self.top = merge_tables(self.top, other.top)
        if self.sample is not None:
            self.sample = merge_tables(self.sample, other.sample)
        self.hist += other.hist
        self.n_fired += other.n_fired
        self.sum_act += other.sum_act
        self.max_act = torch.maximum(self.max_act, other.max_act)
        self.outliers += other.outliers
        self.tokens += other.tokens
        self.seen += other.seen
        self.n_batches += other.n_batches
        return self

    def finalize(self) -> Discovered:
        """The state as the writer takes it (the top slots sorted by activation)."""
        return Discovered(by_key(self.top), self.sample, self.n_fired, self.sum_act, self.max_act,
                          self.hist.view(self.d_sae, -1), self.tokens, self.seen, list(self.outliers))
