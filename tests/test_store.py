"""The object-store artifact root (MISTUDIO_ARTIFACT_ROOT): artifacts pushed when finished and
pulled where missing, through pyarrow's filesystem layer — against a file:// root and against a
real S3 endpoint (moto's S3 server on localhost, spoken to by pyarrow's own S3 client)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from core.errors import UserError
from storage.store import MANIFEST, ArtifactStore

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_uri():
    """A bucket on moto's S3 server; the URI names the endpoint the way pyarrow reads it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        uri = f"s3://bucket/root?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(uri + "&allow_bucket_creation=true")
        fs.create_dir("bucket")
        yield uri
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _folder(path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


@pytest.mark.parametrize("root", ["file", "s3"])
def test_push_then_pull_on_a_node_without_the_artifact(tmp_path, root, request):
    uri = (tmp_path / "store").as_uri() if root == "file" else request.getfixturevalue("s3_uri")
    writer = ArtifactStore(uri, tmp_path / "node-a")
    sae = _folder(tmp_path / "node-a" / "saes" / "sae-1", {"cfg.json": "{}", "sub/w.bin": "weights"})
    writer.push(sae)

    # another node's data root: the same relative layout, nothing there yet
    reader = ArtifactStore(uri, tmp_path / "node-b")
    got = reader.pull(tmp_path / "node-b" / "saes" / "sae-1")
    assert {p.relative_to(got).as_posix(): p.read_text() for p in got.rglob("*") if p.is_file()} == \
        {"cfg.json": "{}", "sub/w.bin": "weights"}
    assert reader.has(got) and not list(got.parent.glob(".tmp-*"))

    # replaced where it was made (features discovered again): the other node's copy is refreshed
    shutil.rmtree(sae)
    writer.push(_folder(sae, {"cfg.json": '{"v": 2}'}))
    assert sorted(p.name for p in reader.pull(got).iterdir()) == ["cfg.json"]
    assert (got / "cfg.json").read_text() == '{"v": 2}'

    # what the store lacks, or lies outside the data root, is left as it is
    assert reader.pull(tmp_path / "node-b" / "saes" / "nothing") == tmp_path / "node-b" / "saes" / "nothing"

    # a folder inside a stored artifact (one hook of an activation set) brings the whole artifact
    writer.push(_folder(tmp_path / "node-a" / "activations" / "job-1", {"h0/shard-00000.parquet": "a",
                                                                        "h1/shard-00000.parquet": "b"}))
    hook = reader.pull(tmp_path / "node-b" / "activations" / "job-1" / "h1")
    assert (hook / "shard-00000.parquet").read_text() == "b"
    assert (hook.parent / "h0" / "shard-00000.parquet").read_text() == "a"
    outside = _folder(tmp_path / "elsewhere", {"config.json": "{}"})
    reader.push(outside)
    assert reader.pull(outside) == outside and not reader.has(outside)


def test_an_upload_without_its_manifest_is_never_taken(tmp_path):
    uri = (tmp_path / "store").as_uri()
    writer = ArtifactStore(uri, tmp_path / "a")
    writer.push(_folder(tmp_path / "a" / "features" / "s", {"features.parquet": "x"}))
    (tmp_path / "store" / "features" / "s" / MANIFEST).unlink()  # as during an upload that has not finished
    reader = ArtifactStore(uri, tmp_path / "b")
    assert not reader.pull(tmp_path / "b" / "features" / "s").exists()


def test_a_root_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^MISTUDIO_ARTIFACT_ROOT='nope://x' cannot be opened .*; give a URI "
                                        r"such as s3://bucket/prefix") as e:
        ArtifactStore("nope://x", tmp_path)
    assert "\n" not in str(e.value)


