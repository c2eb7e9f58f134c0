"""The SQLAlchemy registry and its Alembic migrations, on a real SQLite file and a real PostgreSQL.

Every test taking `db_url` runs on both backends. PostgreSQL is the server in
MISTUDIO_TEST_PG_URL, else a local one at 127.0.0.1:5432/test (user postgres or root) when it
answers. With neither, the PostgreSQL tests fail loudly; MISTUDIO_TEST_NO_PG=1 skips them
instead. Each PostgreSQL test gets its own fresh schema (search_path set through the URL),
dropped afterwards.
"""

import datetime as dt
import os
import threading
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, DateTime, column, create_engine, inspect, make_url, table, text

from core.errors import UserError
from storage import Registry
from storage.migrate import INITIAL_REVISION, alembic_config, head_revision, upgrade_to_head
from storage.registry import SAE, Base, Job, Model, engine_url

LOCAL_PG = ["postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test"]


def _answers(url: str) -> str | None:
    """None when the server answers, else the reason."""
    import psycopg

    try:
        with psycopg.connect(engine_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                             connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not usable", reported below
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """The PostgreSQL server for this test session, or a loud failure (a skip only if asked for)."""
    if os.environ.get("MISTUDIO_TEST_NO_PG") == "1":
        pytest.skip("PostgreSQL registry tests skipped: MISTUDIO_TEST_NO_PG=1")
    if url := os.environ.get("MISTUDIO_TEST_PG_URL"):
        if (why := _answers(url)) is None:
            return url
        tried = {make_url(url).render_as_string(hide_password=True): why}
    else:
        tried = {}
        for url in LOCAL_PG:
            if (why := _answers(url)) is None:
                return url
            tried[url] = why
    pytest.fail(
        "NO POSTGRESQL SERVER FOR THE REGISTRY TESTS. Tried: "
        + "; ".join(f"{u} -> {why}" for u, why in tried.items())
        + ". Start PostgreSQL (database `test`, trust auth on 127.0.0.1:5432) or set MISTUDIO_TEST_PG_URL to "
        "a server where the user may create schemas; set MISTUDIO_TEST_NO_PG=1 to skip these tests on purpose.",
        pytrace=False)


def _pg_admin(base_url: str):
    return create_engine(engine_url(base_url), isolation_level="AUTOCOMMIT")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty registry database URL: a SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    base = request.getfixturevalue("pg_base_url")
    schema = f"mistudio_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin(base)
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def registry(db_url):
    reg = Registry(db_url)
    yield reg
    reg.close()


def _revision(url: str) -> str | None:
    eng = create_engine(engine_url(url))
    try:
        with eng.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        eng.dispose()


# -- the registry itself --------------------------------------------------------------------------------


def test_job_lifecycle_timestamps_and_final_states_are_final(registry):
    job = registry.create_job("extract", {"layers": [3]}, model_id="m")
    assert job["state"] == "queued" and job["message"] == "queued, waiting for a worker"
    assert job["created_at"] is not None and job["started_at"] is None
    running = registry.set_job_state(job["id"], "running")
    assert running["started_at"] is not None
    failed = registry.set_job_state(job["id"], "failed", message="boom")
    assert failed["finished_at"] >= failed["started_at"]
    late = registry.set_job_state(job["id"], "running", message="late update")  # e.g. a delayed worker message
    assert (late["state"], late["message"]) == ("failed", "boom")
    with pytest.raises(ValueError):
        registry.set_job_state(job["id"], "exploded")
    assert registry.get(Job, job["id"])["spec"] == {"layers": [3]}  # JSON round-trips on both backends


def test_what_runs_on_this_model_is_one_query(registry):
    a = registry.create_job("extract", {}, model_id="m1")
    b = registry.create_job("train", {}, model_id="m2")
    registry.set_job_state(b["id"], "running")
    registry.set_job_state(a["id"], "completed")
    assert [j["id"] for j in registry.active_jobs()] == [b["id"]]
    assert [j["id"] for j in registry.jobs(model_id="m1")] == [a["id"]]
    assert [j["id"] for j in registry.jobs(state="running")] == [b["id"]]


def test_features_are_replaced_in_bulk_and_sorted(registry):
    registry.add(Model(id="m", name="m", source="x", path="/m", architecture="llama", n_layers=2, d_model=4,
                       n_params=7_000_000_000, dtype="float32", vocab_size=9))  # > 2**31: BIGINT on PostgreSQL
    assert registry.get(Model, "m")["n_params"] == 7_000_000_000
    registry.add(SAE(id="s", name="s", model_id="m", hook_name="blocks.1.hook_resid_post", architecture="topk",
                     d_in=4, d_sae=3, sae_config={"architecture": "topk", "k": 1}, path="/s"))
    rows = [{"latent": i, "n_fired": i, "frequency": i / 10, "max_act": 1.0, "mean_act": 0.5, "top_tokens": ["a"]}
            for i in range(3)]
    assert registry.replace_features("s", rows) == 3
    assert registry.replace_features("s", rows) == 3  # re-running discovery replaces, never duplicates
    feats = registry.features("s")
    assert [f["latent"] for f in feats] == [2, 1, 0]
    assert feats[0]["top_tokens"] == ["a"]
    assert [f["latent"] for f in registry.features("s", min_frequency=0.1, limit=1)] == [2]
    assert [f["latent"] for f in registry.features("s", offset=1)] == [1, 0]
    assert [f["latent"] for f in registry.features("s", latents=[0, 2])] == [2, 0]


def test_a_feature_page_is_filtered_sorted_and_sliced_by_the_registry(registry):
    """What the Features page asks for: one page of latents under its filters (labels included),
    and how many pass them; the same answers as filtering every row in Python."""
    from core.features.schema import FeatureQuery, matches

    registry.add(Model(id="m", name="m", source="x", path="/m", architecture="llama", n_layers=2, d_model=4,
                       n_params=1, dtype="float32", vocab_size=9))
    registry.add(SAE(id="s", name="s", model_id="m", hook_name="blocks.1.hook_resid_post", architecture="topk",
                     d_in=4, d_sae=12, sae_config={"architecture": "topk", "k": 1}, path="/s"))
    rows = [{"latent": i, "n_fired": i % 4, "frequency": (i % 4) / 10, "max_act": float(i % 5), "mean_act": i / 7,
             "top_tokens": [f" Tok{i}", "ÉTÉ" if i % 3 == 0 else "x"]} for i in range(12)]
    registry.replace_features("s", rows)
    registry.update_features("s", [{"latent": 1, "label": "Dates", "category": "semantic"},
                                   {"latent": 5, "label": "commas", "category": "syntactic"}])
    everything = registry.features("s")
    queries = [FeatureQuery(), FeatureQuery(limit=5), FeatureQuery(offset=5, limit=5), FeatureQuery(offset=11),
               FeatureQuery(live_only=True, order_by="max_act"), FeatureQuery(min_max_act=3.0, order_by="latent"),
               FeatureQuery(min_frequency=0.2, order_by="mean_act"), FeatureQuery(labels="labeled"),
               FeatureQuery(labels="unlabeled", limit=3), FeatureQuery(labels="semantic"),
               FeatureQuery(search="tok1"), FeatureQuery(search="été", limit=2, offset=1),
               FeatureQuery(search="DATES"), FeatureQuery(search="7"),
               FeatureQuery(latents=(3, 4, 9), order_by="latent")]
    for q in queries:
        want = [r for r in everything if r["frequency"] >= q.min_frequency and (r["n_fired"] > 0 or not q.live_only)
                and r["max_act"] >= q.min_max_act and (q.latents is None or r["latent"] in q.latents)
                and {"all": True, "labeled": bool(r["label"]), "unlabeled": not r["label"]}.get(
                    q.labels, bool(r["label"]) and r["category"] == q.labels)
                and (not q.search or matches(r, q.search))]
        want.sort(key=(lambda r: r["latent"]) if q.order_by == "latent" else (lambda r: (-r[q.order_by], r["latent"])))
        page = registry.feature_page("s", q)
        stop = None if q.limit is None else q.offset + q.limit
        assert [r["latent"] for r in page.rows] == [r["latent"] for r in want[q.offset:stop]], q
        assert page.total == len(want), q
        assert page.rows == want[q.offset:stop]
    assert registry.feature_page("s", FeatureQuery(search="été")).total == 4  # case-insensitive beyond ASCII
    with pytest.raises(UserError, match="cannot sort features by 'label'"):
        registry.feature_page("s", FeatureQuery(order_by="label"))


# -- migrations -----------------------------------------------------------------------------------------


def test_fresh_database_is_migrated_to_head_and_matches_the_models(registry, db_url):
    with registry.engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert MigrationContext.configure(conn).get_current_revision() == head_revision()
        # the migrations describe the ORM models exactly: nothing left for autogenerate to add
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_upgrade_again_is_a_no_op(db_url):
    first = Registry(db_url)
    job = first.create_job("extract", {"layers": [1]})
    second = Registry(db_url)  # a second process starting on the same database
    upgrade_to_head(second.engine, "test")  # and once more, directly
    assert second.get(Job, job["id"])["spec"] == {"layers": [1]}
    with second.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    first.close()
    second.close()


def test_a_registry_made_by_create_all_is_adopted(db_url):
    """Registries from before migrations: tables made by create_all, no alembic_version.

    Those tables had the initial schema, so build them with revision 0001 and drop its stamp."""
    eng = create_engine(engine_url(db_url))
    with eng.begin() as conn:
        command.upgrade(alembic_config(connection=conn), INITIAL_REVISION)
        conn.execute(text("DROP TABLE alembic_version"))
    with eng.begin() as conn:
        # the initial schema's columns only (today's Job has more, e.g. priority)
        old_jobs = table("jobs", *(column(c) for c in ("id", "kind", "state", "step", "message")),
                         column("spec", JSON), column("result", JSON), column("created_at", DateTime),
                         column("updated_at", DateTime))
        conn.execute(old_jobs.insert(), [{"id": "old-job", "kind": "extract", "state": "completed", "spec": {},
                                               "step": "", "message": "done", "result": {"n": 1},
                                               "created_at": dt.datetime(2024, 1, 1),
                                               "updated_at": dt.datetime(2024, 1, 1)}])
        assert "alembic_version" not in inspect(conn).get_table_names()
    eng.dispose()
    reg = Registry(db_url)
    assert _revision(db_url) == head_revision()
    assert reg.get(Job, "old-job")["result"] == {"n": 1}
    reg.close()


def test_sae_rows_from_before_type_configs_keep_their_k(db_url):
    """Migration 0005 moves the TopK-only `k` column into each row's type settings (JSON)."""
    eng = create_engine(engine_url(db_url))
    with eng.begin() as conn:
        command.upgrade(alembic_config(connection=conn), "0004")
        old = table("saes", *(column(c) for c in ("id", "name", "hook_name", "architecture", "d_in", "d_sae", "k",
                                                  "path")), column("metrics", JSON), column("history", JSON),
                    column("created_at", DateTime))
        conn.execute(old.insert(), [
            {"id": "sae-topk", "name": "a", "hook_name": "blocks.0.hook_resid_post", "architecture": "topk",
             "d_in": 4, "d_sae": 8, "k": 3, "path": "/a", "metrics": {}, "history": [],
             "created_at": dt.datetime(2026, 1, 1)},
            {"id": "sae-relu", "name": "b", "hook_name": "blocks.0.hook_resid_post", "architecture": "standard",
             "d_in": 4, "d_sae": 8, "k": None, "path": "/b", "metrics": {}, "history": [],
             "created_at": dt.datetime(2026, 1, 1)}])
    eng.dispose()
    reg = Registry(db_url)
    assert reg.get(SAE, "sae-topk")["sae_config"] == {"architecture": "topk", "k": 3}
    assert reg.get(SAE, "sae-relu")["sae_config"] == {"architecture": "standard"}
    assert "k" not in reg.get(SAE, "sae-topk")
    reg.close()


def test_a_half_made_registry_is_refused_in_one_line(db_url):
    eng = create_engine(engine_url(db_url))
    Job.__table__.create(eng)
    eng.dispose()
    with pytest.raises(UserError) as e:
        Registry(db_url)
    msg = str(e.value)
    assert "\n" not in msg and "no alembic_version" in msg and "models" in msg


def test_concurrent_starts_on_one_fresh_database(db_url):
    n = 4
    barrier = threading.Barrier(n)
    errors, registries = [], []

    def start():
        barrier.wait()
        try:
            registries.append(Registry(db_url))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(registries) == n
    assert _revision(db_url) == head_revision()
    job = registries[0].create_job("extract", {})
    assert registries[-1].get(Job, job["id"]) is not None
    for r in registries:
        r.close()


# -- errors and URLs ------------------------------------------------------------------------------------


def test_unreachable_database_is_a_one_line_user_error():
    url = "postgresql://mistudio:s3cret-pw@127.0.0.1:1/registry"  # nothing listens on port 1
    with pytest.raises(UserError) as e:
        Registry(url)
    msg = str(e.value)
    assert "\n" not in msg
    assert "postgresql://mistudio:***@127.0.0.1:1/registry" in msg and "s3cret-pw" not in msg
    assert "MISTUDIO_DATABASE_URL" in msg and "running" in msg


def test_unusable_sqlite_path_is_a_one_line_user_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError) as e:
        Registry(f"sqlite:///{blocker / 'sub' / 'registry.db'}")
    assert "\n" not in str(e.value) and "MISTUDIO_DATABASE_URL" in str(e.value)


