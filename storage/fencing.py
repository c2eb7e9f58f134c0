"""One writer per job: every registry write of a job's run is fenced by the run's attempt token.

Each run of a job gets a fresh token in `jobs.attempt` when it starts, and the token changes
whenever the job changes hands (requeued, cancelled, marked interrupted by a restarted job
manager, ended). A run writes only through a `FencedRegistry` holding its token: every
transaction it opens first runs

    UPDATE jobs SET attempt = :mine WHERE id = :job AND attempt = :mine

and goes on only when that matched the job's row. The statement is a no-op write, so it takes
the lock a concurrent claim needs: PostgreSQL's row lock (as `SELECT ... FOR UPDATE` would), and
SQLite's database write lock. Until the transaction ends no claim can slip in between the check
and the writes, and a claim that committed first makes the check fail. A run of a dead Ray head
(its job manager or worker still alive, the job claimed by a new head's manager) therefore
cannot add a single row: its write raises `StaleAttempt`, and the run just stops.

`atomic()` puts the writes of one block (a job's result rows and its completion) into one such
transaction: all of them land, or none.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any, Iterator

from sqlalchemy import Connection, event, text
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from storage.registry import FINAL_STATES, Job, Registry

_CHECK = text("UPDATE jobs SET attempt = :attempt WHERE id = :job_id AND attempt = :attempt")


class StaleAttempt(Exception):
    """A registry write from a run of a job that no longer owns it (another run, or nobody, does)."""


def new_attempt() -> str:
    return uuid.uuid4().hex


def claim(registry: Registry, job_id: str, state: str, only_from: tuple[str, ...] | None = None,
          **values: Any) -> dict[str, Any] | None:
    """Set a job's state and give it a fresh attempt token: from then on, writes of every
    earlier run of the job are refused. Returns the job, or None when it was left alone: it is
    in a final state (final is final) or in none of `only_from`.

    Through a run's FencedRegistry, the run hands its own job on (requeued, ended) if it still
    owns it. Otherwise the change is a compare-and-set on the attempt just read, so it cannot
    undo a write that committed in between (a run completing its job as the job is claimed)."""
    if isinstance(registry, FencedRegistry):
        return registry.set_job_state(job_id, state, attempt=new_attempt(), **values)
    for _ in range(100):
        seen = registry.get(Job, job_id)
        if seen is None:
            raise KeyError(f"job {job_id!r} not found")
        if seen["state"] in FINAL_STATES or (only_from is not None and seen["state"] not in only_from):
            return None
        try:
            return FencedRegistry(registry, job_id, seen["attempt"]).set_job_state(
                job_id, state, attempt=new_attempt(), **values)
        except StaleAttempt:
            continue  # the job changed hands between the read and the write: look again
    raise RuntimeError(f"job {job_id} keeps changing hands; could not set it {state}")


class FencedRegistry(Registry):
    """The registry as one run of a job sees it: the same tables and methods, every transaction
    checked against the run's attempt (reads too, so a stale run stops at its next access)."""

    def __init__(self, registry: Registry, job_id: str, attempt: str):
        # (no Registry.__init__: the schema is up to date and the engine is shared)
        self.engine, self.home = registry.engine, registry.home  # (the data root its paths are relative to)
        self.job_id, self.attempt = job_id, attempt
        self._local = threading.local()  # the connection of an atomic() block, per thread
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._session, "after_begin", self._on_begin)

    def close(self) -> None:
        """Nothing to close: the engine belongs to the registry this view was made from."""

    def session(self) -> Session:
        conn = getattr(self._local, "conn", None)
        # inside atomic(): the session joins the block's transaction (its commit leaves it open)
        return self._session(bind=conn) if conn is not None else self._session()

    def check(self, conn: Connection) -> None:
        """Raise StaleAttempt unless the job still carries this run's attempt; on success the
        transaction holds the job's row (PostgreSQL) or the database (SQLite) until it ends."""
        matched = conn.execute(_CHECK, {"attempt": self.attempt, "job_id": self.job_id}).rowcount
        if matched != 1:
            raise StaleAttempt(f"job {self.job_id}: attempt {self.attempt[:8]} no longer owns the job; "
                               "its write was refused")

    def _on_begin(self, _session: Session, _transaction: SessionTransaction, conn: Connection) -> None:
        self.check(conn)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Every write of this thread inside the block in one transaction, fenced once at its
        start: all of them are committed, or none (an exception rolls them all back)."""
        if getattr(self._local, "conn", None) is not None:  # nested: part of the outer block
            yield
            return
        with self.engine.connect() as conn, conn.begin():
            self.check(conn)
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None
