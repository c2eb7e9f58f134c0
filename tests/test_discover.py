import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.errors import Cancelled, UserError
from core.features import HIST_EDGES, Accumulator, DiscoverConfig, FeatureQuery, discover
from core.features.schema import matches
from core.features.store import (coactive_features, examples_by_latent, feature_page, read_examples, read_histogram,
                                 top_features)
from core.features.writer import write
from core.sae import TopKConfig, TopKSAE

D_IN, D_SAE, K = 8, 16, 4
B, T = 3, 12
PAD = 0
CFG = DiscoverConfig(top_k=5, window_before=3, window_after=2, outlier_norm_multiple=None, row_group_latents=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(D_IN, D_SAE, TopKConfig(k=K))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    return sae


def make_batches(n_batches=4, seed=1):
    """Right-padded, left-padded and full rows; pad positions carry huge activations and PAD ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        ids = torch.randint(1, 30, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T - 3 :] = 0
        mask[1, :2] = 0
        acts = torch.randn(B, T, D_IN, generator=g)
        acts[mask == 0] = 100.0
        ids[mask == 0] = PAD
        out.append((ids, mask, torch.arange(B) + 100 * i, acts))
    return out


def folder(summary) -> str:
    """The features folder a discovery wrote (what the store reads)."""
    return summary.paths["features"].rsplit("/", 1)[0]


def decode(ids):
    return [f"t{i}" for i in ids]


def reference(sae, batches, cfg):
    """Brute force: every (token, latent) activation, sorted per feature in plain Python."""
    entries = defaultdict(list)  # latent -> [(value, row_id, pos)]
    rows = {}  # row_id -> (ids, mask, z per position [T, d_sae])
    tokens = 0
    with torch.no_grad():
        for ids, mask, row_ids, acts in batches:
            m = mask.bool()
            z = sae.encode(acts[m].float())  # the same call on the same tensor as discover
            b_idx, t_idx = m.nonzero(as_tuple=True)
            z_full = torch.zeros(B, T, D_SAE)
            z_full[b_idx, t_idx] = z
            for j, (b, t) in enumerate(zip(b_idx.tolist(), t_idx.tolist())):
                for latent in range(D_SAE):
                    v = float(z[j, latent])
                    if v > 0:
                        entries[latent].append((v, int(row_ids[b]), t))
            for b in range(B):
                rows[int(row_ids[b])] = (ids[b].tolist(), mask[b].tolist(), z_full[b])
            tokens += len(b_idx)
    top = {l: sorted(e, key=lambda e: -e[0])[: cfg.top_k] for l, e in entries.items()}
    return entries, top, rows, tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    sae, batches = make_sae(), make_batches()
    decoded = []
    calls = []

    def decode_once(ids):
        decoded.append(list(ids))
        return decode(ids)

    out = tmp_path_factory.mktemp("disc") / "features"
    summary = discover(sae, iter(batches), out, decode_once, CFG, total_tokens=10_000, progress=calls.append)
    return sae, batches, summary, decoded, calls


def test_top_k_matches_brute_force(run):
    sae, batches, summary, _, _ = run
    _, top, _, _ = reference(sae, batches, CFG)
    for latent in range(D_SAE):
        got = read_examples(folder(summary), latent)
        want = top.get(latent, [])
        assert [(e["activation"], e["row_id"], e["pos"]) for e in got] == [
            (pytest.approx(v, abs=0, rel=0), r, p) for v, r, p in want
        ]
        assert [e["rank"] for e in got] == list(range(len(want)))
        assert all(e["latent"] == latent for e in got)
    assert summary.heap_examples_count == sum(len(v) for v in top.values())
    assert summary.features_in_heap == len(top)


def test_windows_are_aligned_and_skip_padding(run):
    sae, batches, summary, _, _ = run
    _, _, rows, _ = reference(sae, batches, CFG)
    n = 0
    for latent in range(D_SAE):
        for e in read_examples(folder(summary), latent):
            ids, mask, z = rows[e["row_id"]]
            assert mask[e["pos"]] == 1
            span = [p for p in range(e["pos"] - CFG.window_before, e["pos"] + CFG.window_after + 1) if 0 <= p < T and mask[p]]
            assert e["token_ids"] == [ids[p] for p in span]
            assert e["tokens"] == decode(e["token_ids"])
            assert e["acts"] == [pytest.approx(float(z[p, latent]), abs=0, rel=0) for p in span]
            assert span[e["max_index"]] == e["pos"]
            assert e["acts"][e["max_index"]] == e["activation"]
            assert PAD not in e["token_ids"]
            n += 1
    assert n == summary.heap_examples_count > 0


def test_counts_are_exact(run):
    sae, batches, summary, _, _ = run
    entries, top, _, tokens = reference(sae, batches, CFG)
    features = pq.read_table(summary.paths["features"]).to_pylist()
    assert [f["latent"] for f in features] == list(range(D_SAE))
    assert summary.tokens == tokens == sum(int(b[1].sum()) for b in batches)
    for f in features:
        vals = [v for v, _, _ in entries.get(f["latent"], [])]
        assert f["n_fired"] == len(vals)
        assert f["frequency"] == pytest.approx(len(vals) / tokens)
        assert f["max_act"] == pytest.approx(max(vals, default=0.0))
        assert f["mean_act"] == pytest.approx(np.mean(vals) if vals else 0.0, rel=1e-5)
        # most common max-token strings among the top examples, ties broken by best rank
        centers = [rows_token(batches, r, p) for _, r, p in top.get(f["latent"], [])]
        counts = Counter(centers)
        order = sorted(counts, key=lambda t: (-counts[t], centers.index(t)))
        assert f["top_tokens"] == decode(order[:5])
    assert summary.live_features == sum(1 for f in features if f["n_fired"] > 0)
    assert summary.n_latents == D_SAE and summary.excluded_outliers == 0


def rows_token(batches, row_id, pos):
    for ids, _, row_ids, _ in batches:
        hit = (row_ids == row_id).nonzero()
        if len(hit):
            return int(ids[int(hit[0]), pos])
    raise KeyError(row_id)


def test_each_token_decoded_once_and_progress(run):
    _, _, summary, decoded, calls = run
    assert len(decoded) == 1 and len(decoded[0]) == len(set(decoded[0]))
    assert 2 <= len(calls) <= 4  # the first batch, then at most every PROGRESS_EVERY_S, and the end
    assert [c["done"] for c in calls] == sorted({c["done"] for c in calls})
    for c in calls:
        assert c["phase"] == "discover" and c["unit"] == "tokens" and c["total"] == 10_000
        assert {"done", "samples_per_s", "eta_s", "features_in_heap", "heap_examples_count"} <= set(c)
    assert calls[-1]["done"] == summary.tokens
    assert calls[-1]["heap_examples_count"] == summary.heap_examples_count


def test_examples_file_is_filterable_by_latent(run):
    _, _, summary, _, _ = run
    f = pq.ParquetFile(summary.paths["examples"])
    assert f.metadata.num_row_groups > 1
    table = f.read()
    # per latent: top rows by rank, then quantile rows by bin and rank
    key = [(r["latent"], r["kind"] != "top", r["bin"], r["rank"])
           for r in table.select(["latent", "kind", "bin", "rank"]).to_pylist()]
    assert key == sorted(key) and len(set(key)) == len(key)
    assert min(table.column("activation").to_pylist()) > 0


def test_top_features(run):
    _, _, summary, _, _ = run
    features = pq.read_table(summary.paths["features"]).to_pylist()
    live = sorted((f for f in features if f["n_fired"] > 0), key=lambda f: (-f["frequency"], f["latent"]))
    got = top_features(folder(summary), 3)
    assert [f["latent"] for f in got] == [f["latent"] for f in live[:3]]
    assert all(isinstance(t, str) for f in got for t in f["top_tokens"])


def test_outlier_tokens_are_excluded_and_listed(tmp_path):
    sae, batches = make_sae(), make_batches(n_batches=2)
    batches[1][3][2, 5] *= 1000.0  # one massive-activation token (row_id 102, pos 5)
    cfg = DiscoverConfig(top_k=5, window_before=3, window_after=2, outlier_norm_multiple=10.0)
    summary = discover(sae, iter(batches), tmp_path / "out", decode, cfg)
    n_tokens = sum(int(b[1].sum()) for b in batches)
    assert summary.excluded_outliers == 1 and summary.tokens == n_tokens - 1
    outliers = pq.read_table(summary.paths["outliers"]).to_pylist()
    assert [(o["row_id"], o["pos"], o["token"]) for o in outliers] == [(102, 5, decode([int(batches[1][0][2, 5])])[0])]
    examples = pq.read_table(summary.paths["examples"]).to_pylist()
    assert (102, 5) not in {(e["row_id"], e["pos"]) for e in examples}
    assert sum(f["n_fired"] for f in pq.read_table(summary.paths["features"]).to_pylist()) <= K * (n_tokens - 1)


def test_cancel_between_batches(tmp_path):
    with pytest.raises(Cancelled):
        discover(make_sae(), iter(make_batches()), tmp_path / "out", decode, CFG, should_cancel=lambda: True)
    assert not (tmp_path / "out").exists()


def test_quantile_samples_are_firing_tokens_in_rank_bins(run):
    """Quantile rows are real firing tokens of their latent with aligned windows; each bin's
    activations lie between the bins below and above; a latent that fired on fewer tokens than
    the reservoir has every firing token sampled."""
    sae, batches, summary, _, _ = run
    entries, _, rows, _ = reference(sae, batches, CFG)
    assert summary.quantile_examples_count > 0
    for latent, fired in entries.items():
        got = read_examples(folder(summary), latent, kind="quantile")
        firing = {(r, p): v for v, r, p in fired}
        assert len(got) == min(len(fired), CFG.reservoir)
        for e in got:
            assert e["kind"] == "quantile" and 0 <= e["bin"] < CFG.n_quantiles
            assert firing[(e["row_id"], e["pos"])] == e["activation"]
            assert e["acts"][e["max_index"]] == e["activation"]
            ids, _, z = rows[e["row_id"]]
            assert e["token_ids"][e["max_index"]] == ids[e["pos"]]
        assert len({(e["row_id"], e["pos"]) for e in got}) == len(got)
        acts = [e["activation"] for e in got]
        assert acts == sorted(acts), "bins ascend and rows ascend within a bin"
        if len(fired) <= CFG.reservoir:
            assert sorted(acts) == sorted(v for v, _, _ in fired)
    both = read_examples(folder(summary), 0, kind=None)
    assert [e["kind"] for e in both] == sorted((e["kind"] for e in both), key=lambda k: k != "top")


def test_histograms_are_exact(run):
    sae, batches, summary, _, _ = run
    entries, _, _, _ = reference(sae, batches, CFG)
    for latent in range(D_SAE):
        edges, counts = read_histogram(folder(summary), latent)
        assert edges == pytest.approx(list(HIST_EDGES))
        vals = np.array([v for v, _, _ in entries.get(latent, [])], dtype=np.float32)
        want = np.bincount(np.searchsorted(np.asarray(edges, np.float32), vals, side="left"), minlength=len(edges) + 1)
        assert counts == want.tolist() and sum(counts) == len(vals)


def test_coactive_latents_match_brute_force(run):
    sae, batches, summary, _, _ = run
    _, _, rows, _ = reference(sae, batches, CFG)
    n_checked = 0
    for latent in range(D_SAE):
        for e in read_examples(folder(summary), latent, kind=None):
            z = rows[e["row_id"]][2][e["pos"]]
            order = [int(i) for i in torch.argsort(z, descending=True, stable=True) if i != latent and z[i] > 0]
            want = order[: CFG.n_coactive]
            assert sorted(e["coactive_latents"]) == sorted(want)
            assert e["coactive_acts"] == [pytest.approx(float(z[i])) for i in e["coactive_latents"]]
            n_checked += 1
    assert n_checked > 0
    co = coactive_features(folder(summary), 0, n=3)
    assert 1 <= len(co) <= 3 and all(c["latent"] != 0 and c["count"] >= 1 for c in co)
    assert [c["count"] for c in co] == sorted((c["count"] for c in co), reverse=True)


def test_one_example_per_document_is_exact(tmp_path):
    """Documents span rows and batches: each latent keeps the best token of each of its best
    documents."""
    sae, batches = make_sae(), make_batches(n_batches=4)
    # two rows of one document per batch, and document 1 spans batches 0 and 1
    batches = [(*b, torch.tensor([0, 0, 1]) + 2 * i) for i, b in enumerate(batches)]
    batches[1] = (*batches[1][:4], torch.tensor([1, 1, 3]))
    cfg = DiscoverConfig(top_k=3, window_before=2, window_after=1, outlier_norm_multiple=None, one_per_document=True,
                         n_quantiles=0)
    summary = discover(sae, iter(batches), tmp_path / "out", decode, cfg)
    entries, _, _, _ = reference(sae, [b[:4] for b in batches], cfg)
    doc_of = {int(r): int(d) for _, _, row_ids, _, docs in batches for r, d in zip(row_ids, docs)}
    for latent in range(D_SAE):
        best: dict[int, tuple] = {}
        for v, r, p in entries.get(latent, []):
            d = doc_of[r]
            if d not in best or v > best[d][0]:
                best[d] = (v, r, p)
        want = sorted(best.values(), key=lambda e: -e[0])[: cfg.top_k]
        got = read_examples(folder(summary), latent)
        assert [(e["activation"], e["row_id"], e["pos"]) for e in got] == [(pytest.approx(v, abs=0, rel=0), r, p)
                                                                          for v, r, p in want]
        assert len({doc_of[e["row_id"]] for e in got}) == len(got)


def test_min_frequency_keeps_stats_but_drops_examples(tmp_path):
    sae, batches = make_sae(), make_batches()
    cfg = DiscoverConfig(top_k=3, window_before=1, window_after=1, outlier_norm_multiple=None, min_frequency=0.3)
    summary = discover(sae, iter(batches), tmp_path / "out", decode, cfg)
    features = pq.read_table(summary.paths["features"]).to_pylist()
    rare = {f["latent"] for f in features if f["frequency"] < 0.3}
    assert rare and len(rare) < D_SAE
    assert all(f["below_min_frequency"] == (f["latent"] in rare) for f in features)
    assert all(f["n_fired"] >= 0 for f in features if f["latent"] in rare)
    for latent in range(D_SAE):
        got = read_examples(folder(summary), latent, kind=None)
        assert (not got) == (latent in rare or features[latent]["n_fired"] == 0)


def test_a_small_reservoir_samples_each_bin(tmp_path):
    """With fewer slots than firing tokens, each latent keeps exactly n_quantiles × per-bin
    sampled tokens, per_bin in each bin, all real firing tokens."""
    sae, batches = make_sae(), make_batches(n_batches=6)
    cfg = DiscoverConfig(top_k=2, window_before=1, window_after=1, outlier_norm_multiple=None, n_quantiles=2,
                         quantile_examples=3)
    summary = discover(sae, iter(batches), tmp_path / "out", decode, cfg)
    entries, _, _, _ = reference(sae, batches, cfg)
    crowded = [l for l, e in entries.items() if len(e) > cfg.reservoir]
    assert crowded
    for latent in crowded:
        got = read_examples(folder(summary), latent, kind="quantile")
        assert [e["bin"] for e in got] == [0, 0, 0, 1, 1, 1]
        firing = {(r, p): v for v, r, p in entries[latent]}
        assert all(firing[(e["row_id"], e["pos"])] == e["activation"] for e in got)


def test_same_seed_same_samples(tmp_path):
    cfg = DiscoverConfig(top_k=2, window_before=1, window_after=1, outlier_norm_multiple=None, seed=7)
    runs = [discover(make_sae(), iter(make_batches()), tmp_path / f"o{i}", decode, cfg) for i in range(2)]
    tables = [pq.read_table(r.paths["examples"]).to_pylist() for r in runs]
    assert tables[0] == tables[1]
    other = discover(make_sae(), iter(make_batches()), tmp_path / "o3", decode,
                     DiscoverConfig(top_k=2, window_before=1, window_after=1, outlier_norm_multiple=None, seed=8))
    assert pq.read_table(other.paths["examples"]).to_pylist() != tables[0]


class _DenseOnly(torch.nn.Module):
    """The same SAE read through its dense encode only, as a ReLU or JumpReLU SAE is read."""

    def __init__(self, sae):
        super().__init__()
        self.sae, self.W_dec = sae, sae.W_dec

    def encode(self, x):
        return self.sae.encode(x)


@pytest.mark.parametrize("one_per_document", [False, True])
def test_topk_values_and_dense_z_give_the_same_files(tmp_path, one_per_document):
    """A TopK SAE is read through its own (values, indices); the dense read of the same SAE
    writes identical features, examples (quantile samples included) and outliers."""
    sae, batches = make_sae(), make_batches()
    cfg = dataclasses.replace(CFG, one_per_document=one_per_document, outlier_norm_multiple=1.4)
    sparse = discover(sae, iter(batches), tmp_path / "sparse", decode, cfg)
    dense = discover(_DenseOnly(sae), iter(batches), tmp_path / "dense", decode, cfg)
    assert sparse.excluded_outliers > 0 and sparse.heap_examples_count > 0
    for name in ("features", "examples", "outliers"):
        a, b = pq.read_table(sparse.paths[name]), pq.read_table(dense.paths[name])
        assert a.num_rows > 0 and a.equals(b), name


def test_a_batch_that_beats_nothing_in_the_tables(tmp_path):
    """The same batch twice with one slot per latent: every latent that fires holds its best
    after the first, so the second one's candidates only tie them and none contends — the top
    examples are those of one pass and the counts double."""
    sae, (batch, *_) = make_sae(), make_batches(1)
    cfg = dataclasses.replace(CFG, top_k=1, n_quantiles=0)
    once = discover(sae, iter([batch]), tmp_path / "once", decode, cfg)
    twice = discover(sae, iter([batch, batch]), tmp_path / "twice", decode, cfg)
    assert pq.read_table(once.paths["examples"]).equals(pq.read_table(twice.paths["examples"]))
    n1 = pq.read_table(once.paths["features"]).column("n_fired").to_pylist()
    n2 = pq.read_table(twice.paths["features"]).column("n_fired").to_pylist()
    assert n2 == [2 * n for n in n1] and sum(n1) > 0


# -- the accumulator merges: two halves of a stream give the state of one pass --------------------------


def _accumulate(sae, batches, cfg, key_state=None):
    acc = Accumulator(sae, cfg, key_state=key_state)
    for b in batches:
        acc.update(b)
    return acc


def _written(acc, folder, cfg):
    """The tables a finished accumulator writes (features without mean_act, which is compared apart)."""
    summary = write(folder, acc.finalize(), decode, cfg)
    features = pq.read_table(summary.paths["features"])
    mean = features.column("mean_act").to_numpy()
    tables = {name: pq.read_table(summary.paths[name]) for name in ("examples", "outliers")}
    tables["features"] = features.drop(["mean_act"])
    return tables, mean, summary._replace(paths={})


@pytest.mark.parametrize("variant", ["top and quantiles", "one per document", "outliers"])
def test_halves_merge_into_one_pass(tmp_path, variant):
    """Accumulate the first and second half of a batch stream apart, merge, and the state and the
    written tables equal one pass over the whole stream: exactly for the top-k examples, the
    quantile reservoir (the second half continues the first half's key stream), the histograms,
    counts, maxima and outliers; the float64 activation sums up to rounding. Three parts merged
    in either grouping give the same (the merge is associative)."""
    cfg = {"top and quantiles": CFG, "one per document": dataclasses.replace(CFG, one_per_document=True),
           "outliers": dataclasses.replace(CFG, max_norm=3.2)}[variant]
    sae, batches = make_sae(), make_batches(6)
    one = _accumulate(sae, batches, cfg)
    first = _accumulate(sae, batches[:3], cfg)
    second = _accumulate(sae, batches[3:], cfg, key_state=first.key_state())
    merged = first.merge(second)
    for field in ("n_fired", "hist", "max_act"):
        assert torch.equal(getattr(merged, field), getattr(one, field)), field
    assert torch.allclose(merged.sum_act, one.sum_act, rtol=1e-12, atol=0)
    assert (merged.tokens, merged.seen, merged.n_batches) == (one.tokens, one.seen, one.n_batches)
    if variant == "outliers":
        assert one.seen > one.tokens  # the cut excludes some tokens, and the merge keeps them out too
    want, want_mean, want_summary = _written(one, tmp_path / "one", cfg)
    got, got_mean, got_summary = _written(merged, tmp_path / "merged", cfg)
    assert got_summary == want_summary and want_summary.heap_examples_count > 0
    for name in want:
        assert got[name].equals(want[name]), name
    np.testing.assert_allclose(got_mean, want_mean, rtol=1e-6)

    # three parts, grouped ((a b) c) and (a (b c))
    a = _accumulate(sae, batches[:2], cfg)
    b = _accumulate(sae, batches[2:4], cfg, key_state=a.key_state())
    c = _accumulate(sae, batches[4:], cfg, key_state=b.key_state())
    left = _accumulate(sae, batches[:2], cfg).merge(_accumulate(sae, batches[2:4], cfg, key_state=a.key_state()))
    left.merge(_accumulate(sae, batches[4:], cfg, key_state=b.key_state()))
    right = a.merge(b.merge(c))
    for acc, name in ((left, "left"), (right, "right")):
        tables, _, _ = _written(acc, tmp_path / name, cfg)
        assert all(tables[t].equals(want[t]) for t in want), name


def test_independent_reservoirs_merge_to_the_top_keys_of_both(tmp_path):
    """Halves whose reservoir keys come from independent streams: the merged reservoir holds each
    latent's S largest keys of the two reservoirs — a uniform sample of the whole stream's
    firing tokens, of size min(S, firings) — though not the same sample as one pass."""
    sae, batches = make_sae(), make_batches(6)
    first = _accumulate(sae, batches[:3], CFG)
    second = _accumulate(sae, batches[3:], CFG, key_state=torch.Generator().manual_seed(99).get_state())
    keys = torch.cat([first.sample["key"], second.sample["key"]], 1)
    merged = first.merge(second)
    S = CFG.reservoir
    want = keys.topk(S, dim=1).values
    assert torch.equal(merged.sample["key"].sort(dim=1, descending=True).values, want)
    held = (merged.sample["value"] > 0).sum(1)
    assert torch.equal(held, merged.n_fired.clamp(max=S)) and int(held.sum()) > 0


def test_merging_different_configs_or_cuts_is_refused():
    sae = make_sae()
    with pytest.raises(UserError, match="same SAE width and discovery config"):
        Accumulator(sae, CFG).merge(Accumulator(sae, dataclasses.replace(CFG, top_k=3)))
    a = Accumulator(sae, dataclasses.replace(CFG, max_norm=None, outlier_norm_multiple=2.0))
    b = Accumulator(sae, a.cfg)
    a.update(make_batches(1)[0])
    b.update(make_batches(1, seed=5)[0])
    with pytest.raises(UserError, match="different outlier cuts"):
        a.merge(b)


def test_the_store_serves_pages_of_the_feature_table(run):
    """feature_page over features.parquet: the filters, order and slice a listing asks for, equal
    to filtering every row in Python; the page's rows are whole rows (or the columns asked for)."""
    _, _, summary, _, _ = run
    every = pq.read_table(summary.paths["features"]).to_pylist()
    queries = [FeatureQuery(), FeatureQuery(limit=4), FeatureQuery(offset=3, limit=5, order_by="max_act"),
               FeatureQuery(live_only=True, order_by="mean_act"), FeatureQuery(order_by="latent", offset=14),
               FeatureQuery(min_frequency=float(np.median([f["frequency"] for f in every]))),
               FeatureQuery(min_max_act=1.0, order_by="n_fired"), FeatureQuery(latents=(3, 1, 7), order_by="latent"),
               FeatureQuery(search=every[0]["top_tokens"][0].upper()), FeatureQuery(search="5")]
    for q in queries:
        want = [f for f in every if f["frequency"] >= q.min_frequency and (f["n_fired"] > 0 or not q.live_only)
                and f["max_act"] >= q.min_max_act and (q.latents is None or f["latent"] in q.latents)
                and (not q.search or matches(f, q.search))]
        want.sort(key=(lambda f: f["latent"]) if q.order_by == "latent" else (lambda f: (-f[q.order_by], f["latent"])))
        stop = None if q.limit is None else q.offset + q.limit
        page = feature_page(folder(summary), q)
        assert page.rows == want[q.offset:stop] and page.total == len(want), q
    narrow = feature_page(folder(summary), FeatureQuery(limit=3), columns=["frequency", "n_fired"])
    assert narrow.rows == [{"frequency": f["frequency"], "n_fired": f["n_fired"]}
                           for f in feature_page(folder(summary), FeatureQuery(limit=3)).rows]
    with pytest.raises(UserError, match="labels live in the registry"):
        feature_page(folder(summary), FeatureQuery(labels="labeled"))


def test_the_store_reads_the_examples_of_several_latents_at_once(run):
    _, _, summary, _, _ = run
    by = examples_by_latent(folder(summary), [0, 3, 5])
    assert set(by) == {0, 3, 5}
    for latent, rows in by.items():
        assert rows == read_examples(folder(summary), latent, kind=None)
    tops = examples_by_latent(folder(summary), [3], kind="top", columns=["tokens", "max_index"])
    assert tops[3] == [{"latent": 3, "tokens": e["tokens"], "max_index": e["max_index"]}
                       for e in read_examples(folder(summary), 3)]
    assert examples_by_latent(folder(summary), []) == {}


def test_discovery_leaves_special_tokens_out_by_id(tiny_llama, tiny_tokenizer, tmp_path):
    """discover_features: positions of the excluded ids (BOS/EOS/pad in a job; a frequent byte
    here) are no candidates and not in the statistics, and the summary counts them."""
    from core.data import builtin_corpus, iter_batches, tokenize_to_shards
    from core.features.discovery import discover_features
    from core.formats.saelens import save_saelens

    ds = tmp_path / "ds"
    tokenize_to_shards(builtin_corpus()[:2], tiny_tokenizer, ds, context_length=32)
    torch.manual_seed(0)
    sae = TopKSAE(64, 128, TopKConfig(k=4))
    save_saelens(sae, sae.config(hook_name="blocks.0.hook_resid_post"), tmp_path / "sae")
    batches = list(iter_batches(ds, 4, tiny_tokenizer.pad_token_id, max_tokens=300))
    special = int(batches[0].input_ids[0, 2])
    real = sum(int(b.attention_mask.sum()) for b in batches)
    expected = sum(int((b.attention_mask.bool() & (b.input_ids == special)).sum()) for b in batches)
    assert 0 < expected < real
    cfg = DiscoverConfig(top_k=3, window_before=1, window_after=1, outlier_norm_multiple=None)
    summary = discover_features(tiny_llama, tiny_tokenizer, tmp_path / "sae", ds, tmp_path / "f", cfg, batch_size=4,
                                max_tokens=300, exclude_token_ids=[special])
    assert (summary.excluded_special, summary.tokens) == (expected, real - expected)
    info = json.loads(Path(summary.paths["info"]).read_text())
    assert (info["excluded_special"], info["tokens"]) == (expected, real - expected)
    examples = pq.read_table(summary.paths["examples"]).to_pylist()
    assert examples and all(e["token_ids"][e["max_index"]] != special for e in examples)
    plain = discover_features(tiny_llama, tiny_tokenizer, tmp_path / "sae", ds, tmp_path / "g", cfg, batch_size=4,
                              max_tokens=300)
    assert (plain.excluded_special, plain.tokens) == (0, real)


def test_encoding_in_blocks_gives_the_same_files(tmp_path, monkeypatch):
    """A TopK SAE's batch encoded a block of tokens at a time into one reused buffer (as at 65k
    latents) gives the files of one call over the whole batch, bit for bit."""
    import core.features.batch as batch_mod

    sae = make_sae()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(1, 30, (4, 40), generator=g), torch.ones(4, 40, dtype=torch.long),
                torch.arange(4) + 4 * i, torch.randn(4, 40, D_IN, generator=g)) for i in range(3)]
    whole = discover(sae, iter(batches), tmp_path / "whole", decode, CFG)
    monkeypatch.setattr(batch_mod, "ENCODE_BLOCK_BYTES", 4 * D_SAE * 50)  # blocks of 50, 50, 60 tokens
    blocks = discover(sae, iter(batches), tmp_path / "blocks", decode, CFG)
    for name in ("features", "examples"):
        assert pq.read_table(blocks.paths[name]).equals(pq.read_table(whole.paths[name])), name


