"""Faults against the real actors: a model worker killed mid-job, two clients cancelling the
same job, a disk that fills while a result is written."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from actors.worker import NAMESPACE
from core.sae import load_saelens
from storage.artifacts import Artifacts
from storage.registry import SAE


def kill_worker() -> None:
    ray.kill(ray.get_actor("model_worker", namespace=NAMESPACE), no_restart=True)


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def train_spec(client) -> dict:
    act = next(a for a in client.activations() if a["model_id"] == "tiny-llama")
    return {"activation_ids": [act["id"]], "eval_rows": 2, "checkpoint_every": 20, "keep_checkpoints": 2,
            "config": {"expansion_factor": 2, "k": 4, "batch_size": 64, "epochs": 120, "log_every": 10}}


def test_worker_killed_mid_training_resumes_from_its_checkpoint_and_equals_an_uninterrupted_run(client, tiny_run):
    spec = train_spec(client)
    plain = client.wait(client.submit("train", spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]

    job_id = client.submit("train", spec)
    folder = Artifacts(client.settings.home).checkpoints(job_id)
    wait_for(lambda: any(folder.glob("ckpt-*.pt")) or client.job(job_id)["state"] == "completed",
             what="a first checkpoint")
    assert client.job(job_id)["state"] == "running", "the run ended before it could be interrupted"
    kill_worker()
    done = client.wait(job_id, timeout=600)
    assert done["state"] == "completed", done["message"]
    history = [p.get("message", "") for p in client.history(job_id)]
    assert any("the model worker died; retry 1 of 1 on a fresh worker, from the newest checkpoint" in m
               for m in history), history
    assert client.job(job_id)["spec"]["resume_job"] == job_id
    a, _ = load_saelens(client.get(SAE, plain["result"]["sae_id"])["path"])
    b, _ = load_saelens(client.get(SAE, done["result"]["sae_id"])["path"])
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert done["result"]["fvu"] == plain["result"]["fvu"]
    assert len([s for s in client.saes() if s["training_job_id"] == job_id]) == 1  # nothing registered twice


def test_worker_killed_mid_discovery_starts_over_and_writes_the_same_files(client, tiny_run, tmp_path):
    import pyarrow.parquet as pq

    # a copy of the run's SAE, so that this test's discoveries (over the whole dataset) leave the
    # features other tests read alone
    folder = client.export_sae(tiny_run["job"]["result"]["sae_id"], str(tmp_path / "copy"))
    imported = client.wait(client.submit("import_sae", {"source": folder, "model_id": "tiny-llama"}))
    sae_id = imported["result"]["sae_id"]
    spec = {"sae_id": sae_id, "dataset_id": tiny_run["dataset_id"], "top_k": 5, "batch_size": 1}
    plain = client.wait(client.submit("discover", spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]
    before = pq.read_table(f"{client.get(SAE, sae_id)['features_path']}/examples.parquet")

    job_id = client.submit("discover", spec)
    wait_for(lambda: (client.progress(job_id) or {}).get("phase") == "discover"
             and (client.progress(job_id) or {}).get("done", 0) > 0 or client.job(job_id)["state"] == "completed",
             what="discovery to start")
    assert client.job(job_id)["state"] == "running", "discovery ended before it could be interrupted"
    kill_worker()
    done = client.wait(job_id, timeout=600)
    assert done["state"] == "completed", done["message"]
    assert any("retry 1 of 1 on a fresh worker" in p.get("message", "") for p in client.history(job_id))
    after = pq.read_table(f"{client.get(SAE, sae_id)['features_path']}/examples.parquet")
    assert after.equals(before)


def test_two_clients_cancelling_one_job(client, tiny_run):
    from actors.client import Client

    other = Client(client.settings)
    job_id = client.submit("train", train_spec(client))
    wait_for(lambda: client.job(job_id)["state"] == "running", what="the job to run")
    a, b = client.cancel(job_id), other.cancel(job_id)
    assert a["id"] == b["id"] == job_id
    done = client.wait(job_id, timeout=120)
    assert done["state"] == "cancelled" and done["message"] == "cancelled by request"
    assert not [s for s in client.saes() if s["training_job_id"] == job_id]
    assert client.cancel(job_id)["state"] == "cancelled"  # a third cancel changes nothing