FRESH_NODE = """
import json, shutil, sys, time
from pathlib import Path
import ray
import torch
from core.formats.saelens import load_saelens
from actors.client import Client
from actors.worker import NAMESPACE
from storage.registry import SAE

c = Client()
home = c.settings.home
model = c.wait(c.submit("add_model", {"source": sys.argv[1], "name": "tiny-llama"}), timeout=300)
ds = c.wait(c.submit("add_dataset", {"model_id": "tiny-llama", "source": "builtin", "context_length": 64,
                                     "max_documents": 20}), timeout=300)
run = c.wait(c.submit("pipeline", {"model_id": "tiny-llama", "dataset_id": ds["result"]["dataset_id"], "layer": 1,
                                   "max_tokens": 1500, "train": {"expansion_factor": 2, "k": 4, "epochs": 2},
                                   "top_k": 5}), timeout=600)
assert run["state"] == "completed", run["message"]
sae_id = run["result"]["sae_id"]
before = c.feature_documents(sae_id, [0, 1])

# This machine becomes a node that has never seen these artifacts: a fresh worker, an empty data root
ray.kill(ray.get_actor("model_worker", namespace=NAMESPACE), no_restart=True)
for kind in ("datasets", "activations", "saes", "features", "checkpoints"):
    shutil.rmtree(home / kind, ignore_errors=True)
trained = c.wait(c.submit("train", {"activation_ids": [run["result"]["activation_id"]], "eval_rows": 2,
                                    "config": {"expansion_factor": 2, "k": 4, "epochs": 1}}), timeout=300)
steer = c.wait(c.submit("steer", {"sae_id": sae_id, "prompts": ["The"], "features": [{"latent": 0, "strength": 4.0}],
                                  "generation": {"max_new_tokens": 4, "temperature": 0}}), timeout=300)
shutil.rmtree(home / "features", ignore_errors=True)
docs = c.feature_documents(sae_id, [0, 1])  # the dashboard's read: pulled here
found = c.wait(c.submit("discover", {"sae_id": sae_id, "dataset_id": ds["result"]["dataset_id"], "top_k": 5,
                                     "max_tokens": 1500}), timeout=300)
exported = c.export_sae(sae_id, str(Path(sys.argv[2]) / "exported"))

# A training whose worker is lost on one node resumes on another from the checkpoint it published
spec = {"activation_ids": [run["result"]["activation_id"]], "eval_rows": 0, "checkpoint_every": 100,
        "config": {"expansion_factor": 2, "k": 4, "batch_size": 64, "epochs": 200}}
plain = c.wait(c.submit("train", spec), timeout=600)
job = c.submit("train", spec)
folder = c.artifacts.checkpoints(job)
while not c.artifacts.store.has(folder) and c.job(job)["state"] != "completed":
    time.sleep(0.05)
running = c.job(job)["state"]
ray.kill(ray.get_actor("model_worker", namespace=NAMESPACE), no_restart=True)
shutil.rmtree(folder, ignore_errors=True)  # the next worker's node never had them
resumed = c.wait(job, timeout=600)
history = [p.get("message", "") for p in c.history(job)]
a, b = (load_saelens(c.get(SAE, j["result"]["sae_id"])["path"])[0].state_dict() for j in (plain, resumed))
same = all(torch.equal(t, b[n]) for n, t in a.items())
print(json.dumps({"states": [trained["state"], steer["state"], found["state"]],
                  "messages": [trained["message"], steer["message"], found["message"]],
                  "same_docs": docs == before, "exported": sorted(p.name for p in Path(exported).iterdir()),
                  "local": sorted(p.name for p in home.iterdir()), "running_at_kill": running,
                  "resumed": resumed["state"], "from_checkpoint": any("from the newest checkpoint" in m for m in history),
                  "same_weights": same}))
"""


def test_a_node_without_the_files_gets_them_from_an_s3_root(tmp_path, tiny_model_dir, s3_uri):
    """A whole deployment on an S3 artifact root: after a pipeline, the data root is emptied and
    the worker restarted (a node that never saw the artifacts); training on the cached
    activations, steering, discovery, the dashboard's feature documents and an SAE export still
    work, fetched from the store; and a training killed after it published a checkpoint resumes
    from that checkpoint on a worker without local copies, to the same weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(CREDENTIALS, MISTUDIO_HOME=str(tmp_path / "home"), MISTUDIO_RAY_ADDRESS="local",
               MISTUDIO_WORKER_CPUS="1", MISTUDIO_ARTIFACT_ROOT=s3_uri, RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", FRESH_NODE, str(tiny_model_dir), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["states"] == ["completed"] * 3, r["messages"]
    assert r["same_docs"]
    assert r["exported"] == ["cfg.json", "eval.json", "sae_weights.safetensors"]
    assert {"datasets", "saes", "features"} <= set(r["local"])  # pulled back onto this "node"
    fs, base = pafs.FileSystem.from_uri(s3_uri)
    stored = {i.path.removeprefix(base + "/") for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
              if i.path.endswith(MANIFEST)}
    kinds = {p.split("/")[0] for p in stored}
    assert {"datasets", "activations", "saes", "features", "checkpoints"} <= kinds, stored
    assert r["running_at_kill"] == "running" and r["resumed"] == "completed"
    assert r["from_checkpoint"] and r["same_weights"]


def test_the_cli_refuses_a_bad_root_before_starting_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "home"), MISTUDIO_ARTIFACT_ROOT="nope://x")
    out = subprocess.run([sys.executable, "-m", "ui.cli", "models", "list"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: MISTUDIO_ARTIFACT_ROOT='nope://x' cannot be opened")
    assert not (tmp_path / "home" / "ray_head.json").exists()  # no Ray head was started
