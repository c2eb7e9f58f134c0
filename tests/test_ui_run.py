"""The Extraction and Training pages, driven by AppTest against the session's real actors."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.errors import UserError
from storage.artifacts import Artifacts
from storage.registry import SAE
from tests.conftest import wait_for, plain

PAGES = Path(__file__).resolve().parents[1] / "ui" / "app_pages"
EXTRACTION, TRAINING = str(PAGES / "extraction.py"), str(PAGES / "training.py")


def run_page(path: str) -> AppTest:
    at = AppTest.from_file(path, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def new_jobs(client, before: set[str]) -> list[dict]:
    return [j for j in client.jobs() if j["id"] not in before]


def test_extraction_estimates_then_extracts_layers_by_sites(tiny_run, ui_client):
    at = run_page(EXTRACTION)
    at.selectbox(key="extract-model").select("tiny-llama").run()
    at.selectbox(key="extract-dataset-tiny-llama").select(tiny_run["dataset_id"]).run()
    at.multiselect(key="x-layers-tiny-llama").set_value([0, 1])
    at.multiselect(key="x-sites").set_value(["resid_pre", "mlp_out"])
    at.number_input(key="x-max-tokens").set_value(500).run()
    estimate = " ".join(c.value for c in at.caption)
    # 4 hooks × 500 tokens × d_model 64 × 4 bytes = 512,000 bytes
    assert "4 hook(s) × 500 tokens × d_model 64" in estimate and "500.0 KB" in estimate
    before = {j["id"] for j in ui_client.jobs()}
    at.button(key="x-submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    jobs = new_jobs(ui_client, before)
    assert sorted(j["spec"]["site"] for j in jobs) == ["mlp_out", "resid_pre"]  # one job per site
    for job in jobs:
        assert job["spec"]["layers"] == [0, 1] and job["spec"]["max_tokens"] == 500
        assert ui_client.wait(job["id"], timeout=300)["state"] == "completed"
    at.run()
    hooks = set(at.dataframe[-1].value["hook"])  # the extracted-activations table closes the page
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
            "blocks.1.hook_mlp_out"} <= hooks
    # the next estimate uses the measured rate of the extraction that just ran
    assert "measured" in " ".join(c.value for c in at.caption)


def test_extraction_without_hooks_says_so(tiny_run, ui_client):
    at = run_page(EXTRACTION)
    at.selectbox(key="extract-model").select("tiny-llama").run()
    at.multiselect(key="x-sites").set_value([]).run()
    before = {j["id"] for j in ui_client.jobs()}
    at.button(key="x-submit").click().run()
    assert any("at least one layer and one hook site" in plain(e.value) for e in at.error)
    assert not new_jobs(ui_client, before)


def test_training_presets_templates_and_a_run_with_checkpoints(tiny_run, ui_client):
    at = run_page(TRAINING)
    # choosing a type loads its preset: JumpReLU asks for its L0 coefficient
    at.selectbox(key="t-architecture").select("jumprelu").run()
    assert at.number_input(key="t-l0_coefficient").value == 1.0
    at.selectbox(key="t-architecture").select("topk").run()
    assert not [n for n in at.number_input if n.key == "t-l0_coefficient"]
    at.number_input(key="t-expansion_factor").set_value(2)
    at.number_input(key="t-k").set_value(4)
    at.number_input(key="t-batch_size").set_value(128)
    at.number_input(key="t-checkpoint_every").set_value(2)
    at.text_input(key="t-save-as").set_value("tiny-topk")
    at.button(key="t-save").click().run()
    assert not at.error, [e.value for e in at.error]
    saved = ui_client.template("train", "tiny-topk")["values"]
    # the type's own fields come from its config dataclass, defaults included
    assert saved["config"] == {"architecture": "topk", "expansion_factor": 2, "k": 4, "auxk_alpha": 1 / 32,
                               "batch_size": 128, "epochs": 1, "optimizer": "signum"}
    assert saved["checkpoint_every"] == 2

    # a fresh page loads the template back into the form
    at = run_page(TRAINING)
    at.selectbox(key="t-template").select("tiny-topk")
    at.button(key="t-load-template").click().run()
    assert at.number_input(key="t-k").value == 4 and at.number_input(key="t-checkpoint_every").value == 2

    acts = [a for a in ui_client.activations() if a["model_id"] == "tiny-llama"]
    at.multiselect(key="t-activations").set_value([acts[0]["id"]])
    at.number_input(key="t-d_sae").set_value(200)  # a width as a number, not a multiple of d_model 64
    at.selectbox(key="t-autocast").set_value(True)  # "bf16 — even where emulated": the job trains in bf16
    before = {j["id"] for j in ui_client.jobs()}
    at.button(key="t-submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (job,) = new_jobs(ui_client, before)
    assert job["kind"] == "train" and job["spec"]["activation_ids"] == [acts[0]["id"]]
    assert job["spec"]["config"]["d_sae"] == 200 and job["spec"]["config"]["autocast"] is True
    done = ui_client.wait(job["id"], timeout=300)
    assert done["state"] == "completed", done["message"]
    (sae,) = [s for s in ui_client.saes() if s["training_job_id"] == job["id"]]
    assert sae["d_sae"] == 200 and sae["metrics"]["autocast"] is True
    at.run()
    listed = " ".join(m.value for m in at.markdown)
    assert f"`{job['id']}` — **completed**" in listed and "checkpoint(s)" in listed
    assert not [b for b in at.button if b.key == f"t-resume-{job['id']}"]  # a finished run is not resumed


def test_training_without_a_source_says_what_to_pick(tiny_run, ui_client):
    at = run_page(TRAINING)
    at.multiselect(key="t-activations").set_value([]).run()
    at.button(key="t-submit").click().run()
    assert any("pick what to train on" in plain(e.value) for e in at.error)


def test_pause_resume_and_finalize_a_training(tiny_run, ui_client):
    """Pause saves a checkpoint and frees the worker; Resume (the panel's button) continues the
    same job from it; Finalize ends it early with the SAE evaluated and registered."""
    acts = [a for a in ui_client.activations() if a["model_id"] == "tiny-llama"]
    epochs = 3000  # far more than the test waits for: it ends by Finalize
    job_id = ui_client.submit("train", {"activation_ids": [acts[0]["id"]], "eval_rows": 2, "config": {
        "expansion_factor": 2, "k": 4, "batch_size": 64, "epochs": epochs, "log_every": 20}})
    wait_for(lambda: ui_client.job(job_id)["state"] == "running", what="the training to run")
    with pytest.raises(UserError, match="is a pipeline job; only train jobs"):
        ui_client.pause(tiny_run["job"]["id"])
    ui_client.pause(job_id)
    paused = ui_client.wait(job_id, timeout=120)
    assert paused["state"] == "paused" and paused["message"].startswith("paused at step"), paused["message"]
    assert list(Artifacts(ui_client.settings.home).checkpoints(job_id).glob("ckpt-*.pt"))
    assert job_id not in {j["id"] for j in ui_client.active_jobs()}  # nothing runs: the worker is free
    with pytest.raises(UserError, match="only a running training can finalize"):
        ui_client.finalize(job_id)

    at = run_page(str(PAGES / "jobs.py"))
    at.button(key=f"resume-{job_id}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    wait_for(lambda: ui_client.job(job_id)["state"] == "running", what="the training to run")
    assert ui_client.job(job_id)["spec"]["resume_job"] == job_id
    ui_client.finalize(job_id)
    done = ui_client.wait(job_id, timeout=180)
    assert done["state"] == "completed", done["message"]
    assert 0 < done["result"]["tokens"] < epochs * acts[0]["tokens"]  # stopped early, and saved
    assert ui_client.get(SAE, done["result"]["sae_id"])["training_job_id"] == job_id
