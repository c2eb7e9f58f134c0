"""Every read of a features folder (what core/features/writer.py wrote): pages of the feature
table, a latent's or a set of latents' examples, histograms, the info JSON and co-active
rankings. No other module opens these files by name, so their layout can change here alone.

Reads go through Parquet filters: examples.parquet is written in row groups of a few latents
with statistics on latent/kind/bin, so a filter by latent reads only the row groups that hold
them. A page of features is read in two steps — the narrow columns that filter and sort, then
the page's rows by latent — so a page never decodes the wide columns of every latent.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.errors import UserError
from core.features.schema import EXAMPLES_FILE, FEATURES_FILE, INFO_FILE, FeaturePage, FeatureQuery, matches
from core.io import intact

Folder = str | os.PathLike
"""A features folder (an SAE's `features_path`)."""


def _reader(fn):
    """A public read of a features folder: a damaged file in it is one line naming the fix."""
    @functools.wraps(fn)
    def read(features_dir: Folder, *args, **kwargs):
        with intact(features_dir, "run discovery for this SAE again to rewrite it"):
            return fn(features_dir, *args, **kwargs)
    return read


@_reader
def info(features_dir: Folder) -> dict[str, Any]:
    """discovery.json: the config, token counts and histogram edges ({} when the folder has none)."""
    path = Path(features_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- the feature table


@_reader
def feature_rows(features_dir: Folder, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Every latent's row (in latent order), e.g. to record them in the registry."""
    return pq.read_table(Path(features_dir) / FEATURES_FILE, columns=columns).to_pylist()


@_reader
def feature_page(features_dir: Folder, query: FeatureQuery = FeatureQuery(),
                 columns: list[str] | None = None) -> FeaturePage:
    """The rows of one page of latents (all columns, or `columns`) and how many pass the filters."""
    query.check()
    if query.labels != "all":
        raise UserError("labels live in the registry, not in features.parquet: ask the registry to filter by label")
    path = Path(features_dir) / FEATURES_FILE
    index = _page_index(path, query)
    total = len(index)
    stop = None if query.limit is None else query.offset + query.limit
    latents = index[query.offset:stop].to_pylist()
    if not latents:
        return FeaturePage([], total)
    table = pq.read_table(path, columns=columns if columns is None or "latent" in columns else ["latent", *columns],
                          filters=[("latent", "in", latents)])
    by = dict(zip(table.column("latent").to_pylist(), table.to_pylist()))
    rows = [by[i] for i in latents]
    if columns is not None and "latent" not in columns:
        rows = [{k: r[k] for k in columns} for r in rows]
    return FeaturePage(rows, total)


def _page_index(path: Path, query: FeatureQuery) -> pa.Array:
    """The latents that pass the query's filters, in its order (read from the narrow columns)."""
    filters = []
    if query.min_frequency > 0:
        filters.append(("frequency", ">=", float(query.min_frequency)))
    if query.live_only:
        filters.append(("n_fired", ">", 0))
    if query.min_max_act > 0:
        filters.append(("max_act", ">=", float(query.min_max_act)))
    if query.latents is not None:
        filters.append(("latent", "in", [int(i) for i in query.latents]))
    columns = sorted({"latent", query.order_by} | ({"top_tokens"} if query.search else set()))
    table = pq.read_table(path, columns=columns, filters=filters or None)
    if query.search:
        keep = [matches(r, query.search) for r in table.select(["latent", "top_tokens"]).to_pylist()]
        table = table.filter(pa.array(keep, type=pa.bool_()))
    keys = [("latent", "ascending")] if query.order_by == "latent" else \
        [(query.order_by, "descending"), ("latent", "ascending")]
    return table.column("latent").take(pc.sort_indices(table, sort_keys=keys)).combine_chunks()


def top_features(features_dir: Folder, n: int) -> list[dict]:
    """The `n` most frequent live features (n_fired > 0), with their top tokens."""
    return feature_page(features_dir, FeatureQuery(live_only=True, limit=n)).rows


@_reader
def histograms(features_dir: Folder, latents: Iterable[int]) -> dict[int, list[int]]:
    """Each latent's activation counts in the bins of `info(...)["hist_edges"]`."""
    wanted = [int(i) for i in latents]
    if not wanted:
        return {}
    t = pq.read_table(Path(features_dir) / FEATURES_FILE, columns=["latent", "hist_counts"],
                      filters=[("latent", "in", wanted)])
    return dict(zip(t.column("latent").to_pylist(), t.column("hist_counts").to_pylist()))


@_reader
def read_histogram(features_dir: Folder, latent: int) -> tuple[list[float], list[int]]:
    """(bin edges, counts) of one latent's positive activations; counts has one more entry than
    edges (below the first edge, between consecutive edges, above the last)."""
    edges = json.loads((Path(features_dir) / INFO_FILE).read_text())["hist_edges"]
    counts = histograms(features_dir, [latent])
    if int(latent) not in counts:
        raise UserError(f"latent {latent} is out of range for this SAE's features")
    return edges, counts[int(latent)]


# --------------------------------------------------------------------------- examples


@_reader
def read_examples(features_dir: Folder, latent: int, kind: str | None = "top") -> list[dict]:
    """One latent's examples: top rows by rank, then quantile rows from the lowest bin up (kind
    None gives both). The filter lets Parquet skip other latents' row groups."""
    filters = [("latent", "=", int(latent))] + ([("kind", "=", kind)] if kind else [])
    table = pq.read_table(Path(features_dir) / EXAMPLES_FILE, filters=filters)
    if "kind" not in table.column_names:  # written before quantiles existed: all top rows
        return table.sort_by("rank").to_pylist() if kind in (None, "top") else []
    return table.sort_by([("kind", "descending"), ("bin", "ascending"), ("rank", "ascending")]).to_pylist()


@_reader
def examples_by_latent(features_dir: Folder, latents: Iterable[int], kind: str | None = None,
                       columns: list[str] | None = None) -> dict[int, list[dict[str, Any]]]:
    """The examples of several latents in one read (all columns, or `columns` — latent is always
    among them), each latent's in `read_examples` order; latents without examples are absent."""
    wanted = sorted({int(i) for i in latents})
    if not wanted:
        return {}
    path = Path(features_dir) / EXAMPLES_FILE
    names = pq.read_schema(path).names
    order = [c for c in ("latent", "kind", "bin", "rank") if c in names]  # older files lack some (a stable sort)
    columns = None if columns is None else list(dict.fromkeys(["latent", *columns]))
    read = None if columns is None else list(dict.fromkeys([*columns, *order]))
    filters = [("latent", "in", wanted)] + ([("kind", "=", kind)] if kind and "kind" in names else [])
    table = pq.read_table(path, columns=read, filters=filters)
    table = table.sort_by([(c, "descending" if c == "kind" else "ascending") for c in order])
    if columns is not None:
        table = table.select(columns)
    by: dict[int, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        by.setdefault(row["latent"], []).append(row)
    return by


@_reader
def example_block(features_dir: Folder, start: int, stop: int, columns: list[str],
                  kind: str | None = None) -> pa.Table:
    """The examples of latents start..stop-1 as one Arrow table of `columns` (unsorted), for
    batched work over many latents: no Python row per example. The range filter reads only the
    row groups that hold those latents, so a block's memory is that of its latents' examples."""
    path = Path(features_dir) / EXAMPLES_FILE
    names = pq.read_schema(path).names
    filters = [("latent", ">=", int(start)), ("latent", "<", int(stop))]
    filters += [("kind", "=", kind)] if kind and "kind" in names else []
    return pq.read_table(path, columns=columns, filters=filters)


@_reader
def coactive_features(features_dir: Folder, latent: int, n: int = 10) -> list[dict]:
    """Latents that fire at the same tokens as `latent`'s examples (top and quantile): how many
    of its examples each appears in, and its mean activation there; most frequent first."""
    return rank_coactive(read_examples(features_dir, latent, kind=None), n)


def rank_coactive(examples: Iterable[dict], n: int = 10) -> list[dict]:
    """`coactive_features` over example rows already read."""
    counts: dict[int, list[float]] = {}
    for ex in examples:
        for other, act in zip(ex.get("coactive_latents") or [], ex.get("coactive_acts") or []):
            counts.setdefault(other, []).append(act)
    ranked = sorted(counts.items(), key=lambda kv: (-len(kv[1]), -float(np.mean(kv[1])), kv[0]))
    return [{"latent": int(k), "count": len(v), "mean_act": float(np.mean(v))} for k, v in ranked[:n]]
