"""Tokens without limit: training streams any number of passes over a Parquet activation cache,
keeps a bounded history, and on the fly overlaps the forward with the SAE steps through a
bounded prefetch queue (core.train.prefetch)."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from core.errors import Cancelled, UserError
from core.sae import TopKConfig
from core.train import RunSpec, TrainConfig, train_sae, train_saes
from core.train.history import History, merge
from core.train.prefetch import ahead, prefetched

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8


def write_cache(folder, n: int, d: int = D, shard_tokens: int = 700):
    """A `n`-token activation cache in core.extract's Parquet layout whose token i has x[:, 0] == i
    (and noise elsewhere), so the stream's order and coverage can be read off the data."""
    from core.extract import _ActivationWriter, _RunningStats

    rng = np.random.default_rng(0)
    writer, stats = _ActivationWriter(folder, shard_tokens, group_tokens=128), _RunningStats()
    for start in range(0, n, 250):
        a = rng.standard_normal((min(250, n - start), d)).astype(np.float32) + 3
        a[:, 0] = np.arange(start, start + len(a))
        rows = np.arange(start, start + len(a), dtype=np.int64) // 16
        writer.add(a, rows, np.arange(len(a), dtype=np.int32) % 16, np.zeros(len(a), np.int32))
        stats.update(a)
    writer.close()
    (folder / "stats.json").write_text(json.dumps(stats.result("x").to_dict()))
    return folder


def spied(source, log: list):
    """`source` recording, per call, its start chunk and the token indices it yielded."""
    def src(start):
        seen = []
        log.append((start, seen))
        for chunk in source(start):
            seen.extend(chunk["x"][:, 0].astype(np.int64).tolist())
            yield chunk
    return src


# --------------------------------------------------------------------------- many passes


def test_many_passes_over_a_parquet_cache_train_exactly_the_budget_in_order(tmp_path):
    from core.train.sources import cached_source

    n, holdout = 3_000, 200
    hook_dir = write_cache(tmp_path / "acts", n)
    budget = int(3.5 * (n - holdout))  # three whole passes and half of a fourth
    log: list = []
    cfg = TrainConfig(sae=TopKConfig(k=2), expansion_factor=2, batch_size=128, total_tokens=budget,
                      sample_tokens=512, outlier_norm_multiple=None, log_every=4)
    result = train_saes(spied(cached_source({"x": [hook_dir]}, chunk_tokens=300), log),
                        [RunSpec("sae", "x", D, cfg)], holdout_tokens=holdout)["sae"]
    assert result.final["tokens"] == budget
    assert result.history[-1]["tokens"] == budget
    prelude, *passes = log
    assert prelude[1][:holdout + 512] == list(range(holdout + 512))
    assert [start for start, _ in passes] == [0, 0, 0, 0]
    for _, seen in passes[:3]:  # each whole pass: every token once, in cache order
        assert seen == list(range(n))
    # the fourth pass stops within a chunk of where the budget runs out
    assert holdout + budget - 3 * (n - holdout) <= len(passes[3][1]) < holdout + budget - 3 * (n - holdout) + 300 + 4 * 128


def test_epochs_stream_the_cache_that_many_times(tmp_path):
    from core.train.sources import cached_training

    n = 2_000
    hook_dir = write_cache(tmp_path / "acts", n)
    cfg = TrainConfig(sae=TopKConfig(k=2), expansion_factor=2, batch_size=100, epochs=5, sample_tokens=256,
                      outlier_norm_multiple=None)
    source, runs, holdout = cached_training({"x": [hook_dir]}, [RunSpec("sae", "x", D, cfg)], eval_rows=0)
    assert runs[0].cfg.total_tokens == 5 * n and holdout == 0
    log: list = []
    result = train_saes(spied(source, log), runs)["sae"]
    assert result.final["tokens"] == 5 * n
    assert [seen == list(range(n)) for _, seen in log[1:]] == [True] * 5


# --------------------------------------------------------------------------- bounded history


