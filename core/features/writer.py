"""The feature tables on disk: discovery's finished state written as columnar Parquet files
(features, examples, outliers) and the info JSON, atomically together — a reader sees the old
folder or the new one, never a mix (core.io.atomic_dir). The schema is core/features/schema.py."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.errors import UserError
from core.io import atomic_dir
from core.features.accumulator import Discovered
from core.features.config import DiscoverConfig, DiscoverySummary
from core.features.schema import (EXAMPLES_FILE, FEATURE_ROW_GROUP, FEATURES_FILE, FILTER_COLUMNS, HIST_EDGES,
                                  INFO_FILE, OUTLIERS_FILE, STRING_COLUMNS, TOP_TOKENS)
from core.features.tables import Table

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



def write(out_dir: str | os.PathLike, found: Discovered, decode_tokens: Callable[[list[int]], list[str]],
          cfg: DiscoverConfig, excluded_special: int = 0) -> DiscoverySummary:
    """Write the features folder `out_dir` (replacing one there) from discovery's finished state;
    `excluded_special` (positions left out by token id before discovery saw them) is recorded."""
    d_sae = found.top["value"].shape[0]
    with atomic_dir(out_dir) as tmp:
        counts = _write_tables(tmp, found, decode_tokens, cfg)
        info = {"config": dataclasses.asdict(cfg), "tokens": found.tokens, "excluded_special": excluded_special,
                "excluded_outliers": found.seen - found.tokens, "hist_edges": HIST_EDGES.tolist(), "n_latents": d_sae}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    out_dir = Path(out_dir)
    return DiscoverySummary(
        n_latents=d_sae,
        tokens=found.tokens,
        features_in_heap=counts[0],
        heap_examples_count=counts[1],
        live_features=int((found.n_fired > 0).sum()),
        paths={"features": str(out_dir / FEATURES_FILE), "examples": str(out_dir / EXAMPLES_FILE),
               "outliers": str(out_dir / OUTLIERS_FILE), "info": str(out_dir / INFO_FILE)},
        excluded_outliers=found.seen - found.tokens,
        quantile_examples_count=counts[2],
        excluded_special=excluded_special,
    )


WRITE_LATENTS = 2048
"""Latents whose examples are turned into Arrow rows and written at once: the write holds one
such block of rows (a few hundred MB at most), not copies of the whole tables (4.6M example rows
at 65,536 latents × 70 slots)."""


def _write_tables(folder: Path, found: Discovered, decode_tokens, cfg: DiscoverConfig) -> tuple[int, int, int]:
    """The three Parquet files; returns (latents with top examples, top examples, quantile examples).
    examples.parquet is written a block of latents at a time (`WRITE_LATENTS`)."""
    d_sae = found.top["value"].shape[0]
    n_fired = found.n_fired.cpu().numpy()
    frequency = n_fired / found.tokens if found.tokens else np.zeros(d_sae)
    rare = frequency < cfg.min_frequency
    outliers = found.outliers
    out_ids = np.concatenate([o["token_id"] for o in outliers]) if outliers else np.array([], dtype=np.int64)
    lookup = _decoder(np.concatenate([_window_ids(found), out_ids]), decode_tokens)

    step = max(cfg.row_group_latents, WRITE_LATENTS // cfg.row_group_latents * cfg.row_group_latents)
    top_ids, top_counts, counts = [], [], np.zeros(3, dtype=np.int64)
    writer = None
    try:
        for lo in range(0, d_sae, step):
            hi = min(lo + step, d_sae)
            sample = _block(found.sample, lo, hi) if found.sample is not None else None
            t, rows, kind, bin_, rank = _example_rows(_block(found.top, lo, hi), sample, rare[lo:hi], cfg)
            ids, n_ids = _top_tokens(t["latent"], t["win_tokens"][:, cfg.window_before], hi - lo)
            top_ids.append(ids)
            top_counts.append(n_ids)
            rows["latent"] = rows["latent"] + lo
            examples = _examples_table(rows, kind, bin_, rank, rows["win_tokens"] >= 0, lookup, cfg)
            per_latent = max(1, len(examples) // max(1, len(np.unique(rows["latent"]))))
            if writer is None:
                writer = pq.ParquetWriter(folder / EXAMPLES_FILE, examples.schema, use_dictionary=STRING_COLUMNS,
                                          write_statistics=FILTER_COLUMNS)
            writer.write_table(examples.cast(writer.schema), row_group_size=max(1, cfg.row_group_latents * per_latent))
            n_top = int((kind == 0).sum())
            counts += (len(np.unique(t["latent"])), len(t["latent"]), len(kind) - n_top)
    finally:
        if writer is not None:
            writer.close()

    features = _features_table(found, n_fired, frequency, rare, np.concatenate(top_ids), np.concatenate(top_counts),
                               lookup)
    pq.write_table(features, folder / FEATURES_FILE, row_group_size=FEATURE_ROW_GROUP, use_dictionary=STRING_COLUMNS,
                   write_statistics=FILTER_COLUMNS)
    pq.write_table(_outliers_table(outliers, out_ids, lookup), folder / OUTLIERS_FILE)
    return int(counts[0]), int(counts[1]), int(counts[2])


def _block(table: Table, lo: int, hi: int) -> Table:
    return {f: v[lo:hi] for f, v in table.items()}


def _window_ids(found: Discovered) -> np.ndarray:
    """Every distinct token id held in a window of the tables (decoded once for the whole write)."""
    seen = []
    for table in (found.top, found.sample):
        if table is not None:
            for block in table["win_tokens"].split(WRITE_LATENTS):
                seen.append(torch.unique(block).cpu().numpy())
    ids = np.unique(np.concatenate(seen)) if seen else np.array([], dtype=np.int64)
    return ids[ids >= 0]


def _example_rows(top: Table, sample: Table | None, rare: np.ndarray, cfg: DiscoverConfig) -> tuple:
    """The held top rows (t), and every example row to write — top then quantile rows of each
    latent that is not rare — with their kind (0 top, 1 quantile), bin and rank, in file order.
    Latents count from the tables' first row."""
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
    return t, rows, kind[order], bin_[order], rank[order]


