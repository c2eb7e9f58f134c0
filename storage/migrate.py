"""Registry schema migrations (Alembic), applied on start by `Registry(url)`.

Alembic is configured here in code; no alembic.ini is needed. The migration scripts live in
`storage/migrations/` inside the installed package. `upgrade_to_head(engine)` is safe to call
from any number of processes at once and a no-op when the schema is already at head:

- PostgreSQL: the whole upgrade runs in one transaction that first takes a transaction-level
  advisory lock, so concurrent starters wait for each other and then find the schema at head.
- SQLite: the upgrade runs in one `BEGIN IMMEDIATE` transaction on its own connection, so the
  second starter waits (busy_timeout) for the first one's commit.

A registry made by `create_all` before migrations existed (all tables, no `alembic_version`)
is stamped at the initial revision and then upgraded.

Data that depends on where the registry is opened from is not a revision: artifact paths are
made relative to the data root by `storage.portable.relocate`, which `Registry(url, home)` runs
after the upgrade on every open (a registry copied from another data root needs it again).

To write a new migration after changing the models in `storage/registry.py`::

    .venv/bin/python -c "from alembic import command; from storage.migrate import alembic_config; \
command.revision(alembic_config('sqlite:////tmp/rev.db'), 'what changed', autogenerate=True)"

(upgrade /tmp/rev.db to head first: `Registry('sqlite:////tmp/rev.db')`), then review the file
in `storage/migrations/versions/`, and make it work on SQLite (batch ops) and PostgreSQL.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from core.errors import UserError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
INITIAL_REVISION = "0001"
_ALEMBIC_LOCK = threading.Lock()
_PG_LOCK_KEY = 0x6D6953747564696F  # "miStudio": serializes concurrent migrations on one PostgreSQL database


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged migrations (a URL for tooling, or a live connection)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def sqlite_pragmas(dbapi_conn, _record) -> None:
    """WAL lets the dashboard read while the JobManager writes; busy_timeout rides out a lock.

    Switching a file to WAL needs an exclusive lock, and SQLite answers "database is locked" at
    once (no busy wait) when another connection is starting up or migrating at that moment, so
    that step is retried for up to the same 10 s.
    """
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=10000")
        deadline = time.monotonic() + 10
        while True:
            try:
                if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    cur.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        cur.close()


def _sqlite_migration_engine(engine: Engine) -> Engine:
    """A one-connection engine whose transactions are `BEGIN IMMEDIATE` (the write lock up front).

    pysqlite runs DDL outside any transaction by default; here the driver's own transaction
    handling is off and the whole upgrade is one real transaction.
    """
    eng = create_engine(engine.url, poolclass=NullPool)

    @event.listens_for(eng, "connect")
    def _connect(dbapi_conn, record):
        dbapi_conn.isolation_level = None
        sqlite_pragmas(dbapi_conn, record)

    @event.listens_for(eng, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return eng


@functools.cache
def _initial_schema() -> dict[str, set[str]]:
    """Table → column names of the initial revision: what `create_all` made before migrations."""
    eng = create_engine("sqlite://")
    with eng.begin() as conn:
        command.upgrade(alembic_config(connection=conn), INITIAL_REVISION)
        insp = inspect(conn)
        schema = {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names() if t != "alembic_version"}
    eng.dispose()
    return schema


def _adopt_unversioned(conn: Connection, cfg: Config, where: str) -> None:
    """Stamp a registry made by `create_all` (tables, no alembic_version) at the initial revision."""
    insp = inspect(conn)
    existing = set(insp.get_table_names())
    if "alembic_version" in existing:
        return
    initial = _initial_schema()
    ours = set(initial)
    present = ours & existing
    if not present:
        return  # a fresh database (or one holding only other applications' tables)
    if present != ours:
        raise UserError(
            f"the registry database at {where} has some miStudio tables ({', '.join(sorted(present))}) but not "
            f"{', '.join(sorted(ours - present))} and no alembic_version table; point MISTUDIO_DATABASE_URL at "
            "a complete registry or an empty database")
    missing = [f"{t}.{c}" for t in sorted(ours) for c in sorted(initial[t])
               if c not in {col["name"] for col in insp.get_columns(t)}]
    if missing:
        raise UserError(
            f"the registry database at {where} predates migrations and lacks columns {', '.join(missing)}; "
            "point MISTUDIO_DATABASE_URL at a new database (or add the columns) and start again")
    command.stamp(cfg, INITIAL_REVISION)


def driver_reason(e: DBAPIError) -> str:
    """The first line of what the database driver said, for a one-line error."""
    lines = str(e.orig if e.orig is not None else e).strip().splitlines()
    return lines[0].strip() if lines else type(e.orig or e).__name__


def connect(engine: Engine, where: str) -> Connection:
    """A connection, or a one-line UserError naming the URL (password masked) and the fix."""
    try:
        return engine.connect()
    except DBAPIError as e:
        reason = driver_reason(e)
        fix = "that this user may read and write the database file and its folder" \
            if engine.dialect.name == "sqlite" else "that the database server is running and accepts this user"
        raise UserError(f"cannot reach the registry database at {where} ({reason}); check MISTUDIO_DATABASE_URL "
                        f"and {fix}") from None


def upgrade_to_head(engine: Engine, where: str) -> None:
    """Bring the registry schema to the newest revision; a no-op when it is already there.

    `where` is the URL to show in errors, password masked.
    """
    # an in-memory SQLite database lives in its connection: migrate it on that one, no lock needed
    sqlite = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")
    eng = _sqlite_migration_engine(engine) if sqlite else engine
    try:
        with connect(eng, where) as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            if current_revision(conn) == head_revision():
                return  # the common case: nothing to do, nothing written
            with _ALEMBIC_LOCK:  # alembic.context / alembic.op are process-wide proxies
                cfg = alembic_config(connection=conn)
                _adopt_unversioned(conn, cfg, where)
                command.upgrade(cfg, "head")
    finally:
        if sqlite:
            eng.dispose()
