"""Feature discovery: for every SAE latent, its exact top activating token positions, a
uniform sample of its firing tokens split into activation quantiles, an exact activation
histogram, and the latents that fire beside it.

Every non-pad token position is a candidate (not one example per sequence). The running
state is a table of [d_sae, n] slots per latent; each batch contributes its own per-latent
best candidates, the two are concatenated and merged with one `torch.topk` on a key — no
per-feature Python heaps. The top table's key is the activation; the quantile reservoir's key
is a uniform random number drawn for each firing (token, latent) pair, so its survivors are a
uniform sample without replacement of the latent's firing tokens (the top-S of i.i.d. keys).
Because the activations are gone after a batch, each candidate carries its context window
(token ids, and that latent's activation at each window position) and the strongest other
latents at its token, gathered vectorized when it enters a table, so they stay aligned.

Tokens whose activation norm is an outlier (see DESIGN.md: a handful of SmolLM2 tokens have
norms ~100× the median) are kept out of the tables and the statistics and listed separately in
`outliers.parquet`.

Outputs (written atomically into `out_dir`):
* `features.parquet`: one row per latent — n_fired, frequency, max_act, mean_act, top_tokens,
  hist_counts (exact counts in the log-spaced bins of discovery.json), below_min_frequency.
* `examples.parquet`: per latent its top rows (kind "top", bin -1, by rank) then its quantile
  rows (kind "quantile", bin 0 = lowest decile ..., by activation), with windows and co-active
  latents, in row groups of about `row_group_latents` latents so a reader can filter by latent.
* `outliers.parquet`: the excluded tokens with their strongest latents.
* `discovery.json`: the config, token counts and the histogram's bin edges.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from core.errors import Cancelled, UserError
from core.io import atomic_dir

Batch = tuple
"""(input_ids LongTensor[B,T], attention_mask LongTensor[B,T], row_ids LongTensor[B], acts FloatTensor[B,T,d_in]
[, doc_ids LongTensor[B]]); without doc_ids every row counts as its own document."""

FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "examples.parquet"
OUTLIERS_FILE = "outliers.parquet"
INFO_FILE = "discovery.json"
TOP_TOKENS = 5  # max-token strings listed per feature
STRING_COLUMNS = ["kind", "tokens.list.element", "top_tokens.list.element"]
"""Columns written dictionary-encoded (repetitive strings); numbers are written plain, which is
faster and, for float activations, no larger."""
FILTER_COLUMNS = ["latent", "kind", "bin"]
"""Columns with row-group statistics: what readers filter on (by latent, then kind)."""
OUTLIER_LATENTS = 10  # strongest latents listed per outlier token
HIST_EDGES = np.round(10.0 ** np.arange(-3.0, 4.0 + 1e-9, 0.1), 10)
"""Activation histogram bin edges: 10 per decade from 1e-3 to 1e4, plus an underflow bin below
and an overflow bin above (len(HIST_EDGES) + 1 counts per latent)."""


@dataclass
class DiscoverConfig:
    """What discovery keeps per latent. The caller picks the batch size: a batch of n non-pad
    tokens is encoded at once into a dense [n, d_sae] fp32 matrix (4096 × 4608 ≈ 75 MB), or for a
    TopK SAE into its (values, indices) [n, k]."""

    top_k: int = 20
    """Examples kept per latent: the exact top activations over every token position."""
    window_before: int = 8
    """Context tokens kept before the max-activating token."""
    window_after: int = 4
    """Context tokens kept after it."""
    max_norm: float | None = None
    """Tokens whose activation norm exceeds this are outliers (excluded from top-k and
    statistics, listed in outliers.parquet). Pass the training run's
    `final["outlier_norm_threshold"]` to use the same cut as training."""
    outlier_norm_multiple: float | None = 10.0
    """When max_norm is None: the cut is this × the median norm of the first batch; None disables."""
    row_group_latents: int = 64
    """Latents per row group of examples.parquet (smaller = finer filtering, more overhead)."""
    n_quantiles: int = 10
    """Quantile bins of each latent's firing distribution (deciles by default); 0 disables."""
    quantile_examples: int = 5
    """Examples per quantile bin: the reservoir holds n_quantiles × quantile_examples tokens."""
    one_per_document: bool = False
    """Top examples hold at most one token per document (its best); quantile samples stay per token."""
    min_frequency: float = 0.0
    """Latents firing on a smaller fraction of tokens keep their statistics but no examples."""
    n_coactive: int = 8
    """Strongest other latents recorded at each example's token (its co-occurring features)."""
    seed: int = 0
    """Seed of the quantile reservoir's random keys: the same data and seed give the same samples."""

    def check(self) -> None:
        if self.top_k < 1 or self.window_before < 0 or self.window_after < 0:
            raise UserError(f"top_k={self.top_k}, window_before={self.window_before}, window_after={self.window_after}: "
                            "use top_k >= 1 and windows >= 0")
        if self.n_quantiles < 0 or self.quantile_examples < 0 or self.n_coactive < 0:
            raise UserError("n_quantiles, quantile_examples and n_coactive must be 0 or more")
        if not 0.0 <= self.min_frequency <= 1.0:
            raise UserError(f"min_frequency={self.min_frequency} must be a fraction between 0 and 1")

    @property
    def reservoir(self) -> int:
        return self.n_quantiles * self.quantile_examples