def test_writing_in_blocks_of_latents_gives_the_same_files(tmp_path, monkeypatch):
    """examples.parquet written a few latents at a time (as at 65k latents) holds the rows of
    one write, and the summary counts agree."""
    import core.features.writer as writer_mod

    sae, batches = make_sae(), make_batches()
    one = discover(sae, iter(batches), tmp_path / "one", decode, CFG)
    monkeypatch.setattr(writer_mod, "WRITE_LATENTS", 4)  # 4 blocks of 4 latents
    blocks = discover(sae, iter(batches), tmp_path / "blocks", decode, CFG)
    for name in ("features", "examples", "outliers"):
        assert pq.read_table(blocks.paths[name]).equals(pq.read_table(one.paths[name])), name
    assert pq.ParquetFile(blocks.paths["examples"]).num_row_groups >= 4
    assert blocks._replace(paths={}) == one._replace(paths={})


@pytest.mark.parametrize("cfg", [CFG, DiscoverConfig(), DiscoverConfig(n_quantiles=0, n_coactive=0, top_k=3)])
def test_state_bytes_is_what_the_accumulator_holds(cfg):
    """The documented memory bound (a function of width, top-k, reservoir and window) is the
    bytes the running state allocates, and batches add nothing to it."""
    from core.features.accumulator import state_bytes

    acc = Accumulator(make_sae(), cfg)

    def held():
        tables = [acc.top, *([acc.sample] if acc.sample is not None else [])]
        tensors = [v for t in tables for v in t.values()] + [acc.hist, acc.n_fired, acc.sum_act, acc.max_act]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert held() == state_bytes(D_SAE, cfg)
    for b in make_batches():
        acc.update(b)
    assert held() == state_bytes(D_SAE, cfg)
