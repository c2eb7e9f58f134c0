"""What the dashboard may touch on the server (storage.access): reads under the allowed roots
only, exports under the data root's exports/ only, symlinks and `..` resolved first."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from core.errors import UserError
from storage import Settings, access


@pytest.fixture
def settings(tmp_path):
    home = tmp_path / "home"
    (home / "imports").mkdir(parents=True)
    (home / "imports" / "notes.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("password")
    return Settings.from_env({"MISTUDIO_HOME": str(home)})


def test_default_roots_are_imports_uploads_and_shipped_corpora(settings):
    roots = access.allowed_roots(settings)
    assert roots[0] == (settings.home / "imports").resolve()
    assert (settings.home / "uploads").resolve() in roots
    assert Path(sysconfig.get_paths()["stdlib"]).resolve() in roots
    stdlib_file = Path(sysconfig.get_paths()["stdlib"]) / "os.py"
    assert access.readable(str(stdlib_file), settings) == str(stdlib_file.resolve())


def test_reads_inside_the_roots_only(settings, tmp_path):
    inside = settings.home / "imports" / "notes.txt"
    assert access.readable(str(inside), settings) == str(inside.resolve())
    assert access.readable("notes.txt", settings) == str(inside.resolve())  # a name: under imports/
    for outside in (str(tmp_path / "secret.txt"), "/etc/passwd", "../secret.txt", "../../secret.txt",
                    f"{settings.home}/imports/../../secret.txt", str(settings.home / "registry.db")):
        with pytest.raises(UserError, match="is outside the folders the dashboard may read"):
            access.readable(outside, settings)


def test_symlink_out_of_a_root_is_refused(settings, tmp_path):
    (settings.home / "imports" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (settings.home / "imports" / "etc").symlink_to("/etc")
    for given in ("link.txt", str(settings.home / "imports" / "etc" / "passwd"), "etc"):
        with pytest.raises(UserError, match="outside the folders"):
            access.readable(given, settings)


def test_allowed_roots_setting_replaces_the_default(tmp_path):
    data = tmp_path / "team-data"
    data.mkdir()
    (data / "a.jsonl").write_text("{}")
    s = Settings.from_env({"MISTUDIO_HOME": str(tmp_path / "home"),
                           "MISTUDIO_ALLOWED_ROOTS": f"{data}{os.pathsep}{tmp_path / 'more'}"})
    assert s.to_env()["MISTUDIO_ALLOWED_ROOTS"] == f"{data}{os.pathsep}{tmp_path / 'more'}"
    assert access.readable("a.jsonl", s) == str(data / "a.jsonl")
    with pytest.raises(UserError, match="outside"):
        access.readable(str(tmp_path / "home" / "imports" / "x.txt"), s)  # imports/ is no longer a root
    assert access.readable(str(tmp_path / "home" / "uploads" / "u.txt"), s)  # uploads/ always is


def test_source_tells_paths_from_hub_ids(settings, tmp_path, monkeypatch):
    assert access.source("builtin", settings) == "builtin"
    assert access.source("embedded", settings) == "embedded"
    assert access.source("stdlib-source", settings) == "stdlib-source"
    assert access.source("org/some-dataset", settings) == "org/some-dataset"  # a hub id passes
    assert access.source("notes.txt", settings) == str((settings.home / "imports" / "notes.txt").resolve())
    monkeypatch.chdir(tmp_path)  # the server's working folder never matters: a relative path is taken under imports/
    for given in ("secret.txt", "./secret.txt", "sub/data.parquet"):
        assert access.source(given, settings) == str((settings.home / "imports" / given).resolve())
    for given in ("/etc/passwd", "~/x.txt", "../secret.txt", "../home/registry.db"):
        with pytest.raises(UserError, match="outside the folders"):
            access.source(given, settings)


def test_exports_only_under_exports(settings, tmp_path):
    root = (settings.home / "exports").resolve()
    assert access.writable("run-1", settings) == str(root / "run-1")
    assert access.writable(str(root / "a" / "b.zip"), settings) == str(root / "a" / "b.zip")
    (settings.home / "exports").mkdir()
    (settings.home / "exports" / "out").symlink_to(tmp_path)
    for bad in ("", ".", "../x", str(tmp_path / "x"), "/etc/cron.d/x", "out/x", str(settings.home / "saes")):
        with pytest.raises(UserError, match="is not inside"):
            access.writable(bad, settings)


# -- mistudio ui --host: closed by default ---------------------------------------------------------
def _run(argv: list[str], cwd: Path, **env: str):
    """A fresh Python process in `cwd` (also its HOME, so no secrets.toml of the machine's user)."""
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    base.update(HOME=str(cwd), PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=base, capture_output=True, text=True, timeout=120)


def run_cli(args: list[str], cwd: Path, **env: str):
    return _run(["-m", "ui.cli", *args], cwd, **env)


def run_cli_code(code: str, cwd: Path, **env: str):
    return _run(["-c", code], cwd, **env)


def test_ui_beyond_localhost_needs_sign_in(tmp_path):
    home = tmp_path / "home"
    out = run_cli(["ui", "--host", "0.0.0.0", "--port", "1"], tmp_path, MISTUDIO_HOME=str(home))
    assert out.returncode != 0
    assert out.stderr.strip() == ("error: refusing to serve the dashboard on 0.0.0.0 with no sign-in; set "
                                  "MISTUDIO_UI_PASSWORD or configure OIDC ([auth] in .streamlit/secrets.toml), "
                                  'see README "Serving a team"')
    assert not (home / "ray_head.json").exists()  # refused before any Ray head started


def test_sign_in_configured_by_password_or_oidc(tmp_path):
    """Each check in a fresh process: Streamlit keeps the secrets it read for the process's life."""
    def serves(host: str, **env: str) -> bool:
        out = run_cli_code(f"from ui.cli_demo import check_host; check_host({host!r})", tmp_path, **env)
        assert out.returncode == 0 or out.stderr.strip().endswith('see README "Serving a team"'), out.stderr
        return out.returncode == 0

    assert serves("localhost") and serves("127.0.0.1") and serves("::1")
    assert not serves("10.0.0.5") and not serves("0.0.0.0")
    assert serves("10.0.0.5", MISTUDIO_UI_PASSWORD="team-password")
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text(
        '[auth]\nredirect_uri = "https://studio.example/oauth2callback"\ncookie_secret = "s"\nclient_id = "c"\n'
        'client_secret = "x"\nserver_metadata_url = "https://idp.example/.well-known/openid-configuration"\n')
    assert serves("0.0.0.0")


def test_no_setting_is_echoed_with_its_password(tmp_path):
    from storage.store import open_root

    with pytest.raises(UserError) as e:
        open_root("nope://key:Sup3rSecret@bucket/prefix")
    assert "Sup3rSecret" not in str(e.value) and "key:***@bucket" in str(e.value)
    from core.interp import OpenAILabeler

    with pytest.raises(UserError) as e:
        OpenAILabeler("ftp://me:Sup3rSecret@host/v1", "m")
    assert "Sup3rSecret" not in str(e.value)


def test_free_text_is_made_literal_for_markdown():
    import re

    from ui.components.formatting import literal

    text = "**bold** ![x](http://example.invalid/x.png) <img src=x> :red[x] $x^2$ # h `c` a\\b"
    shown = literal(text)
    assert re.sub(r"\\(.)", r"\1", shown).replace("\u2060", "") == text  # unescaped, it reads the same
    unescaped = re.sub(r"\\.", "", shown)  # what is left outside escapes holds no markup character
    assert not set(unescaped) & set("\\`*_{}[]()<>#+-.!|~$:&=^")
    assert literal("plain words 42") == "plain words 42"
    for link in ("http://example.invalid/x", "see www.example.org", "mail me@example.org"):  # no autolinks
        assert not re.search(r"://|www\\?\.|@[a-z]", literal(link)), literal(link)


def test_code_spans_cannot_be_closed_by_their_text():
    from ui.components.formatting import code_span

    assert code_span("/data/a.txt") == "`/data/a.txt`"
    assert code_span("a`b") == "``a`b``"
    assert code_span("`x``") == "``` `x`` ```"
    assert code_span("two\nlines") == "`two lines`"