def test_postgresql_urls_use_psycopg3():
    assert engine_url("postgresql://u:p@h:5432/db").drivername == "postgresql+psycopg"
    assert engine_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert engine_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"  # explicit: kept
    assert engine_url("sqlite:///x.db").drivername == "sqlite"


def test_feature_labels_survive_a_new_discovery_and_bulk_updates(registry):
    registry.add(SAE(id="sae-lab", name="s", hook_name="blocks.0.hook_resid_post", architecture="topk", d_in=4,
                     d_sae=3, path="/x"))
    base = [{"latent": i, "n_fired": i, "frequency": i / 10, "max_act": 1.0, "mean_act": 0.5, "top_tokens": ["a"]}
            for i in range(3)]
    registry.replace_features("sae-lab", base)
    n = registry.update_features("sae-lab", [
        {"latent": 1, "label": "cities", "category": "entity", "description": "city names", "label_source": "user"},
        {"latent": 2, "analysis": {"similar": [[0, 0.5]]}}])
    assert n == 2
    rows = {f["latent"]: f for f in registry.features("sae-lab")}
    assert rows[1]["label"] == "cities" and rows[1]["category"] == "entity" and rows[0]["label"] == ""
    assert rows[2]["analysis"] == {"similar": [[0, 0.5]]}
    registry.replace_features("sae-lab", [dict(r, n_fired=r["n_fired"] + 5) for r in base])  # rediscovered
    rows = {f["latent"]: f for f in registry.features("sae-lab")}
    assert rows[1]["n_fired"] == 6 and (rows[1]["label"], rows[1]["label_source"]) == ("cities", "user")
    assert rows[2]["analysis"] == {}, "analysis came from the old examples"


