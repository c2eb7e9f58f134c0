"""Where miStudio keeps its state, read from the environment once per process.

Every process of a deployment (CLI, dashboard, Ray workers) must agree on these, so they
come from environment variables that Ray passes on to the actors it starts
(`Settings.to_env`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from core.errors import UserError


@dataclass(frozen=True)
class Settings:
    home: Path
    """Data root: registry database (SQLite), models, datasets, activations, SAEs, features."""
    database_url: str
    """SQLAlchemy URL; SQLite under `home` unless MISTUDIO_DATABASE_URL is set."""
    ray_address: str
    """Ray cluster to attach to; empty means the local head recorded under `home` (started on demand)."""
    num_gpus: float = 0.0
    """GPUs per ModelWorker (0 on CPU)."""
    worker_cpus: int = 0
    """CPU cores per ModelWorker; 0 means all cores of the machine (Ray otherwise gives torch 1 thread)."""
    workers: int = 1
    """ModelWorkers, each holding its own models (one per GPU on a GPU machine)."""
    worker_gpus: str = ""
    """Explicit GPU per worker, ";"-separated CUDA device lists ("0;1": worker 0 on GPU 0, worker
    1 on GPU 1); empty lets Ray assign `num_gpus` per worker."""
    worker_resources: str = ""
    """Ray custom resources each ModelWorker requires, as JSON ({"gpu_node": 1}): places the
    workers on the nodes started with that resource (ray start --resources ...)."""
    worker_models: int = 2
    """Models a worker keeps loaded; loading one more evicts the least recently used."""
    job_retries: int = 1
    """Times a job whose model worker died is run again on a fresh worker (training from its
    last checkpoint); 0 fails it at once."""
    artifact_root: str = ""
    """An object-store URI (s3://bucket/prefix, gs://..., file://...) that holds every finished
    artifact; `home` is then this node's working copy (storage.store). Empty: `home` alone."""
    allowed_roots: str = ""
    """Folders (separated by ":") whose files the dashboard may read (datasets, models and SAEs
    from a server path); empty: the data root's imports/ folder and the corpora that ship with
    Python. The CLI reads any path its user gives."""
    job_stall_s: float = 1200.0
    """Seconds a running job (not one still loading its model) may go without a progress report
    before its worker is taken for hung, killed and the job retried like after a worker death;
    0 never does."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = Path(env.get("MISTUDIO_HOME") or "mistudio_data").expanduser().resolve()
        url = env.get("MISTUDIO_DATABASE_URL") or f"sqlite:///{home / 'registry.db'}"
        return cls(
            home=home,
            database_url=url,
            ray_address=env.get("MISTUDIO_RAY_ADDRESS", ""),
            num_gpus=_number(env, "MISTUDIO_NUM_GPUS", 0, float),
            worker_cpus=_number(env, "MISTUDIO_WORKER_CPUS", 0, int),
            workers=max(1, _number(env, "MISTUDIO_WORKERS", 1, int)),
            worker_gpus=env.get("MISTUDIO_WORKER_GPUS", ""),
            worker_resources=_resources(env.get("MISTUDIO_WORKER_RESOURCES", "")),
            worker_models=max(1, _number(env, "MISTUDIO_WORKER_MODELS", 2, int)),
            job_retries=_number(env, "MISTUDIO_JOB_RETRIES", 1, int),
            job_stall_s=_number(env, "MISTUDIO_JOB_STALL_S", 1200, float),
            artifact_root=env.get("MISTUDIO_ARTIFACT_ROOT", "").strip(),
            allowed_roots=env.get("MISTUDIO_ALLOWED_ROOTS", ""),
        )

    def check_home(self) -> None:
        """The data root exists (made if missing) and can be written: a read-only one is refused
        in one line before anything (a Ray head, a registry) starts there."""
        probe = self.home / f".write-check-{os.getpid()}"
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"the data root {self.home} is not writable ({e.strerror}); set MISTUDIO_HOME "
                            "to a folder you can write, or make this one writable") from None

    @property
    def cpus_per_worker(self) -> int:
        return self.worker_cpus or (os.cpu_count() or 1)

    def to_env(self) -> dict[str, str]:
        d = asdict(self)
        return {
            "MISTUDIO_HOME": str(d["home"]),
            "MISTUDIO_DATABASE_URL": d["database_url"],
            "MISTUDIO_RAY_ADDRESS": d["ray_address"],
            "MISTUDIO_NUM_GPUS": str(d["num_gpus"]),
            "MISTUDIO_WORKER_CPUS": str(d["worker_cpus"]),
            "MISTUDIO_WORKERS": str(d["workers"]),
            "MISTUDIO_WORKER_GPUS": d["worker_gpus"],
            "MISTUDIO_WORKER_RESOURCES": d["worker_resources"],
            "MISTUDIO_WORKER_MODELS": str(d["worker_models"]),
            "MISTUDIO_JOB_RETRIES": str(d["job_retries"]),
            "MISTUDIO_JOB_STALL_S": str(d["job_stall_s"]),
            "MISTUDIO_ARTIFACT_ROOT": d["artifact_root"],
            "MISTUDIO_ALLOWED_ROOTS": d["allowed_roots"],
        }


def _number(env: Mapping[str, str], name: str, default, kind: type):
    """A numeric setting, or a one-line error naming it (MISTUDIO_WORKERS=abc)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not {'a whole number' if kind is int else 'a number'}; "
                        f"fix or unset it (default {default})") from None


def _resources(text: str) -> str:
    """MISTUDIO_WORKER_RESOURCES checked: a JSON object of resource name → amount."""
    if not text.strip():
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                              and not isinstance(v, bool) and v > 0 for k, v in value.items()):
        from core.errors import UserError

        raise UserError(f"MISTUDIO_WORKER_RESOURCES={text!r} is not a JSON object of resource amounts; "
                        'write it like {"gpu_node": 1}')
    return text
