"""Token shards: a tokenized dataset is a folder of Parquet shards (`shard-00000.parquet`, ...)
with one row per chunk of at most `context_length` tokens, plus `stats.json`:

    input_ids: list<int32>   the chunk's tokens
    doc_id:    int32         index of the source document
    row_id:    int64         global row index, stable across shards

Rows are never padded on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
import itertools
from collections.abc import Sized
from typing import Callable, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError
from core.io import atomic_dir, intact
from core.progress import Meter
from core.data.texts import CORPORA, corpus_name, iter_texts, load_texts



@dataclass
class DatasetStats:
    """Summary of a tokenized dataset, saved as stats.json beside its shards."""

    documents: int
    """Input documents (blank ones included; they produce no rows)."""
    rows: int
    """Rows written: chunks of at most `context_length` tokens."""
    tokens: int
    """Real tokens over all rows."""
    context_length: int
    length_hist: dict = field(default_factory=dict)
    """Row lengths in tokens: {"bin_edges": [...], "counts": [...]}."""
    prepend_bos: bool = False
    """Every row starts with the tokenizer's BOS token (TransformerLens/SAELens contexts).
    False for datasets tokenized before the setting existed: their rows start with text."""
    bos_token_id: int | None = None
    """The BOS id the rows start with, when `prepend_bos`."""

    def to_dict(self) -> dict:
        return asdict(self)


_SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("doc_id", pa.int32()),
    ("row_id", pa.int64()),
])


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def shard_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("shard-*.parquet"))


class _ShardWriter:
    """Buffers rows and writes one Parquet shard per `rows_per_shard` rows."""

    def __init__(self, folder: Path, rows_per_shard: int):
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.rows: list[np.ndarray] = []
        self.doc_ids: list[int] = []
        self.next_row = 0
        self.shards = 0

    def add(self, tokens: np.ndarray, doc_id: int) -> None:
        self.rows.append(tokens)
        self.doc_ids.append(doc_id)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        lengths = np.fromiter((len(r) for r in self.rows), dtype=np.int32, count=len(self.rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(self.rows).astype(np.int32)))
        n = len(self.rows)
        table = pa.Table.from_arrays(
            [ids, pa.array(np.asarray(self.doc_ids, dtype=np.int32)),
             pa.array(np.arange(self.next_row, self.next_row + n, dtype=np.int64))],
            schema=_SHARD_SCHEMA)
        pq.write_table(table, _shard_path(self.folder, self.shards))
        self.shards += 1
        self.next_row += n
        self.rows, self.doc_ids = [], []


def _length_hist(lengths: np.ndarray, context_length: int, bins: int = 20) -> dict:
    counts, edges = np.histogram(lengths, bins=min(bins, max(context_length, 1)), range=(0, context_length))
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def bos_id(tokenizer, prepend_bos: bool) -> int | None:
    """The BOS id rows start with: the tokenizer's, when asked for and it defines one."""
    return tokenizer.bos_token_id if prepend_bos and tokenizer.bos_token_id is not None else None


def tokenize_to_shards(texts: Iterable[str], tokenizer, out_dir, context_length: int = 256,
                       rows_per_shard: int = 4096,
                       progress: Callable[[dict], None] | None = None,
                       prepend_bos: bool = True, total_documents: int | None = None) -> DatasetStats:
    """Tokenize documents, cut each into rows of ≤ context_length tokens, write Parquet shards.

    With `prepend_bos` (and a tokenizer that defines BOS) every row is BOS followed by up to
    context_length − 1 text tokens, as TransformerLens and SAELens build contexts: the model's
    attention sink then sits on BOS in every row, not on a row's first word. The text is
    tokenized without the tokenizer's own special tokens, so a tokenizer that adds BOS itself
    (Llama's add_bos_token) does not give two. Without it, special tokens are added as the
    tokenizer does by default (only a document's first row starts with BOS, for tokenizers that
    add one). Rows shorter than 2 tokens are dropped: they hold no next-token prediction.
    Everything is written atomically into `out_dir`. `texts` may be a stream: it is read 256
    documents at a time and rows go to disk shard by shard, so memory stays bounded whatever
    the corpus's size; progress counts documents against `total_documents` (or len(texts)).
    """
    if context_length < 2:
        raise UserError(f"context length {context_length} is too small; use at least 2 tokens")
    if rows_per_shard < 1:
        raise UserError(f"rows per shard must be positive, got {rows_per_shard}")
    total = len(texts) if isinstance(texts, Sized) else total_documents
    meter = Meter(progress, "tokenize", total=total, unit="documents")
    stream = iter(texts)
    documents = 0
    bos = bos_id(tokenizer, prepend_bos)
    head = np.asarray([] if bos is None else [bos], dtype=np.int32)
    step = context_length - len(head)  # text tokens per row
    lengths: list[int] = []
    batch = 256  # documents per tokenizer call: the fast tokenizer parallelises a batch
    with atomic_dir(out_dir) as tmp:
        writer = _ShardWriter(tmp, rows_per_shard)
        while chunk := [t if isinstance(t, str) else "" for t in itertools.islice(stream, batch)]:
            first, documents = documents, documents + len(chunk)
            # verbose=False: documents longer than model_max_length are expected; we chunk them.
            encoded = tokenizer(chunk, verbose=False, add_special_tokens=bos is None)["input_ids"]
            for doc_id, ids in enumerate(encoded, start=first):
                if not chunk[doc_id - first].strip():
                    continue
                ids = np.asarray(ids, dtype=np.int32)
                for s in range(0, len(ids), step):
                    row = np.concatenate([head, ids[s:s + step]]) if len(head) else ids[s:s + step]
                    if len(row) >= 2:
                        writer.add(row, doc_id)
                        lengths.append(len(row))
            meter.add(len(chunk))
        writer.flush()
        if not lengths:
            raise UserError("no text to tokenize: every document is empty or shorter than 2 tokens; "
                            "check the dataset")
        arr = np.asarray(lengths)
        stats = DatasetStats(documents=documents, rows=len(arr), tokens=int(arr.sum()),
                             context_length=context_length, length_hist=_length_hist(arr, context_length),
                             prepend_bos=bos is not None, bos_token_id=bos)
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
    return stats


