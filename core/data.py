"""Text datasets: the built-in corpus, user files, Hugging Face datasets; token shards; batches.

A tokenized dataset is a folder of Parquet shards (`shard-00000.parquet`, ...) with one row
per chunk of at most `context_length` tokens, plus `stats.json`:

    input_ids: list<int32>   the chunk's tokens
    doc_id:    int32         index of the source document
    row_id:    int64         global row index, stable across shards

Rows are never padded on disk; `iter_batches` pads each batch to its own longest row and
returns the attention mask, so padded positions can be masked everywhere downstream.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.errors import UserError
from core.io import atomic_dir
from core.progress import Meter

BUILTIN = "builtin"
MAX_DOC_CHARS = 2000
FILE_TYPES = (".txt", ".jsonl", ".parquet", ".csv")

# Stdlib modules whose docstrings are real English prose. A fixed list keeps the corpus
# deterministic and avoids modules with import side effects (this, antigravity, turtle).
_DOC_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "bz2", "calendar", "cmd",
    "code", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox",
    "mimetypes", "modulefinder", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "queue", "quopri", "random", "re",
    "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "site", "smtplib", "socket", "socketserver", "stat", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig", "tabnanny",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace",
    "traceback", "tracemalloc", "types", "typing", "unittest", "urllib", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "webbrowser", "xml", "xml.dom",
    "xml.etree.ElementTree", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)


# ---------------------------------------------------------------------------- texts


def _split_long(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split text at paragraph boundaries into pieces of at most ~max_chars characters."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        # A paragraph longer than the limit is cut at line breaks (never mid-line).
        parts = [para] if len(para) <= max_chars else para.splitlines()
        for part in parts:
            if current and len(current) + 2 + len(part) > max_chars:
                pieces.append(current)
                current = part
            else:
                current = f"{current}\n\n{part}" if current else part
    if current:
        pieces.append(current)
    return pieces


def builtin_corpus() -> list[str]:
    """Real English text shipped with Python: the pydoc topics and stdlib module docstrings.

    About 465 k characters (≈ 113 k SmolLM2 tokens); same documents in the same order on
    every call. Long texts are split at paragraph boundaries into documents of ≤ ~2000 chars.
    """
    from pydoc_data.topics import topics

    sources = [topics[key] for key in sorted(topics)]
    for name in _DOC_MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:  # optional stdlib parts (e.g. zlib, lzma) may be absent from a build
            continue
        if doc:
            sources.append(doc)
    docs = [piece.strip() for text in sources for piece in _split_long(text)]
    return [d for d in docs if d]


def _column_error(column: str, where: str, available: Iterable[str]) -> UserError:
    return UserError(f"column '{column}' not found in {where}; available columns: "
                     f"{', '.join(map(str, available))}; pass --text-column")


def _read_txt(path: Path, column: str) -> list[str]:
    # Documents are separated by blank lines.
    return re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path.name} line {lineno} is not valid JSON ({e.msg}); "
                                "fix the file: one JSON object per line") from e
            if not isinstance(record, dict) or column not in record:
                keys = record.keys() if isinstance(record, dict) else []
                raise _column_error(column, f"{path.name} (line {lineno})", keys)
            texts.append(record[column])
    return texts


def _read_parquet(path: Path, column: str) -> list[str]:
    names = pq.read_schema(path).names
    if column not in names:
        raise _column_error(column, path.name, names)
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _read_csv(path: Path, column: str) -> list[str]:
    # The csv module copes with multi-line quoted fields, which is what text columns hold.
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise _column_error(column, path.name, reader.fieldnames or [])
        return [row[column] for row in reader]


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv}


def _read_file(path: Path, column: str) -> list[str]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unsupported file type '{path.suffix}' ({path.name}); "
                        f"use one of: {', '.join(FILE_TYPES)}, or a Hugging Face dataset id")
    return reader(path, column)


def _read_hub(source: str, column: str, split: str, limit: int | None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split if limit is None else f"{split}[:{limit}]")
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load dataset '{source}' split '{split}' from the Hugging Face hub ({first}); "
                        "check the id and that you are online (HF_HUB_OFFLINE=1 allows only cached "
                        "datasets), or give a local .txt/.jsonl/.parquet/.csv file") from e
    if column not in ds.column_names:
        raise _column_error(column, f"dataset {source}", ds.column_names)
    return ds[column]


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~", "."))
            or source.lower().endswith(FILE_TYPES) or "\\" in source)


def load_texts(source: str, text_column: str = "text", split: str = "train",
               limit: int | None = None) -> list[str]:
    """Documents from "builtin", a local file or folder of files, or a Hugging Face dataset id.

    Blank documents are dropped; `limit` keeps the first `limit` documents.
    """
    source = str(source)
    path = Path(source).expanduser()
    if source == BUILTIN:
        texts: Sequence = builtin_corpus()
    elif path.is_file():
        texts = _read_file(path, text_column)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES)
        if not files:
            raise UserError(f"no {', '.join(FILE_TYPES)} files in folder {path}; put data files there")
        texts = [t for f in files for t in _read_file(f, text_column)]
    elif _looks_like_path(source):
        raise UserError(f"data file not found: {source}; check the path")
    else:
        texts = _read_hub(source, text_column, split, limit)
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise UserError(f"dataset {source} is empty: no non-blank text in column '{text_column}'; "
                        "check the file or pass --text-column")
    return docs


# --------------------------------------------------------------------------- shards


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

    def to_dict(self) -> dict:
        return asdict(self)


_SHARD_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("doc_id", pa.int32()),
    ("row_id", pa.int64()),
])


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.parquet"


def _shard_files(folder: Path) -> list[Path]:
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


def tokenize_to_shards(texts: Sequence[str], tokenizer, out_dir, context_length: int = 256,
                       rows_per_shard: int = 4096,
                       progress: Callable[[dict], None] | None = None) -> DatasetStats:
    """Tokenize documents, cut each into rows of ≤ context_length tokens, write Parquet shards.

    Special tokens are added as the tokenizer does by default (so only a document's first
    row starts with BOS, for tokenizers that add one). Rows shorter than 2 tokens are dropped:
    they hold no next-token prediction. Everything is written atomically into `out_dir`.
    """
    if context_length < 2:
        raise UserError(f"context length {context_length} is too small; use at least 2 tokens")
    if rows_per_shard < 1:
        raise UserError(f"rows per shard must be positive, got {rows_per_shard}")
    texts = list(texts)
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise UserError("no text to tokenize: every document is empty; check the dataset")
    meter = Meter(progress, "tokenize", total=len(texts), unit="documents")
    lengths: list[int] = []
    batch = 256  # documents per tokenizer call: the fast tokenizer parallelises a batch
    with atomic_dir(out_dir) as tmp:
        writer = _ShardWriter(tmp, rows_per_shard)
        for first in range(0, len(texts), batch):
            chunk = [t if isinstance(t, str) else "" for t in texts[first:first + batch]]
            # verbose=False: documents longer than model_max_length are expected; we chunk them.
            encoded = tokenizer(chunk, verbose=False)["input_ids"]
            for doc_id, ids in enumerate(encoded, start=first):
                if not chunk[doc_id - first].strip():
                    continue
                ids = np.asarray(ids, dtype=np.int32)
                for s in range(0, len(ids), context_length):
                    row = ids[s:s + context_length]
                    if len(row) >= 2:
                        writer.add(row, doc_id)
                        lengths.append(len(row))
            meter.add(len(chunk))
        writer.flush()
        if not lengths:
            raise UserError("no rows written: every document is shorter than 2 tokens; check the dataset")
        arr = np.asarray(lengths)
        stats = DatasetStats(documents=len(texts), rows=len(arr), tokens=int(arr.sum()),
                             context_length=context_length, length_hist=_length_hist(arr, context_length))
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
    return stats


def read_stats(dataset_dir) -> DatasetStats:
    """The stats.json of a tokenized dataset."""
    path = Path(dataset_dir) / "stats.json"
    if not path.is_file():
        raise UserError(f"{dataset_dir} is not a tokenized dataset (no stats.json); tokenize it first")
    return DatasetStats(**json.loads(path.read_text()))


# -------------------------------------------------------------------------- batches


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


def _pad(rows: list[np.ndarray], row_ids: list[int], pad_token_id: int, doc_ids: list[int]) -> TokenBatch:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor(row_ids, dtype=torch.int64),
                      torch.tensor(doc_ids, dtype=torch.int64))


def _iter_rows(dataset_dir: Path) -> Iterator[tuple[np.ndarray, int, int]]:
    """(tokens, row_id, doc_id) for every row, shard by shard, a record batch at a time."""
    for shard in _shard_files(dataset_dir):
        for rb in pq.ParquetFile(shard).iter_batches(batch_size=1024, columns=["input_ids", "row_id", "doc_id"]):
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
    """
    dataset_dir = Path(dataset_dir)
    if not _shard_files(dataset_dir):
        raise UserError(f"{dataset_dir} holds no token shards; tokenize the dataset first")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    rows: list[np.ndarray] = []
    row_ids: list[int] = []
    doc_ids: list[int] = []
    n_rows = n_tokens = 0
    for tokens, row_id, doc_id in _iter_rows(dataset_dir):
        if (max_rows is not None and n_rows >= max_rows) or (max_tokens is not None and n_tokens >= max_tokens):
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


