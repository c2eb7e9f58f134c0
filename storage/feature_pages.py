"""Pages of an SAE's feature rows in the registry: a `FeatureQuery`'s filters, order and slice as
SQL, so a listing of tens of thousands of latents loads only the page it shows.

The registry is where labels live, so it answers every filter of the query; core/features/store.py
answers the same query over features.parquet for the filters that file holds.

A page is read in two steps: the latents of the page (one narrow ordered query, so a deep page
sorts two columns, not whole rows), then those latents' rows. A text search (label, top tokens
or latent number, core.features.schema.matches) runs in Python over narrow columns of the rows
the other filters keep, with the top tokens as the database's raw JSON text: a plain substring
test on that text rules out most rows without decoding them, and only the rows it cannot rule
out are decoded and matched exactly (`_candidate` says why that loses no match). Matching in SQL
would depend on how each database escapes and lowercases that JSON.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import Session

from core.features.schema import FeaturePage, FeatureQuery, matches


def feature_page(s: Session, feature, sae_id: str, q: FeatureQuery, count: bool = True) -> FeaturePage:
    """One page of `feature` (the registry's Feature model) rows of an SAE; total is -1 unless
    `count`."""
    q.check()
    where = _conditions(feature, sae_id, q)
    order = [feature.latent] if q.order_by == "latent" else [getattr(feature, q.order_by).desc(), feature.latent]
    stop = None if q.limit is None else q.offset + q.limit
    if q.search:
        found = _search(s, feature, where, order, q.search)
        latents, total = found[q.offset:stop], len(found)
    else:
        stmt = select(feature.latent).where(*where).order_by(*order).offset(q.offset or None)
        if q.limit is not None:
            stmt = stmt.limit(q.limit)
        latents = list(s.scalars(stmt))
        total = s.scalar(select(func.count()).select_from(feature).where(*where)) if count else -1
    return FeaturePage(_rows(s, feature, sae_id, latents), total)


def _rows(s: Session, feature, sae_id: str, latents: list[int]) -> list[dict[str, Any]]:
    """The full rows of `latents`, in that order."""
    if not latents:
        return []
    rows = {r.latent: r.to_dict() for r in s.scalars(select(feature).where(feature.sae_id == sae_id,
                                                                          feature.latent.in_(latents)))}
    return [rows[i] for i in latents]


def _search(s: Session, feature, where: list[Any], order: list[Any], search: str) -> list[int]:
    """The latents (in the query's order) that pass the filters and match `search`."""
    needle = search.lower()
    narrow = s.execute(select(feature.latent, feature.label, cast(feature.top_tokens, Text))
                       .where(*where).order_by(*order))
    found = []
    for latent, label, raw in narrow:
        if matches({"latent": latent, "label": label, "top_tokens": []}, search) or (
                _candidate(needle, raw) and matches({"latent": latent, "label": label, "top_tokens": json.loads(raw)},
                                                    search)):
            found.append(latent)
    return found


def _candidate(needle: str, raw: str | None) -> bool:
    """Whether a top-token list stored as the JSON text `raw` may hold a token containing
    `needle` (lowercased). A JSON text that is pure ASCII without a backslash holds every token
    verbatim, so a token containing the needle puts the needle in the text's lowercase; any
    other text (escapes, or characters whose lowercase differs in length or script) is always
    a candidate and is decoded."""
    if not raw:
        return False
    return needle in raw.lower() or "\\" in raw or not raw.isascii()


def _conditions(feature, sae_id: str, q: FeatureQuery) -> list[Any]:
    where = [feature.sae_id == sae_id, feature.frequency >= q.min_frequency]
    if q.live_only:
        where.append(feature.n_fired > 0)
    if q.min_max_act > 0:
        where.append(feature.max_act >= q.min_max_act)
    if q.latents is not None:
        where.append(feature.latent.in_([int(i) for i in q.latents]))
    if q.labels == "labeled":
        where.append(feature.label != "")
    elif q.labels == "unlabeled":
        where.append(feature.label == "")
    elif q.labels != "all":
        where += [feature.label != "", feature.category == q.labels]
    return where
