"""A portable data root: the registry stores artifact paths relative to MISTUDIO_HOME.

A row's `path` under the data root is kept as `saes/sae-ab12`, and every reader gets it back
as an absolute path under the data root of the process that reads it, so a data root copied
or moved (a backup, a new disk, another machine) opens and works on its own copy. A path
outside the data root (a model folder the user registered in place) stays absolute. With an
object-store artifact root (storage.store) these relative paths are the store's keys too.

`relocate` is the migration for registries written before: run on every open (cheap: it
reads only the few rows whose path is still absolute), it rewrites an absolute path under
this data root to a relative one, and an absolute path under some *other* root (a registry
copied from another machine, `/old/home/saes/sae-x`) to a relative one when this data root
holds that artifact (`<home>/saes/sae-x`: the kind's folder and the row's id must match).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

from sqlalchemy import Connection, column, select, table, update


@dataclass(frozen=True)
class PathColumn:
    """A registry column holding an artifact folder, and where that folder lives: `folder`
    under the data root, then one level per `id_columns` (the row's values name it)."""

    table: str
    column: str
    folder: str
    id_columns: tuple[str, ...]
    in_place: str = ""
    """A column that equals `column` when the user's own folder was registered in place (a
    model's `source`): such a path is never taken for a copied artifact."""


PATH_COLUMNS = (
    PathColumn("models", "path", "models", ("id",), in_place="source"),
    PathColumn("datasets", "path", "datasets", ("id",)),
    PathColumn("activations", "path", "activations", ("job_id", "hook_name")),
    PathColumn("saes", "path", "saes", ("id",)),
    PathColumn("saes", "features_path", "features", ("id",)),
)
COLUMNS_OF: dict[str, tuple[str, ...]] = {}
for _c in PATH_COLUMNS:
    COLUMNS_OF[_c.table] = (*COLUMNS_OF.get(_c.table, ()), _c.column)


def to_stored(value: str | None, home: Path) -> str | None:
    """What the registry keeps for an artifact path: relative (POSIX) under `home`, else as given."""
    if not value or not Path(value).is_absolute():
        return value
    rel = _under(Path(value), home)
    return value if rel is None else rel.as_posix()


def to_absolute(value: str | None, home: Path) -> str | None:
    """What a reader gets: a stored relative path under `home`, an absolute one unchanged."""
    if not value or Path(value).is_absolute():
        return value
    return str(home / value)


def recorded(conn: Connection, path: str, home: Path) -> bool:
    """Whether any registry row names the artifact folder `path` (however it was stored)."""
    values = {path, to_stored(path, home)}
    return any(conn.execute(select(t.c.id).where(t.c[col.column].in_(values)).limit(1)).first() is not None
               for col in PATH_COLUMNS for t in [_table(col)])


def _under(path: Path, home: Path) -> PurePath | None:
    """`path` relative to `home`, also through symlinks (`home` is resolved in Settings); None outside."""
    for p, h in ((path, home), (path.resolve(), home.resolve())):
        if p.is_relative_to(h):
            rel = p.relative_to(h)
            return rel if rel.parts else None  # the data root itself is no artifact
    return None


def moved_here(value: str, row: dict[str, Any], col: PathColumn, home: Path,
               exists: Callable[[Path], bool]) -> str | None:
    """The relative path of an artifact of another data root that this one holds, or None.

    `/old/home/saes/sae-x` of the SAE `sae-x` is `saes/sae-x` when `<home>/saes/sae-x` exists:
    the path must end in the kind's folder and the row's own ids, so an unrelated folder that
    happens to share a name is never taken."""
    if col.in_place and row.get(col.in_place) == value:
        return None
    tail = (col.folder, *(str(row[c]) for c in col.id_columns))
    parts = PurePath(value).parts
    if parts[-len(tail):] != tail:
        return None
    rel = PurePath(*tail)
    return rel.as_posix() if exists(home / rel) else None


def relocate(conn: Connection, home: Path, exists: Callable[[Path], bool] = Path.exists) -> int:
    """Rewrite the registry's absolute artifact paths that belong to this data root as relative
    ones (see the module docstring); returns how many values changed. Safe to run again and from
    several processes at once: each update applies only while the value is still the old one.

    A path another root's artifact matched (`/old/home/saes/sae-x`) also names that old root, and
    any other path under it (a model folder registered in place under `/old/home/imports/`) moves
    too when this root holds the same relative path."""
    pending, moves, old_roots = [], [], set()
    for col in PATH_COLUMNS:
        t = _table(col)
        for row in conn.execute(select(t).where(t.c[col.column].like("/%"))).mappings():  # only absolute ones
            old = row[col.column]
            new = to_stored(old, home)
            if new == old and (new := moved_here(old, row, col, home, exists)) is not None:
                old_roots.add(PurePath(old).parents[len(PurePath(new).parts) - 1])
            (pending if new in (None, old) else moves).append((t, col.column, row["id"], old, new))
    for t, name, key, old, _ in pending:
        rel = next((PurePath(old).relative_to(r) for r in old_roots if PurePath(old).is_relative_to(r)), None)
        if rel is not None and rel.parts and exists(home / rel):
            moves.append((t, name, key, old, rel.as_posix()))
    for t, name, key, old, new in moves:
        conn.execute(update(t).where(t.c.id == key, t.c[name] == old).values({name: new}))
    return len(moves)


def _table(col: PathColumn):
    """The columns of `col`'s table that relocating it reads (no model class: this runs on any revision)."""
    names = {"id", col.column, *col.id_columns, *([col.in_place] if col.in_place else [])}
    return table(col.table, *(column(n) for n in sorted(names)))