def _features_table(found: Discovered, n_fired: np.ndarray, frequency: np.ndarray, rare: np.ndarray,
                    top_ids: np.ndarray, top_counts: np.ndarray, lookup) -> pa.Table:
    d_sae = len(n_fired)
    fired = np.maximum(n_fired, 1)
    hist = found.hist
    return pa.table({
        "latent": pa.array(np.arange(d_sae, dtype=np.int32)),
        "n_fired": pa.array(n_fired.astype(np.int64)),
        "frequency": pa.array(frequency),
        "max_act": pa.array(found.max_act.cpu().numpy().astype(np.float32)),
        "mean_act": pa.array((found.sum_act.cpu().numpy() / fired).astype(np.float32)),
        "top_tokens": _list_array(lookup(top_ids), top_counts, pa.string()),
        "hist_counts": _list_array(hist.cpu().numpy().reshape(-1), np.full(d_sae, hist.shape[1]), pa.int64()),
        "below_min_frequency": pa.array(rare),
    })


def _examples_table(rows: dict, kind: np.ndarray, bin_: np.ndarray, rank: np.ndarray, valid: np.ndarray, lookup,
                    cfg: DiscoverConfig) -> pa.Table:
    win_tokens, win_acts = rows["win_tokens"], rows["win_acts"]
    lengths = valid.sum(1)
    co_lat, co_val, co_len = _coactive(rows, cfg.n_coactive)
    return pa.table({
        "latent": pa.array(rows["latent"].astype(np.int32)),
        "kind": pa.array(np.where(kind == 0, "top", "quantile")),
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


def _outliers_table(outliers: list[dict], out_ids: np.ndarray, lookup) -> pa.Table:
    cat = lambda key: np.concatenate([o[key] for o in outliers]) if outliers else np.zeros((0,))
    n_out = len(out_ids)
    k_out = outliers[0]["latents"].shape[1] if outliers else 0
    return pa.table({
        "row_id": pa.array(cat("row_id").astype(np.int64)),
        "pos": pa.array(cat("pos").astype(np.int32)),
        "token_id": pa.array(out_ids.astype(np.int32)),
        "token": pa.array(lookup(out_ids), type=pa.string()),
        "norm": pa.array(cat("norm").astype(np.float32)),
        "latents": _list_array(cat("latents").reshape(-1).astype(np.int32), np.full(n_out, k_out), pa.int32()),
        "acts": _list_array(cat("acts").reshape(-1).astype(np.float32), np.full(n_out, k_out), pa.float32()),
    })
