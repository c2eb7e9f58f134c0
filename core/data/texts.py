"""Text datasets: the built-in corpora, user files (.txt/.jsonl/.parquet/.csv) and Hugging Face
datasets, read as documents (the built-in corpora as a stream)."""

from __future__ import annotations

import codecs
import csv
import importlib
import io
import itertools
import json
import re
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import UserError

BUILTIN = "builtin"
"""The first built-in corpus's original name, kept as another name of `stdlib-docs`."""
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


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"the Python standard library was not found at {root}; "
                        "use the stdlib-docs corpus or a data file")
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]


def stdlib_source() -> Iterator[str]:
    """The Python standard library's own source files, tests included: real code, comments and
    docstrings (≈ 31 MB, 9.1M SmolLM2 tokens), one document per file in path order, read one
    at a time. Found through `sysconfig`'s stdlib path (the base installation's, also inside a
    venv); site-packages is left out, and so are the few files that are not UTF-8 (encoding
    tests)."""
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


class Corpus(NamedTuple):
    about: str
    documents: Callable[[], Iterable[str]]  # in a fixed order
    count: Callable[[], int]  # how many (an upper bound where some are skipped), for progress


CORPORA: dict[str, Corpus] = {
    "stdlib-docs": Corpus("The Python standard library's documentation (pydoc topics and module docstrings): "
                          "real English, ≈ 113k SmolLM2 tokens", builtin_corpus, lambda: len(builtin_corpus())),
    "stdlib-source": Corpus("The Python standard library's source files, tests included: real code, comments and "
                            "docstrings, ≈ 9M SmolLM2 tokens", stdlib_source, lambda: len(_stdlib_files())),
}
"""The built-in corpora, available offline."""


def corpus_name(source: str) -> str | None:
    """The built-in corpus `source` names ("builtin" is stdlib-docs), or None."""
    return "stdlib-docs" if source == BUILTIN else source if source in CORPORA else None


def _column_error(column: str, where: str, available: Iterable[str]) -> UserError:
    return UserError(f"column '{column}' not found in {where}; available columns: "
                     f"{', '.join(map(str, available))}; pass --text-column")


def _decode(path: Path, encoding: str) -> str:
    """A text file's contents, decoded strictly: binary or wrongly-encoded input is a one-line
    error instead of text full of U+FFFD that tokenizes into nonsense."""
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown encoding {encoding[:40]!r}; use e.g. utf-8, latin-1 or cp1252") from None
    return _check_bytes(path, path.read_bytes(), encoding, lambda b: codec.decode(b)[0])


def check_text_file(source: str, encoding: str = "utf-8", head: int = 1 << 20) -> None:
    """At submit: refuse an unknown encoding, and a local text file whose first `head` bytes are
    binary or not in `encoding`, before a job is queued (the job decodes the whole file again)."""

    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise UserError(f"unknown encoding {encoding[:40]!r}; use e.g. utf-8, latin-1 or cp1252") from None
    path = Path(str(source)).expanduser()
    files = [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []
    for f in files:
        if f.suffix.lower() in (".txt", ".jsonl", ".csv"):
            with f.open("rb") as fh:
                data = fh.read(head)
            # final only when the whole file was read: a cut may split a multi-byte character
            _check_bytes(f, data, encoding, lambda b: decoder.decode(b, final=len(b) < head))
            decoder.reset()


def _check_bytes(path: Path, data: bytes, encoding: str, decode) -> str:
    if b"\0" in data[:8192] and not encoding.lower().startswith("utf-16"):
        raise UserError(f"{path.name} looks binary (it holds NUL bytes), not text; give a .txt/.jsonl/.csv "
                        "text file, or --encoding if it is UTF-16")
    try:
        return decode(data)
    except UnicodeDecodeError as e:
        raise UserError(f"{path.name} is not valid {encoding} (byte {e.start}); pass --encoding "
                        "(e.g. --encoding latin-1) with the file's encoding") from None


def _read_txt(path: Path, column: str, encoding: str = "utf-8") -> list[str]:
    # Documents are separated by blank lines.
    return re.split(r"\n\s*\n", _decode(path, encoding))


def _read_jsonl(path: Path, column: str, encoding: str = "utf-8") -> list[str]:
    texts = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(_decode(path, encoding).split("\n"), 1):
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


def _read_parquet(path: Path, column: str, encoding: str = "utf-8") -> list[str]:
    schema = pq.read_schema(path)
    if column not in schema.names:
        raise _column_error(column, path.name, schema.names)
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"column '{column}' of {path.name} holds {kind}, not text; pass --text-column "
                        f"with a string column ({', '.join(schema.names)})")
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _read_csv(path: Path, column: str, encoding: str = "utf-8") -> list[str]:
    # The csv module copes with multi-line quoted fields, which is what text columns hold.
    csv.field_size_limit(1 << 30)
    with io.StringIO(_decode(path, encoding), newline="") as f:
        reader = csv.DictReader(f)
        if column not in (reader.fieldnames or []):
            raise _column_error(column, path.name, reader.fieldnames or [])
        return [row[column] for row in reader]


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".csv": _read_csv}


def _read_file(path: Path, column: str, encoding: str = "utf-8") -> list[str]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unsupported file type '{path.suffix}' ({path.name}); "
                        f"use one of: {', '.join(FILE_TYPES)}, or a Hugging Face dataset id")
    return reader(path, column, encoding)


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


def iter_texts(source: str, text_column: str = "text", split: str = "train",
               limit: int | None = None) -> Iterator[str]:
    """The non-blank documents of `source`, the first `limit` of them: a built-in corpus is
    streamed, files and hub datasets are read whole first (`load_texts`)."""
    name = corpus_name(str(source))
    if name is None:
        yield from load_texts(source, text_column, split, limit)
        return
    docs = (t for t in CORPORA[name].documents() if t.strip())
    yield from itertools.islice(docs, limit) if limit is not None else docs


def load_texts(source: str, text_column: str = "text", split: str = "train",
               limit: int | None = None, encoding: str = "utf-8") -> list[str]:
    """Documents from a built-in corpus ("stdlib-docs" a.k.a. "builtin", "stdlib-source"), a
    local file or folder of files, or a Hugging Face dataset id.

    Blank documents are dropped; `limit` keeps the first `limit` documents. Local text files
    are decoded strictly with `encoding`.
    """
    source = str(source)
    path = Path(source).expanduser()
    if corpus_name(source):
        texts: Sequence = list(iter_texts(source, limit=limit))
    elif path.is_file():
        texts = _read_file(path, text_column, encoding)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES)
        if not files:
            raise UserError(f"no {', '.join(FILE_TYPES)} files in folder {path}; put data files there")
        texts = [t for f in files for t in _read_file(f, text_column, encoding)]
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
