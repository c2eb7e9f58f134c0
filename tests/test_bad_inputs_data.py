"""Bad input by area: text files decoded strictly (--encoding), a non-text Parquet column
named, and a corrupt or unreachable registry refused before Ray starts (issue 24)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.jobs.add_dataset import AddDatasetSpec, check as check_dataset
from core.data.texts import check_text_file, load_texts
from core.errors import UserError
from tests.test_registry import pg_base_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and len(message) < 500
    return message


# Text input: decoded strictly, with --encoding for other encodings.

def test_latin1_text_needs_its_encoding(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café olé\n\nsecond".encode("latin-1"))
    message = one_line_error(load_texts, str(path))
    assert "latin.txt is not valid utf-8" in message and "--encoding" in message
    assert load_texts(str(path), encoding="latin-1") == ["café olé", "second"]
    assert "latin.txt is not valid utf-8" in one_line_error(check_text_file, str(path))
    check_text_file(str(path), "latin-1")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_binary_text_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"blob{suffix}"
    path.write_bytes(bytes(range(256)) * 4)
    assert f"blob{suffix} looks binary" in one_line_error(load_texts, str(path))


def test_unknown_encoding_is_refused(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    assert "unknown encoding 'klingon'" in one_line_error(load_texts, str(path), encoding="klingon")
    assert "unknown encoding" in one_line_error(check_text_file, str(path), "klingon")


def test_parquet_column_of_ints_names_the_column_and_type(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), path)
    message = one_line_error(load_texts, str(path))
    assert "column 'text' of ints.parquet holds int64, not text" in message and "body" in message
    assert load_texts(str(path), text_column="body") == ["a", "b", "c"]


def test_dataset_spec_refused_at_submit(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("olé".encode("latin-1"))
    assert "not valid utf-8" in one_line_error(check_dataset, None, AddDatasetSpec("m", source=str(path)))
    check_dataset(None, AddDatasetSpec("m", source=str(path), encoding="latin-1"))


def run_cli(args, home: Path, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, MISTUDIO_HOME=str(home), PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", **env)
    return subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=120)


def assert_refused(out: subprocess.CompletedProcess, words: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], out.stderr


def test_cli_corrupt_or_unreachable_registry_is_one_line_and_starts_no_ray(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.db").write_bytes(b"not a database" * 400)
    assert_refused(run_cli(["jobs", "list"], home), "file is not a database")
    url = "postgresql://u:S3cretPW@127.0.0.1:1/db"  # a closed port
    out = run_cli(["jobs", "list"], home, MISTUDIO_DATABASE_URL=url)
    assert_refused(out, "postgresql://u:***@127.0.0.1:1/db")
    assert "S3cretPW" not in out.stderr + out.stdout
    assert sorted(p.name for p in home.iterdir()) == ["registry.db"]  # no Ray head recorded


# Damaged artifacts (truncated by an interrupted copy): one line naming the file and the fix.

def _truncated(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_truncated_artifacts_are_one_line_naming_the_fix(tmp_path):
    from core.data.shards import read_rows, row_lengths
    from core.extract import count_activations, iter_activations
    from core.features import FeatureQuery
    from core.features import store

    features = tmp_path / "features"
    _truncated(features / "features.parquet", pa.table({"latent": [0, 1], "frequency": [0.5, 0.1]}))
    (features / "discovery.json").write_text('{"hist_edges": [0.1, ')
    msg = one_line_error(store.feature_page, features, FeatureQuery(limit=5))
    assert msg.startswith(f"{features} is damaged (") and msg.endswith("; run discovery for this SAE again to rewrite it")
    assert "discovery for this SAE again" in one_line_error(store.info, features)

    dataset = tmp_path / "dataset"
    _truncated(dataset / "shard-00000.parquet", pa.table({"input_ids": [[1, 2]], "row_id": [0], "doc_id": [0]}))
    for read in (lambda: row_lengths(dataset), lambda: read_rows(dataset, [0])):
        msg = one_line_error(read)
        assert msg.startswith(f"{dataset / 'shard-00000.parquet'} is damaged (")
        assert msg.endswith("delete the dataset (mistudio datasets delete ID) and add it again")

    hook = tmp_path / "acts" / "blocks.0.hook_resid_post"
    act = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 8, pa.float32()), 4)
    _truncated(hook / "shard-00000.parquet", pa.table({"act": act}))
    for read in (lambda: list(iter_activations(hook)), lambda: count_activations(hook)):
        assert one_line_error(read).endswith("delete the activation set (mistudio extract delete ID) and extract again")


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for this user: a read-only bind mount (root ignores file modes),
    or mode 0555 for a user who is not root."""
    mounted = os.geteuid() == 0
    if mounted:
        out = subprocess.run(["mount", "-o", "bind,ro", str(folder), str(folder)], capture_output=True, text=True)
        assert out.returncode == 0, f"root here cannot make a read-only bind mount: {out.stderr}"
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


