"""Crash-safe writes: nothing half-written is ever visible under its final name.

Everything is written under a hidden temporary sibling and `os.replace`d into place, which
is atomic on POSIX filesystems (the temp path is on the same filesystem as the target).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from core.errors import UserError


def check_new(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """`path` for an export: refused (one line, naming the flag) when a file or a non-empty
    folder is already there, unless the user asked to replace it with `overwrite`. An export
    never deletes what the user did not name for replacement."""
    path = Path(path)
    if overwrite or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return path
    what = "a folder with files in it" if path.is_dir() else "a file"
    raise UserError(f"{path} is already {what}; pick a new name, or pass --overwrite (the dashboard's "
                    "\"Overwrite\" box) to replace it")


@contextlib.contextmanager
def intact(path: str | os.PathLike, remedy: str) -> Iterator[None]:
    """Reads of an artifact under here that meet a damaged file (truncated by an interrupted
    copy, say: miStudio itself never leaves one) fail in one line naming the artifact and
    `remedy`, not with pyarrow's or json's traceback."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, json.JSONDecodeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = reason if len(reason) <= 160 else reason[:159] + "…"
        raise UserError(f"{path} is damaged ({reason}); {remedy}") from None


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces `path` (an existing one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _tmp_sibling(path)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path; on success it is renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def sweep_tmp(path: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer of `path` left behind: its temp siblings and, when `path` is
    a folder, temp entries inside it. Call it only when no writer of `path` runs any more (a
    SIGKILLed process cannot clean up after itself). Returns what was removed."""
    path = Path(path)
    found = list(path.parent.glob(f".tmp-{path.name}-*")) if path.parent.is_dir() else []
    if path.is_dir():
        found += list(path.rglob(".tmp-*"))
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found
