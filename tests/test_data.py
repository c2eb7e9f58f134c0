"""Corpus loading, token shards and batching."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.data import (CORPORA, DatasetStats, builtin_corpus, iter_batches, load_texts, read_stats, row_lengths,
                       stdlib_source, tokenize_dataset, tokenize_to_shards)
from core.errors import UserError


def test_builtin_corpus_is_real_and_deterministic():
    docs = builtin_corpus()
    assert docs == builtin_corpus()
    assert len(docs) > 300 and sum(map(len, docs)) > 450_000
    assert all(d.strip() == d and d for d in docs)
    assert max(map(len, docs)) <= 2000
    assert any('The "assert" statement' in d for d in docs)
    assert load_texts("builtin", limit=5) == docs[:5]


def test_stdlib_source_is_the_standard_librarys_code_tests_included():
    """The second built-in corpus: every .py file of the stdlib (found through sysconfig, so also
    from a venv), tests included, site-packages left out, in a fixed order, streamed."""
    import itertools
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    first = list(itertools.islice(stdlib_source(), 40))
    assert first == list(itertools.islice(stdlib_source(), 40))  # deterministic
    assert all(d.strip() for d in first)
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    assert CORPORA["stdlib-source"].count() == len(files) > 1_000
    assert (root / "test").is_dir() and sum(1 for p in files if "test" in p.relative_to(root).parts) > 300
    assert (root / "heapq.py").read_text(encoding="utf-8") in stdlib_source()  # a plain module, whole
    assert load_texts("stdlib-source", limit=3) == first[:3]
    assert load_texts("builtin", limit=4) == load_texts("stdlib-docs", limit=4)


def test_a_builtin_corpus_is_tokenized_as_a_stream(tmp_path, tiny_tokenizer):
    """tokenize_dataset reads a built-in corpus as a stream, with progress against its size."""
    seen = []
    stats = tokenize_dataset(tiny_tokenizer, "stdlib-source", tmp_path / "src", context_length=128, max_documents=30,
                             progress=seen.append)
    assert stats.documents == 30 and stats.tokens > 30 * 100
    assert seen[-1]["total"] == 30 and seen[-1]["done"] == 30 and seen[-1]["unit"] == "documents"
    docs = iter(["def f():\n    return 1\n", "", "class A:\n    pass\n"])  # a generator has no len()
    stats = tokenize_to_shards(docs, tiny_tokenizer, tmp_path / "gen", context_length=16)
    assert stats.documents == 3 and stats.tokens == len("def f():\n    return 1\n") + len("class A:\n    pass\n")


def test_load_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n  \nsecond doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc\n"]
    (tmp_path / "b.jsonl").write_text('{"body": "x y"}\n\n{"body": "  "}\n{"body": "z"}\n')
    assert load_texts(str(tmp_path / "b.jsonl"), text_column="body") == ["x y", "z"]
    pq.write_table(pa.table({"text": ["p1", None, "p2", "p3"], "n": [1, 2, 3, 4]}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "c.parquet"), limit=2) == ["p1", "p2"]
    (tmp_path / "d.csv").write_text('a,b\n1,"multi\nline"\n2,hello\n')
    assert load_texts(str(tmp_path / "d.csv"), text_column="b") == ["multi\nline", "hello"]


def test_load_errors(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"column 'text' not found in data.csv; available columns: a, b; pass --text-column"):
        load_texts(str(tmp_path / "data.csv"))
    with pytest.raises(UserError, match="not found"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match=r"dataset .*empty.txt is empty"):
        load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="offline|online"):
        load_texts("no-such-org/no-such-dataset")


def _rows(out):
    table = pq.read_table(sorted(out.glob("shard-*.parquet")))
    return table.column("input_ids").to_pylist(), table.column("doc_id").to_pylist(), table.column("row_id").to_pylist()


def test_tokenize_to_shards(tmp_path, tiny_tokenizer):
    texts = ["a" * 25, "", "bc", "x", "hello world"]  # byte tokenizer: one token per char
    seen = []
    stats = tokenize_to_shards(texts, tiny_tokenizer, tmp_path / "ds", context_length=10, rows_per_shard=2,
                               progress=seen.append)
    ids, doc_ids, row_ids = _rows(tmp_path / "ds")
    # "a"*25 -> 10, 10, 5; "" -> nothing; "bc" -> 2; "x" -> dropped (1 token); "hello world" -> 10, 1 (dropped)
    assert [len(r) for r in ids] == [10, 10, 5, 2, 10]
    assert doc_ids == [0, 0, 0, 2, 4]
    assert row_ids == list(range(5))
    assert ids[3] == tiny_tokenizer("bc")["input_ids"]
    assert len(list((tmp_path / "ds").glob("shard-*.parquet"))) == 3
    schema = pq.read_schema(tmp_path / "ds" / "shard-00000.parquet")
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("doc_id").type == pa.int32() and schema.field("row_id").type == pa.int64()
    assert stats == DatasetStats(documents=5, rows=5, tokens=37, context_length=10, length_hist=stats.length_hist)
    assert sum(stats.length_hist["counts"]) == 5
    assert read_stats(tmp_path / "ds") == stats
    assert json.loads((tmp_path / "ds" / "stats.json").read_text())["tokens"] == 37
    assert seen[-1]["phase"] == "tokenize" and seen[-1]["done"] == seen[-1]["total"] == 5
    lengths = row_lengths(tmp_path / "ds")  # the Datasets page's histogram, from the shards' offsets
    assert lengths.tokens.tolist() == [10, 10, 5, 2, 10] and lengths.doc_ids.tolist() == doc_ids
    with pytest.raises(UserError, match="no token shards"):
        row_lengths(tmp_path)


def _with_bos(tiny_tokenizer, adds_it: bool):
    """The tiny tokenizer with a BOS token; `adds_it`: it also puts BOS in front of every
    encoding itself, as Llama's add_bos_token does."""
    import copy

    from tokenizers.processors import TemplateProcessing
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"bos_token": "<s>"})
    if adds_it:
        tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("adds_it", [False, True])
