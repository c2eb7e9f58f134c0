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


def test_exclude_special_tokens(tmp_path, tiny_llama, tiny_tokenizer):
    """Special-token positions are dropped like padding, counted in stats.json, and every kept
    position keeps its original `pos` and activation."""
    eos = tiny_tokenizer.eos_token  # the tiny tokenizer's only special token (id 256, also the pad)
    texts = [f"{eos}The quick brown fox.", f"Hi!{eos}again", "No special token here.", f"{eos}{eos}x"]
    tokenize_to_shards(texts, tiny_tokenizer, tmp_path / "ds", context_length=32)
    batches = _batches(tmp_path / "ds", tiny_tokenizer)
    special = tiny_tokenizer.all_special_ids
    real = [b.attention_mask.bool() for b in batches]
    n_special = sum(int((m & (b.input_ids == 256)).sum()) for m, b in zip(real, batches))
    n_real = sum(int(m.sum()) for m in real)
    assert n_special == 4
    seen = []
    stats = extract(tiny_llama, batches, HOOKS, tmp_path / "acts", exclude_token_ids=special, progress=seen.append,
                    total_tokens=n_real)
    assert seen[-1]["done"] == seen[-1]["total"] == n_real  # excluded tokens count as processed
    for name in HOOKS:
        hook_dir = tmp_path / "acts" / name
        s = read_hook_stats(hook_dir)
        assert s == stats[name] and s.excluded_special == n_special and s.tokens == n_real - n_special
        table = pq.read_table(sorted(hook_dir.glob("shard-*.parquet")))
        assert 256 not in table.column("token_id").to_pylist()
        expected = []
        for b, m in zip(batches, real):
            keep = m & (b.input_ids != 256)
            expected.append(run_hooked(tiny_llama, b.input_ids, b.attention_mask, [name])[name][keep].numpy())
        expected = np.concatenate(expected)
        np.testing.assert_allclose(np.concatenate(list(iter_activations(hook_dir))), expected, atol=1e-5)
        assert s.mean_norm == pytest.approx(np.linalg.norm(expected, axis=1).mean(), rel=1e-5)
        assert table.column("pos").to_pylist()[:3] == [1, 2, 3]  # row 0 starts with the excluded eos
    # Without the option nothing is excluded, and the count says so.
    plain = extract(tiny_llama, batches, HOOKS[:1], tmp_path / "plain")
    assert plain[HOOKS[0]].excluded_special == 0 and plain[HOOKS[0]].tokens == n_real


def test_only_special_tokens_is_an_error(tmp_path, tiny_llama, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    tokenize_to_shards([eos * 5], tiny_tokenizer, tmp_path / "ds", context_length=32)
    with pytest.raises(UserError, match="all 5 tokens are excluded special tokens"):
        extract(tiny_llama, _batches(tmp_path / "ds", tiny_tokenizer), HOOKS, tmp_path / "acts",
                exclude_token_ids=tiny_tokenizer.all_special_ids)
    assert not (tmp_path / "acts").exists()


def test_old_stats_json_loads(tmp_path):
    """stats.json written before `excluded_special` existed still reads, as 0."""
    old = {"hook_name": "blocks.0.hook_resid_post", "tokens": 10, "d_model": 4, "mean_norm": 1.0,
           "median_norm": 1.0, "max_norm": 2.0, "mean": 0.0, "std": 1.0}
    (tmp_path / "stats.json").write_text(__import__("json").dumps(old))
    assert read_hook_stats(tmp_path).excluded_special == 0


def test_context_longer_than_model_max_length(tmp_path, tiny_llama, tiny_tokenizer):
    """No hidden cap: rows longer than the tokenizer's model_max_length are tokenized, batched and
    extracted whole (the tiny Llama has 512 positions; RoPE models have no hard limit anyway)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                  model_max_length=128)
    tok.pad_token = tok.eos_token
    text = " ".join(f"word{i}" for i in range(200))  # 1,489 byte tokens
    ds = tokenize_to_shards([text], tok, tmp_path / "ds", context_length=500)
    assert ds.rows == 3 and ds.tokens == len(tok(text, verbose=False)["input_ids"]) > 1000
    batches = list(iter_batches(tmp_path / "ds", batch_size=2, pad_token_id=tok.pad_token_id))
    assert batches[0].input_ids.shape == (2, 500)
    stats = extract(tiny_llama, batches, HOOKS[:1], tmp_path / "acts")
    assert stats[HOOKS[0]].tokens == ds.tokens
    shards = sorted((tmp_path / "acts" / HOOKS[0]).glob("shard-*.parquet"))
    pos = pq.read_table(shards, columns=["pos"]).column("pos").to_numpy()
    assert pos.max() == 499


def test_rows_longer_than_learned_positions(tmp_path, tiny_tokenizer):
    """GPT-2's learned position table is a hard limit: a clear error instead of an IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=257,
                                       bos_token_id=256, eos_token_id=256)).eval()
    tokenize_to_shards(["x" * 40], tiny_tokenizer, tmp_path / "ds", context_length=32)
    with pytest.raises(UserError, match="rows of 32 tokens.*smaller context length"):
        extract(model, _batches(tmp_path / "ds", tiny_tokenizer), ["blocks.0.hook_resid_post"], tmp_path / "acts")


