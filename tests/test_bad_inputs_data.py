"""Bad input by area: text files decoded strictly (--encoding), a non-text Parquet column
named, and a corrupt or unreachable registry refused before Ray starts (issue 24)."""

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


@pytest.fixture
def read_only_home(tmp_path):
    """A data root the CLI's user cannot write: a read-only bind mount (root ignores file modes),
    or mode 0555 for a user who is not root."""
    home = tmp_path / "home"
    home.mkdir()
    mounted = os.geteuid() == 0
    if mounted:
        out = subprocess.run(["mount", "-o", "bind,ro", str(home), str(home)], capture_output=True, text=True)
        assert out.returncode == 0, f"root here cannot make a read-only bind mount: {out.stderr}"
    else:
        home.chmod(0o555)
    try:
        yield home
    finally:
        if mounted:
            subprocess.run(["umount", str(home)], check=True)
        else:
            home.chmod(0o755)


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