class DiscoverySummary(NamedTuple):
    n_latents: int
    """d_sae of the SAE."""
    tokens: int
    """Token positions scored (non-pad, outliers excluded); the denominator of frequency."""
    features_in_heap: int
    """Latents with at least one example with activation > 0."""
    heap_examples_count: int
    """Top examples held with activation > 0."""
    live_features: int
    """Latents that fired (activation > 0) on at least one token."""
    paths: dict
    """File name stem → path: features, examples, outliers, info."""
    excluded_outliers: int = 0
    """Non-pad tokens excluded as norm outliers."""
    quantile_examples_count: int = 0
    """Quantile examples held (a uniform sample of firing tokens per latent)."""


Table = dict[str, torch.Tensor]
"""A running per-latent table; every field has leading dims [d_sae, slots]: key (what the merge
ranks by, -inf where empty), value (the activation), row_id, pos, doc, win_tokens [.., W] (-1
outside the row or on padding), win_acts [.., W] (0 there), co_lat / co_val [.., n_coactive+1]."""


def _empty_table(d_sae: int, k: int, w: int, m: int, device: torch.device) -> Table:
    long = lambda *shape: torch.full((d_sae, k, *shape), -1, dtype=torch.long, device=device)
    return {"key": torch.full((d_sae, k), -torch.inf, device=device), "value": torch.zeros((d_sae, k), device=device),
            "row_id": long(), "pos": long(), "doc": long(), "win_tokens": long(w),
            "win_acts": torch.zeros((d_sae, k, w), device=device), "co_lat": long(m),
            "co_val": torch.zeros((d_sae, k, m), device=device)}


