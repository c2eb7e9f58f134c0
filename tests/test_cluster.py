"""One Ray cluster per deployment: the first process starts a local head (ray start --head on
free ports) and records it under the data root; every later process attaches to it and sees
the same actors and jobs; `mistudio stop` ends that head and nothing else."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def run_py(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_processes_share_one_local_head(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "home"), MISTUDIO_WORKER_CPUS="1")
    first = run_py(
        "from actors.client import Client\n"
        "c = Client()\n"
        f"job = c.wait(c.submit('add_model', {{'source': {str(tiny_model_dir)!r}, 'name': 'tiny'}}), timeout=200)\n"
        "print(job['state'])\n", env)
    assert first.strip().endswith("completed")
    head = json.loads((tmp_path / "home" / "ray_head.json").read_text())

    # A second process (as the dashboard or a later CLI call would be) attaches to the same head
    # and sees the job and the loaded model in the same long-lived worker.
    second = run_py(
        "from actors.client import Client\n"
        "import ray\n"
        "c = Client()\n"
        "print(ray.get_runtime_context().gcs_address, [j['kind'] for j in c.jobs()], c.worker_status())\n", env)
    port = head["address"].rpartition(":")[2]
    assert f":{port}" in second and "['add_model']" in second
    assert "'loaded': ['tiny']" in second

    stopped = subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)
    assert "stopped the local Ray head" in stopped.stdout
    assert not (tmp_path / "home" / "ray_head.json").exists()
    left = [p for p in psutil.process_iter(["cmdline"]) if f"gcs_server_port={port}" in " ".join(p.info["cmdline"] or [])]
    assert not left
    assert not root_processes(tmp_path / "home")  # nor its autoscaler, log monitor, dashboard, agents


def test_ray_job_submit_runs_a_job_file(tmp_path, tiny_model_dir):
    """`ray job submit --address http://HEAD:DASHBOARD -- mistudio run job.yaml` against a head
    started with `ray start --head`: the job attaches to that cluster and its actors."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(home), MISTUDIO_WORKER_CPUS="1", RAY_AUTH_MODE="token")
    run_py("from actors import cluster\nfrom storage import Settings\ncluster.start_head(Settings.from_env())\n", env)
    head = json.loads((home / "ray_head.json").read_text())
    try:
        work = tmp_path / "work"
        work.mkdir()
        (work / "job.yaml").write_text(f"kind: add_model\nsource: {tiny_model_dir}\nname: tiny-submitted\n")
        ray_exe = os.path.join(os.path.dirname(sys.executable), "ray")
        runtime_env = json.dumps({"env_vars": {"MISTUDIO_HOME": str(home)}})
        submit = [ray_exe, "job", "submit", "--address", head["dashboard"], "--working-dir", str(work),
                  "--runtime-env-json", runtime_env, "--", sys.executable, "-m", "ui.cli", "run", "job.yaml"]
        for _ in range(10):
            out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            # A head that has just started may not have its job agent up yet; Ray says to try again.
            if "No available agent to submit job" not in out.stderr:
                break
            time.sleep(5)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "succeeded" in out.stdout and '"model_id": "tiny-submitted"' in out.stdout

        listed = run_py("from actors.client import Client\nprint([m['id'] for m in Client().models()])\n", env)
        assert "tiny-submitted" in listed
    finally:
        subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)