def test_shards_stream_in_row_groups_and_keep_every_token_in_order(tmp_path):
    """The writer holds at most a row group: shards of exactly `shard_tokens` (the last one
    shorter), row groups of at most `group_tokens`, every token once and in order."""
    from core.extract import _ActivationWriter

    rng = np.random.default_rng(0)
    writer = _ActivationWriter(tmp_path / "hook", shard_tokens=100, group_tokens=32)
    sizes = rng.integers(1, 70, size=20)
    n = int(sizes.sum())
    acts = rng.normal(size=(n, 8)).astype(np.float32)
    start = 0
    for size in sizes:
        part = slice(start, start + int(size))
        ids = np.arange(n)[part]
        writer.add(acts[part], ids.astype(np.int64), ids.astype(np.int32), ids.astype(np.int32))
        assert writer.buffered < 32  # nothing beyond one row group waits in memory
        start += int(size)
    writer.close()
    shards = sorted((tmp_path / "hook").glob("shard-*.parquet"))
    rows = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert rows == [100] * (n // 100) + ([n % 100] if n % 100 else [])
    groups = [pq.ParquetFile(s).metadata.row_group(i).num_rows for s in shards
              for i in range(pq.ParquetFile(s).metadata.num_row_groups)]
    assert max(groups) <= 32 and sum(groups) == n
    table = pq.read_table(shards)
    assert table.column("row_id").to_pylist() == list(range(n))
    np.testing.assert_array_equal(np.stack(table.column("act").to_numpy(zero_copy_only=False)), acts)


def test_rows_per_forward_come_from_free_gpu_memory(tiny_llama):
    """On the CPU the job's batch size stands; given a GPU's free memory, as many rows as fit in
    half of it by the forward's estimate (at least the job's, at most MAX_GPU_ROWS)."""
    from core.models.memory import MAX_GPU_ROWS, _forward_bytes, gpu_batch_size

    assert gpu_batch_size(tiny_llama, 8, 64, 1) == 8
    per_row = _forward_bytes(tiny_llama.config, 4, 1, 64, 1, False) + 100 * 64
    assert gpu_batch_size(tiny_llama, 8, 64, 1, 100, free_bytes=2 * 40 * per_row) == 40
    assert gpu_batch_size(tiny_llama, 8, 64, 1, 100, free_bytes=2 * 40 * per_row - 1) == 39
    assert gpu_batch_size(tiny_llama, 8, 64, 1, 100, free_bytes=per_row) == 8
    assert gpu_batch_size(tiny_llama, 8, 64, 1, 100, free_bytes=2**40) == MAX_GPU_ROWS
    assert gpu_batch_size(tiny_llama, 8, 64, None, 100, free_bytes=2 * 40 * per_row) < 40  # the logits count too
