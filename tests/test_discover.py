from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from core.discover import DiscoverConfig, discover, read_examples, top_features
from core.errors import Cancelled
from core.sae import TopKSAE

D_IN, D_SAE, K = 8, 16, 4
B, T = 3, 12
PAD = 0
CFG = DiscoverConfig(top_k=5, window_before=3, window_after=2, outlier_norm_multiple=None, row_group_latents=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(seed=0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(D_IN, D_SAE, K)
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
    latents = table.column("latent").to_pylist()
    ranks = table.column("rank").to_pylist()
    assert list(zip(latents, ranks)) == sorted(zip(latents, ranks))
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