def test_a_cluster_address_that_does_not_answer_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "home"), MISTUDIO_RAY_ADDRESS="127.0.0.1:9")
    out = subprocess.run([sys.executable, "-m", "ui.cli", "models", "list"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: the Ray cluster at 127.0.0.1:9 does not answer; check MISTUDIO_RAY_ADDRESS")


TWO_NODES = """
import json, os, sys, time
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
second = cluster.add_node(num_cpus=2, resources={"node2": 1})
cluster.wait_for_nodes()
os.environ.update(MISTUDIO_RAY_ADDRESS=cluster.address, MISTUDIO_WORKER_RESOURCES='{"node2": 1}',
                  MISTUDIO_WORKER_CPUS="1")
from actors.client import Client
c = Client()
model = c.wait(c.submit("add_model", {"source": sys.argv[1], "name": "tiny-llama"}), timeout=300)
ds = c.wait(c.submit("add_dataset", {"model_id": "tiny-llama", "source": "builtin", "context_length": 64,
                                     "max_documents": 10}), timeout=300)
job = c.wait(c.submit("extract", {"model_id": "tiny-llama", "dataset_id": ds["result"]["dataset_id"],
                                  "layers": [1], "max_tokens": 500}), timeout=300)
(worker,) = c.workers_status()
acts = [a for a in c.activations() if a["job_id"] == job["id"]]
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(os.path.join("ui", "app_pages", "jobs.py"), default_timeout=60).run()
listed = job["id"] in at.dataframe[-1].value["id"].tolist()
print(json.dumps({"states": [model["state"], ds["state"], job["state"]], "second": second.node_id,
                  "worker_node": worker["node_id"], "paths": [a["path"] for a in acts], "listed": listed}))
import ray
ray.shutdown()
cluster.shutdown()
"""


def test_a_job_placed_on_a_second_node_writes_to_the_shared_root(tmp_path, tiny_model_dir):
    """A simulated two-node cluster (ray.cluster_utils.Cluster): the model worker asks for a
    resource only the second node has, so the job runs there; what it writes lands under the
    shared data root, is registered, and the dashboard's Jobs page lists it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "shared"), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", TWO_NODES, str(tiny_model_dir)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["states"] == ["completed"] * 3
    assert r["worker_node"] == r["second"]
    assert r["paths"] and all(p.startswith(str(tmp_path / "shared")) for p in r["paths"])
    assert all(any((Path(p)).glob("shard-*.parquet")) for p in r["paths"])
    assert r["listed"]


def test_worker_resources_must_be_json_amounts():
    from core.errors import UserError
    from storage import Settings

    with pytest.raises(UserError, match="MISTUDIO_WORKER_RESOURCES='gpu' is not a JSON object"):
        Settings.from_env({"MISTUDIO_WORKER_RESOURCES": "gpu"})
    assert Settings.from_env({"MISTUDIO_WORKER_RESOURCES": '{"gpu_node": 1}'}).worker_resources == '{"gpu_node": 1}'


def test_ray_cluster_yaml_is_valid_for_the_cluster_launcher():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's own schema check, as `ray up` runs it
    assert cfg["provider"]["type"] == "local"
    assert any("make install" in c for c in cfg["setup_commands"])
    assert any('"mistudio_worker": 1' in c for c in cfg["worker_start_ray_commands"])


GPUS = """
import json, os, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
os.environ.update(MISTUDIO_RAY_ADDRESS=cluster.address, MISTUDIO_WORKERS="2", MISTUDIO_WORKER_CPUS="1",
                  **json.loads(sys.argv[2]))
from actors.client import Client
c = Client()
# two jobs at once: the second finds the first worker busy (it is still starting) and starts the other
jobs = [c.submit("add_model", {"source": sys.argv[1], "name": f"tiny-{i}"}) for i in range(2)]
states = [c.wait(j, timeout=300)["state"] for j in jobs]
print(json.dumps({"states": states, "gpus": {w["name"]: w["gpus"] for w in c.workers_status()},
                  "devices": sorted(w["device"] for w in c.workers_status())}))
import ray
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.parametrize("settings, want", [
    ({"MISTUDIO_WORKER_GPUS": "1;0"}, {"model_worker": "1", "model_worker-1": "0"}),  # pinned as written
    ({"MISTUDIO_NUM_GPUS": "1"}, None),  # Ray hands each worker its own GPU
])
def test_each_worker_gets_its_gpu(tmp_path, tiny_model_dir, settings, want):
    """A node that advertises two GPUs (Ray's resource accounting is the same whether or not CUDA
    is present): each ModelWorker sees only the GPU it was given, through CUDA_VISIBLE_DEVICES."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "home"), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", GPUS, str(tiny_model_dir), json.dumps(settings)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["states"] == ["completed"] * 2
    if want:
        assert r["gpus"] == want
    else:
        assert sorted(r["gpus"].values()) == ["0", "1"]
    import torch
    assert r["devices"] == ["cuda" if torch.cuda.is_available() else "cpu"] * 2


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def head_processes(port: str) -> list[psutil.Process]:
    """The processes of the head whose GCS listens on `port`: those named by its session folder
    (gcs_server, raylet, dashboard, monitors) and all their children (agents, actor workers)."""
    gcs = [p for p in psutil.process_iter(["cmdline"]) if f"gcs_server_port={port}" in " ".join(p.info["cmdline"] or [])]
    assert gcs, "the head's gcs_server is not running"
    session = next(a for a in gcs[0].info["cmdline"] if "session_" in a).split("session_")[1].split("/")[0]
    named = [p for p in psutil.process_iter(["cmdline"]) if f"session_{session}" in " ".join(p.info["cmdline"] or [])]
    found = {p.pid: p for p in named}
    for p in named:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def test_local_head_listens_on_loopback_only(tmp_path):
    """Every listening socket of the local head (GCS, raylet, object manager, dashboard and its
    agent, runtime-env agent, Ray client server, the actors' workers) is bound to 127.0.0.1, and
    the auth token file is its owner's alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(tmp_path / "home"), MISTUDIO_WORKER_CPUS="1")
    try:
        run_py("from actors.client import Client\nc = Client()\nprint(c.jobs())\n", env)
        port = json.loads((tmp_path / "home" / "ray_head.json").read_text())["address"].rpartition(":")[2]
        listening = {}
        for p in head_processes(port):
            with contextlib.suppress(psutil.NoSuchProcess):
                for conn in p.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        listening[(conn.laddr.ip, conn.laddr.port)] = p.name()
        names = set(listening.values())
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::JobManager") for n in names), names
        exposed = {addr: name for addr, name in listening.items() if addr[0] not in LOOPBACK}
        assert not exposed, exposed
        assert ("127.0.0.1", int(port)) in listening or ("::ffff:127.0.0.1", int(port)) in listening
        token = Path.home() / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600
        # another registry's URL (here one nothing serves: the Client opens it before Ray) is
        # refused in one line without echoing its password
        other = {**env, "MISTUDIO_DATABASE_URL": "postgresql://mistudio:S3cretPW@127.0.0.1:9/x"}
        out = subprocess.run([sys.executable, "-m", "ui.cli", "jobs", "list"], env=other, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode != 0 and "S3cretPW" not in out.stdout + out.stderr, out.stderr
        assert "postgresql://mistudio:***@127.0.0.1:9/x" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    finally:
        subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)


def root_processes(home: Path) -> list[psutil.Process]:
    """The processes that point at this data root's Ray sessions: by their command line, or (the
    agents and actor workers rename themselves) by the files they hold open."""
    from actors import cluster
    from storage import Settings

    root = str(cluster.ray_root(Settings.from_env({"MISTUDIO_HOME": str(home)})))
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if root in " ".join(p.info["cmdline"] or []) or any(f.path.startswith(root) for f in p.open_files()):
                found.append(p)
    return found


def _health(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def test_the_dashboard_outlives_a_killed_head_and_stop_leaves_no_process_behind(tmp_path):
    """`mistudio ui` restarts the dashboard on a fresh head when the head is killed (gcs_server
    and raylet, as a crash would); `mistudio stop` then ends the dashboard, the new head and
    what the killed one left behind (autoscaler, log monitor, dashboard, agents)."""
    from actors.cluster import _free_port
    from tests.conftest import wait_for

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(home), MISTUDIO_WORKER_CPUS="1")
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "ui.cli", "ui", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _health(port), timeout=240, what="the dashboard")
        first = json.loads((home / "ray_head.json").read_text())["address"]
        (server,) = psutil.Process(ui.pid).children()
        gcs_port = first.rpartition(":")[2]
        gcs = [p for p in psutil.process_iter(["cmdline"]) if f"gcs_server_port={gcs_port}" in " ".join(p.info["cmdline"] or [])]
        session = next(a for a in gcs[0].info["cmdline"] if "session_" in a).split("session_")[1].split("/")[0]
        raylet = [p for p in psutil.process_iter(["name", "cmdline"])
                  if p.info["name"] == "raylet" and f"session_{session}" in " ".join(p.info["cmdline"] or [])]
        for p in gcs + raylet:
            p.kill()

        def restarted() -> bool:
            head = json.loads((home / "ray_head.json").read_text())["address"]
            servers = psutil.Process(ui.pid).children()
            return head != first and [s.pid for s in servers] != [server.pid] and len(servers) == 1 and _health(port)

        wait_for(restarted, timeout=240, what="the dashboard on a new head")
        assert ui.poll() is None
        assert not server.is_running()
        run_py("from actors.client import Client\nprint(Client(start=False).jobs())\n", env)  # the new head serves
        # what the killed head left running (its autoscaler and log monitor name its session)
        killed = [p for p in root_processes(home) if f"session_{session}" in " ".join(p.cmdline())]
        assert killed

        stopped = subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)
        assert "stopped the local Ray head" in stopped.stdout, stopped.stderr
        assert ui.wait(timeout=30) is not None
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in root_processes(home) if p.is_running()]
        assert not left, left
        assert not any(p.is_running() for p in killed)
        assert not (home / "dashboard.json").exists()
    finally:
        if ui.poll() is None:
            ui.kill()
        subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)


