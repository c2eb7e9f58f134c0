"""What the dashboard may touch on the server: files it reads only under the allowed roots
(MISTUDIO_ALLOWED_ROOTS; by default the data root's imports/ folder and the corpora that ship
with Python), exports written only under the data root's exports/ folder.

The CLI, run by a user on their own account, reads and writes any path it is given; these
checks are for the dashboard, whose users act with the server's account (see README, "Serving a
team")."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from core.errors import UserError
from storage.settings import Settings

BUILT_IN = ("builtin", "embedded")
"""Sources that name no file: the built-in corpus and the embedded model (and every corpus of
core.data's CORPORA)."""
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv", ".gguf", ".safetensors", ".zip", ".tar", ".gz", ".tgz",
                 ".json")
"""Endings that make a source a file name, not a Hugging Face id."""


def shipped_corpora() -> list[Path]:
    """Text that ships with the install: the Python standard library's source and docs."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def allowed_roots(settings: Settings) -> list[Path]:
    """The folders the dashboard may read, symlinks resolved; the first is where a relative
    name is looked up. The data root's uploads/ (files users gave the dashboard) is always one."""
    given = [r for r in settings.allowed_roots.split(os.pathsep) if r.strip()]
    roots = [Path(r).expanduser() for r in given] or [settings.home / "imports", *shipped_corpora()]
    return [r.resolve() for r in [*roots, settings.home / "uploads"]]


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def readable(path: str, settings: Settings) -> str:
    """`path` resolved (symlinks and `..` first; a relative one under the first allowed root),
    or a UserError when it lies outside every allowed root."""
    roots = allowed_roots(settings)
    given = Path(path).expanduser()
    resolved = (given if given.is_absolute() else roots[0] / given).resolve()
    if not any(_inside(resolved, r) for r in roots):
        raise UserError(f"{path} is outside the folders the dashboard may read; copy it under {roots[0]} "
                        "(or have the administrator add its folder to MISTUDIO_ALLOWED_ROOTS)")
    return str(resolved)


def source(value: str, settings: Settings) -> str:
    """A job's source as the dashboard may submit it: a built-in name, a Hugging Face id, or a
    path inside the allowed roots, returned absolute and resolved, so that the worker never
    reads a relative name against its own working folder. A name that exists there counts as
    a path (taken under the first root), so it cannot slip through as a hub id."""
    from core.data.texts import corpus_name

    value = value.strip()
    if value in BUILT_IN or corpus_name(value):
        return value
    path = Path(value).expanduser()
    if (path.is_absolute() or value.startswith((".", "~")) or path.exists() or "\\" in value
            or path.suffix.lower() in FILE_SUFFIXES or (allowed_roots(settings)[0] / path).exists()):
        return readable(value, settings)
    return value


def export_folder(settings: Settings) -> Path:
    return (settings.home / "exports").resolve()


def writable(out: str, settings: Settings) -> str:
    """Where the dashboard may write an export: inside the data root's exports/ folder (a
    relative name is taken under it), resolved; UserError otherwise."""
    root = export_folder(settings)
    given = Path(out.strip()).expanduser()
    resolved = (given if given.is_absolute() else root / given).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UserError(f"{out} is not inside {root}; the dashboard writes exports there only: give a new "
                        "folder or file name")
    return str(resolved)
