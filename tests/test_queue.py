"""The job queue: priorities decide what starts next, a queued job can be reordered from the
dashboard, and queued jobs wait in the registry (a restarted manager finds them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.errors import UserError
from tests.conftest import wait_for

JOBS = str(Path(__file__).resolve().parents[1] / "ui" / "app_pages" / "jobs.py")


def blocker(client) -> str:
    """A training long enough to hold the worker while others queue (ended by Finalize)."""
    act = next(a for a in client.activations() if a["model_id"] == "tiny-llama")
    job_id = client.submit("train", {"activation_ids": [act["id"]], "eval_rows": 2, "config": {
        "expansion_factor": 2, "k": 4, "batch_size": 64, "epochs": 3000}})
    wait_for(lambda: client.job(job_id)["state"] == "running", what="the blocking training to start")
    return job_id


def small_import(client, tiny_run, tmp_path, name: str, priority: int) -> str:
    folder = tmp_path / name
    if not folder.exists():
        client.export_sae(tiny_run["job"]["result"]["sae_id"], str(folder))
    return client.submit("import_sae", {"source": str(folder), "model_id": "tiny-llama", "name": name},
                         priority=priority)


def test_priorities_and_reordering_decide_the_start_order(tiny_run, ui_client, tmp_path):
    busy = blocker(ui_client)
    low = small_import(ui_client, tiny_run, tmp_path, "low", 0)
    high = small_import(ui_client, tiny_run, tmp_path, "high", 5)
    later = small_import(ui_client, tiny_run, tmp_path, "later", 0)
    assert [j["id"] for j in ui_client.queue()] == [high, low, later]

    at = AppTest.from_file(JOBS, default_timeout=60).run()
    assert not at.exception
    shown = next(d.value for d in at.dataframe if "#" in d.value.columns)  # the queue table
    assert list(shown["id"]) == [high, low, later]
    at.selectbox(key="queue_job").select(later).run()
    at.button(key="queue_next").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [j["id"] for j in ui_client.queue()] == [later, high, low]
    assert ui_client.job(later)["priority"] == 6

    with pytest.raises(UserError, match="only a queued job can be reordered"):
        ui_client.set_priority(busy, 100)
    ui_client.finalize(busy)
    for job_id in (busy, later, high, low):
        assert ui_client.wait(job_id, timeout=300)["state"] == "completed"
    started = sorted((ui_client.job(j)["started_at"], j) for j in (later, high, low))
    assert [j for _, j in started] == [later, high, low]


def test_a_restarted_job_manager_runs_the_queued_jobs_and_stops_the_orphaned_one(tiny_run, client, tmp_path):
    import ray

    from actors.client import Client
    from actors.worker import NAMESPACE

    busy = blocker(client)
    waiting = small_import(client, tiny_run, tmp_path, "waiting", 0)
    ray.kill(ray.get_actor("job_manager", namespace=NAMESPACE), no_restart=True)
    again = Client(client.settings)  # what a restarted CLI or dashboard does: the manager comes back
    done = again.wait(waiting, timeout=300)
    assert done["state"] == "completed", done["message"]
    interrupted = again.job(busy)
    assert interrupted["state"] == "failed" and interrupted["message"].startswith("interrupted: the job manager")
    assert not [s for s in again.saes() if s["training_job_id"] == busy]
    client.manager = again.manager  # the session's client talks to the new manager from here on


def test_a_paused_training_survives_a_job_manager_restart_and_resumes(tiny_run, client):
    import ray

    from actors.client import Client
    from actors.worker import NAMESPACE

    job_id = blocker(client)
    wait_for(lambda: (client.progress(job_id) or {}).get("done", 0) > 0, what="training progress")
    client.pause(job_id)
    assert client.wait(job_id, timeout=300)["state"] == "paused"
    ray.kill(ray.get_actor("job_manager", namespace=NAMESPACE), no_restart=True)
    again = Client(client.settings)
    client.manager = again.manager
    assert again.job(job_id)["state"] == "paused", "a paused job is not taken for an interrupted one"
    again.resume(job_id)
    wait_for(lambda: again.job(job_id)["state"] == "running", what="the resumed training")
    again.finalize(job_id)
    done = again.wait(job_id, timeout=300)
    assert done["state"] == "completed", done["message"]
    assert [s["id"] for s in again.saes() if s["training_job_id"] == job_id] == [done["result"]["sae_id"]]