@pytest.fixture
def read_only_home(tmp_path):
    """A data root the CLI's user cannot write."""
    home = tmp_path / "home"
    home.mkdir()
    with read_only(home):
        yield home


def _older_registry(url: str, home: Path) -> None:
    """A registry as older miStudio wrote it: one SAE whose path under `home` is stored absolute."""
    from storage import Registry
    from storage.registry import SAE

    (home / "saes" / "sae-1").mkdir(parents=True)
    legacy = Registry(url)  # no data root: the path is stored as given
    legacy.add(SAE(id="sae-1", name="sae-1", model_id="m", hook_name="blocks.1.hook_resid_post",
                   architecture="topk", d_in=64, d_sae=256, path=str(home / "saes" / "sae-1")))
    legacy.close()


def _stored_paths(url: str) -> list[str]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sqlalchemy.text("SELECT path FROM saes"))]
    finally:
        engine.dispose()


def test_a_sqlite_registry_in_a_read_only_folder_is_one_line(tmp_path):
    """SQLite (in WAL mode) cannot open a database whose folder it may not write: one line that
    names the file and what to check, not a database server."""
    from storage import Registry

    home, db = tmp_path / "home", tmp_path / "db"
    db.mkdir()
    url = f"sqlite:///{db / 'registry.db'}"
    _older_registry(url, home)
    with read_only(db):
        message = one_line_error(lambda: Registry(url, home))
    assert message == (f"cannot reach the registry database at {url} (unable to open database file); check "
                       "MISTUDIO_DATABASE_URL and that this user may read and write the database file and its folder")


def test_a_read_only_registry_that_needs_its_paths_moved_is_one_line(pg_base_url, tmp_path):  # noqa: F811
    """An older registry (absolute artifact paths) opened by a PostgreSQL user who may only read
    it: opening must rewrite the paths, which that user cannot; one line says so and how to fix
    it, and nothing was changed."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    from storage import Registry

    schema, role = f"mistudio_test_{uuid.uuid4().hex[:12]}", f"mistudio_ro_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        _older_registry(url.render_as_string(hide_password=False), tmp_path / "home")
        with admin.connect() as c:
            c.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            c.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            c.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'))
        reader = url.set(username=role, password=None).render_as_string(hide_password=False)
        message = one_line_error(lambda: Registry(reader, tmp_path / "home"))
        assert message.startswith(f"cannot update the registry database at {reader} (permission denied"), message
        assert message.endswith("opening it brings its older absolute artifact paths to ones relative to the data "
                                "root: open it once with write access, or point MISTUDIO_DATABASE_URL at a "
                                "writable copy"), message
        assert _stored_paths(reader) == [str(tmp_path / "home" / "saes" / "sae-1")]  # nothing half-changed
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            c.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_a_read_only_data_root_is_one_line_and_starts_nothing(read_only_home):
    import psutil

    def ray_heads() -> set[int]:
        return {p.pid for p in psutil.process_iter(["cmdline"]) if "gcs_server" in " ".join(p.info["cmdline"] or [])}

    before = ray_heads()
    out = run_cli(["models", "list"], read_only_home)
    assert_refused(out, f"the data root {read_only_home} is not writable (")
    assert out.stderr.strip().endswith("set MISTUDIO_HOME to a folder you can write, or make this one writable")
    assert list(read_only_home.iterdir()) == []  # no registry, no ray_head.json
    assert ray_heads() <= before  # no Ray head was started
