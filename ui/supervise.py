"""The dashboard outlives its Ray head: `mistudio ui` runs the Streamlit server as a child and
restarts it on a head that answers.

The Streamlit process holds a Ray driver attached to the local head. When that head dies, the
driver is left talking to a dead cluster (and Ray ends the process after a while), and reconnecting
a driver in place is not something Ray offers. So the `mistudio ui` process itself holds no Ray
connection and watches the head recorded under the data root: when it stops answering, or a new
head replaces it (a CLI call after the head was killed starts one), it makes sure a head runs
(starting one under the same lock a CLI call takes, so there are never two) and restarts the
Streamlit server, whose first page then attaches to that head. A Streamlit server that exits on
its own after having run a while is restarted the same way. When the head record disappears,
`mistudio stop` ran: the server is stopped too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from actors import cluster
from storage import Settings

POLL_S = 1.0
MIN_UPTIME_S = 15.0
"""A server that exits sooner than this after its start is not restarted (a port in use, a bad
flag): its error is the user's to see."""


def supervise(cmd: list[str], settings: Settings | None = None) -> int:
    """Run the Streamlit server `cmd` until it is stopped (Ctrl-C, SIGTERM, `mistudio stop`),
    restarting it whenever the local head is replaced; returns its last exit status."""
    settings = settings or Settings.from_env()
    _drop_ray()
    local = not settings.ray_address
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `mistudio stop`: the finally below ends the server
    _record(settings)
    proc = None
    try:
        while True:
            head = cluster.ensure_head(settings) if local else None
            proc, started = subprocess.Popen(cmd), time.monotonic()
            reason = _watch(proc, settings, head)
            if reason is None:
                return proc.returncode or 0
            if proc.poll() is not None and time.monotonic() - started < MIN_UPTIME_S:
                return proc.returncode
            print(f"restarting the dashboard: {reason}", flush=True)
            _end(proc)
    finally:
        if proc is not None:
            _end(proc)
        _unrecord(settings)


def _watch(proc: subprocess.Popen, settings: Settings, head: dict | None) -> str | None:
    """Wait until the server must restart (the reason) or stop (None)."""
    misses = 0
    while True:
        code = proc.poll()
        if code is not None:
            return None if code == 0 else f"the server exited with status {code}"
        if head is not None:
            f = cluster.head_file(settings)
            if not f.exists():
                return None  # `mistudio stop`
            now = cluster.recorded_head(settings)
            misses = misses + 1 if now is None else 0
            if now is not None and now["address"] != head["address"]:
                return f"the Ray head was replaced ({now['address']})"
            if misses >= 3:  # (not one slow answer)
                return f"the Ray head at {head['address']} stopped answering"
        time.sleep(POLL_S)


def _drop_ray() -> None:
    """This process keeps no Ray driver: a driver whose head dies takes its process with it."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _record(settings: Settings) -> None:
    """Where `mistudio stop` finds this process (and so its server): pid and start time."""
    me = psutil.Process(os.getpid())
    f = cluster.dashboard_file(settings)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
    tmp.replace(f)


def _unrecord(settings: Settings) -> None:
    f = cluster.dashboard_file(settings)
    try:
        if json.loads(f.read_text()).get("pid") == os.getpid():
            f.unlink()
    except (OSError, ValueError):
        pass
