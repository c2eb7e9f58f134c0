"""Templates: job forms and steering prompt sets saved in the registry (through the JobManager),
exported and imported as JSON, and used to fill a job config."""

import json

import pytest

from core.errors import UserError
from ui import cli


@pytest.fixture
def cli_env(client, monkeypatch):
    monkeypatch.setenv("MISTUDIO_HOME", str(client.settings.home))
    monkeypatch.setenv("MISTUDIO_RAY_ADDRESS", "local")


def test_save_list_export_import_round_trip(client):
    values = {"top_k": 12, "batch_size": 4}
    client.save_template("discover", "quick", values)
    client.save_template("steering_prompts", "cities", {"prompts": ["I live in", "The capital of France is"]})
    assert {(t["kind"], t["name"]) for t in client.templates()} >= {("discover", "quick"), ("steering_prompts", "cities")}
    prompt_sets = client.templates("steering_prompts")  # the session's registry may hold others
    assert "cities" in [t["name"] for t in prompt_sets] and {t["kind"] for t in prompt_sets} == {"steering_prompts"}

    exported = client.export_template("discover", "quick")
    doc = json.loads(exported)
    assert doc == {"format": "mistudio-template/1", "kind": "discover", "name": "quick", "values": values}
    assert client.delete_template("discover", "quick") and not client.delete_template("discover", "quick")
    with pytest.raises(UserError, match="no discover template named 'quick'"):
        client.template("discover", "quick")
    row = client.import_template(exported)
    assert (row["kind"], row["name"], row["values"]) == ("discover", "quick", values)

    client.save_template("discover", "quick", {"top_k": 30})  # saving again replaces
    assert client.template("discover", "quick")["values"] == {"top_k": 30}


@pytest.mark.parametrize("kind, values, message", [
    ("discover", {"top_kk": 3}, "unknown key(s) top_kk in a discover template"),
    ("train", {"eval_rows": "ten"}, "train template key 'eval_rows' should be"),
    ("steering_prompts", {"prompts": []}, "at least one non-empty prompt"),
    ("steering_prompts", {"prompts": ["ok"], "x": 1}, "steering_prompts template needs"),
    ("nonsense", {}, "unknown template kind 'nonsense'"),
])
def test_bad_templates_are_refused_in_one_line(client, kind, values, message):
    with pytest.raises(UserError) as e:
        client.save_template(kind, "bad", values)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert all(t["name"] != "bad" for t in client.templates())


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not JSON"),
    ('{"kind": "discover", "name": "x", "values": {}}', "is not a miStudio template"),
    ('{"format": "mistudio-template/1", "kind": "discover", "name": "", "values": {}}', "non-empty name"),
])
def test_bad_template_files_are_refused(client, text, message):
    with pytest.raises(UserError, match=message):
        client.import_template(text, "t.json")


def test_cli_templates_and_run_with_a_template(cli_env, client, tiny_run, tmp_path, capsys):
    (tmp_path / "form.yaml").write_text("kind: discover\ntop_k: 3\nbatch_size: 4\n")
    cli.main(["templates", "save", "small", "--from", str(tmp_path / "form.yaml")])
    cli.main(["templates", "export", "small", "--kind", "discover", "--out", str(tmp_path / "small.json")])
    assert json.loads((tmp_path / "small.json").read_text())["values"] == {"top_k": 3, "batch_size": 4}
    cli.main(["templates", "list", "--kind", "discover"])
    assert "small" in capsys.readouterr().out

    # the template fills the form, the file's fields override it and complete it
    sae_id = tiny_run["job"]["result"]["sae_id"]
    (tmp_path / "job.yaml").write_text(f"sae_id: {sae_id}\ndataset_id: {tiny_run['dataset_id']}\ntop_k: 2\n"
                                       "max_tokens: 400\n")
    cli.main(["run", str(tmp_path / "job.yaml"), "--template", "discover/small"])
    (job,) = [j for j in client.jobs() if j["kind"] == "discover"][:1]
    assert job["spec"]["top_k"] == 2 and job["spec"]["batch_size"] == 4 and job["state"] == "completed"

    (tmp_path / "train.yaml").write_text("kind: train\n")
    with pytest.raises(SystemExit, match="the template is for discover jobs but train.yaml is a train job"):
        cli.main(["run", str(tmp_path / "train.yaml"), "--template", "discover/small"])
