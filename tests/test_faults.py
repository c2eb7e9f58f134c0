"""Faults against the real actors: a model worker killed mid-job (every job kind), a hung
worker, two clients cancelling the same job, a disk that fills while a result is written."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
import torch

from actors.worker import NAMESPACE
from core.formats.saelens import load_saelens
from storage.artifacts import Artifacts
from storage.registry import SAE, Dataset, Model
from tests.conftest import wait_for


def kill_worker() -> None:
    ray.kill(ray.get_actor("model_worker", namespace=NAMESPACE), no_restart=True)


def leftovers(client) -> list[Path]:
    """Temporary files anywhere under the data root (a killed writer's, if not swept)."""
    return list(Path(client.settings.home).rglob(".tmp-*"))


def progressed(client, job_id: str, step: str = "") -> bool:
    """The job has reported work done (in `step`, when given), or it is already over."""
    p = client.progress(job_id) or {}
    return (p.get("done", 0) > 0 and (not step or p.get("step") == step)) or client.job(job_id)["state"] == "completed"


def killed_mid_job(client, job_id: str, started, what: str) -> dict:
    """Kill the model worker once `started()` holds; the job must then be retried on a fresh
    worker and complete, with no temporary file left anywhere."""
    wait_for(started, what=what)
    assert client.job(job_id)["state"] in ("loading", "running"), f"the job ended before {what} could be interrupted"
    kill_worker()
    done = client.wait(job_id, timeout=600)
    assert done["state"] == "completed", done["message"]
    history = [p.get("message", "") for p in client.history(job_id)]
    assert any("the model worker died; retry 1 of 1 on a fresh worker" in m for m in history), history
    assert not leftovers(client)
    return done


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
    done = killed_mid_job(client, job_id, lambda: any(folder.glob("ckpt-*.pt"))
                          or client.job(job_id)["state"] == "completed", "a first checkpoint")
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
    killed_mid_job(client, job_id, lambda: progressed(client, job_id, "discover"), "discovery")
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


def test_a_run_whose_job_was_taken_over_records_nothing_and_a_retry_records_it_once(client, tiny_run):
    """What a new Ray head's job manager does to a job the old head was running: mark it
    failed ("interrupted"), which gives it a new attempt. The old run trains on, and its record
    (the SAE row, the job's completion) is refused when it gets there, and its SAE folder
    removed; a retry registers exactly one SAE."""
    from storage.fencing import StaleAttempt, claim

    spec = train_spec(client)
    spec["config"] = {**spec["config"], "epochs": 60}
    job_id = client.submit("train", spec)
    wait_for(lambda: progressed(client, job_id), what="training progress")
    taken = claim(client.registry, job_id, "failed", only_from=("loading", "running"),
                  message="interrupted: the job manager restarted")
    assert taken is not None, "the job ended before it could be taken over; give it more epochs"
    with pytest.raises(StaleAttempt):  # what the old run's worker gets at its next state change
        ray.get(client.manager.set_state.remote(job_id, "running"))
    retry = client.retry(job_id)  # queued behind the old run, which holds the one worker
    done = client.wait(retry, timeout=600)
    assert done["state"] == "completed", done["message"]
    old = client.job(job_id)
    assert (old["state"], old["message"], old["result"], old["sae_id"]) == \
        ("failed", "interrupted: the job manager restarted", {}, None)
    assert not [s for s in client.saes() if s["training_job_id"] == job_id]
    assert [s["id"] for s in client.saes() if s["training_job_id"] == retry] == [done["result"]["sae_id"]]
    # the old run's SAE folder went with its refused record (the retry started after, on the one
    # worker): every SAE folder is one the registry names (other tests' rows may have none)
    folders = {p.name for p in (Path(client.settings.home) / "saes").iterdir() if not p.name.startswith(".")}
    assert folders <= {s["id"] for s in client.saes()}, folders - {s["id"] for s in client.saes()}


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
    from core.features import discover, writer
    from tests.test_discover import CFG, decode, make_batches, make_sae

    sae, batches = make_sae(), make_batches()
    out = tmp_path / "features"
    first = discover(sae, iter(batches), out, decode, CFG)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "examples.parquet"))

    monkeypatch.setattr(writer.pq, "write_table", full)
    with pytest.raises(OSError) as e:
        discover(sae, iter(batches), out, decode, CFG)
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
    done = killed_mid_job(client, job_id, lambda: progressed(client, job_id), f"the {kind} job")
    assert _outcome(client, done) == _outcome(client, plain)


# -- the other job kinds: each killed mid-job, retried, and recorded once -----------------------


