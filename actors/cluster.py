"""One Ray cluster per deployment, shared by the CLI, the dashboard and `ray job submit`.

`connect` attaches to, in order: an already initialised Ray (inside a Ray job), the address in
MISTUDIO_RAY_ADDRESS, or the local head whose address is recorded under the data root —
starting that head (`ray start --head` on free ports) when none answers. The special address
"local" starts a private in-process Ray instead (tests and notebooks).

Every local head of a data root keeps its sessions under one Ray temp dir of its own
(`ray_root`), so `stop_head` finds every process of every head started there — also those a
killed head left behind (its autoscaler, log monitor, dashboard and agents outlive it) — and the
dashboard `mistudio ui` serves (`dashboard_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import ray

from actors.manager import JobManager
from actors.progress import ProgressActor
from actors.worker import NAMESPACE
from core.errors import UserError
from storage import Settings
from storage.registry import masked_url


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: every socket stays bound until all are picked, so no port repeats
    (`ray start` refuses a port given to two components)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _free_port() -> int:
    return _free_ports(1)[0]


def _answers(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def head_file(settings: Settings) -> Path:
    return settings.home / "ray_head.json"


def _own_record(settings: Settings) -> dict | None:
    """The head recorded under the data root, unless the record came with a copy of another data
    root (a backup, a moved folder): that head serves the other root, and this one starts its own
    (and `mistudio stop` here leaves it alone). Records from before the root was noted are taken."""
    f = head_file(settings)
    if not f.exists():
        return None
    head = json.loads(f.read_text())
    return head if head.get("home", str(settings.home)) == str(settings.home) else None


def dashboard_file(settings: Settings) -> Path:
    """The `mistudio ui` process serving this data root's dashboard (pid and start time)."""
    return settings.home / "dashboard.json"


def ray_root(settings: Settings) -> Path:
    """Ray's temp dir for this data root's local heads: one per data root, and short, because
    Ray's socket paths under it must stay within 107 bytes."""
    digest = hashlib.sha1(str(settings.home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mistudio-ray-{digest}"


@contextlib.contextmanager
def head_lock(settings: Settings):
    """One process at a time looks for the local head and starts it when none answers (the
    dashboard's supervisor and a CLI call after a head died would otherwise start two)."""
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        f = open(settings.home / ".ray_head.lock", "a")
    except OSError as e:
        raise UserError(f"cannot write under the data root {settings.home} ({e.strerror}); "
                        "set MISTUDIO_HOME to a folder you can write") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_head(settings: Settings, start: bool = True) -> dict | None:
    """The local head recorded under the data root, started when none answers (and `start`)."""
    with head_lock(settings):
        return recorded_head(settings) or (start_head(settings) if start else None)


def recorded_head(settings: Settings) -> dict | None:
    """The local head recorded under the data root, if it still answers."""
    head = _own_record(settings)
    if head is not None and _answers(head["address"]):
        return head
    return None


def start_head(settings: Settings) -> dict:
    """Start a local Ray head with the dashboard (the Jobs API needs it) and record its address."""
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
             "metrics-export-port", "runtime-env-agent-port")
    port, dash, *others = _free_ports(2 + len(flags))
    # Every fixed default port (the job agent's 52365, the client server's 10001, ...) may be held
    # by another Ray on this machine; a clash leaves the head up but without a Jobs API.
    extra = [f"--{flag}={p}" for flag, p in zip(flags, others)]
    cmd = [ray_exe, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={ray_root(settings)}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", *extra, f"--num-cpus={os.cpu_count() or 1}", "--disable-usage-stats"]
    # `ray start` inherits RAY_AUTH_MODE from actors/__init__.py. The head and its clients authenticate with the token in ~/.ray/auth_token; make one once.
    subprocess.run([ray_exe, "get-auth-token", "--generate"], capture_output=True, check=False)
    protect_token()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"could not start a local Ray head: {proc.stderr.strip().splitlines()[-1:]}")
    head = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "home": str(settings.home)}
    settings.home.mkdir(parents=True, exist_ok=True)
    head_file(settings).write_text(json.dumps(head))
    return head