class _Acts:
    """A batch's latent activations: a dense z [n, d_sae], or a TopK SAE's own (values,
    indices) [n, k] — read as they are, so no pass over an [n, d_sae] matrix is needed. The
    indices are sorted within each token, so `keys` (token · d_sae + latent) ascend and a
    (token, latent) lookup is a binary search."""

    def __init__(self, sae, x: torch.Tensor):
        self.d_sae = int(sae.W_dec.shape[0])
        self.z = self.values = self.indices = self.keys = None
        if not hasattr(sae, "encode_topk"):
            self.z = sae.encode(x).float()
            return
        values, indices = sae.encode_topk(x)
        self.indices, order = indices.sort(dim=1)
        self.values = values.float().gather(1, order)
        self.keys = (torch.arange(len(x), device=x.device)[:, None] * self.d_sae + self.indices).reshape(-1)
        if len(x) * self.d_sae < 2**31:  # the binary searches run faster on 4-byte keys
            self.keys = self.keys.int()

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense activations [len(rows), d_sae] of some tokens (an index or a boolean mask)."""
        if self.z is not None:
            return self.z[rows]
        v = self.values[rows]
        return torch.zeros((len(v), self.d_sae), device=v.device).scatter_(1, self.indices[rows], v)

    def pairs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The firing (token, latent, activation) entries of tokens `rows`, by token then latent."""
        if self.values is None:
            z = self.z[rows] if len(rows) < len(self.z) else self.z
            tok, lat = (z > 0).nonzero(as_tuple=True)
            return rows[tok], lat, z[tok, lat]
        v, i = self.values[rows], self.indices[rows]
        tok = rows[:, None].expand_as(i)
        live = v > 0
        if bool(live.all()):  # the usual case: no selection needed
            return tok.reshape(-1), i.reshape(-1), v.reshape(-1)
        return tok[live], i[live], v[live]

    def at(self, tok: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        """The activation of latent `lat` at token `tok` (same shapes)."""
        if self.z is not None:
            return self.z[tok, lat]
        q = (tok * self.d_sae + lat).to(self.keys.dtype)
        i = torch.searchsorted(self.keys, q.reshape(-1)).clamp(max=len(self.keys) - 1).view(q.shape)
        return torch.where(self.keys[i] == q, self.values.view(-1)[i], 0.0)


class _BatchView(NamedTuple):
    """One batch's non-pad tokens and what a candidate gathers from them."""

    acts: _Acts  # latent activations of the non-pad tokens
    b_idx: torch.Tensor  # [n] batch row of each token
    t_idx: torch.Tensor  # [n] position of each token
    pos_map: torch.Tensor  # [B, T] token index in acts, -1 on padding
    input_ids: torch.Tensor
    row_ids: torch.Tensor
    doc_ids: torch.Tensor
    co_i: torch.Tensor  # [n, m] strongest latents of each token
    co_v: torch.Tensor


def _gather(view: _BatchView, latents: torch.Tensor, flat: torch.Tensor, before: int, after: int) -> Table:
    """Table fields (all but key) of candidates: token `flat` (index into view.acts) for latent
    `latents`, any matching shape; windows add a trailing W dimension."""
    b, t = view.b_idx[flat], view.t_idx[flat]
    T = view.pos_map.shape[1]
    tt = t[..., None] + torch.arange(-before, after + 1, device=flat.device)  # [..., W]
    in_row = (tt >= 0) & (tt < T)
    at = b[..., None] * T + tt.clamp(0, T - 1)  # flat [B·T] index of each window position
    src = view.pos_map.view(-1)[at]  # token index of each window position, -1 on padding
    valid = in_row & (src >= 0)
    win_acts = torch.where(valid, view.acts.at(src.clamp_min(0), latents[..., None].expand_as(src)), 0.0)
    return {"value": win_acts[..., before], "row_id": view.row_ids[b], "pos": t,  # the window's centre is the token
            "doc": view.doc_ids[b], "win_tokens": torch.where(valid, view.input_ids.reshape(-1)[at], -1),
            "win_acts": win_acts, "co_lat": view.co_i[flat], "co_val": view.co_v[flat]}


def _merge_winners(table: Table, keys: torch.Tensor, flat: torch.Tensor, view: _BatchView, before: int,
                   after: int) -> Table:
    """Merge candidates given by keys and token indices ([d_sae, c]) into the table in place:
    each winner takes the slot of an entry it evicts, and windows are gathered only for winners —
    once the table holds high values, few candidates win and nothing else moves. Slots are not
    kept in key order (`_by_key` sorts them once, at the end)."""
    k_old = table["key"].shape[1]
    new_keys, sel = torch.cat([table["key"], keys], 1).topk(k_old, dim=1)
    won = (sel >= k_old) & (new_keys > -torch.inf)  # an empty candidate never displaces anything
    kept = torch.zeros((len(sel), k_old + 1), dtype=torch.bool, device=sel.device)
    kept.scatter_(1, sel.clamp(max=k_old), True)
    evicted = ~kept[:, :k_old]
    # pair each latent's winners with as many of its evicted slots, in order
    free = evicted & (evicted.cumsum(1) <= won.sum(1, keepdim=True))
    lat, j = won.nonzero(as_tuple=True)
    slot = free.nonzero(as_tuple=True)[1]
    tok = flat[lat, sel[lat, j] - k_old]
    for f, v in _gather(view, lat, tok, before, after).items():
        table[f][lat, slot] = v
    table["key"][lat, slot] = new_keys[lat, j]
    return table


def _by_key(table: Table) -> Table:
    """The table with each latent's slots in descending key order."""
    order = table["key"].argsort(dim=1, descending=True, stable=True)
    return {f: v.gather(1, order if v.dim() == 2 else order[..., None].expand_as(v)) for f, v in table.items()}


def _segment_top(seg: torch.Tensor, key: torch.Tensor, n_seg: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries grouped by `seg` (e.g. latent), each group's `c` largest keys: keys [n_seg, c]
    (-inf where a group has fewer) and entry indices (-1 there). One stable sort, no loop: the
    bits of a non-negative float32 order like the float, so (group, key descending) packs into
    one int64."""
    if key.dtype == torch.float32 and (len(key) == 0 or bool(key.min() >= 0)):
        packed = seg.long() * 2**32 + (2**31 - 1 - key.view(torch.int32).long())
        order = torch.argsort(packed, stable=True)
    else:
        order = torch.argsort(key, descending=True, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
    s = seg[order]
    counts = torch.bincount(s, minlength=n_seg)
    rank = torch.arange(len(s), device=seg.device) - (torch.cumsum(counts, 0) - counts)[s]
    keep = rank < c
    keys = torch.full((n_seg, c), -torch.inf, device=key.device, dtype=key.dtype)
    entry = torch.full((n_seg, c), -1, dtype=torch.long, device=seg.device)
    keys[s[keep], rank[keep]] = key[order[keep]]
    entry[s[keep], rank[keep]] = order[keep]
    return keys, entry


def _contenders(table_key: torch.Tensor, lat: torch.Tensor, key: torch.Tensor, c: int):
    """`_segment_top` by latent of the entries that beat their latent's lowest key in the table
    (-inf while it has a free slot): once the table holds high values few do, so little is
    sorted. Entry indices point into `lat` / `key`."""
    floor = table_key.min(dim=1).values
    hot = (key > floor[lat]).nonzero().squeeze(1)
    keys, entry = _segment_top(lat[hot], key[hot], len(table_key), c)
    return keys, torch.cat([hot, hot.new_full((1,), -1)])[entry]  # entry -1 (an empty slot) reads the -1


def _per_token_top(tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor, n: int, m: int):
    """Each token's m strongest firing latents and their activations ([n, m]; -1 / 0 where fewer)."""
    keys, entry = _segment_top(tok, val, n, m)
    return torch.where(entry >= 0, lat[entry.clamp_min(0)], -1), torch.where(entry >= 0, keys, 0.0)


def _best_per_row(view: _BatchView, cand: torch.Tensor, c: int) -> tuple:
    """Each latent's best `c` rows of the batch, one token each (its best): keys, flat."""
    # Rows of one document (here or in the table) are merged in `_merge_documents`.
    B, T = view.pos_map.shape
    d_sae = view.acts.d_sae
    dense = torch.full((B * T, d_sae), -torch.inf, device=cand.device)
    dense[view.b_idx[cand] * T + view.t_idx[cand]] = view.acts.rows(cand)
    row_max, row_arg = dense.view(B, T, -1).max(dim=1)  # [B, d_sae]
    keys, rows = row_max.topk(min(c, B), dim=0)  # [c, d_sae]
    latent = torch.arange(d_sae, device=cand.device)
    flat = view.pos_map[rows, row_arg[rows, latent]]  # -1 where the row had no candidate
    keys = torch.where(flat >= 0, keys, -torch.inf)
    return keys.T, flat.clamp_min(0).T


def _merge_documents(table: Table, new: Table, k: int) -> Table:
    """Keep each latent's best k entries (by key) of the running table and the batch candidates,
    only the best entry of each document."""
    both = {f: torch.cat([table[f], new[f]], 1) for f in table}
    order = both["key"].argsort(dim=1, descending=True)
    both = {f: v.gather(1, order if v.dim() == 2 else order[..., None].expand_as(v)) for f, v in both.items()}
    doc = both["doc"]
    earlier = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool, device=doc.device).tril(-1)
    dup = ((doc[:, :, None] == doc[:, None, :]) & earlier).any(2) & (doc >= 0)
    keys = torch.where(dup, -torch.inf, both["key"])
    both["key"] = keys
    _, sel = keys.topk(k, dim=1)
    out = {f: v.gather(1, sel if v.dim() == 2 else sel[..., None].expand(-1, -1, v.shape[2])) for f, v in both.items()}
    out["value"] = torch.where(out["key"] > -torch.inf, out["value"], 0.0)  # an empty slot holds nothing
    return out


def _check_cancel(should_cancel) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("discovery cancelled")


def _as_tensors(batch: Batch, device) -> tuple:
    if len(batch) not in (4, 5):
        raise UserError("a discovery batch is (input_ids, attention_mask, row_ids, acts[, doc_ids])")
    input_ids, mask, row_ids, acts = batch[:4]
    input_ids = torch.as_tensor(input_ids, device=device).long()
    mask = torch.as_tensor(mask, device=device).bool()
    row_ids = torch.as_tensor(row_ids, device=device).long()
    acts = torch.as_tensor(acts, device=device)
    doc_ids = torch.as_tensor(batch[4], device=device).long() if len(batch) == 5 and batch[4] is not None else row_ids
    if acts.shape[:2] != mask.shape or input_ids.shape != mask.shape or row_ids.shape != mask.shape[:1] \
            or doc_ids.shape != row_ids.shape:
        raise UserError(
            f"batch shapes disagree: input_ids {list(input_ids.shape)}, attention_mask {list(mask.shape)}, "
            f"row_ids {list(row_ids.shape)}, acts {list(acts.shape)}; they must be [B,T], [B,T], [B], [B,T,d_in]"
        )
    return input_ids, mask, row_ids, acts, doc_ids


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
    every non-pad token of `batches`."""
    cfg.check()
    device = next(sae.parameters()).device
    d_sae = int(sae.W_dec.shape[0])
    w = cfg.window_before + 1 + cfg.window_after
    m = min(cfg.n_coactive + 1, d_sae) if cfg.n_coactive else 1  # +1: the latent itself is among its token's strongest
    top = _empty_table(d_sae, cfg.top_k, w, m, device)
    sample = _empty_table(d_sae, cfg.reservoir, w, m, device) if cfg.reservoir else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
    hist = torch.zeros(d_sae * (len(HIST_EDGES) + 1), dtype=torch.long, device=device)
    n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    sum_act = torch.zeros(d_sae, dtype=torch.float64, device=device)
    max_act = torch.zeros(d_sae, device=device)
    threshold = cfg.max_norm
    outliers: list[dict] = []
    tokens = seen = n_batches = 0
    t0 = time.perf_counter()

    for batch in batches:
        _check_cancel(should_cancel)
        input_ids, mask, row_ids, acts, doc_ids = _as_tensors(batch, device)
        n_batches += 1
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        if len(b_idx) == 0:
            continue
        # rows without padding (the usual case) are a view, not a copy
        x = (acts.reshape(-1, acts.shape[-1]) if bool(mask.all()) else acts[b_idx, t_idx]).float()
        acts_z = _Acts(sae, x)
        norms = x.norm(dim=1)
        if threshold is None:
            threshold = float(norms.median()) * cfg.outlier_norm_multiple if cfg.outlier_norm_multiple else float("inf")
        ok = norms <= threshold  # NaN norms compare False: non-finite tokens are excluded too
        seen += len(x)
        if not bool(ok.all()):
            outliers.append(_outlier_rows(acts_z.rows(~ok), ~ok, norms, b_idx, t_idx, input_ids, row_ids))
        cand = ok.nonzero().squeeze(1)
        if len(cand):
            pos_map = torch.full(mask.shape, -1, dtype=torch.long, device=device)
            pos_map[b_idx, t_idx] = torch.arange(len(b_idx), device=device)
            # Everything below reads only the firing (token, latent) entries: a TopK SAE has
            # k per token, so this is O(n·k) work instead of passes over [n, d_sae].
            tok, lat, val = acts_z.pairs(cand)
            n = len(x)
            if cfg.n_coactive:
                co_i, co_v = _per_token_top(tok, lat, val, n, m)
            else:
                co_i, co_v = torch.full((n, 1), -1, device=device), torch.zeros((n, 1), device=device)
            view = _BatchView(acts_z, b_idx, t_idx, pos_map, input_ids, row_ids, doc_ids, co_i, co_v)
            win = (cfg.window_before, cfg.window_after)
            if cfg.one_per_document:
                keys, flat = _best_per_row(view, cand, cfg.top_k)
                every = torch.arange(d_sae, device=device)[:, None].expand_as(flat)
                top = _merge_documents(top, {"key": keys, **_gather(view, every, flat, *win)}, cfg.top_k)
            else:
                keys, entry = _contenders(top["key"], lat, val, cfg.top_k)
                top = _merge_winners(top, keys, tok[entry.clamp_min(0)], view, *win)
            if sample is not None:
                # uniform random keys on firing pairs: the reservoir keeps the top-S keys
                rand = torch.rand(val.shape, generator=gen, device=device)
                rk, entry = _contenders(sample["key"], lat, rand, cfg.reservoir)
                sample = _merge_winners(sample, rk, tok[entry.clamp_min(0)], view, *win)
            n_fired += torch.bincount(lat, minlength=d_sae)
            sum_act.index_add_(0, lat, val.double())
            max_act = max_act.scatter_reduce(0, lat, val, "amax")
            bins = torch.bucketize(val, edges)
            hist.index_add_(0, lat * (len(HIST_EDGES) + 1) + bins, torch.ones_like(bins))
            tokens += len(cand)
        if progress is not None:
            progress(_progress(seen, total_tokens, t0, top, n_batches))

    hist = hist.view(d_sae, -1)
    with atomic_dir(out_dir) as tmp:
        counts = _write(tmp, _by_key(top), sample, n_fired, sum_act, max_act, hist, tokens, outliers, decode_tokens, cfg)
        info = {"config": dataclasses.asdict(cfg), "tokens": tokens, "excluded_outliers": seen - tokens,
                "hist_edges": HIST_EDGES.tolist(), "n_latents": d_sae}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    out_dir = Path(out_dir)
    return DiscoverySummary(
        n_latents=d_sae,
        tokens=tokens,
        features_in_heap=counts[0],
        heap_examples_count=counts[1],
        live_features=int((n_fired > 0).sum()),
        paths={"features": str(out_dir / FEATURES_FILE), "examples": str(out_dir / EXAMPLES_FILE),
               "outliers": str(out_dir / OUTLIERS_FILE), "info": str(out_dir / INFO_FILE)},
        excluded_outliers=seen - tokens,
        quantile_examples_count=counts[2],
    )


def _progress(seen: int, total: int | None, t0: float, table: Table, n_batches: int) -> dict:
    elapsed = time.perf_counter() - t0
    rate = seen / elapsed if elapsed > 0 else 0.0
    held = table["value"] > 0
    return {
        "phase": "discover",
        "done": seen,
        "total": total,
        "unit": "tokens",
        "samples_per_s": rate,
        "eta_s": (total - seen) / rate if total and rate else None,
        "batches": n_batches,
        "features_in_heap": int(held.any(1).sum()),
        "heap_examples_count": int(held.sum()),
    }


def _outlier_rows(zo, out, norms, b_idx, t_idx, input_ids, row_ids) -> dict:
    """Excluded tokens (mask `out`, their latent activations `zo`) and their strongest latents."""
    vals, lat = zo.topk(min(OUTLIER_LATENTS, zo.shape[1]), dim=1)
    b, t = b_idx[out], t_idx[out]
    return {
        "row_id": row_ids[b].cpu().numpy(),
        "pos": t.cpu().numpy(),
        "token_id": input_ids[b, t].cpu().numpy(),
        "norm": norms[out].cpu().numpy(),
        "latents": lat.cpu().numpy(),
        "acts": vals.cpu().numpy(),
    }


# --------------------------------------------------------------------------- writing


def _list_array(values: np.ndarray | pa.Array, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = values if isinstance(values, pa.Array) else pa.array(values, type=type_)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _decoder(ids: np.ndarray, decode_tokens) -> Callable[[np.ndarray], pa.Array]:
    """Decode each distinct id once; return a vectorized id → string lookup giving an Arrow
    string array (taken in Arrow, so no Python string per token)."""
    uniq = np.unique(ids)
    strings = list(decode_tokens([int(i) for i in uniq])) if len(uniq) else []
    if len(strings) != len(uniq):
        raise UserError(f"decode_tokens returned {len(strings)} strings for {len(uniq)} ids; it must return one per id")
    table = pa.array(strings, type=pa.string())
    return lambda a: table.take(pa.array(np.searchsorted(uniq, a))) if len(a) else pa.array([], type=pa.string())


def _top_tokens(latent: np.ndarray, center: np.ndarray, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, up to TOP_TOKENS distinct max-token ids, most common first (ties: best rank)."""
    if len(latent) == 0:
        return np.array([], dtype=np.int64), np.zeros(d_sae, dtype=np.int64)
    span = int(center.max()) + 1
    key = latent.astype(np.int64) * span + center
    uniq, first, count = np.unique(key, return_index=True, return_counts=True)
    lat_u = uniq // span
    order = np.lexsort((first, -count, lat_u))  # examples are sorted by (latent, rank): first = best rank
    lat_s = lat_u[order]
    starts = np.searchsorted(lat_s, lat_s, side="left")
    keep = np.arange(len(order)) - starts < TOP_TOKENS
    chosen = (uniq % span)[order][keep]
    return chosen, np.bincount(lat_s[keep], minlength=d_sae)


def _held_rows(table: Table) -> dict[str, np.ndarray]:
    """The table's filled slots (activation > 0) as numpy arrays, in (latent, slot) order."""
    values = table["value"].cpu().numpy()
    held = values > 0
    latent, slot = np.nonzero(held)
    rows = {f: v.cpu().numpy()[held] for f, v in table.items() if f != "key"}
    rows.update(latent=latent, slot=slot)
    return rows


def _quantile_bins(rows: dict[str, np.ndarray], n_quantiles: int, per_bin: int) -> np.ndarray:
    """Each sampled row's quantile bin by rank of activation within its latent's sample; keeps
    rows in (latent, activation) order and at most `per_bin` per bin."""
    order = np.lexsort((rows["value"], rows["latent"]))
    for f in rows:
        rows[f] = rows[f][order]
    lat = rows["latent"]
    start = np.searchsorted(lat, lat, side="left")
    n = np.searchsorted(lat, lat, side="right") - start
    r = np.arange(len(lat)) - start
    bins = (r * n_quantiles) // np.maximum(n, 1)
    first = np.searchsorted(lat * n_quantiles + bins, lat * n_quantiles + bins, side="left")
    keep = (np.arange(len(lat)) - first) < per_bin
    for f in rows:
        rows[f] = rows[f][keep]
    return bins[keep]


def _coactive(rows: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, up to n other latents firing at its token: flat latents, flat values, lengths."""
    keep = (rows["co_lat"] != rows["latent"][:, None]) & (rows["co_val"] > 0)
    keep &= np.cumsum(keep, axis=1) <= n
    return rows["co_lat"][keep], rows["co_val"][keep], keep.sum(1)


def _write(folder: Path, top: Table, sample: Table | None, n_fired, sum_act, max_act, hist, tokens: int,
           outliers: list[dict], decode_tokens, cfg: DiscoverConfig) -> tuple[int, int, int]:
    d_sae = top["value"].shape[0]
    n_fired_np = n_fired.cpu().numpy()
    frequency = n_fired_np / tokens if tokens else np.zeros(d_sae)
    rare = frequency < cfg.min_frequency

    parts = []
    t = _held_rows(top)
    parts.append((t, np.zeros(len(t["latent"]), np.int8), np.full(len(t["latent"]), -1, np.int16), t["slot"]))
    if sample is not None:
        q = _held_rows(sample)
        bins = _quantile_bins(q, cfg.n_quantiles, cfg.quantile_examples)
        first = np.searchsorted(q["latent"] * cfg.n_quantiles + bins, q["latent"] * cfg.n_quantiles + bins)
        parts.append((q, np.ones(len(bins), np.int8), bins.astype(np.int16), np.arange(len(bins)) - first))
    rows = {f: np.concatenate([p[0][f] for p in parts]) for f in parts[0][0]}
    kind, bin_, rank = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    keep = ~rare[rows["latent"]]
    order = np.lexsort((rank, bin_, kind, rows["latent"]))
    order = order[keep[order]]
    rows = {f: v[order] for f, v in rows.items()}
    kind, bin_, rank = kind[order], bin_[order], rank[order]

    win_tokens, win_acts = rows["win_tokens"], rows["win_acts"]
    valid = win_tokens >= 0  # trim out-of-row and padding positions (tokens and acts together)
    out_ids = np.concatenate([o["token_id"] for o in outliers]) if outliers else np.array([], dtype=np.int64)
    lookup = _decoder(np.concatenate([win_tokens[valid], out_ids]), decode_tokens)

    is_top = kind == 0
    top_ids, top_counts = _top_tokens(t["latent"], t["win_tokens"][:, cfg.window_before], d_sae)
    fired = np.maximum(n_fired_np, 1)
    features = pa.table({
        "latent": pa.array(np.arange(d_sae, dtype=np.int32)),
        "n_fired": pa.array(n_fired_np.astype(np.int64)),
        "frequency": pa.array(frequency),
        "max_act": pa.array(max_act.cpu().numpy().astype(np.float32)),
        "mean_act": pa.array((sum_act.cpu().numpy() / fired).astype(np.float32)),
        "top_tokens": _list_array(lookup(top_ids), top_counts, pa.string()),
        "hist_counts": _list_array(hist.cpu().numpy().reshape(-1), np.full(d_sae, hist.shape[1]), pa.int64()),
        "below_min_frequency": pa.array(rare),
    })
    pq.write_table(features, folder / FEATURES_FILE, use_dictionary=STRING_COLUMNS, write_statistics=FILTER_COLUMNS)

    lengths = valid.sum(1)
    co_lat, co_val, co_len = _coactive(rows, cfg.n_coactive)
    examples = pa.table({
        "latent": pa.array(rows["latent"].astype(np.int32)),
        "kind": pa.array(np.where(is_top, "top", "quantile")),
        "bin": pa.array(bin_),
        "rank": pa.array(rank.astype(np.int16)),
        "activation": pa.array(rows["value"].astype(np.float32)),
        "row_id": pa.array(rows["row_id"].astype(np.int64)),
        "pos": pa.array(rows["pos"].astype(np.int32)),
        "token_ids": _list_array(win_tokens[valid].astype(np.int32), lengths, pa.int32()),
        "tokens": _list_array(lookup(win_tokens[valid]), lengths, pa.string()),
        "acts": _list_array(win_acts[valid].astype(np.float32), lengths, pa.float32()),
        "max_index": pa.array(valid[:, : cfg.window_before].sum(1).astype(np.int16)),
        "coactive_latents": _list_array(co_lat.astype(np.int32), co_len, pa.int32()),
        "coactive_acts": _list_array(co_val.astype(np.float32), co_len, pa.float32()),
    })
    per_latent = max(1, len(examples) // max(1, len(np.unique(rows["latent"]))))
    pq.write_table(examples, folder / EXAMPLES_FILE, row_group_size=max(1, cfg.row_group_latents * per_latent),
                   use_dictionary=STRING_COLUMNS, write_statistics=FILTER_COLUMNS)

    cat = lambda key: np.concatenate([o[key] for o in outliers]) if outliers else np.zeros((0,))
    n_out = len(out_ids)
    k_out = outliers[0]["latents"].shape[1] if outliers else 0
    out_table = pa.table({
        "row_id": pa.array(cat("row_id").astype(np.int64)),
        "pos": pa.array(cat("pos").astype(np.int32)),
        "token_id": pa.array(out_ids.astype(np.int32)),
        "token": pa.array(lookup(out_ids), type=pa.string()),
        "norm": pa.array(cat("norm").astype(np.float32)),
        "latents": _list_array(cat("latents").reshape(-1).astype(np.int32), np.full(n_out, k_out), pa.int32()),
        "acts": _list_array(cat("acts").reshape(-1).astype(np.float32), np.full(n_out, k_out), pa.float32()),
    })
    pq.write_table(out_table, folder / OUTLIERS_FILE)
    n_top = int((is_top).sum())
    return len(np.unique(t["latent"])), int(len(t["latent"])), len(kind) - n_top


# --------------------------------------------------------------------------- reading


def top_features(features_path: str | os.PathLike, n: int) -> list[dict]:
    """The `n` most frequent live features (n_fired > 0), with their top tokens."""
    table = pq.read_table(features_path, filters=[("n_fired", ">", 0)])
    order = pc.sort_indices(table, sort_keys=[("frequency", "descending"), ("latent", "ascending")])
    return table.take(order[:n]).to_pylist()


def read_examples(examples_path: str | os.PathLike, latent: int, kind: str | None = "top") -> list[dict]:
    """One latent's examples: top rows by rank, then quantile rows from the lowest bin up (kind
    None gives both). The filter lets Parquet skip other latents' row groups."""
    filters = [("latent", "=", int(latent))] + ([("kind", "=", kind)] if kind else [])
    table = pq.read_table(examples_path, filters=filters)
    if "kind" not in table.column_names:  # written before quantiles existed: all top rows
        return table.sort_by("rank").to_pylist() if kind in (None, "top") else []
    return table.sort_by([("kind", "descending"), ("bin", "ascending"), ("rank", "ascending")]).to_pylist()


def read_histogram(out_dir: str | os.PathLike, latent: int) -> tuple[list[float], list[int]]:
    """(bin edges, counts) of one latent's positive activations; counts has one more entry than
    edges (below the first edge, between consecutive edges, above the last)."""
    edges = json.loads((Path(out_dir) / INFO_FILE).read_text())["hist_edges"]
    table = pq.read_table(Path(out_dir) / FEATURES_FILE, columns=["latent", "hist_counts"],
                          filters=[("latent", "=", int(latent))])
    if table.num_rows == 0:
        raise UserError(f"latent {latent} is out of range for this SAE's features")
    return edges, table.column("hist_counts")[0].as_py()


def coactive_features(examples_path: str | os.PathLike, latent: int, n: int = 10) -> list[dict]:
    """Latents that fire at the same tokens as `latent`'s examples (top and quantile): how many
    of its examples each appears in, and its mean activation there; most frequent first."""
    return rank_coactive(read_examples(examples_path, latent, kind=None), n)


def rank_coactive(examples: Iterable[dict], n: int = 10) -> list[dict]:
    """`coactive_features` over example rows already read."""
    counts: dict[int, list[float]] = {}
    for ex in examples:
        for other, act in zip(ex.get("coactive_latents") or [], ex.get("coactive_acts") or []):
            counts.setdefault(other, []).append(act)
    ranked = sorted(counts.items(), key=lambda kv: (-len(kv[1]), -float(np.mean(kv[1])), kv[0]))
    return [{"latent": int(k), "count": len(v), "mean_act": float(np.mean(v))} for k, v in ranked[:n]]


def discover_features(model, tokenizer, sae_dir: Path, dataset_dir: Path, out_dir: Path,
                      cfg: DiscoverConfig, batch_size: int = 8, max_tokens: int | None = None,
                      progress: Callable[[dict], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None,
                      exclude_token_ids: Sequence[int] = ()) -> DiscoverySummary:
    """Top activating contexts, quantile samples, histograms, co-active latents, frequency and
    max/mean activation for every latent of an SAE.

    Positions holding an `exclude_token_ids` token are no candidates (the model still reads them)."""
    from core import data, hooks  # the model side of discovery; the rest of this module needs neither
    from core.formats.saelens import load_saelens

    sae, sae_cfg = load_saelens(sae_dir)
    hook_name = sae_cfg.hook_name
    hooks.validate_hooks(model, [hook_name])
    d_model = model.config.hidden_size
    if sae_cfg.d_in != d_model:
        raise UserError(f"SAE d_in={sae_cfg.d_in} does not match {hook_name} of this model (d_model={d_model}); "
                        "pick the model the SAE was trained on")
    sae = sae.to(next(model.parameters()).device)
    total = data.total_tokens(dataset_dir, max_tokens)
    excluded = torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long)

    def hooked_batches():
        for b in data.iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens):
            acts = hooks.run_hooked(model, b.input_ids, b.attention_mask, [hook_name])[hook_name]
            yield b.input_ids, b.attention_mask * ~torch.isin(b.input_ids, excluded), b.row_ids, acts, b.doc_ids

    with torch.no_grad():
        return discover(sae, hooked_batches(), out_dir, lambda ids: data.decode_tokens(tokenizer, ids), cfg,
                        total_tokens=total, progress=progress, should_cancel=should_cancel)
