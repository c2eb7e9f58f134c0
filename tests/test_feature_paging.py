"""The feature browser at width reads one page, not every latent: the registry builds full rows
for the page shown only, a search decodes only the top tokens that may match (and finds exactly
what matching every row would), features.parquet is written in row groups so one latent's wide
columns are read alone, and charts of long runs are thinned to a bounded number of points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import storage.feature_pages as feature_pages
from core.features.schema import FEATURE_ROW_GROUP, FEATURES_FILE, FeatureQuery, matches
from storage.registry import SAE, Feature, Registry

N = 6000
TOKENS = [" def", " return", "ing", "Élan", "\u212a", 'say "hi"', "back\\slash", " the", "ÉCOLE", "x"]


def _rows(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        top = [TOKENS[j] for j in rng.choice(len(TOKENS), size=rng.integers(0, 4), replace=False)]
        fired = int(rng.integers(0, 50)) if i % 10 else 0
        rows.append({"latent": i, "n_fired": fired, "frequency": fired / 1000, "max_act": float(rng.uniform(0, 5)),
                     "mean_act": 0.5, "top_tokens": top})
    return rows


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(f"sqlite:///{tmp_path_factory.mktemp('paging') / 'registry.db'}")
    reg.add(SAE(id="wide", name="wide", hook_name="blocks.0.hook_resid_post", architecture="topk", d_in=8, d_sae=N,
                path="/nowhere"))
    rows = _rows(N)
    reg.replace_features("wide", rows)
    reg.update_features("wide", [{"latent": i, "label": "Ingress KELVIN" if i % 7 == 0 else "plain",
                                  "category": "other"} for i in range(0, N, 5)])
    yield reg
    reg.close()


@pytest.fixture
def built(monkeypatch):
    """How many registry Feature rows are turned into dicts (full rows materialized)."""
    count = {"n": 0}
    real = Feature.to_dict

    def counting(self):
        count["n"] += 1
        return real(self)

    monkeypatch.setattr(Feature, "to_dict", counting)
    return count


def _all(registry) -> list[dict]:
    return registry.features("wide", order_by="latent")


@pytest.mark.parametrize("offset", [0, 2500, 5500])
def test_a_page_builds_only_its_own_rows(registry, built, offset):
    page = registry.feature_page("wide", FeatureQuery(live_only=True, offset=offset, limit=100))
    live = [r for r in _all(registry) if r["n_fired"] > 0]
    want = sorted(live, key=lambda r: (-r["frequency"], r["latent"]))[offset:offset + 100]
    assert [r["latent"] for r in page.rows] == [r["latent"] for r in want]
    assert page.total == len(live)
    assert built["n"] == N + len(page.rows)  # _all built every row once; the page only its own


@pytest.mark.parametrize("search", ["ing", "ING", "élan", "k", "\u212a", '"hi', "\\", "kelvin", "42", "zzz", " "])
def test_a_search_finds_exactly_what_matching_every_row_finds(registry, built, monkeypatch, search):
    decoded = {"n": 0}
    real = feature_pages.json.loads

    def counting(text):
        decoded["n"] += 1
        return real(text)

    monkeypatch.setattr(feature_pages.json, "loads", counting)
    page = registry.feature_page("wide", FeatureQuery(order_by="max_act", search=search, limit=50, offset=10))
    rows = _all(registry)
    want = [r["latent"] for r in sorted(rows, key=lambda r: (-r["max_act"], r["latent"])) if matches(r, search)]
    assert page.total == len(want)
    assert [r["latent"] for r in page.rows] == want[10:60]
    assert built["n"] == N + len(page.rows)
    # a word's search decodes top tokens only for rows holding it, or holding escaped JSON text
    if search.isalnum() and search.isascii():
        plain = lambda t: t.isascii() and '"' not in t and "\\" not in t
        maybe = sum(1 for r in rows if any(search.lower() in t.lower() or not plain(t) for t in r["top_tokens"]))
        assert decoded["n"] <= maybe < N


def test_features_parquet_is_written_in_row_groups_and_one_latent_reads_one(tmp_path):
    from bench.browser import synthetic_discovered
    from core.features import store
    from core.features.config import DiscoverConfig
    from core.features.writer import write

    d_sae = FEATURE_ROW_GROUP * 2 + 100
    found = synthetic_discovered(d_sae, vocab=300)
    write(tmp_path / "f", found, lambda ids: [f"t{i}" for i in ids], DiscoverConfig())
    meta = pq.ParquetFile(tmp_path / "f" / FEATURES_FILE).metadata
    assert meta.num_row_groups == math.ceil(d_sae / FEATURE_ROW_GROUP)
    assert meta.row_group(0).num_rows == FEATURE_ROW_GROUP
    latent = FEATURE_ROW_GROUP + 7
    assert store.histograms(tmp_path / "f", [latent])[latent] == found.hist[latent].tolist()
    page = store.feature_page(tmp_path / "f", FeatureQuery(order_by="max_act", offset=3, limit=20))
    order = np.lexsort((np.arange(d_sae), -found.max_act.numpy()))
    assert [r["latent"] for r in page.rows] == order[3:23].tolist()


def test_a_long_history_is_thinned_for_its_chart():
    from ui.components.charts import MAX_POINTS, thin

    df = pd.DataFrame({"step": np.arange(5000), "loss": np.linspace(1, 0, 5000)})
    out = thin(df)
    assert len(out) == MAX_POINTS
    assert out["step"].iloc[0] == 0 and out["step"].iloc[-1] == 4999
    assert out["step"].is_monotonic_increasing
    gaps = np.diff(out["step"].to_numpy())
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    short = df.iloc[:100]
    assert thin(short) is short
