import dataclasses
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.discover import (HIST_EDGES, DiscoverConfig, coactive_features, discover, read_examples, read_histogram,
                           top_features)
from core.errors import Cancelled
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
        got = read_examples(summary.paths["examples"], latent)
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
        for e in read_examples(summary.paths["examples"], latent):
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
    assert len(calls) == 4
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
    got = top_features(summary.paths["features"], 3)
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
        got = read_examples(summary.paths["examples"], latent, kind="quantile")
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
    both = read_examples(summary.paths["examples"], 0, kind=None)
    assert [e["kind"] for e in both] == sorted((e["kind"] for e in both), key=lambda k: k != "top")


def test_histograms_are_exact(run):
    sae, batches, summary, _, _ = run
    entries, _, _, _ = reference(sae, batches, CFG)
    folder = summary.paths["features"].rsplit("/", 1)[0]
    for latent in range(D_SAE):
        edges, counts = read_histogram(folder, latent)
        assert edges == pytest.approx(list(HIST_EDGES))
        vals = np.array([v for v, _, _ in entries.get(latent, [])], dtype=np.float32)
        want = np.bincount(np.searchsorted(np.asarray(edges, np.float32), vals, side="left"), minlength=len(edges) + 1)
        assert counts == want.tolist() and sum(counts) == len(vals)


def test_coactive_latents_match_brute_force(run):
    sae, batches, summary, _, _ = run
    _, _, rows, _ = reference(sae, batches, CFG)
    n_checked = 0
    for latent in range(D_SAE):
        for e in read_examples(summary.paths["examples"], latent, kind=None):
            z = rows[e["row_id"]][2][e["pos"]]
            order = [int(i) for i in torch.argsort(z, descending=True, stable=True) if i != latent and z[i] > 0]
            want = order[: CFG.n_coactive]
            assert sorted(e["coactive_latents"]) == sorted(want)
            assert e["coactive_acts"] == [pytest.approx(float(z[i])) for i in e["coactive_latents"]]
            n_checked += 1
    assert n_checked > 0
    co = coactive_features(summary.paths["examples"], 0, n=3)
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
        got = read_examples(summary.paths["examples"], latent)
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
        got = read_examples(summary.paths["examples"], latent, kind=None)
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
        got = read_examples(summary.paths["examples"], latent, kind="quantile")
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