def test_worker_killed_while_adding_the_real_model_adds_it_once(client):
    """Converting the embedded SmolLM2 GGUF takes ~20 s: the kill lands inside it."""
    job_id = client.submit("add_model", {"source": "embedded", "name": "smollm2-killed"})
    wait_for(lambda: client.job(job_id)["state"] != "queued", what="the model to start loading")
    time.sleep(2)
    done = killed_mid_job(client, job_id, lambda: True, "the conversion")
    model = client.get(Model, "smollm2-killed")
    assert (model["n_layers"], model["d_model"]) == (30, 576)
    assert [m["id"] for m in client.models()].count("smollm2-killed") == 1
    assert done["result"] == {"model_id": "smollm2-killed"}
    from core.models import load_model
    load_model(model["path"])  # the folder is whole


def test_worker_killed_while_tokenizing_reruns_to_the_same_dataset(client, tiny_run, tmp_path):
    from core.data import builtin_corpus

    corpus = tmp_path / "big.jsonl"  # ~25 MB: tokenizing takes several seconds
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_corpus() * 40))
    spec = {"model_id": "tiny-llama", "source": str(corpus), "context_length": 64}
    plain = client.wait(client.submit("add_dataset", spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]
    job_id = client.submit("add_dataset", spec)
    done = killed_mid_job(client, job_id, lambda: progressed(client, job_id), "tokenizing")
    a, b = (client.get(Dataset, j["result"]["dataset_id"]) for j in (plain, done))
    assert (a["documents"], a["rows"], a["tokens"]) == (b["documents"], b["rows"], b["tokens"])
    assert _shards(a["path"]).equals(_shards(b["path"]))
    assert len([d for d in client.datasets() if d["source"] == str(corpus)]) == 2  # one per job, not per attempt


def _shards(folder: str):
    import pyarrow.parquet as pq

    return pq.read_table(sorted(Path(folder).glob("*.parquet")))


def test_worker_killed_mid_import_imports_every_sae_once(client, tiny_run, tmp_path):
    from core.formats.saelens import save_saelens
    from core.sae import build_sae

    source = tmp_path / "wide"  # 10 SAEs of 64 × 65536 latents (32 MB each): seconds to check and write
    for i in range(10):
        sae = build_sae("topk", 64, 65536, k=8)
        save_saelens(sae, sae.config(hook_name="blocks.1.hook_resid_post"), source / f"sae{i}")
    job_id = client.submit("import_sae", {"source": str(source), "model_id": "tiny-llama", "name": "killed"})
    # killed once the import runs (its progress, throttled to a report a second, may only show at its end)
    done = killed_mid_job(client, job_id, lambda: client.job(job_id)["state"] in ("running", "completed"),
                          "the import")
    imported = [s for s in client.saes() if s["name"].startswith("killed/")]
    assert sorted(s["name"] for s in imported) == sorted(f"killed/blocks.1.hook_resid_post/sae{i}"
                                                         for i in range(10))
    assert sorted(done["result"]["sae_ids"]) == sorted(s["id"] for s in imported)
    assert not (Path(client.settings.home) / "imports" / job_id).exists()


def test_worker_killed_mid_analysis_reruns_to_the_same_analysis(client, tiny_run):
    sae_id = tiny_run["job"]["result"]["sae_id"]
    # Killed in the first half of its NLP pass or of its ablation of every latent (one at a
    # time): each stage reports 0 done when it starts, so the kill lands mid-job even when the
    # analysis is fast
    # (killing at the first report of any stage once came after the job's last one).
    spec = {"sae_id": sae_id, "config": {"ablation_top": 256, "ablation_contexts": 8, "ablation_group": 1}}
    plain = client.wait(client.submit("analyze", spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]
    first = {f["latent"]: f["analysis"] for f in client.features(sae_id)}
    job_id = client.submit("analyze", spec)
    def early_in_ablation():
        p = client.progress(job_id) or {}
        return (p.get("stage") in ("NLP", "ablation") and p.get("done", 0) < p.get("total", 0) // 2) \
            or client.job(job_id)["state"] == "completed"
    done = killed_mid_job(client, job_id, early_in_ablation, "the analysis")
    assert done["result"] == plain["result"]
    assert {f["latent"]: f["analysis"] for f in client.features(sae_id)} == first


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that holds its first request until `release` is set (the
    worker waits on it like on a slow model server) and answers every request with one label."""

    release = threading.Event()
    arrived = threading.Event()
    keys: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        _Endpoint.keys.append(self.headers.get("Authorization"))
        if not _Endpoint.arrived.is_set():
            _Endpoint.arrived.set()
            _Endpoint.release.wait(120)
        content = json.dumps({"name": "Held label", "category": "semantic", "description": "From the endpoint."})
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def endpoint():
    _Endpoint.release.clear()
    _Endpoint.arrived.clear()
    _Endpoint.keys = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    _Endpoint.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def sae_copy(client, tiny_run, tmp_path_factory):
    """A discovered copy of the run's SAE, so labels written here leave other tests' alone."""
    folder = client.export_sae(tiny_run["job"]["result"]["sae_id"], str(tmp_path_factory.mktemp("copy") / "sae"))
    imported = client.wait(client.submit("import_sae", {"source": folder, "model_id": "tiny-llama", "name": "copy"}))
    sae_id = imported["result"]["sae_id"]
    found = client.wait(client.submit("discover", {"sae_id": sae_id, "dataset_id": tiny_run["dataset_id"],
                                                   "top_k": 5, "max_tokens": 1000}))
    assert found["state"] == "completed", found["message"]
    return sae_id


def _labels(client, sae_id: str, url: str) -> str:
    return client.submit("label", {"sae_id": sae_id, "method": "openai", "base_url": url, "endpoint_model": "m",
                                   "limit": 3}, api_key="sk-test-key")


def _assert_labeled(client, sae_id: str, done: dict) -> None:
    assert done["result"]["labeled"] == 3, done["result"]
    assert [f["label"] for f in client.features(sae_id) if f["label_source"] == "openai:m"] == ["Held label"] * 3
    assert set(_Endpoint.keys) == {"Bearer sk-test-key"}  # the retry still had the key (kept in memory only)
    assert "sk-test-key" not in str(client.job(done["id"]))


def test_worker_killed_while_waiting_on_the_labeling_endpoint_labels_once(client, sae_copy, endpoint):
    job_id = _labels(client, sae_copy, endpoint)
    wait_for(_Endpoint.arrived.is_set, what="the first labeling request")
    done = killed_mid_job(client, job_id, lambda: True, "labeling")
    _assert_labeled(client, sae_copy, done)


def test_a_hung_worker_is_stopped_by_the_heartbeat_check_and_its_job_retried(client, sae_copy, endpoint):
    """The endpoint never answers the first request: the worker is alive (Ray's health checks
    pass) but silent, so the job manager's heartbeat check stops it and the job runs again."""
    import dataclasses

    from tests.test_load import restart_actors

    watched = restart_actors(dataclasses.replace(client.settings, job_stall_s=3.0))
    try:
        done = watched.wait(_labels(watched, sae_copy, endpoint), timeout=300)
        assert done["state"] == "completed", done["message"]
        history = [p.get("message", "") for p in watched.history(done["id"])]
        assert any("the model worker sent no progress for 3 s and was stopped as hung; retry 1 of 1 on a fresh "
                   "worker" in m for m in history), history
        _assert_labeled(watched, sae_copy, done)
    finally:
        again = restart_actors(client.settings)  # the session's own manager and worker again
        client.manager = again.manager


def test_worker_killed_mid_pipeline_keeps_its_extraction_and_trains_the_same_sae(client, tiny_run):
    import pyarrow.parquet as pq

    spec = {"model_id": "tiny-llama", "dataset_id": tiny_run["dataset_id"], "layer": 0, "max_tokens": 3000,
            "train": {"expansion_factor": 2, "k": 4, "batch_size": 64, "epochs": 120}, "top_k": 5}
    plain = client.wait(client.submit("pipeline", spec), timeout=600)
    assert plain["state"] == "completed", plain["message"]
    job_id = client.submit("pipeline", spec)
    done = killed_mid_job(client, job_id, lambda: progressed(client, job_id, "train"), "the training")
    assert [a["id"] for a in client.activations() if a["job_id"] == job_id] == [done["result"]["activation_id"]]
    assert [s["id"] for s in client.saes() if s["training_job_id"] == job_id] == [done["result"]["sae_id"]]
    a, _ = load_saelens(client.get(SAE, plain["result"]["sae_id"])["path"])
    b, _ = load_saelens(client.get(SAE, done["result"]["sae_id"])["path"])
    assert all(torch.equal(t, b.state_dict()[n]) for n, t in a.state_dict().items())
    examples = [pq.read_table(f"{client.get(SAE, j['result']['sae_id'])['features_path']}/examples.parquet")
                for j in (plain, done)]
    assert examples[0].equals(examples[1])


def test_a_worker_that_died_while_idle_is_replaced_without_spending_a_retry(client, tiny_run, tmp_path):
    from tests.test_queue import small_import

    assert client.wait(small_import(client, tiny_run, tmp_path, "warm", 0))["state"] == "completed"
    kill_worker()  # idle: between jobs
    job_id = small_import(client, tiny_run, tmp_path, "after", 0)
    done = client.wait(job_id, timeout=300)
    assert done["state"] == "completed", done["message"]
    assert not any("retry" in p.get("message", "") for p in client.history(job_id))