# -- deleting objects ------------------------------------------------------------------------------------


def _objects(registry, home):
    """A model (its folder under the data root), a dataset, an activation set and an SAE with
    features, each with files."""
    from storage.registry import SAE, Activation, Dataset, Feature

    def folder(name):
        (home / name).mkdir(parents=True)
        (home / name / "data.bin").write_bytes(b"x")
        return str(home / name)
    registry.add(Model(id="m", name="m", source="embedded", path=folder("models/m"), architecture="llama",
                       n_layers=2, d_model=4, n_params=10, dtype="float32", vocab_size=9))
    registry.add(Dataset(id="d", name="d", source="builtin", text_column="text", model_id="m", context_length=8,
                         path=folder("datasets/d"), documents=1, rows=1, tokens=8))
    registry.add(Activation(id="a", job_id="j", model_id="m", dataset_id="d", hook_name="blocks.0.hook_resid_post",
                            path=folder("activations/a"), tokens=8, d_model=4))
    registry.add(SAE(id="s", name="m/topk", model_id="m", hook_name="blocks.0.hook_resid_post", architecture="topk",
                     d_in=4, d_sae=8, path=folder("saes/s"), activation_id="a", features_path=folder("features/s"),
                     features_dataset_id="d"))
    registry.replace_features("s", [{"latent": 0, "n_fired": 1, "frequency": 0.5, "max_act": 1.0, "mean_act": 1.0}])
    return SAE, Activation, Dataset, Feature


