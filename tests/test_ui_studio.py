"""The SAEs, Templates and Settings pages (AppTest against the session's real actors), and SAE
import as a job: from a folder, an archive, and what goes wrong."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.errors import UserError
from core.formats import open_source
from core.formats.saelens import load_saelens
from storage.registry import SAE
from tests.conftest import plain

PAGES = Path(__file__).resolve().parents[1] / "ui" / "app_pages"
SAES, TEMPLATES, SETTINGS = (str(PAGES / f"{p}.py") for p in ("saes", "templates", "settings"))


def run_page(path: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def trained_sae(client) -> dict:
    return next(s for s in client.saes() if s["model_id"] == "tiny-llama" and s.get("training_job_id"))


# -- import as a job -------------------------------------------------------------------------------
def test_import_an_exported_sae_from_a_zip_gives_the_same_weights(tiny_run, client, tmp_path):
    sae = trained_sae(client)
    folder = Path(client.export_sae(sae["id"], str(tmp_path / "exported")))
    assert {"cfg.json", "sae_weights.safetensors"} <= {p.name for p in folder.iterdir()}
    with pytest.raises(UserError, match="is already a folder with files in it; pick a new name, or pass --overwrite"):
        client.export_sae(sae["id"], str(folder))
    archive = tmp_path / "sae.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"release/{f.name}")
    job = client.wait(client.submit("import_sae", {"source": str(archive), "model_id": "tiny-llama",
                                                   "name": "imported"}), timeout=300)
    assert job["state"] == "completed", job["message"]
    (new_id,) = job["result"]["sae_ids"]
    new = client.get(SAE, new_id)
    assert new["hook_name"] == sae["hook_name"] and new["d_sae"] == sae["d_sae"] and new["model_id"] == "tiny-llama"
    assert new["name"].startswith("imported/") and new["metrics"]["format"] == "saelens"
    a, _ = load_saelens(sae["path"])
    b, _ = load_saelens(new["path"])
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not (Path(client.settings.home) / "imports" / job["id"]).exists()  # the work folder is gone


def test_import_refuses_an_sae_of_another_width_and_leaves_nothing(tiny_run, client, tmp_path):
    sae = trained_sae(client)
    folder = Path(client.export_sae(sae["id"], str(tmp_path / "wide")))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_in"] = 128  # the tensors say 64: the config contradicts them
    (folder / "cfg.json").write_text(json.dumps(cfg))
    before = {s["id"] for s in client.saes()}
    job = client.wait(client.submit("import_sae", {"source": str(folder), "model_id": "tiny-llama"}), timeout=300)
    assert job["state"] == "failed" and "\n" not in job["message"] and "d_in" in job["message"], job["message"]
    assert {s["id"] for s in client.saes()} == before


def test_import_of_a_missing_path_or_model_is_refused_at_submit(tiny_run, client, tmp_path):
    with pytest.raises(UserError, match="not registered"):
        client.submit("import_sae", {"source": str(tmp_path), "model_id": "no-such-model"})
    job = client.wait(client.submit("import_sae", {"source": str(tmp_path / "nope" / "x y"), "model_id": "tiny-llama"}),
                      timeout=120)
    assert job["state"] == "failed" and "neither an existing path nor a Hugging Face repo id" in job["message"]


def test_retry_runs_a_failed_jobs_spec_again_from_the_cli_client_and_the_panel(tiny_run, ui_client, tmp_path):
    source = tmp_path / "later"
    failed = ui_client.wait(ui_client.submit("import_sae", {"source": str(source), "model_id": "tiny-llama"}),
                            timeout=120)
    assert failed["state"] == "failed"
    # the cause is fixed (the folder now holds an SAE), so the same spec succeeds when retried
    ui_client.export_sae(trained_sae(ui_client)["id"], str(source))
    at = run_page(str(PAGES / "jobs.py"))
    before = {j["id"] for j in ui_client.jobs()}
    at.button(key=f"retry-{failed['id']}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (new,) = [j for j in ui_client.jobs() if j["id"] not in before]
    assert new["kind"] == "import_sae" and new["spec"] == failed["spec"]
    assert ui_client.wait(new["id"], timeout=120)["state"] == "completed"
    queued = ui_client.registry.create_job("import_sae", new["spec"])  # a job no worker has taken yet
    try:
        with pytest.raises(UserError, match="still queued"):
            ui_client.retry(queued["id"])
    finally:
        ui_client.registry.set_job_state(queued["id"], "cancelled", message="test cleanup")


def test_open_source_archives_and_hub_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot be unpacked"):
        open_source(str(bad), tmp_path / "w1")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(UserError, match="unsafe path"):
        open_source(str(evil), tmp_path / "w2")
    assert not (tmp_path / "outside.txt").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on an offline laptop: a one-line reason, not a traceback
    with pytest.raises(UserError, match="could not download someone/some-saes from the Hugging Face Hub"):
        open_source("someone/some-saes/layer_3", tmp_path / "w3")
    folder = tmp_path / "plain"
    folder.mkdir()
    assert open_source(str(folder), tmp_path / "w4") == folder


# -- pages -----------------------------------------------------------------------------------------
def test_saes_page_lists_metrics_and_exports(tiny_run, ui_client, tmp_path):
    sae = trained_sae(ui_client)
    at = run_page(SAES)
    table = at.dataframe[0].value
    row = table[table["id"] == sae["id"]].iloc[0]
    assert row["FVU · miStudio"] == pytest.approx(sae["metrics"]["fvu"])
    assert row["L0 · miStudio"] == pytest.approx(sae["metrics"]["l0"])
    assert row["explained var. · SAELens"] == pytest.approx(sae["metrics"]["explained_variance"])
    assert row["CE score · SAELens"] == pytest.approx(sae["metrics"]["ce_loss_score"])
    meanings = at.dataframe[1].value  # "What the numbers mean"
    assert "every position (BOS included)" in meanings.set_index("column").loc["CE score · SAELens", "definition"]
    assert row["source"] == "trained"
    at.selectbox(key="exp-sae").select(sae["id"]).run()
    at.text_input(key="exp-out").set_value("from-page")  # a name: under the data root's exports/
    at.button(key="exp-go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    exported = ui_client.settings.home / "exports" / "from-page"
    assert (exported / "sae_weights.safetensors").is_file()
    (exported / "notes.txt").write_text("mine")  # a second export there is refused, and leaves it be
    at.button(key="exp-go").click().run()
    assert any("from-page is already a folder with files in it; pick a new name, or pass --overwrite" in plain(e.value)
               for e in at.error), [plain(e.value) for e in at.error]
    assert (exported / "notes.txt").read_text() == "mine"
    at.checkbox(key="exp-overwrite").check()
    at.button(key="exp-go").click().run()
    assert not at.error, [e.value for e in at.error]
    assert (exported / "sae_weights.safetensors").is_file() and not (exported / "notes.txt").exists()
    at.checkbox(key="exp-overwrite").uncheck()
    for outside in (str(tmp_path / "from-page"), "../escaped"):  # the dashboard writes under exports/ only
        at.text_input(key="exp-out").set_value(outside)
        at.button(key="exp-go").click().run()
        shown = [plain(e.value) for e in at.error]
        assert any(e.startswith(f"{outside} is not inside ") for e in shown), shown
    assert not (tmp_path / "from-page").exists() and not (ui_client.settings.home / "escaped").exists()
    at.text_input(key="imp-source").set_value("")
    at.button(key="imp-submit").click().run()
    assert any("give a source" in plain(e.value) for e in at.error)
    before = {j["id"] for j in ui_client.jobs()}
    at.text_input(key="imp-source").set_value("/etc")
    at.button(key="imp-submit").click().run()
    assert any(plain(e.value).startswith("/etc is outside the folders the dashboard may read") for e in at.error)
    assert {j["id"] for j in ui_client.jobs()} == before


def test_templates_page_creates_edits_refuses_and_imports(tiny_run, ui_client):
    at = run_page(TEMPLATES)
    at.selectbox(key="tpl-new-kind").select("steering_prompts").run()
    at.text_input(key="tpl-new-name").set_value("weather")
    at.button(key="tpl-create").click().run()
    assert not at.error, [e.value for e in at.error]
    assert ui_client.template("steering_prompts", "weather")["values"]["prompts"][0] == "The weather today is"
    # edit it: a bad value is refused with one line and nothing changes
    at = run_page(TEMPLATES)
    at.selectbox(key="tpl-pick").select("steering_prompts / weather").run()
    at.text_area(key="tpl-text-steering_prompts-weather").set_value('{"prompts": []}')
    at.button(key="tpl-save-steering_prompts-weather").click().run()
    assert any("at least one non-empty prompt" in plain(e.value) for e in at.error)
    assert ui_client.template("steering_prompts", "weather")["values"]["prompts"]
    at.text_area(key="tpl-text-steering_prompts-weather").set_value('{"prompts": ["Rain is"]}')
    at.button(key="tpl-save-steering_prompts-weather").click().run()
    assert ui_client.template("steering_prompts", "weather")["values"] == {"prompts": ["Rain is"]}
    # a train template with an unknown key is refused too
    at.selectbox(key="tpl-new-kind").select("train").run()
    at.text_input(key="tpl-new-name").set_value("bad")
    at.text_area(key="tpl-new-values-train").set_value('{"epochz": 2}')
    at.button(key="tpl-create").click().run()
    assert any("unknown key(s) epochz" in plain(e.value) for e in at.error)
    # export → delete → import round trip, through the client the page uses
    exported = ui_client.export_template("steering_prompts", "weather")
    at.selectbox(key="tpl-pick").select("steering_prompts / weather").run()
    at.button(key="tpl-delete-steering_prompts-weather").click().run()
    assert not [t for t in ui_client.templates("steering_prompts") if t["name"] == "weather"]
    ui_client.import_template(exported)
    assert ui_client.template("steering_prompts", "weather")["values"] == {"prompts": ["Rain is"]}


def test_settings_page_shows_the_deployment_and_keeps_the_key_in_the_session(tiny_run, ui_client):
    at = run_page(SETTINGS)
    table = at.dataframe[0].value
    assert str(ui_client.settings.home) in set(table["value"])
    assert "MISTUDIO_DATABASE_URL" in set(table["environment variable"])
    shown = dict(zip(table["environment variable"], table["value"]))
    assert shown["MISTUDIO_JOB_STALL_S"] == "1200" and shown["MISTUDIO_ARTIFACT_ROOT"] == "none (the data root alone)"
    at.text_input(key="endpoint-url").set_value("ftp://nowhere")
    at.button(key="endpoint-save").click().run()
    assert any("not an http(s) URL" in plain(e.value) for e in at.error)
    at.text_input(key="endpoint-url").set_value("http://127.0.0.1:9/v1")
    at.text_input(key="endpoint-model").set_value("tiny")
    at.text_input(key="endpoint-key").set_value("sk-secret")
    at.button(key="endpoint-save").click().run()
    assert at.session_state["label_endpoint"] == {"base_url": "http://127.0.0.1:9/v1", "model": "tiny",
                                                  "api_key": "sk-secret"}
    shown = " ".join(c.value for c in at.caption)
    assert "key set" in shown and "sk-secret" not in shown
    assert "sk-secret" not in json.dumps([t["values"] for t in ui_client.templates()])


def test_features_page_offers_openai_labeling_once_an_endpoint_is_set(tiny_run, ui_client):
    at = AppTest.from_file(str(PAGES / "features.py"), default_timeout=60)
    at.session_state["label_endpoint"] = {"base_url": "http://127.0.0.1:9/v1", "model": "tiny", "api_key": ""}
    at.run()
    assert not at.exception
    assert "openai" in at.selectbox(key="label_method").options

