"""The registry: what exists (models, datasets, activations, SAEs, features) and every job.

SQLAlchemy 2 ORM over SQLite by default (PostgreSQL for a team); the schema is managed by
Alembic migrations in `storage/migrations/`, applied on start (`storage.migrate`). The JobManager actor is the
one writer; the dashboard and CLI only read. Large results live as files under the data root
(`storage.artifacts`); rows hold their paths and summary numbers. Those paths are stored relative
to the data root and read back absolute under it (`storage.portable`), so a copied data root works
on its own copy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import (JSON, URL, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event,
                        make_url, select, update)
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from core.errors import UserError
from core.features.schema import FeaturePage, FeatureQuery
from storage.feature_pages import feature_page
from storage.migrate import driver_reason, sqlite_pragmas, upgrade_to_head
from storage.portable import COLUMNS_OF, relocate, to_absolute, to_stored

JOB_STATES = ("queued", "loading", "running", "saving", "paused", "completed", "failed", "cancelled")
FINAL_STATES = ("completed", "failed", "cancelled")
IDLE_STATES = (*FINAL_STATES, "paused")
"""States in which nothing runs: a paused training waits, with its checkpoint, to be resumed."""


Count = BigInteger().with_variant(Integer(), "sqlite")
"""Token/parameter counts: BIGINT on PostgreSQL (a 7B model overflows INTEGER); SQLite's INTEGER is 64-bit."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}

    def to_dict(self) -> dict[str, Any]:
        return {c.key: getattr(self, c.key) for c in self.__mapper__.column_attrs}


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(64))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    n_params: Mapped[int] = mapped_column(Count)
    dtype: Mapped[str] = mapped_column(String(16))
    vocab_size: Mapped[int] = mapped_column(Integer)
    quantization: Mapped[str] = mapped_column(String(8), default="none")
    """bitsandbytes loading: none, 8bit or 4bit; every job loads the model this way."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text)
    text_column: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    """Token shards depend on the tokenizer, so a dataset is tokenized for one model."""
    context_length: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    documents: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Count)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Higher runs first among queued jobs; ties run in submission order."""
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sae_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    step: Mapped[str] = mapped_column(String(32), default="")
    """Pipeline step in progress (extract, train, discover)."""
    message: Mapped[str] = mapped_column(Text, default="")
    """Human-readable status, or the one-line reason a job failed."""
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    attempt: Mapped[str] = mapped_column(String(32), default="", server_default="")
    """The run that owns the job now (storage.fencing): a fresh token whenever a run starts or
    the job changes hands; a run's writes are refused once the job carries another."""


