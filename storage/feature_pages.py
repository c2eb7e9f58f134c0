"""Pages of an SAE's feature rows in the registry: a `FeatureQuery`'s filters, order and slice as
SQL, so a listing of tens of thousands of latents loads only the page it shows.

The registry is where labels live, so it answers every filter of the query; core/features/store.py
answers the same query over features.parquet for the filters that file holds. A text search
(label, top tokens or latent number, core.features.schema.matches) runs in Python over three
narrow columns of the rows the other filters keep: top tokens are a JSON list, and matching in
SQL would depend on how each database escapes that JSON.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.features.schema import FeaturePage, FeatureQuery, matches


def feature_page(s: Session, feature, sae_id: str, q: FeatureQuery, count: bool = True) -> FeaturePage:
    """One page of `feature` (the registry's Feature model) rows of an SAE; total is -1 unless
    `count`."""
    q.check()
    where = _conditions(feature, sae_id, q)
    order = [feature.latent] if q.order_by == "latent" else [getattr(feature, q.order_by).desc(), feature.latent]
    if q.search:
        narrow = s.execute(select(feature.latent, feature.label, feature.top_tokens).where(*where).order_by(*order))
        found = [r.latent for r in narrow if matches(r._asdict(), q.search)]
        stop = None if q.limit is None else q.offset + q.limit
        latents = found[q.offset:stop]
        rows = {r.latent: r.to_dict() for r in s.scalars(select(feature).where(feature.sae_id == sae_id,
                                                                              feature.latent.in_(latents)))}
        return FeaturePage([rows[i] for i in latents], len(found))
    stmt = select(feature).where(*where).order_by(*order).offset(q.offset or None)
    if q.limit is not None:
        stmt = stmt.limit(q.limit)
    rows = [r.to_dict() for r in s.scalars(stmt)]
    total = s.scalar(select(func.count()).select_from(feature).where(*where)) if count else -1
    return FeaturePage(rows, total)


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