def test_delete_refuses_while_in_use_or_needed_then_removes_rows_and_files(registry, tmp_path):
    from core.errors import UserError
    from storage import deletion

    home = tmp_path / "home"
    SAE, Activation, Dataset, Feature = _objects(registry, home)
    with pytest.raises(UserError, match=r"^model m is needed by dataset d, activation set a, SAE s; delete those first$"):
        deletion.delete(registry, home, "model", "m")
    with pytest.raises(UserError, match=r"^dataset d is needed by activation set a, SAE \(its feature examples\) s"):
        deletion.delete(registry, home, "dataset", "d")
    job = registry.create_job("discover", {"sae_id": "s", "dataset_id": "d"})
    with pytest.raises(UserError, match=rf"^sae s is used by job {job['id']}, not finished; .*jobs cancel"):
        deletion.delete(registry, home, "sae", "s")
    assert (home / "saes/s/data.bin").is_file() and registry.get(SAE, "s") is not None  # nothing touched
    with pytest.raises(UserError, match=r"^no sae 'nope'; list them with: mistudio saes list$"):
        deletion.delete(registry, home, "sae", "nope")

    registry.set_job_state(job["id"], "completed")
    assert deletion.delete(registry, home, "activation", "a") == [str(home / "activations/a")]
    assert registry.get(SAE, "s")["activation_id"] is None  # the SAE stands on its own
    removed = deletion.delete(registry, home, "sae", "s")
    assert removed == [str(home / "saes/s"), str(home / "features/s")]
    assert registry.get(SAE, "s") is None and registry.features("s") == []
    deletion.delete(registry, home, "dataset", "d")
    deletion.delete(registry, home, "model", "m")
    assert sorted(p.name for p in home.rglob("*")) == ["activations", "datasets", "features", "models", "saes"]
    assert registry.list(Model) == [] and registry.list(Dataset) == []


def test_delete_keeps_a_users_own_folder_and_rolls_back_files_when_the_rows_cannot_go(registry, tmp_path,
                                                                                     monkeypatch):
    from storage import deletion

    home = tmp_path / "home"
    SAE, *_ = _objects(registry, home)
    own = tmp_path / "my-model"
    own.mkdir()
    registry.add(Model(id="mine", name="mine", source=str(own), path=str(own), architecture="llama", n_layers=2,
                       d_model=4, n_params=10, dtype="float32", vocab_size=9))
    assert deletion.delete(registry, home, "model", "mine") == []  # registered from the user's folder: kept
    assert own.is_dir() and registry.get(Model, "mine") is None

    def broken(*args):
        raise RuntimeError("the database went away")
    monkeypatch.setattr(deletion, "_delete_rows", broken)
    with pytest.raises(RuntimeError):
        deletion.delete(registry, home, "sae", "s")
    assert (home / "saes/s/data.bin").is_file() and (home / "features/s/data.bin").is_file()
    assert not [p for p in (home / "saes").iterdir() if p.name.startswith(".deleting")]
    assert registry.get(SAE, "s") is not None