class Activation(Base):
    """One hook site's activations from one extraction job."""

    __tablename__ = "activations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    hook_name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Count)
    d_model: Mapped[int] = mapped_column(Integer)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class SAE(Base):
    __tablename__ = "saes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    model_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    hook_name: Mapped[str] = mapped_column(String(128))
    architecture: Mapped[str] = mapped_column(String(32))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    sae_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The SAE type's settings ({"architecture": "topk", "k": 32, ...}; `core.sae.registry`)."""
    path: Mapped[str] = mapped_column(Text)
    training_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    activation_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    history: Mapped[list[Any]] = mapped_column(default=list)
    """Training metrics at every log step, for the loss/FVU/L0 charts."""
    features_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Folder with features.parquet + examples.parquet once discovery ran."""
    features_dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The dataset discovery ran on: its rows are the contexts the examples point at."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Feature(Base):
    __tablename__ = "features"
    sae_id: Mapped[str] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    latent: Mapped[int] = mapped_column(Integer, primary_key=True)
    n_fired: Mapped[int] = mapped_column(Count)
    frequency: Mapped[float] = mapped_column(Float)
    max_act: Mapped[float] = mapped_column(Float)
    mean_act: Mapped[float] = mapped_column(Float)
    top_tokens: Mapped[list[Any]] = mapped_column(default=list)
    label: Mapped[str] = mapped_column(Text, default="")
    """The label's short name ("" until labeled)."""
    category: Mapped[str] = mapped_column(String(32), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    label_source: Mapped[str] = mapped_column(String(128), default="")
    """Who wrote the label: heuristic, local:<model>, openai:<model> or user."""
    analysis: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Measured analysis of this latent (logit effects, similar features, ablation, NLP summary)."""


class Template(Base):
    """A saved job form (any job kind), discovery config, or steering prompt set, exportable as JSON."""

    __tablename__ = "templates"
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    """A job kind (train, discover, ...) or `steering_prompts` / `label_prompt`."""
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    values: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Experiment(Base):
    """A saved steering experiment: the request and every output."""

    __tablename__ = "experiments"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    sae_id: Mapped[str] = mapped_column(String(64), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    record: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The experiment as core.steer writes it: prompts, features, generation settings, outputs."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


LABEL_FIELDS = ("label", "category", "description", "label_source")


def engine_url(url: str) -> URL:
    """The SQLAlchemy URL to connect with: `postgresql://` (and `postgres://`) use the psycopg 3 driver.

    The one place where user-written URLs are mapped to drivers; an explicit driver
    (`postgresql+psycopg2://...`) is kept as written.
    """
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def masked_url(url: str) -> str:
    """The URL as the user wrote it, password replaced by ***, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


@contextlib.contextmanager
def _writing(where: str, what: str) -> Iterator[None]:
    """Opening a registry may have to write (a migration, moving old paths): a database this user
    may only read refuses that in one line instead of the driver's error."""
    try:
        yield
    except DBAPIError as e:
        raise UserError(f"cannot update the registry database at {where} ({driver_reason(e)}); opening it brings "
                        f"{what}: open it once with write access, or point MISTUDIO_DATABASE_URL at a writable copy"
                        ) from None


class Registry:
    """Typed access to the registry database. Cheap to create; one per process.

    Creating one brings the schema to the newest Alembic migration (`storage.migrate`): safe to
    run from several processes at once, and a no-op when the schema is already at head.

    `home`, the data root: artifact paths under it are written relative and read back absolute
    under it (`storage.portable`; `Registry.of(settings)` passes it), and absolute paths an older
    registry holds are made relative on open. Without it (tools, tests of other tables) paths
    are kept and returned exactly as given.
    """

    def __init__(self, url: str, home: str | Path | None = None, exists: Callable[[Path], bool] = Path.exists):
        where = masked_url(url)
        try:
            u = engine_url(url)
        except ArgumentError:
            raise UserError("MISTUDIO_DATABASE_URL is not a database URL; use e.g. "
                            "sqlite:////path/registry.db or postgresql://user:password@host:5432/dbname") from None
        if u.get_backend_name() == "sqlite":
            if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
                try:
                    Path(u.database).parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UserError(f"cannot create the folder of the registry database at {where} "
                                    f"({e.strerror}); check MISTUDIO_DATABASE_URL / MISTUDIO_HOME") from None
            self.engine = create_engine(u)
            event.listen(self.engine, "connect", sqlite_pragmas)
        else:
            connect_args = {"connect_timeout": 10} if u.get_backend_name() == "postgresql" and \
                "connect_timeout" not in u.query else {}
            self.engine = create_engine(u, pool_pre_ping=True, connect_args=connect_args)
        self.home = Path(home) if home is not None else None
        try:
            with _writing(where, "its schema to the newest revision"):
                upgrade_to_head(self.engine, where)
            if self.home is not None:
                with _writing(where, "its older absolute artifact paths to ones relative to the data root"), \
                        self.engine.begin() as conn:
                    relocate(conn, self.home, exists)
        except BaseException:
            self.engine.dispose()
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def of(cls, settings, artifacts=None) -> "Registry":
        """The deployment's registry, its paths relative to the settings' data root. With an
        artifact store (`artifacts`), an artifact it holds counts as present when moving paths."""
        store = getattr(artifacts, "store", None)
        exists = (lambda p: p.exists() or store.has(p)) if store is not None else Path.exists
        return cls(settings.database_url, settings.home, exists)

    def _stored(self, table: type[Base], values: dict[str, Any]) -> dict[str, Any]:
        """`values` with the table's artifact paths as the registry keeps them (relative)."""
        if self.home is None:
            return values
        return {k: to_stored(v, self.home) if k in COLUMNS_OF.get(table.__tablename__, ()) else v
                for k, v in values.items()}

    def _read(self, row: Base) -> dict[str, Any]:
        """A row as a dict, its artifact paths absolute under this process's data root."""
        d = row.to_dict()
        if self.home is not None:
            for k in COLUMNS_OF.get(row.__tablename__, ()):
                d[k] = to_absolute(d[k], self.home)
        return d

    def close(self) -> None:
        """Close the pooled connections (the registry can be used again; it reconnects)."""
        self.engine.dispose()

    def session(self) -> Session:
        return self._session()

    # -- generic -----------------------------------------------------------------
    def add(self, row: Base) -> dict[str, Any]:
        paths = {k: getattr(row, k) for k in COLUMNS_OF.get(row.__tablename__, ())}
        for k, v in self._stored(type(row), paths).items():
            setattr(row, k, v)
        with self.session() as s, s.begin():
            merged = s.merge(row)
            s.flush()  # fills column defaults (timestamps) before we read them back
            return self._read(merged)

    def get(self, table: type[Base], key: Any) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.get(table, key)
            return self._read(row) if row else None

    def list(self, table: type[Base], order_by=None, **where: Any) -> list[dict[str, Any]]:
        with self.session() as s:
            q = select(table).filter_by(**self._stored(table, where))
            if order_by is not None:
                q = q.order_by(order_by)
            return [self._read(r) for r in s.scalars(q)]

    def update(self, table: type[Base], key: Any, **values: Any) -> dict[str, Any]:
        with self.session() as s, s.begin():
            row = s.get(table, key)
            if row is None:
                raise KeyError(f"{table.__tablename__} {key!r} not found")
            for k, v in self._stored(table, values).items():
                setattr(row, k, v)
            return self._read(row)

    # -- jobs --------------------------------------------------------------------
    def create_job(self, kind: str, spec: dict[str, Any], priority: int = 0, **refs: Any) -> dict[str, Any]:
        return self.add(Job(id=new_id(kind), kind=kind, spec=spec, state="queued", priority=priority,
                            message="queued, waiting for a worker", **refs))

    def queue(self) -> list[dict[str, Any]]:
        """Queued jobs in the order they will start: priority, then submission time."""
        with self.session() as s:
            q = select(Job).where(Job.state == "queued").order_by(Job.priority.desc(), Job.created_at)
            return [r.to_dict() for r in s.scalars(q)]

    def set_job_state(self, job_id: str, state: str, **values: Any) -> dict[str, Any]:
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        stamp = now()
        with self.session() as s, s.begin():
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(f"job {job_id!r} not found")
            if job.state in FINAL_STATES:  # final states are final: a late update must not revive a job
                return job.to_dict()
            if state in ("loading", "running") and job.started_at is None:
                job.started_at = stamp
            if state in FINAL_STATES:
                job.finished_at = stamp
            job.state, job.updated_at = state, stamp
            for k, v in values.items():
                setattr(job, k, v)
            return job.to_dict()

    def jobs(self, state: str | None = None, model_id: str | None = None, kind: str | None = None
             ) -> list[dict[str, Any]]:
        """Jobs newest first; filter by state, model ("what runs on this model now") and/or kind."""
        with self.session() as s:
            q = select(Job).order_by(Job.created_at.desc())
            if state:
                q = q.where(Job.state == state)
            if kind:
                q = q.where(Job.kind == kind)
            if model_id:
                q = q.where(Job.model_id == model_id)
            return [r.to_dict() for r in s.scalars(q)]

    def active_jobs(self) -> list[dict[str, Any]]:
        """Jobs queued or running (not paused), oldest first."""
        with self.session() as s:
            q = select(Job).where(Job.state.not_in(IDLE_STATES)).order_by(Job.created_at)
            return [r.to_dict() for r in s.scalars(q)]

    # -- templates ---------------------------------------------------------------
    def templates(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.session() as s:
            q = select(Template).order_by(Template.kind, Template.name)
            if kind:
                q = q.where(Template.kind == kind)
            return [r.to_dict() for r in s.scalars(q)]

    def delete(self, table: type[Base], *key: Any) -> bool:
        with self.session() as s, s.begin():
            row = s.get(table, key if len(key) > 1 else key[0])
            if row is not None:
                s.delete(row)
            return row is not None

    # -- features ----------------------------------------------------------------
    def replace_features(self, sae_id: str, rows: Iterable[dict[str, Any]]) -> int:
        """Replace an SAE's feature rows in one bulk insert (never row by row).

        Labels describe the latent (the SAE's weights), so a new discovery keeps them; the
        analysis came from the old examples and is dropped."""
        with self.session() as s, s.begin():
            kept = {r.latent: {k: getattr(r, k) for k in LABEL_FIELDS}
                    for r in s.scalars(select(Feature).where(Feature.sae_id == sae_id, Feature.label != ""))}
            # every row names every column: an executemany INSERT takes its columns from the first row
            blank = {k: "" for k in LABEL_FIELDS}
            rows = [{**blank, **r, **kept.get(r["latent"], {}), "sae_id": sae_id} for r in rows]
            s.query(Feature).filter(Feature.sae_id == sae_id).delete()
            if rows:
                s.execute(Feature.__table__.insert(), rows)
        return len(rows)

    def update_features(self, sae_id: str, rows: Iterable[dict[str, Any]]) -> int:
        """Set some columns (label fields, analysis) of many latents in one bulk UPDATE; each row
        has `latent` and the columns to set."""
        rows = [dict(r, sae_id=sae_id) for r in rows]
        if rows:
            with self.session() as s, s.begin():
                s.execute(update(Feature), rows)
        return len(rows)

    def features(self, sae_id: str, order_by: str = "frequency", limit: int | None = None,
                 min_frequency: float = 0.0, offset: int = 0,
                 latents: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """An SAE's feature rows, most frequent (or largest `order_by`) first; `offset`/`limit`
        slice them (a limit of 0 or None: all), `latents` keeps only those."""
        query = FeatureQuery(order_by=order_by, offset=offset, limit=limit or None, min_frequency=min_frequency,
                             latents=None if latents is None else tuple(latents))
        with self.session() as s:
            return feature_page(s, Feature, sae_id, query, count=False).rows

    def feature_page(self, sae_id: str, query: FeatureQuery) -> FeaturePage:
        """One page of an SAE's feature rows under every filter of `query` (labels included), and
        how many rows pass the filters."""
        with self.session() as s:
            return feature_page(s, Feature, sae_id, query)