class RowLengths(NamedTuple):
    """Per row of a tokenized dataset, in row_id order."""
    tokens: np.ndarray  # int64: tokens in the row (at most the context length)
    doc_ids: np.ndarray  # int64: the source document the row was cut from


def row_lengths(dataset_dir) -> RowLengths:
    """Every row's length and document, read from the shards' offsets (no token is decoded)."""
    lengths, docs = [], []
    for shard in _shard_files(Path(dataset_dir)):
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
    for shard in _shard_files(Path(dataset_dir)):
        if not wanted:
            break
        table = pq.read_table(shard, columns=["input_ids", "row_id"], filters=[("row_id", "in", wanted)])
        for ids, rid in zip(table.column("input_ids").to_pylist(), table.column("row_id").to_pylist()):
            out[int(rid)] = np.asarray(ids, dtype=np.int64)
    missing = set(wanted) - set(out)
    if missing:
        raise UserError(f"rows {sorted(missing)[:5]} are not in {dataset_dir}; was the dataset re-tokenized?")
    return out


def tokenize_dataset(tokenizer, source: str, out_dir: Path, text_column: str = "text",
                     context_length: int = 256, max_documents: int | None = None,
                     progress: Callable[[dict], None] | None = None) -> DatasetStats:
    """Load texts from `source` and write them as Parquet token shards under `out_dir`."""
    if context_length < 2:
        raise UserError(f"context length {context_length} is too short; use --context-length 2 or more")
    texts = load_texts(source, text_column=text_column, limit=max_documents)
    return tokenize_to_shards(texts, tokenizer, out_dir, context_length=context_length, progress=progress)


def total_tokens(dataset_dir: Path, max_tokens: int | None) -> int:
    """Tokens a pass over the dataset reads: all of them, or at most `max_tokens`."""
    tokens = read_stats(dataset_dir).tokens
    return min(tokens, max_tokens) if max_tokens else tokens


def decode_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token id as the text it stands for (byte-level markers like 'Ġ' resolved)."""
    return [tokenizer.decode([i]) for i in ids]