def _session_of(gcs_port: str) -> tuple[list[psutil.Process], str]:
    """The gcs_server listening on `gcs_port`, and its Ray session's name."""
    gcs = [p for p in psutil.process_iter(["cmdline"]) if f"gcs_server_port={gcs_port}" in " ".join(p.info["cmdline"] or [])]
    session = next(a for a in gcs[0].info["cmdline"] if "session_" in a).split("session_")[1].split("/")[0]
    return gcs, session


def test_a_head_killed_mid_training_leaves_one_result_from_a_retry_and_none_from_the_old_run(tmp_path, tiny_model_dir):
    """The whole story of a crashed head, end to end on real heads: the GCS of the head running
    a training job is killed while its raylet, job manager and model worker live on (their GCS
    reconnect window is set long; the worker is paused meanwhile so the run cannot finish
    first). The next client starts a new head, whose manager marks the job interrupted (a new
    attempt); the old run, resumed, trains to its end and its final record is refused (its log
    says so), so the job holds no SAE; a retry holds exactly one, with one SAE folder on disk
    and no temporary file; `mistudio stop` ends both heads."""
    from actors import cluster
    from storage import Settings
    from tests.conftest import wait_for

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_"))}
    env.update(MISTUDIO_HOME=str(home), MISTUDIO_WORKER_CPUS="1")
    old_env = {**env, "RAY_gcs_rpc_server_reconnect_timeout_s": "600"}
    try:
        job_id = run_py(
            "from actors.client import Client\nfrom tests.conftest import wait_for\n"
            "c = Client()\n"
            f"assert c.wait(c.submit('add_model', {{'source': {str(tiny_model_dir)!r}, 'name': 'tiny'}}), timeout=200)['state'] == 'completed'\n"
            "ds = c.wait(c.submit('add_dataset', {'model_id': 'tiny', 'source': 'builtin', 'context_length': 64, 'max_documents': 40}))\n"
            "act = c.wait(c.submit('extract', {'model_id': 'tiny', 'dataset_id': ds['result']['dataset_id'], 'layers': [1], 'max_tokens': 3000}))\n"
            "assert act['state'] == 'completed', act['message']\n"
            "job = c.submit('train', {'activation_ids': [c.activations()[0]['id']], 'eval_rows': 2, 'checkpoint_every': 50,\n"
            "    'config': {'expansion_factor': 2, 'k': 4, 'batch_size': 64, 'epochs': 150, 'log_every': 10}})\n"
            "wait_for(lambda: (c.progress(job) or {}).get('done', 0) > 0, what='training progress')\n"
            "assert c.job(job)['state'] == 'running', 'the job ended before the head could be killed; give it more epochs'\n"
            "print(job)\n", old_env).strip().splitlines()[-1]
        old_gcs, old_session = _session_of(json.loads((home / "ray_head.json").read_text())["address"].rpartition(":")[2])
        (worker,) = [p for p in root_processes(home) if p.cmdline()[0].startswith("ray::ModelWorker")]
        worker.suspend()
        for p in old_gcs:
            p.kill()

        # a new client finds the head gone and starts another; its manager takes the job over
        state = run_py("from actors.client import Client\n"
                       f"j = Client().job({job_id!r})\nprint(j['state'], '|', j['message'])\n", env).strip()
        assert state.startswith("failed | interrupted: the job manager restarted"), state
        worker.resume()
        logs = cluster.ray_root(Settings.from_env({"MISTUDIO_HOME": str(home)})) / f"session_{old_session}" / "logs"

        def refused() -> bool:
            return any(f"job {job_id}: this run stops here" in f.read_text(errors="replace") for f in logs.glob("*.out"))

        wait_for(refused, timeout=300, what="the old run's refused record")
        retried = run_py(
            "from actors.client import Client\n"
            f"c = Client()\nold = c.job({job_id!r})\nassert old['state'] == 'failed' and old['sae_id'] is None, old\n"
            f"assert not [s for s in c.saes() if s['training_job_id'] == {job_id!r}]\n"
            f"done = c.wait(c.retry({job_id!r}), timeout=600)\nassert done['state'] == 'completed', done['message']\n"
            "print(len(c.saes()), done['result']['sae_id'])\n", env).split()
        assert retried[0] == "1", retried
        folders = [p.parent for p in (home / "saes").rglob("cfg.json")]
        assert len(folders) == 1 and retried[1] in str(folders[0]), folders
        assert not list(home.rglob(".tmp-*"))
    finally:
        stopped = subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=env, capture_output=True, text=True)
    assert "stopped the local Ray head" in stopped.stdout, stopped.stderr
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in root_processes(home) if p.is_running()]
    assert not left, left


def test_the_head_s_ports_are_picked_distinct():
    """`ray start` refuses a port given to two components; the head's seven ports are picked
    with every socket still bound, so none repeats (a CI run once failed on Ray's "same port is
    not used by multiple components")."""
    from actors.cluster import _free_ports

    for _ in range(20):
        ports = _free_ports(64)
        assert len(set(ports)) == 64 and all(p > 0 for p in ports)
