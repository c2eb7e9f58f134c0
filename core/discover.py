"""Feature discovery: for every SAE latent, its exact top activating token positions.

Every non-pad token position is a candidate (not one example per sequence). The running
state is a [d_sae, top_k] table of the best activations so far; each batch contributes its own
per-latent top-k, the two are concatenated and merged with one `torch.topk` — no per-feature
Python heaps. Because the activations are gone after a batch, each candidate carries its
context window (token ids, and that latent's activation at each window position) gathered,
vectorized, when it enters the table, so tokens and activations stay aligned.

Tokens whose activation norm is an outlier (see DESIGN.md: a handful of SmolLM2 tokens have
norms ~100× the median) are kept out of the top-k and the statistics and listed separately in
`outliers.parquet`.

Outputs (written atomically into `out_dir`):
* `features.parquet`: one row per latent — n_fired, frequency, max_act, mean_act, top_tokens.
* `examples.parquet`: one row per (latent, rank) with activation > 0, sorted by latent then
  rank, in row groups of `row_group_latents` latents so a reader can filter by latent.
* `outliers.parquet`: the excluded tokens with their strongest latents.
"""

from __future__ import annotations

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

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(input_ids LongTensor[B,T], attention_mask LongTensor[B,T], row_ids LongTensor[B], acts FloatTensor[B,T,d_in])."""

FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "examples.parquet"
OUTLIERS_FILE = "outliers.parquet"
TOP_TOKENS = 5  # max-token strings listed per feature
OUTLIER_LATENTS = 10  # strongest latents listed per outlier token


@dataclass
class DiscoverConfig:
    """What discovery keeps per latent. The caller picks the batch size: a batch of n non-pad
    tokens is encoded at once into a dense [n, d_sae] fp32 matrix (4096 × 4608 ≈ 75 MB)."""

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


class DiscoverySummary(NamedTuple):
    n_latents: int
    """d_sae of the SAE."""
    tokens: int
    """Token positions scored (non-pad, outliers excluded); the denominator of frequency."""
    features_in_heap: int
    """Latents with at least one example with activation > 0."""
    heap_examples_count: int
    """Examples held with activation > 0."""
    live_features: int
    """Latents that fired (activation > 0) on at least one token."""
    paths: dict
    """File name stem → path: features, examples, outliers."""
    excluded_outliers: int = 0
    """Non-pad tokens excluded as norm outliers."""


class _TopK(NamedTuple):
    """Running per-latent table; every field has leading dims [d_sae, top_k]."""

    values: torch.Tensor  # float32, -inf where empty
    row_id: torch.Tensor  # int64
    pos: torch.Tensor  # int64
    win_tokens: torch.Tensor  # int64 [.., W], -1 outside the row or on padding
    win_acts: torch.Tensor  # float32 [.., W], 0 there


def _empty_table(d_sae: int, k: int, w: int, device: torch.device) -> _TopK:
    return _TopK(
        torch.full((d_sae, k), -torch.inf, device=device),
        torch.full((d_sae, k), -1, dtype=torch.long, device=device),
        torch.full((d_sae, k), -1, dtype=torch.long, device=device),
        torch.full((d_sae, k, w), -1, dtype=torch.long, device=device),
        torch.zeros((d_sae, k, w), device=device),
    )


def _candidates(z: torch.Tensor, cand: torch.Tensor, c: int, b_idx, t_idx, pos_map, input_ids, row_ids,
                before: int, after: int) -> _TopK:
    """Each latent's top `c` activations among token rows `cand` of z, with their windows."""
    zc = z if len(cand) == len(z) else z[cand]
    values, top = zc.topk(c, dim=0)  # [c, d_sae]
    values, flat = values.T, cand[top.T]  # [d_sae, c]; flat indexes z's rows
    b, t = b_idx[flat], t_idx[flat]
    offsets = torch.arange(-before, after + 1, device=z.device)
    tt = t[..., None] + offsets  # [d_sae, c, W]
    in_row = (tt >= 0) & (tt < pos_map.shape[1])
    tt = tt.clamp(0, pos_map.shape[1] - 1)
    bb = b[..., None].expand_as(tt)
    src = pos_map[bb, tt]  # row of z for that window position, -1 on padding
    valid = in_row & (src >= 0)
    latent = torch.arange(z.shape[1], device=z.device)[:, None, None]
    win_acts = torch.where(valid, z[src.clamp_min(0), latent], 0.0)
    win_tokens = torch.where(valid, input_ids[bb, tt], -1)
    return _TopK(values, row_ids[b], t, win_tokens, win_acts)


