"""The `mistudio` CLI: help for every command, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from ui import cli

COMMANDS = ["demo", "run", "ui", "stop", "models", "datasets", "extract", "train", "discover", "jobs", "templates", "steer",
            "features", "saes"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage: mistudio " + command in capsys.readouterr().out


def test_console_script_help_needs_no_ray():
    out = subprocess.run([sys.executable, "-m", "ui.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "discover" in out.stdout


def test_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "run"])
    assert e.value.code == 2
    assert "train run needs --activations" in capsys.readouterr().err


@pytest.fixture
def cli_env(client, monkeypatch):
    """The CLI in this process attaches to the test session's Ray and data root."""
    monkeypatch.setenv("MISTUDIO_HOME", str(client.settings.home))
    monkeypatch.setenv("MISTUDIO_RAY_ADDRESS", "local")


def test_bad_layer_is_one_line_error(cli_env, tiny_run):
    with pytest.raises(SystemExit) as e:
        cli.main(["extract", "run", "--model", "tiny-llama", "--dataset", tiny_run["dataset_id"], "--layers", "40"])
    assert str(e.value).startswith("error: layer 40 is out of range") and "\n" not in str(e.value)


def test_failed_job_exits_with_its_reason(cli_env, tiny_run, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["datasets", "add", str(tmp_path / "missing.jsonl"), "--model", "tiny-llama"])
    assert "failed" in str(e.value) and "missing.jsonl" in str(e.value)


def test_lists_print_tables(cli_env, tiny_run, capsys):
    cli.main(["models", "list"])
    cli.main(["datasets", "show", tiny_run["dataset_id"]])
    cli.main(["extract", "list"])
    cli.main(["jobs", "list"])
    cli.main(["discover", "show", "--sae", tiny_run["job"]["result"]["sae_id"], "--limit", "3"])
    out = capsys.readouterr().out
    assert "tiny-llama" in out and "pipeline" in out and "frequency" in out
    assert "row length (tokens)" in out and "#" in out and "median_norm" in out


def test_saes_show_names_each_metrics_definition(cli_env, tiny_run, capsys):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    cli.main(["saes", "list"])
    cli.main(["saes", "show", "--sae", sae_id])
    out = capsys.readouterr().out
    assert "fvu(ours)" in out and "ce_score(SAELens)" in out
    ours, theirs = out.split("miStudio's definitions:")[1].split("SAELens's definitions:")
    assert "FVU" in ours and "CE rec. (zero)" in ours and "explained var." not in ours
    assert "explained var." in theirs and "CE score" in theirs and "BOS included" in theirs
    with pytest.raises(SystemExit) as e:
        cli.main(["saes", "show", "--sae", "sae-nope"])
    assert str(e.value) == "error: no SAE 'sae-nope'; list them with: mistudio saes list"


def test_delete_through_the_cli(cli_env, client, tiny_run, capsys):
    """A dataset nothing needs goes with its shards; a model that others need is refused in one line."""
    from pathlib import Path

    job = client.wait(client.submit("add_dataset", {"model_id": "tiny-llama", "source": "builtin", "name": "scratch",
                                                    "context_length": 32, "max_documents": 2}))
    assert job["state"] == "completed", job["message"]
    ds = job["result"]["dataset_id"]
    path = Path(next(d["path"] for d in client.datasets() if d["id"] == ds))
    assert path.is_dir()
    cli.main(["datasets", "delete", ds])
    assert capsys.readouterr().out.strip() == f"deleted dataset {ds} and {path}"
    assert not path.exists() and ds not in {d["id"] for d in client.datasets()}
    with pytest.raises(SystemExit) as e:
        cli.main(["models", "delete", "tiny-llama"])
    assert str(e.value).startswith("error: model tiny-llama is needed by dataset ") and "\n" not in str(e.value)
    assert "tiny-llama" in {m["id"] for m in client.models()}


def test_cancelling_a_finished_job_is_an_error(cli_env, tiny_run):
    job_id = tiny_run["job"]["id"]
    with pytest.raises(SystemExit) as e:
        cli.main(["jobs", "cancel", job_id])
    assert str(e.value) == f"error: job {job_id} is already completed; there is nothing to cancel"


def test_job_history_filters(cli_env, tiny_run, capsys):
    cli.main(["jobs", "list", "--kind", "pipeline", "--model", "tiny-llama", "--since", "2000-01-01"])
    out = capsys.readouterr().out
    assert tiny_run["job"]["id"] in out and "add_model" not in out
    cli.main(["jobs", "list", "--kind", "pipeline", "--since", "2999-01-01"])
    assert tiny_run["job"]["id"] not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["jobs", "list", "--since", "yesterday"])
    assert str(e.value).startswith("error: --since 'yesterday' is not a date")