def read_stats(dataset_dir) -> DatasetStats:
    """The stats.json of a tokenized dataset."""
    path = Path(dataset_dir) / "stats.json"
    if not path.is_file():
        raise UserError(f"{dataset_dir} is not a tokenized dataset (no stats.json); tokenize it first")
    return DatasetStats(**json.loads(path.read_text()))  # older files lack prepend_bos: False


DAMAGED_DATASET = "delete the dataset (mistudio datasets delete ID) and add it again"


class RowLengths(NamedTuple):
    """Per row of a tokenized dataset, in row_id order."""
    tokens: np.ndarray  # int64: tokens in the row (at most the context length)
    doc_ids: np.ndarray  # int64: the source document the row was cut from


def row_lengths(dataset_dir) -> RowLengths:
    """Every row's length and document, read from the shards' offsets (no token is decoded)."""
    lengths, docs = [], []
    for shard in shard_files(Path(dataset_dir)):
        with intact(shard, DAMAGED_DATASET):
            for rb in pq.ParquetFile(shard).iter_batches(batch_size=65536, columns=["input_ids", "doc_id"]):
                lengths.append(np.diff(rb.column(0).offsets.to_numpy()))
                docs.append(rb.column(1).to_numpy())
    if not lengths:
        raise UserError(f"{dataset_dir} holds no token shards; was the dataset deleted? Add it again.")
    return RowLengths(np.concatenate(lengths).astype(np.int64), np.concatenate(docs).astype(np.int64))


def read_rows(dataset_dir, row_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """The token ids of the given rows (by `row_id`), read with a filter per shard."""
    wanted = sorted(set(int(r) for r in row_ids))
    out: dict[int, np.ndarray] = {}
    for shard in shard_files(Path(dataset_dir)):
        if not wanted:
            break
        with intact(shard, DAMAGED_DATASET):
            table = pq.read_table(shard, columns=["input_ids", "row_id"], filters=[("row_id", "in", wanted)])
        for ids, rid in zip(table.column("input_ids").to_pylist(), table.column("row_id").to_pylist()):
            out[int(rid)] = np.asarray(ids, dtype=np.int64)
    missing = set(wanted) - set(out)
    if missing:
        raise UserError(f"rows {sorted(missing)[:5]} are not in {dataset_dir}; was the dataset re-tokenized?")
    return out


def tokenize_dataset(tokenizer, source: str, out_dir: Path, text_column: str = "text",
                     context_length: int = 256, max_documents: int | None = None,
                     progress: Callable[[dict], None] | None = None, prepend_bos: bool = True,
                     encoding: str = "utf-8") -> DatasetStats:
    """Load texts from `source` and write them as Parquet token shards under `out_dir`
    (rows start with BOS when `prepend_bos` and the tokenizer defines one)."""
    if context_length < 2:
        raise UserError(f"context length {context_length} is too short; use --context-length 2 or more")
    max_documents = max_documents or None  # 0 is "all", as everywhere
    name = corpus_name(str(source))
    if name is None:  # a file or hub dataset: read whole (and checked non-empty) first
        texts: Iterable[str] = load_texts(source, text_column=text_column, limit=max_documents, encoding=encoding)
        total = None
    else:  # a built-in corpus: streamed
        texts = iter_texts(source, limit=max_documents)
        total = CORPORA[name].count()
        total = min(total, max_documents) if max_documents else total
    return tokenize_to_shards(texts, tokenizer, out_dir, context_length=context_length, progress=progress,
                              prepend_bos=prepend_bos, total_documents=total)


def total_tokens(dataset_dir: Path, max_tokens: int | None) -> int:
    """Tokens a pass over the dataset reads: all of them, or at most `max_tokens`."""
    tokens = read_stats(dataset_dir).tokens
    return min(tokens, max_tokens) if max_tokens else tokens