def _merge(table: _TopK, new: _TopK, k: int) -> _TopK:
    """Keep each latent's best k of the running table and the batch candidates."""
    values, sel = torch.cat([table.values, new.values], 1).topk(k, dim=1)

    def pick(old: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        index = sel if old.dim() == 2 else sel[..., None].expand(-1, -1, old.shape[2])
        return torch.cat([old, cand], 1).gather(1, index)

    return _TopK(values, *(pick(a, b) for a, b in zip(table[1:], new[1:])))


def _check_cancel(should_cancel) -> None:
    if should_cancel is not None and should_cancel():
        raise Cancelled("discovery cancelled")


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
    """Exact per-latent top-k examples and firing statistics over every non-pad token of `batches`."""
    if cfg.top_k < 1 or cfg.window_before < 0 or cfg.window_after < 0:
        raise UserError(f"top_k={cfg.top_k}, window_before={cfg.window_before}, window_after={cfg.window_after}: use top_k >= 1 and windows >= 0")
    device = next(sae.parameters()).device
    d_sae = int(sae.W_dec.shape[0])
    w = cfg.window_before + 1 + cfg.window_after
    table = _empty_table(d_sae, cfg.top_k, w, device)
    n_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    sum_act = torch.zeros(d_sae, dtype=torch.float64, device=device)
    max_act = torch.zeros(d_sae, device=device)
    threshold = cfg.max_norm
    outliers: list[dict] = []
    tokens = seen = n_batches = 0
    t0 = time.perf_counter()

    for input_ids, attention_mask, row_ids, acts in batches:
        _check_cancel(should_cancel)
        input_ids = torch.as_tensor(input_ids, device=device).long()
        mask = torch.as_tensor(attention_mask, device=device).bool()
        row_ids = torch.as_tensor(row_ids, device=device).long()
        acts = torch.as_tensor(acts, device=device)
        if acts.shape[:2] != mask.shape or input_ids.shape != mask.shape or row_ids.shape != mask.shape[:1]:
            raise UserError(
                f"batch shapes disagree: input_ids {list(input_ids.shape)}, attention_mask {list(mask.shape)}, "
                f"row_ids {list(row_ids.shape)}, acts {list(acts.shape)}; they must be [B,T], [B,T], [B], [B,T,d_in]"
            )
        n_batches += 1
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        if len(b_idx) == 0:
            continue
        x = acts[b_idx, t_idx].float()
        z = sae.encode(x).float()
        norms = x.norm(dim=1)
        if threshold is None:
            threshold = float(norms.median()) * cfg.outlier_norm_multiple if cfg.outlier_norm_multiple else float("inf")
        ok = norms <= threshold  # NaN norms compare False: non-finite tokens are excluded too
        seen += len(x)
        if not bool(ok.all()):
            outliers.append(_outlier_rows(z, ~ok, norms, b_idx, t_idx, input_ids, row_ids))
        cand = ok.nonzero().squeeze(1)
        if len(cand):
            pos_map = torch.full(mask.shape, -1, dtype=torch.long, device=device)
            pos_map[b_idx, t_idx] = torch.arange(len(b_idx), device=device)
            new = _candidates(z, cand, min(cfg.top_k, len(cand)), b_idx, t_idx, pos_map, input_ids, row_ids,
                              cfg.window_before, cfg.window_after)
            table = _merge(table, new, cfg.top_k)
            z_ok = z[cand] if len(cand) < len(z) else z
            # Column reductions in fp32/int32 (a float64 or int64 reduction over [n, d_sae] is
            # several times slower); per-batch sums are accumulated in float64.
            n_fired += (z_ok > 0).sum(0, dtype=torch.int32)
            sum_act += z_ok.sum(0)
            max_act = torch.maximum(max_act, z_ok.amax(0))
            tokens += len(cand)
        if progress is not None:
            progress(_progress(seen, total_tokens, t0, table, n_batches))

    with atomic_dir(out_dir) as tmp:
        counts = _write(tmp, table, n_fired, sum_act, max_act, tokens, outliers, decode_tokens, cfg)
    out_dir = Path(out_dir)
    return DiscoverySummary(
        n_latents=d_sae,
        tokens=tokens,
        features_in_heap=counts[0],
        heap_examples_count=counts[1],
        live_features=int((n_fired > 0).sum()),
        paths={"features": str(out_dir / FEATURES_FILE), "examples": str(out_dir / EXAMPLES_FILE),
               "outliers": str(out_dir / OUTLIERS_FILE)},
        excluded_outliers=seen - tokens,
    )


def _progress(seen: int, total: int | None, t0: float, table: _TopK, n_batches: int) -> dict:
    elapsed = time.perf_counter() - t0
    rate = seen / elapsed if elapsed > 0 else 0.0
    held = table.values > 0
    return {
        "phase": "discover",
        "done": seen,
        "total": total,
        "unit": "tokens",
        "samples_per_s": rate,
        "eta_s": (total - seen) / rate if total and rate else None,
        "batches": n_batches,
        "features_in_heap": int(held[:, 0].sum()),
        "heap_examples_count": int(held.sum()),
    }


def _outlier_rows(z, out, norms, b_idx, t_idx, input_ids, row_ids) -> dict:
    """Excluded tokens and their strongest latents, as numpy arrays."""
    zo = z[out]
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


def _list_array(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def _decoder(ids: np.ndarray, decode_tokens) -> Callable[[np.ndarray], np.ndarray]:
    """Decode each distinct id once; return a vectorized id → string lookup."""
    uniq = np.unique(ids)
    strings = np.array(list(decode_tokens([int(i) for i in uniq])) if len(uniq) else [], dtype=object)
    if len(strings) != len(uniq):
        raise UserError(f"decode_tokens returned {len(strings)} strings for {len(uniq)} ids; it must return one per id")
    return lambda a: strings[np.searchsorted(uniq, a)] if len(a) else np.array([], dtype=object)


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


def _write(folder: Path, table: _TopK, n_fired, sum_act, max_act, tokens: int, outliers: list[dict],
           decode_tokens, cfg: DiscoverConfig) -> tuple[int, int]:
    values = table.values.cpu().numpy()
    held = values > 0
    latent, rank = np.nonzero(held)  # row-major: sorted by latent, then rank
    win_tokens = table.win_tokens.cpu().numpy()[held]
    win_acts = table.win_acts.cpu().numpy()[held]
    valid = win_tokens >= 0  # trim out-of-row and padding positions (tokens and acts together)
    out_ids = np.concatenate([o["token_id"] for o in outliers]) if outliers else np.array([], dtype=np.int64)
    lookup = _decoder(np.concatenate([win_tokens[valid], out_ids]), decode_tokens)
    d_sae = values.shape[0]

    center = win_tokens[:, cfg.window_before]
    top_ids, top_counts = _top_tokens(latent, center, d_sae)
    n_fired_np = n_fired.cpu().numpy()
    fired = np.maximum(n_fired_np, 1)
    features = pa.table({
        "latent": pa.array(np.arange(d_sae, dtype=np.int32)),
        "n_fired": pa.array(n_fired_np.astype(np.int64)),
        "frequency": pa.array(n_fired_np / tokens if tokens else np.zeros(d_sae)),
        "max_act": pa.array(max_act.cpu().numpy().astype(np.float32)),
        "mean_act": pa.array((sum_act.cpu().numpy() / fired).astype(np.float32)),
        "top_tokens": _list_array(lookup(top_ids), top_counts, pa.string()),
    })
    pq.write_table(features, folder / FEATURES_FILE)

    lengths = valid.sum(1)
    examples = pa.table({
        "latent": pa.array(latent.astype(np.int32)),
        "rank": pa.array(rank.astype(np.int16)),
        "activation": pa.array(values[held].astype(np.float32)),
        "row_id": pa.array(table.row_id.cpu().numpy()[held].astype(np.int64)),
        "pos": pa.array(table.pos.cpu().numpy()[held].astype(np.int32)),
        "token_ids": _list_array(win_tokens[valid].astype(np.int32), lengths, pa.int32()),
        "tokens": _list_array(lookup(win_tokens[valid]), lengths, pa.string()),
        "acts": _list_array(win_acts[valid].astype(np.float32), lengths, pa.float32()),
        "max_index": pa.array(valid[:, : cfg.window_before].sum(1).astype(np.int16)),
    })
    pq.write_table(examples, folder / EXAMPLES_FILE, row_group_size=max(1, cfg.row_group_latents * cfg.top_k))

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
    return int(held[:, 0].sum()) if d_sae else 0, int(held.sum())


# --------------------------------------------------------------------------- reading


def top_features(features_path: str | os.PathLike, n: int) -> list[dict]:
    """The `n` most frequent live features (n_fired > 0), with their top tokens."""
    table = pq.read_table(features_path, filters=[("n_fired", ">", 0)])
    order = pc.sort_indices(table, sort_keys=[("frequency", "descending"), ("latent", "ascending")])
    return table.take(order[:n]).to_pylist()


def read_examples(examples_path: str | os.PathLike, latent: int) -> list[dict]:
    """One latent's examples in rank order; the filter lets Parquet skip other row groups."""
    table = pq.read_table(examples_path, filters=[("latent", "=", int(latent))])
    return table.sort_by("rank").to_pylist()