def test_history_merges_pairwise_into_exact_window_means():
    h = History(cap=8)
    per_step = {}  # loss of each optimizer step: the exact means the rows must hold
    for i in range(1, 101):  # 100 log steps of 5 optimizer steps and 5 × 10 tokens each
        losses = [float(i * 10 + j) for j in range(5)]
        per_step.update({(i - 1) * 5 + j + 1: v for j, v in enumerate(losses)})
        h.add({"step": 5 * i, "tokens": 50 * i, "loss": sum(losses) / 5, "mse": float(i), "fvu": 0.5, "l0": 3.0,
               "dead_frac": i / 100, "lr": 1e-3})
        assert len(h) <= 8
    rows = h.all()
    assert 4 <= len(rows) <= 8
    assert rows[-1]["step"] == 500 and rows[-1]["tokens"] == 5_000 and rows[-1]["dead_frac"] == 1.0
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and len(set(np.diff(steps[:-1]))) == 1  # evenly spaced
    start = 0
    for r in rows:
        covered = [per_step[s] for s in range(start + 1, r["step"] + 1)]
        assert r["loss"] == pytest.approx(sum(covered) / len(covered))
        start = r["step"]
    assert h.last["step"] == 500


def test_merge_weights_each_window_by_its_steps_and_tokens():
    a = {"step": 10, "tokens": 100, "loss": 1.0, "mse": 1.0, "fvu": 1.0, "l0": 1.0, "dead_frac": 0.1, "lr": 1.0}
    b = {"step": 13, "tokens": 400, "loss": 2.0, "mse": 2.0, "fvu": 2.0, "l0": 2.0, "dead_frac": 0.2, "lr": 0.5}
    m = merge(a, b, (0, 0))
    assert m["loss"] == pytest.approx((10 * 1 + 3 * 2) / 13)  # step-weighted
    assert m["mse"] == pytest.approx((100 * 1 + 300 * 2) / 400)  # token-weighted
    assert (m["step"], m["tokens"], m["dead_frac"], m["lr"]) == (13, 400, 0.2, 0.5)


def test_a_long_training_keeps_a_bounded_history_and_resumes_it_exactly(tmp_path, monkeypatch):
    from core.train import CheckpointConfig
    from core.train import history as history_mod

    monkeypatch.setattr(history_mod, "HISTORY_ROWS", 16)
    x = np.random.default_rng(0).standard_normal((2_000, D)).astype(np.float32) + 2
    cfg = TrainConfig(sae=TopKConfig(k=2), expansion_factor=2, batch_size=32, total_tokens=12_800, log_every=1,
                      sample_tokens=256)
    chunks = lambda: iter([x[i:i + 250] for i in range(0, len(x), 250)])  # noqa: E731
    full = train_sae(chunks, D, cfg)
    assert len(full.history) <= 16  # 400 log steps
    assert full.history[-1]["step"] == 400 and full.history[-1]["tokens"] == 12_800
    ck, steps = CheckpointConfig(tmp_path / "ck", every_steps=37, keep=1), []
    with pytest.raises(Cancelled):
        train_sae(chunks, D, cfg, checkpoint=ck, progress=lambda d: steps.append(d["step"]),
                  should_cancel=lambda: bool(steps) and steps[-1] >= 250)
    resumed = train_sae(chunks, D, cfg, checkpoint=ck)
    assert resumed.history == full.history


# --------------------------------------------------------------------------- prefetch


def test_prefetch_yields_the_same_chunks_in_order():
    src = lambda start: ({"x": np.full((3, 2), i, np.float32)} for i in range(start, 40))  # noqa: E731
    got = list(prefetched(src, depth=2)(5))
    assert [int(c["x"][0, 0]) for c in got] == list(range(5, 40))


def test_prefetch_queue_is_bounded():
    made = []

    def src(start):
        for i in range(50):
            made.append(i)
            yield i

    it = prefetched(src, depth=2)(0)
    consumed = 0
    for _ in it:
        consumed += 1
        time.sleep(0.02)  # a slow consumer: the producer must wait, not run ahead
        # the queue's 2, plus the one the producer holds while the queue is full
        assert len(made) <= consumed + 3
        if consumed == 10:
            break
    it.close()
    assert len(made) <= 13