def test_train_from_a_config_file(cli_env, client, tiny_run, tmp_path, capsys):
    import json

    act = next(a for a in client.activations() if a["model_id"] == "tiny-llama")
    (tmp_path / "train.yaml").write_text(f"activation_ids: [{act['id']}]\neval_rows: 2\n"
                                         "config: {expansion_factor: 2, k: 4, batch_size: 128, epochs: 1}\n")
    cli.main(["train", "--config", str(tmp_path / "train.yaml")])
    result = json.loads(capsys.readouterr().out)
    from storage.registry import SAE

    assert client.get(SAE, result["sae_id"])["hook_name"] == act["hook_name"]
    (tmp_path / "bad.yaml").write_text(f"activation_ids: [{act['id']}]\nconfig: {{epochz: 1}}\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert "epochz" in str(e.value) and "\n" not in str(e.value)


def test_progress_bars_follow_steps_and_stages(capsys):
    """`follow` draws one bar per step and, for a step in stages (an analysis), per stage; the job
    manager's own reports (queued, completed) go on the bar in use."""
    import re

    class Replay:  # what Client.wait hands its callback: the job row and the newest progress point
        def wait(self, job_id, on_progress):
            job = {"id": job_id, "kind": "analyze", "step": "analyze", "state": "running"}
            for p in [{"phase": "queued"},
                      {"step": "analyze", "stage": "logits and similar features", "done": 10, "total": 10},
                      {"step": "analyze", "stage": "NLP", "done": 5, "total": 10},
                      {"step": "analyze", "stage": "ablation", "done": 2, "total": 2},
                      {"phase": "completed", "fraction": 1.0}]:
                on_progress(job, p)
            return {**job, "state": "completed"}

    from ui.cli_output import follow

    follow(Replay(), "analyze-1")
    labels = re.findall(r"(analyze(?: · [A-Za-z ]+)?):", capsys.readouterr().err)
    assert list(dict.fromkeys(labels)) == ["analyze", "analyze · logits and similar features", "analyze · NLP",
                                           "analyze · ablation"]
    assert labels[-1] == "analyze · ablation"  # "completed" did not open a bar of its own


def test_progress_without_a_terminal_prints_a_line_every_few_seconds(capsys):
    """Output sent to a file (pytest's capture is one) gets a bar's first and last line and at
    most one more per LOG_INTERVAL_S, however often the job reports: `make demo > log` stays short."""
    from ui.cli_output import follow

    class Chatty:  # 2,000 progress reports within well under a second
        def wait(self, job_id, on_progress):
            job = {"id": job_id, "kind": "extract", "step": "extract", "state": "running"}
            for i in range(2_000):
                on_progress(job, {"step": "extract", "done": i + 1, "total": 2_000, "unit": "tokens"})
            return {**job, "state": "completed"}

    follow(Chatty(), "extract-1")
    err = capsys.readouterr().err
    lines = [seg for seg in err.replace("\r", "\n").split("\n") if seg.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert "2000/2000" in lines[-1] or "2.00k/2.00k" in lines[-1], lines[-1]


def test_a_damaged_features_file_is_one_line_naming_the_fix(cli_env, client, tiny_run, tmp_path):
    """A features folder truncated outside miStudio (an interrupted copy of the data root) is
    reported by the CLI in one line that names the folder and how to rewrite it."""
    import shutil

    from storage.registry import SAE

    sae = client.get(SAE, tiny_run["job"]["result"]["sae_id"])
    damaged = shutil.copytree(sae["features_path"], tmp_path / "features")
    examples = damaged / "examples.parquet"
    examples.write_bytes(examples.read_bytes()[:200])
    client.registry.add(SAE(**{**sae, "id": "sae-damaged", "features_path": str(damaged)}))
    try:
        with pytest.raises(SystemExit) as e:
            cli.main(["discover", "show", "--sae", "sae-damaged", "--latent", "0"])
        assert str(e.value).startswith(f"error: {damaged} is damaged (") and "\n" not in str(e.value)
        assert str(e.value).endswith("; run discovery for this SAE again to rewrite it")
    finally:
        client.registry.delete(SAE, "sae-damaged")


def test_autocast_flag_takes_on_or_off(capsys):
    """`--autocast on|off` sets the train config's bf16 encoder matmul; left out, the config
    decides (bf16 where native and faster); anything else is a one-line usage error."""
    from ui import cli_flags

    kind, parser = cli_flags.kind_of("train", "run"), cli.build_parser("train")
    given = {flag: cli_flags.spec_values(kind, parser.parse_args(["train", "run", "--activations", "a", *flag]))
             for flag in [(), ("--autocast", "off"), ("--autocast", "ON")]}
    assert "autocast" not in given[()].get("config", {})
    assert given[("--autocast", "off")]["config"]["autocast"] is False
    assert given[("--autocast", "ON")]["config"]["autocast"] is True
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["train", "run", "--activations", "a", "--autocast", "bf16"])
    assert e.value.code == 2
    assert "argument --autocast: 'bf16' is neither on nor off" in capsys.readouterr().err
