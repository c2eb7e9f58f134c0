"""Bad input through `mistudio` against a running studio (issue 24's suite, CLI side).

Each case is refused before any job runs: one line on stderr's `error:` (the SystemExit text),
a non-zero exit, and nothing left behind — no registry row, no active job, no artifact folder
and no temporary file under the data root.
"""

from pathlib import Path

import pytest

from storage.registry import SAE, Activation, Dataset, Model
from ui import cli

DS, SAE_ID, ACT = "{dataset}", "{sae}", "{activation}"

CASES = [
    # unknown objects, each with the command that lists them
    (["extract", "run", "--model", "nope", "--dataset", DS], "error: model 'nope' is not registered; "
     "add it first with: mistudio models add"),
    (["extract", "run", "--model", "tiny-llama", "--dataset", "nope"], "error: dataset 'nope' is not registered; "
     "add it first with: mistudio datasets add"),
    (["train", "run", "--activations", "nope"], "error: activation set 'nope' is not registered; "
     "list them with: mistudio extract list"),
    (["discover", "run", "--sae", "nope", "--dataset", DS], "error: SAE 'nope' is not registered; "
     "list them with: mistudio saes list"),
    (["discover", "show", "--sae", "nope"], "error: no SAE 'nope'; list them with: mistudio saes list"),
    (["features", "label", "--sae", "nope", "--latent", "0", "--name", "x"], "error: SAE 'nope' is not registered; "
     "list them with: mistudio saes list"),
    (["steer", "run", "--sae", "nope", "--prompt", "hi", "--feature", "0:4"], "error: SAE 'nope' is not registered; "
     "list them with: mistudio saes list"),
    (["saes", "export", "--sae", "nope", "--out", "{tmp}/exported"], "error: no SAE 'nope'; "
     "list them with: mistudio saes list"),
    (["datasets", "show", "nope"], "error: no dataset 'nope'; list them with: mistudio datasets list"),
    (["datasets", "delete", "nope"], "error: no dataset 'nope'; list them with: mistudio datasets list"),
    (["models", "delete", "nope"], "error: no model 'nope'; list them with: mistudio models list"),
    (["extract", "delete", "nope"], "error: no activation 'nope'; list them with: mistudio extract list"),
    (["jobs", "show", "nope"], "error: no job 'nope'; list jobs with: mistudio jobs list"),
    (["jobs", "cancel", "nope"], "error: no job 'nope'; list jobs with: mistudio jobs list"),
    (["jobs", "retry", "nope"], "error: no job 'nope'; list jobs with: mistudio jobs list"),
    # values out of range
    (["extract", "run", "--model", "tiny-llama", "--dataset", DS, "--layers", "40"],
     "error: layer 40 is out of range: tiny-llama has 2 layers (0-1); pick a layer within it"),
    (["extract", "run", "--model", "tiny-llama", "--dataset", DS, "--layers", "1", "--site", "hook_nonsense"],
     "error: unknown hook site 'hook_nonsense'; choose one of resid_pre, resid_post, mlp_out, attn_out"),
    (["extract", "run", "--model", "tiny-llama", "--dataset", DS, "--batch-size", "0"],
     "error: batch_size=0 must be at least 1"),
    (["extract", "run", "--model", "tiny-llama", "--dataset", DS, "--max-tokens", "-3"],
     "error: max_tokens=-3 must be 0 (all) or more"),
    (["discover", "run", "--sae", SAE_ID, "--dataset", DS, "--batch-size", "0"],
     "error: batch_size=0 must be at least 1"),
    (["discover", "run", "--sae", SAE_ID, "--dataset", DS, "--top-k", "0"], "error: top_k=0 must be at least 1"),
    (["features", "analyze", "--sae", SAE_ID, "--latents", "0-3,99999"],
     "error: latent 99999 is out of range: SAE {sae} has latents 0-255"),
    (["features", "autolabel", "--sae", SAE_ID, "--latents", "70000-70002"],
     "error: latent 70000 is out of range: SAE {sae} has latents 0-255"),
    (["train", "run", "--activations", ACT, "--lr", "0"], "error: lr=0.0 must be a positive number"),
    (["datasets", "add", "builtin", "--model", "tiny-llama", "--max-documents", "-2"],
     "error: max_documents=-2 must be 0 (all) or more"),
    (["datasets", "add", "builtin", "--model", "tiny-llama", "--context-length", "1"],
     "error: context length 1 is too short; use --context-length 2 or more"),
    (["datasets", "add", "builtin", "--model", "nope"], "error: model 'nope' is not registered; "
     "add it first with: mistudio models add"),
    (["steer", "run", "--sae", SAE_ID, "--prompt", "hi", "--feature", "0:4", "--temperature", "-1"],
     "error: use a finite temperature >= 0"),
    (["jobs", "list", "--state", "nonsense"], "error: --state 'nonsense' is not a job state; use one of queued, "),
    (["jobs", "list", "--kind", "nonsense"], "error: --kind 'nonsense' is not a job kind; use one of add_model, "),
    (["jobs", "list", "--since", "yesterday-ish"], "error: --since 'yesterday-ish' is not a date; "
     "write it as 2026-12-01 or 2026-12-01T14:30"),
    # files that are missing or not what they claim
    (["models", "add", "{tmp}/nowhere"], "error: model not found: {tmp}/nowhere; give an existing model folder"),
    (["models", "add", "{tmp}/notes.csv"], "error: {tmp}/notes.csv is a file but not a .gguf model"),
    (["run", "{tmp}/nowhere.yaml"], "error: job config {tmp}/nowhere.yaml not found; check the path"),
    (["run", "{tmp}/unknown.json"], "error: unknown job kind 'nonsense'; choose one of add_model, "),
    (["run", "{tmp}/missing.yaml"], "error: this extract job needs dataset_id"),
    (["run", "{tmp}/broken.yaml"], "error: broken.yaml is not valid YAML/JSON at line 1, column 12"),
    (["run", "{tmp}/notes.csv"], "error: notes.csv must be a mapping with a 'kind' key and the job's fields"),
    (["templates", "import", "--from", "{tmp}/broken.json"], "error: {tmp}/broken.json is not JSON "
     "(Expecting ',' delimiter at line 1); export templates with: mistudio templates export"),
    (["templates", "import", "--from", "{tmp}/unknown.json"], "error: {tmp}/unknown.json is not a miStudio template"),
]