def test_a_producer_error_is_raised_in_the_consumer_not_a_hang():
    def src(start):
        yield {"x": np.zeros((1, 2), np.float32)}
        raise UserError("the dataset shard is damaged; add it again")

    it = prefetched(src)(0)
    next(it)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="shard is damaged"):
        next(it)
    assert time.perf_counter() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "mistudio-prefetch"]


def test_leaving_early_stops_the_producer_and_closes_its_source():
    closed = threading.Event()

    def src(start):
        try:
            for i in range(10_000):
                yield {"x": np.full((4, D), float(i), np.float32) + 1}
        finally:
            closed.set()

    # a training that cancels on its 3rd step: the loop closes the source on the way out
    cfg = TrainConfig(sae=TopKConfig(k=2), expansion_factor=2, batch_size=16, total_tokens=10**6, sample_tokens=16,
                      outlier_norm_multiple=None, log_every=1)
    steps = []
    with pytest.raises(Cancelled):
        train_saes(prefetched(src), [RunSpec("sae", "x", D, cfg)], progress=lambda d: steps.append(d["step"]),
                   should_cancel=lambda: len(steps) > 3)
    assert closed.wait(5)
    assert not [t for t in threading.enumerate() if t.name == "mistudio-prefetch" and t.is_alive()]


def test_prefetch_threads_apply_to_the_producer_only():
    outer = torch.get_num_threads()  # 1 under the one_thread fixture
    seen = list(ahead(lambda: iter([torch.get_num_threads()]), threads=outer + 1))
    assert seen == [outer + 1] and torch.get_num_threads() == outer


def test_training_on_the_fly_with_prefetch_equals_without(tiny_llama, tiny_tokenizer, tmp_path):
    """The prefetched live source yields exactly the non-prefetched chunks, and the SAEs trained
    from either are identical."""
    from core.data import builtin_corpus, tokenize_to_shards
    from core.train.sources import live_training, model_source

    ds = tmp_path / "ds"
    tokenize_to_shards(builtin_corpus()[:4], tiny_tokenizer, ds, context_length=32)
    hook = "blocks.0.hook_resid_post"
    d = tiny_llama.config.hidden_size
    plain = model_source(tiny_llama, [ds], [hook], tiny_tokenizer.pad_token_id, 4, max_tokens=600)
    ahead_ = prefetched(plain, depth=1)
    for start in (0, 3):
        a, b = list(plain(start)), list(ahead_(start))
        assert len(a) == len(b) >= 2
        assert all(np.array_equal(x[hook], y[hook]) for x, y in zip(a, b))
    cfg = TrainConfig(sae=TopKConfig(k=4), expansion_factor=2, batch_size=64, epochs=2, sample_tokens=128, lr=1e-3)
    runs = [RunSpec("sae", hook, d, cfg)]
    results = []
    for depth in (0, 1):
        source, holdout = live_training(tiny_llama, tiny_tokenizer, [ds], runs, eval_rows=2, batch_size=4,
                                        max_tokens=600, prefetch=depth)
        results.append(train_saes(source, runs, holdout_tokens=holdout)["sae"])
    for name, p in results[0].sae.state_dict().items():
        assert torch.equal(p, results[1].sae.state_dict()[name]), name
    assert results[0].history == results[1].history and results[0].final == results[1].final


def test_prefetched_smollm2_forward_matches_the_plain_one(smollm2_dir, tmp_path):
    """Through the real model: the forward run in the prefetch thread (its own grad mode and
    torch threads) gives the plain source's activations bit for bit."""
    from core.data import builtin_corpus, special_token_ids, tokenize_to_shards
    from core.models import load_model
    from core.train.sources import model_source

    model, tok = load_model(smollm2_dir)
    ds = tmp_path / "ds"
    tokenize_to_shards(builtin_corpus()[:6], tok, ds, context_length=64)
    hook = "blocks.3.hook_resid_post"
    plain = model_source(model, [ds], [hook], tok.pad_token_id, 2, max_tokens=300,
                         exclude_token_ids=special_token_ids(tok))
    a = list(plain(0))
    b = list(prefetched(plain, depth=1, threads=1)(0))
    assert len(a) == len(b) >= 2
    assert all(np.array_equal(x[hook], y[hook]) for x, y in zip(a, b))
    assert torch.is_grad_enabled()  # the producer's no_grad stayed in its thread