def protect_token() -> None:
    """Make Ray's auth token file readable by its owner only (Ray writes it 0644): whoever reads
    it may run code on the cluster."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        token.chmod(0o600)


def connect(settings: Settings, start: bool = True) -> None:
    """Attach this process to the deployment's Ray cluster and make sure the actors exist."""
    if not ray.is_initialized():
        quiet = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
        # Inside `ray job submit`, Ray names the cluster the job runs on in RAY_ADDRESS.
        address = settings.ray_address or os.environ.get("RAY_ADDRESS", "")
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        else:
            if not address:
                head = ensure_head(settings, start)
                if head is None:
                    raise UserError("no miStudio Ray cluster is running; start one with: mistudio demo (or mistudio ui)")
                address = head["address"]
            elif address != "auto" and not _answers(address.removeprefix("ray://")):
                raise UserError(f"the Ray cluster at {address} does not answer; check MISTUDIO_RAY_ADDRESS")
            ray.init(address=address, **quiet)
    ensure_actors(settings)


def ensure_actors(settings: Settings):
    """The named, detached ProgressActor and JobManager (created once, found afterwards)."""
    opts = {"namespace": NAMESPACE, "get_if_exists": True, "lifetime": "detached"}
    progress = ProgressActor.options(name="progress", **opts).remote()
    manager = JobManager.options(name="job_manager", **opts).remote(settings.to_env())
    theirs = ray.get(manager.database_url.remote())
    if theirs != settings.database_url:  # one cluster serves one registry
        raise UserError(f"the Ray cluster already serves the registry {masked_url(theirs)}, not "
                        f"{masked_url(settings.database_url)}; "
                        "use the same MISTUDIO_HOME / MISTUDIO_DATABASE_URL, or another cluster")
    return progress, manager


def stop_head(settings: Settings) -> bool:
    """Stop the dashboard `mistudio ui` serves for this data root, and every process of the local
    heads started for it (the recorded one and any a killed head left behind), and only those.

    `ray stop` would kill every Ray on the machine; instead end the processes that name this
    data root's Ray temp dir in their command line or their open files (gcs_server, raylet,
    autoscaler, log monitor, dashboard, the agents, which rename themselves, and a killed head's
    client server, which names only its dead GCS's address), or the recorded
    head's GCS port, with all their children (actor workers).
    """
    if ray.is_initialized():
        ray.shutdown()
    f, head = head_file(settings), _own_record(settings)
    # Not recorded_head(): a head that no longer answers (half shut down) must be ended too. A
    # record that came with a copy of another data root names that root's head: not ours to stop.
    port = head["address"].rpartition(":")[2] if head is not None else None
    f.unlink(missing_ok=True)  # first: the dashboard's supervisor takes this for "stopped", not "died"
    procs = _dashboard_processes(settings) + head_processes(settings, port)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may exit on its own meanwhile
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:  # gcs_server and the autoscaler can linger after SIGTERM
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    dashboard_file(settings).unlink(missing_ok=True)
    return bool(procs)


def head_processes(settings: Settings, port: str | None = None) -> list[psutil.Process]:
    """Every running process of this data root's local heads (see stop_head), children included."""
    root = str(ray_root(settings))
    mark = re.compile(rf"[:=]{port}(?![0-9])") if port else None  # gcs_server_port=P, --gcs-address=HOST:P
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == os.getpid():
            continue
        line = " ".join(p.info["cmdline"] or [])
        with contextlib.suppress(psutil.Error):
            if root in line or (mark and mark.search(line)) or \
                    ("ray" in line and any(o.path.startswith(root) for o in p.open_files())):
                found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid != os.getpid()})
    return list(found.values())


def _dashboard_processes(settings: Settings) -> list[psutil.Process]:
    """The `mistudio ui` process recorded for this data root and its Streamlit server."""
    f = dashboard_file(settings)
    try:
        rec = json.loads(f.read_text())
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["started"]) > 1:  # the pid was reused by another process
            return []
        return [proc, *proc.children(recursive=True)]
    except (OSError, ValueError, KeyError, psutil.Error):
        return []
