"""Faults against the real actors: a model worker killed mid-job, two clients cancelling the
same job, a disk that fills while a result is written."""

from __future__ import annotations


import pytest
import ray
import torch

from actors.worker import NAMESPACE
from core.sae import load_saelens
from storage.artifacts import Artifacts
from storage.registry import SAE
from tests.conftest import wait_for


def kill_worker() -> None:
    ray.kill(ray.get_actor("model_worker", namespace=NAMESPACE), no_restart=True)


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


def test_a_restarted_dashboard_or_cli_sees_a_running_jobs_progress_at_its_first_poll(client, tiny_run):
    """A new process (a restarted UI or CLI) reads the registry and the ProgressActor: the job
    it never submitted shows its live numbers on the first call."""
    import subprocess
    import sys

    job_id = client.submit("train", train_spec(client))
    wait_for(lambda: (client.progress(job_id) or {}).get("done", 0) > 0, what="training progress")
    code = ("from actors.client import Client\n"
            f"c = Client(); j = c.job({job_id!r}); p = c.progress({job_id!r}) or {{}}\n"
            "print(j['state'], p.get('done', 0) > 0, len(c.history(j['id'])) > 1)\n")
    env = {**__import__("os").environ, **client.settings.to_env(),
           "MISTUDIO_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    client.cancel(job_id)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.split()[-3:] == ["running", "True", "True"], out.stdout
    assert client.wait(job_id, timeout=120)["state"] == "cancelled"


def test_a_full_disk_loses_nothing_already_written_and_says_so(tmp_path, monkeypatch):
    """Simulated: Parquet writes fail with ENOSPC during a rediscovery. The earlier results stay
    whole, no temporary folder is left, and the job's message is one line naming the fix."""
    import errno

    import pyarrow.parquet as pq

    from actors.manager import disk_full_message
    from core import discover as disc
    from tests.test_discover import CFG, decode, make_batches, make_sae

    sae, batches = make_sae(), make_batches()
    out = tmp_path / "features"
    first = disc.discover(sae, iter(batches), out, decode, CFG)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "examples.parquet"))

    monkeypatch.setattr(disc.pq, "write_table", full)
    with pytest.raises(OSError) as e:
        disc.discover(sae, iter(batches), out, decode, CFG)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["features"]  # no .tmp-* sibling left
    assert pq.read_table(first.paths["examples"]).num_rows > 0
    message = disk_full_message(e.value, tmp_path, "discover-1")
    assert message == (f"the disk is full writing {out / 'examples.parquet'}; free space under {tmp_path} and "
                       "retry: mistudio jobs retry discover-1")


def _extract_spec(client, run):
    return {"model_id": "tiny-llama", "dataset_id": run["dataset_id"], "layers": [0, 1], "site": "mlp_out",
            "batch_size": 1}


def _steer_spec(client, run):
    # 16 generations of 300 tokens: long enough that the kill lands mid-job
    return {"sae_id": run["job"]["result"]["sae_id"], "prompts": ["The", "Hello", "A", "It", "We", "In", "On", "So"],
            "features": [{"latent": 3, "strength": 10.0}], "generation": {"max_new_tokens": 300, "temperature": 0}}


def _outcome(client, job):
    """What a job produced, without ids: activation sets (hook, tokens) or generated token ids."""
    if job["kind"] == "extract":
        return sorted((a["hook_name"], a["tokens"]) for a in client.activations() if a["job_id"] == job["id"])
    return [o["token_ids"] for o in job["result"]["outputs"]]


@pytest.mark.parametrize("kind, make_spec", [("extract", _extract_spec), ("steer", _steer_spec)])
def test_worker_killed_mid_job_reruns_it_to_the_same_outputs(client, tiny_run, kind, make_spec):
    spec = make_spec(client, tiny_run)
    plain = client.wait(client.submit(kind, spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]
    job_id = client.submit(kind, spec)
    wait_for(lambda: (client.progress(job_id) or {}).get("done", 0) > 0 or client.job(job_id)["state"] == "completed",
             what=f"the {kind} job to make progress")
    assert client.job(job_id)["state"] == "running", f"the {kind} job ended before it could be interrupted"
    kill_worker()
    done = client.wait(job_id, timeout=600)
    assert done["state"] == "completed", done["message"]
    assert any("retry 1 of 1 on a fresh worker" in p.get("message", "") for p in client.history(job_id))
    assert _outcome(client, done) == _outcome(client, plain)
