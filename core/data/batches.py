"""Batches of dataset rows: `iter_batches` pads each batch to its own longest row and returns
the attention mask, so padded positions can be masked everywhere downstream."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from core.data.shards import DAMAGED_DATASET, shard_files
from core.errors import UserError
from core.io import intact



SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
"""The structural special tokens, SAELens's `exclude_special_tokens=True` rule."""


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS, pad (and SEP, decoder start) ids of a tokenizer, sorted: the positions that are
    excluded from training, evaluation, statistics and discovery by identity. Chat-template tokens
    (additional special tokens) are text here, as in SAELens."""
    ids = {getattr(tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS}
    return sorted(int(i) for i in ids if i is not None)


class TokenBatch(NamedTuple):
    """A right-padded batch of dataset rows."""

    input_ids: torch.LongTensor
    """[B, T] token ids, padded on the right with the pad token id."""
    attention_mask: torch.LongTensor
    """[B, T] 1 for real tokens, 0 for padding."""
    row_ids: torch.LongTensor
    """[B] global row index of each row (the `row_id` column)."""
    doc_ids: torch.LongTensor | None = None
    """[B] source document of each row (a long document spans several rows)."""


def right_padded(rows, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths (arrays or tensors) as [rows, longest] ids padded on the
    right with `pad_token_id`, and the attention mask (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(np.array(r))  # a copy: torch warns on Arrow's read-only arrays
        mask[i, :len(r)] = 1
    return ids, mask


def _pad(rows: list[np.ndarray], row_ids: list[int], pad_token_id: int, doc_ids: list[int]) -> TokenBatch:
    ids, mask = right_padded(rows, pad_token_id)
    return TokenBatch(ids, mask, torch.tensor(row_ids, dtype=torch.int64), torch.tensor(doc_ids, dtype=torch.int64))


def _iter_rows(dataset_dir: Path) -> Iterator[tuple[np.ndarray, int, int]]:
    """(tokens, row_id, doc_id) for every row, shard by shard, a record batch at a time."""
    for shard in shard_files(dataset_dir):
        with intact(shard, DAMAGED_DATASET):
            batches = pq.ParquetFile(shard).iter_batches(batch_size=1024, columns=["input_ids", "row_id", "doc_id"])
            for rb in batches:
                col = rb.column(0)
                # .offsets index into .values (which ignores any slice offset), so they agree.
                offsets = col.offsets.to_numpy()
                values = col.values.to_numpy()
                docs = rb.column(2).to_numpy()
                for i, row_id in enumerate(rb.column(1).to_numpy()):
                    yield values[offsets[i]:offsets[i + 1]], int(row_id), int(docs[i])


def iter_batches(dataset_dir, batch_size: int, pad_token_id: int, max_rows: int | None = None,
                 max_tokens: int | None = None) -> Iterator[TokenBatch]:
    """Stream rows in order as padded batches; stop after `max_rows` rows or once `max_tokens`
    real tokens have been yielded (the row that crosses the limit is included whole).
    `max_tokens` None or 0 means no limit: 0 is "all" everywhere (CLI flags, job files and the
    dashboard's "Max tokens (0 = all)" fields alike).
    """
    dataset_dir = Path(dataset_dir)
    if not shard_files(dataset_dir):
        raise UserError(f"{dataset_dir} holds no token shards; tokenize the dataset first")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    rows: list[np.ndarray] = []
    row_ids: list[int] = []
    doc_ids: list[int] = []
    n_rows = n_tokens = 0
    for tokens, row_id, doc_id in _iter_rows(dataset_dir):
        if (max_rows is not None and n_rows >= max_rows) or (max_tokens and n_tokens >= max_tokens):
            break
        rows.append(tokens)
        row_ids.append(row_id)
        doc_ids.append(doc_id)
        n_rows += 1
        n_tokens += len(tokens)
        if len(rows) == batch_size:
            yield _pad(rows, row_ids, pad_token_id, doc_ids)
            rows, row_ids, doc_ids = [], [], []
    if rows:
        yield _pad(rows, row_ids, pad_token_id, doc_ids)


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (byte-level markers like 'Ġ' resolved)."""
    return [tokenizer.decode([i]) for i in ids]