@pytest.fixture
def cli_env(client, monkeypatch):
    """The CLI in this process attaches to the test session's Ray and data root."""
    monkeypatch.setenv("MISTUDIO_HOME", str(client.settings.home))
    monkeypatch.setenv("MISTUDIO_RAY_ADDRESS", "local")


def snapshot(client) -> dict:
    """What a refused command must not change: the registry's objects, active jobs, the data
    root's folders, and temporary files anywhere under it."""
    home = client.settings.home
    return {"rows": {t.__tablename__: {r["id"] for r in client.registry.list(t)}
                     for t in (Model, Dataset, Activation, SAE)},
            "active": {j["id"] for j in client.active_jobs()},
            "folders": {p.relative_to(home) for p in home.glob("*/*") if p.is_dir()},
            "tmp": sorted(home.rglob(".tmp-*"))}


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_leaves_nothing(cli_env, client, tiny_run, tmp_path, args, message):
    (tmp_path / "notes.csv").write_text("body,id\nhello,1\n")
    (tmp_path / "unknown.json").write_text('{"kind": "nonsense"}')
    (tmp_path / "missing.yaml").write_text("kind: extract\nmodel_id: tiny-llama\n")
    (tmp_path / "broken.yaml").write_text("not: [valid")
    (tmp_path / "broken.json").write_text("[1, 2")
    names = {"dataset": tiny_run["dataset_id"], "sae": tiny_run["job"]["result"]["sae_id"],
             "activation": tiny_run["job"]["result"]["activation_id"], "tmp": str(tmp_path)}
    args = [a.format(**names) for a in args]
    before = snapshot(client)
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    text = str(e.value)
    assert text.startswith(message.format(**names)), text
    assert "\n" not in text and len(text) < 400
    assert snapshot(client) == before
    assert not (tmp_path / "exported").exists()
