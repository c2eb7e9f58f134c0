"""Extraction to Parquet shards on a tiny Llama, and reading the shards back."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.data import iter_batches, tokenize_to_shards
from core.errors import Cancelled, UserError
from core.extract import count_activations, extract, iter_activations, read_hook_stats
from core.hooks import run_hooked

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi!", "Sparse autoencoders find features.",
         "a" * 40, "Padding must never be extracted."]


@pytest.fixture
def dataset(tmp_path, tiny_tokenizer):
    tokenize_to_shards(TEXTS, tiny_tokenizer, tmp_path / "ds", context_length=32, rows_per_shard=3)
    return tmp_path / "ds"


def _batches(dataset, tokenizer):
    return list(iter_batches(dataset, batch_size=3, pad_token_id=tokenizer.pad_token_id))


def test_extract_matches_run_hooked(tmp_path, dataset, tiny_llama, tiny_tokenizer):
    batches = _batches(dataset, tiny_tokenizer)
    assert any((b.attention_mask == 0).any() for b in batches)  # the test needs padding
    seen = []
    stats = extract(tiny_llama, batches, HOOKS, tmp_path / "acts", shard_tokens=50, progress=seen.append,
                    total_tokens=int(sum(b.attention_mask.sum() for b in batches)))
    n_real = int(sum(b.attention_mask.sum() for b in batches))
    for name in HOOKS:
        expected, rows, positions, tokens = [], [], [], []
        for b in batches:
            acts = run_hooked(tiny_llama, b.input_ids, b.attention_mask, [name])[name]
            for i, mask in enumerate(b.attention_mask):
                n = int(mask.sum())
                expected.append(acts[i, :n].numpy())
                rows += [int(b.row_ids[i])] * n
                positions += list(range(n))
                tokens += b.input_ids[i, :n].tolist()
        expected = np.concatenate(expected)
        hook_dir = tmp_path / "acts" / name
        table = pq.read_table(sorted(hook_dir.glob("shard-*.parquet")))
        assert table.schema.field("act").type == pa.list_(pa.float32(), 64)
        assert table.column("row_id").type == pa.int64() and table.column("pos").type == pa.int32()
        assert table.column("token_id").type == pa.int32()
        assert table.column("row_id").to_pylist() == rows
        assert table.column("pos").to_pylist() == positions
        assert table.column("token_id").to_pylist() == tokens
        got = np.concatenate(list(iter_activations(hook_dir, batch_tokens=16)))
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert count_activations(hook_dir) == n_real == stats[name].tokens
        assert len(list(hook_dir.glob("shard-*.parquet"))) == -(-n_real // 50)
        s = read_hook_stats(hook_dir)
        assert s == stats[name] and s.d_model == 64
        norms = np.linalg.norm(expected, axis=1)
        assert s.mean_norm == pytest.approx(norms.mean(), rel=1e-5)
        assert s.median_norm == pytest.approx(np.median(norms), rel=1e-5)
        assert s.max_norm == pytest.approx(norms.max(), rel=1e-5)
        assert s.mean == pytest.approx(expected.mean(), abs=1e-5)
        assert s.std == pytest.approx(expected.std(), rel=1e-4)
    assert seen[-1]["phase"] == "extract" and seen[-1]["done"] == seen[-1]["total"] == n_real
    assert seen[-1]["unit"] == "tokens" and seen[-1]["eta_s"] == 0


def test_iter_activations_is_zero_copy(tmp_path, dataset, tiny_llama, tiny_tokenizer):
    extract(tiny_llama, _batches(dataset, tiny_tokenizer), HOOKS[:1], tmp_path / "acts")
    chunks = list(iter_activations(tmp_path / "acts" / HOOKS[0], batch_tokens=7))
    assert all(c.dtype == np.float32 and c.shape[1] == 64 and len(c) <= 7 for c in chunks)
    assert not chunks[1].flags.writeable and not chunks[1].flags.owndata  # a view of Arrow memory


def test_cancel_leaves_nothing(tmp_path, dataset, tiny_llama, tiny_tokenizer):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 1  # cancel before the second batch

    with pytest.raises(Cancelled):
        extract(tiny_llama, _batches(dataset, tiny_tokenizer), HOOKS, tmp_path / "acts", should_cancel=should_cancel)
    assert list(tmp_path.iterdir()) == [dataset]


def test_bad_layer(tmp_path, dataset, tiny_llama, tiny_tokenizer):
    with pytest.raises(UserError, match="layer 7 is out of range"):
        extract(tiny_llama, _batches(dataset, tiny_tokenizer), ["blocks.7.hook_resid_post"], tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def test_median_from_reservoir(monkeypatch):
    """Past NORM_SAMPLE tokens the median comes from a uniform sample of norms."""
    import core.extract as ex

    monkeypatch.setattr(ex, "NORM_SAMPLE", 500)
    running = ex._RunningStats()
    rng = np.random.default_rng(0)
    scales = rng.uniform(0, 100, size=20_000).astype(np.float32)
    for part in np.array_split(scales, 37):
        running.update(np.stack([part, np.zeros_like(part)], axis=1))  # norm == scale
    s = running.result("h")
    assert s.tokens == 20_000
    assert s.median_norm == pytest.approx(50, abs=8)  # a sample of 500 from U(0, 100)
    assert s.mean_norm == pytest.approx(scales.mean(), rel=1e-6)