def test_every_row_starts_with_bos(tmp_path, tiny_tokenizer, adds_it):
    """prepend_bos: every row is BOS + up to context_length − 1 text tokens — each row of a
    document cut into several, once even when the tokenizer adds BOS itself — and the dataset
    records it. Off, or with a tokenizer that has no BOS, rows are text only."""
    tok = _with_bos(tiny_tokenizer, adds_it)
    bos = tok.bos_token_id
    assert (tok("ab")["input_ids"][0] == bos) == adds_it
    texts = ["a" * 25, "bc", "x"]
    stats = tokenize_to_shards(texts, tok, tmp_path / "ds", context_length=10)
    ids, doc_ids, _ = _rows(tmp_path / "ds")
    # "a"*25 -> 9 + 9 + 7 text tokens, each row behind its own BOS; "x" -> BOS x (2 tokens)
    assert [len(r) for r in ids] == [10, 10, 8, 3, 2] and doc_ids == [0, 0, 0, 1, 2]
    assert all(r[0] == bos and bos not in r[1:] for r in ids)
    assert ids[3][1:] == tiny_tokenizer("bc")["input_ids"]
    assert (stats.prepend_bos, stats.bos_token_id, stats.tokens) == (True, bos, 33)
    assert read_stats(tmp_path / "ds") == stats
    off = tokenize_to_shards(texts, tok, tmp_path / "off", context_length=10, prepend_bos=False)
    assert (off.prepend_bos, off.bos_token_id) == (False, None)
    assert [r[0] == bos for r in _rows(tmp_path / "off")[0]] == [adds_it, False, False, adds_it, adds_it][:off.rows]
    no_bos = tokenize_to_shards(texts, tiny_tokenizer, tmp_path / "plain", context_length=10)
    assert not no_bos.prepend_bos and no_bos.tokens == 27  # 10 + 10 + 5 + 2: nothing to prepend


def test_old_stats_read_as_no_bos(tmp_path):
    """A dataset tokenized before prepend_bos existed reads as rows without BOS."""
    (tmp_path / "stats.json").write_text(json.dumps({"documents": 1, "rows": 1, "tokens": 5, "context_length": 8}))
    assert read_stats(tmp_path).prepend_bos is False


def test_tokenize_long_context_and_empty(tmp_path, tiny_tokenizer):
    stats = tokenize_to_shards(["z" * 5000], tiny_tokenizer, tmp_path / "long", context_length=4096)
    assert [len(r) for r in _rows(tmp_path / "long")[0]] == [4096, 904]  # no hidden cap
    assert stats.tokens == 5000
    with pytest.raises(UserError):
        tokenize_to_shards(["", "  "], tiny_tokenizer, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_iter_batches(tmp_path, tiny_tokenizer):
    texts = ["abcdefg", "hij", "klmnopqrstuvwxyz", "12", "345"]
    tokenize_to_shards(texts, tiny_tokenizer, tmp_path / "ds", context_length=8, rows_per_shard=2)
    expected, _, _ = _rows(tmp_path / "ds")
    pad = tiny_tokenizer.pad_token_id
    batches = list(iter_batches(tmp_path / "ds", batch_size=4, pad_token_id=pad))
    assert [b.input_ids.shape for b in batches] == [torch.Size([4, 8]), torch.Size([2, 3])]
    got = []
    for b in batches:
        assert b.input_ids.dtype == b.attention_mask.dtype == b.row_ids.dtype == torch.int64
        for ids, mask in zip(b.input_ids, b.attention_mask):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            assert (ids[n:] == pad).all()
            got.append(ids[:n].tolist())
    assert got == expected
    assert torch.cat([b.row_ids for b in batches]).tolist() == list(range(len(expected)))
    assert sum(len(b.row_ids) for b in iter_batches(tmp_path / "ds", 4, pad, max_rows=3)) == 3
    limited = list(iter_batches(tmp_path / "ds", 2, pad, max_tokens=9))
    assert int(sum(b.attention_mask.sum() for b in limited)) == 7 + 3  # the row crossing 9 tokens is kept whole
    assert len(limited) == 1 and np.array_equal(limited[0].row_ids.numpy(), [0, 1])
    everything = [r for b in iter_batches(tmp_path / "ds", 4, pad, max_tokens=0) for r in b.row_ids.tolist()]
    assert everything == list(range(len(expected)))  # 0 means "all", as the dashboard's fields say
