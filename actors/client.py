"""The facade the dashboard and the CLI talk to.

Writes (submit, cancel) go to the JobManager; reads go straight to the registry and the
ProgressActor, so a restarted UI finds every job and its live numbers on its first poll.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import ray

from actors import cluster
from actors.catalogue import Catalogue
from core.errors import UserError
from core.features import FeaturePage, FeatureQuery
from core.features import store as features_store
from storage import Artifacts, Registry, Settings, access
from storage.registry import FINAL_STATES, IDLE_STATES, SAE, Activation, Dataset, Experiment, Job, Model, Template
from storage.registry import masked_url


class Client(Catalogue):
    def __init__(self, settings: Settings | None = None, start: bool = True, confined: bool = False):
        """`confined`: the dashboard's Client, acting for its users with the server's account:
        files are read only under the allowed roots and exports written only under the data
        root's exports/ folder (storage.access). The CLI's Client reads and writes any path."""
        self.settings = settings or Settings.from_env()
        self.settings.check_home()  # a read-only data root fails before Ray or the registry starts there
        self.confined = confined
        self.artifacts = Artifacts.of(self.settings)  # a bad MISTUDIO_ARTIFACT_ROOT fails before Ray starts
        # a corrupt or unreachable registry fails before Ray starts
        self.registry = Registry.of(self.settings, self.artifacts)
        cluster.connect(self.settings, start=start)
        self.progress_actor, self.manager = cluster.ensure_actors(self.settings)

    def local(self, path: str) -> str:
        """An artifact's local path, fetched from the artifact store first if this machine lacks it."""
        return str(self.artifacts.pull(path))

    # -- jobs ------------------------------------------------------------------------
    def submit(self, kind: str, spec: dict[str, Any], api_key: str | None = None, priority: int = 0) -> str:
        """Enqueue a job (a higher `priority` starts before lower ones); bad input raises
        UserError with a one-line reason.

        What a kind needs and never stores (an openai labeling's endpoint key, from `api_key` or
        this process's MISTUDIO_LABEL_API_KEY / OPENAI_API_KEY) comes from the kind's `secrets`
        hook and travels with the job in memory only."""
        from actors import jobs

        if self.confined and kind in jobs.names():
            spec = {**spec, **{f: access.source(str(spec[f]), self.settings)
                               for f in jobs.get(kind).server_paths if spec.get(f)}}
        hook = jobs.get(kind).secrets if kind in jobs.names() else None  # an unknown kind fails in submit
        secrets = hook(spec, api_key) if hook is not None else None
        return _get(self.manager.submit.remote(kind, spec, secrets, priority))["id"]

    def queue(self) -> list[dict[str, Any]]:
        """Queued jobs in the order they will start."""
        return self.registry.queue()

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        return _get(self.manager.set_priority.remote(job_id, priority))

    def pause(self, job_id: str) -> dict[str, Any]:
        """Ask a running training to save a checkpoint at its next chunk boundary and stop (state paused)."""
        return _get(self.manager.control.remote(job_id, "pause"))

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a paused training again; it continues from its checkpoint exactly as if never paused."""
        return _get(self.manager.control.remote(job_id, "resume"))

    def finalize(self, job_id: str) -> dict[str, Any]:
        """Ask a running training to stop at its next chunk boundary and save the SAEs as they are."""
        return _get(self.manager.control.remote(job_id, "finalize"))

    def retry(self, job_id: str, api_key: str | None = None) -> str:
        """Submit a finished job's spec again as a new job (validated afresh); returns its id."""
        job = self.job(job_id)
        if job["state"] not in FINAL_STATES:
            raise UserError(f"job {job_id} is still {job['state']}; cancel it first or wait for it to finish")
        return self.submit(job["kind"], job["spec"], api_key=api_key, priority=job.get("priority", 0))

    def set_label(self, sae_id: str, latent: int, name: str, category: str = "other", description: str = "") -> dict:
        """Write a feature's label by hand (source "user"); an empty name clears it."""
        return _get(self.manager.set_label.remote(sae_id, latent, name, category, description))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _get(self.manager.cancel.remote(job_id))

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.registry.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id!r}; list jobs with: mistudio jobs list")
        return job

    def jobs(self, state: str | None = None, model_id: str | None = None, kind: str | None = None
             ) -> list[dict[str, Any]]:
        return self.registry.jobs(state=state, model_id=model_id, kind=kind)

    def active_jobs(self) -> list[dict[str, Any]]:
        return self.registry.active_jobs()

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return ray.get(self.progress_actor.get.remote(job_id))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return ray.get(self.progress_actor.history.remote(job_id))

    def wait(self, job_id: str, on_progress: Callable[[dict, dict], None] | None = None,
             poll: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends (or pauses); `on_progress(job, progress)` is called at every poll."""
        start = time.monotonic()
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job, self.progress(job_id) or {})
            if job["state"] in IDLE_STATES:
                return job
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f}s")
            time.sleep(poll)

    # -- templates -------------------------------------------------------------------
    def save_template(self, kind: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
        return _get(self.manager.save_template.remote(kind, name, values))

    def delete_template(self, kind: str, name: str) -> bool:
        return _get(self.manager.delete_template.remote(kind, name))

    def templates(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self.registry.templates(kind)

    def template(self, kind: str, name: str) -> dict[str, Any]:
        row = self.registry.get(Template, (kind, name))
        if row is None:
            raise UserError(f"no {kind} template named {name!r}; list them with: mistudio templates list")
        return row

    def export_template(self, kind: str, name: str) -> str:
        from actors.specs import template_document

        return json.dumps(template_document(kind, name, self.template(kind, name)["values"]), indent=2)

    def import_template(self, text: str, where: str = "template file") -> dict[str, Any]:
        from actors.specs import read_template_document

        return self.save_template(*read_template_document(text, where))

    def worker_status(self) -> dict[str, Any] | None:
        return ray.get(self.manager.worker_status.remote())

    def workers_status(self) -> list[dict[str, Any]]:
        """Every started ModelWorker: name, device, busy job, models loaded."""
        return ray.get(self.manager.workers_status.remote())

    def system(self) -> list[dict[str, Any]]:
        """CPU, memory, disk (of the data root's filesystem) and GPUs of every Ray node."""
        from actors.monitor import cluster_stats

        return cluster_stats(str(self.settings.home))

    # -- registry reads ----------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        return self.registry.list(Model, order_by=Model.created_at)

    def datasets(self) -> list[dict[str, Any]]:
        return self.registry.list(Dataset, order_by=Dataset.created_at)

    def activations(self) -> list[dict[str, Any]]:
        return self.registry.list(Activation, order_by=Activation.created_at)

    def saes(self) -> list[dict[str, Any]]:
        """Registered SAEs, each with `settings`: its type's knobs in a few characters ("k=32")."""
        from core.sae import registry

        return [s | {"settings": registry.summarize(s["sae_config"])}
                for s in self.registry.list(SAE, order_by=SAE.created_at)]

    def get(self, table, key: str) -> dict[str, Any] | None:
        return self.registry.get(table, key)

    def features(self, sae_id: str, order_by: str = "frequency", limit: int | None = None,
                 min_frequency: float = 0.0, offset: int = 0, latents: list[int] | None = None) -> list[dict[str, Any]]:
        """An SAE's feature rows (all of them unless `limit` or `latents`: a listing shows a page,
        see `feature_page`)."""
        return self.registry.features(sae_id, order_by=order_by, limit=limit, min_frequency=min_frequency,
                                      offset=offset, latents=latents)

    def feature_page(self, sae_id: str, offset: int = 0, limit: int | None = None, order_by: str = "frequency",
                     min_frequency: float = 0.0, live_only: bool = False, min_max_act: float = 0.0,
                     labels: str = "all", search: str = "") -> FeaturePage:
        """One page of an SAE's latents (rows, and how many pass the filters), filtered, sorted and
        sliced by the registry: what a listing shows without loading every latent. `labels` is all,
        labeled, unlabeled or a label category; `search` finds a latent number or text in a label
        or top token."""
        return self.registry.feature_page(sae_id, FeatureQuery(
            order_by=order_by, offset=offset, limit=limit, min_frequency=min_frequency, live_only=live_only,
            min_max_act=min_max_act, labels=labels, search=search))

    def experiments(self, sae_id: str | None = None) -> list[dict[str, Any]]:
        where = {"sae_id": sae_id} if sae_id else {}
        return self.registry.list(Experiment, order_by=Experiment.created_at.desc(), **where)

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        row = self.registry.get(Experiment, experiment_id)
        if row is None:
            raise UserError(f"no steering experiment {experiment_id!r}; list them with: mistudio steer list")
        return row

    def examples(self, sae_id: str, latent: int) -> list[dict[str, Any]]:
        """The stored top contexts of one latent, read from Parquet by a filter (not the whole file)."""
        return features_store.read_examples(self.discovered(sae_id)["features_path"], latent)

    def latent_selection(self, text: str, sae: dict[str, Any]) -> list[int]:
        """Latents typed as "0-99,512" (blank: []), each checked against the SAE's width; UserError
        in one line otherwise."""
        from core.latents import check_latents, parse_latents

        return check_latents(parse_latents(text), int(sae.get("d_sae") or 0), f"SAE {sae['id']}")

    def feature_documents(self, sae_id: str, latents: list[int] | None = None) -> list[dict[str, Any]]:
        """Feature-page documents (core.export) of the given latents, else of every live latent."""
        from core.export import feature_documents

        sae = self.discovered(sae_id)
        if latents is not None:
            wanted = set(latents)
            rows = self.registry.features(sae_id, latents=wanted)
            missing = wanted - {r["latent"] for r in rows}
            if missing:
                raise UserError(f"latent {min(missing)} is out of range: {sae_id} has latents 0-{sae['d_sae'] - 1}")
        else:
            rows = self.registry.feature_page(sae_id, FeatureQuery(live_only=True)).rows
        return feature_documents(rows, sae["features_path"])

    def export_features(self, sae_id: str, fmt: str, out: str, latents: list[int] | None = None,
                        overwrite: bool = False) -> str:
        """Write a Neuronpedia batch folder or a dashboard bundle (.zip); returns the path. An
        existing file or non-empty folder at `out` is replaced only with `overwrite`."""
        from core import export
        from core.hooks import parse_hook_name
        from core.io import check_new

        out = str(check_new(self._export_path(out), overwrite))
        if fmt not in ("neuronpedia", "bundle"):
            raise UserError(f"export format {fmt!r} is not one of neuronpedia, bundle")
        sae = self.discovered(sae_id)
        docs = self.feature_documents(sae_id, latents)
        if fmt == "neuronpedia":
            layer = parse_hook_name(sae["hook_name"])[0]
            export.write_neuronpedia(docs, out, sae["model_id"] or "", layer, sae["name"])
        else:
            meta = {k: sae[k] for k in ("id", "name", "model_id", "hook_name", "architecture", "d_in", "d_sae", "sae_config",
                                        "metrics")}
            export.write_bundle(docs, out, {"sae": meta})
        return out

    def export_sae(self, sae_id: str, out: str, overwrite: bool = False) -> str:
        """The SAE as a SAELens folder at `out` (what SAELens's own loader reads), written
        atomically; an existing file or non-empty folder there is replaced only with `overwrite`."""
        from core.io import atomic_dir, check_new

        out = str(check_new(self._export_path(out), overwrite))
        sae = self.get(SAE, sae_id)
        if sae is None:
            raise UserError(f"no SAE {sae_id!r}; list them with: mistudio saes list")
        with atomic_dir(out) as tmp:
            for f in Path(self.local(sae["path"])).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        return str(Path(out).resolve())

    def delete(self, kind: str, object_id: str) -> list[str]:
        """Delete a model, dataset, activation set or SAE (`kind`: model, dataset, activation,
        sae) with its files under the data root; refused while an unfinished job uses it or
        other objects need it (storage.deletion). Returns the paths removed."""
        from storage import deletion

        return deletion.delete(self.registry, self.settings.home, kind, object_id, self.artifacts.store)

    def server_path(self, path: str) -> str:
        """A file or folder on the server that this Client may read: resolved and checked
        against the allowed roots when confined (the dashboard), as given otherwise."""
        return access.readable(path, self.settings) if self.confined else path

    def masked(self, url: str) -> str:
        """A URL (database, object store, endpoint) with any password hidden, for showing."""
        return masked_url(url) if url else url

    def server_label_endpoint(self) -> str:
        """The labeling endpoint the server's MISTUDIO_LABEL_API_KEY is bound to ("" when none)."""
        from core.interp import BASE_URL_ENV

        return os.environ.get(BASE_URL_ENV, "").strip()

    def check_label_endpoint(self, base_url: str) -> None:
        """UserError unless `base_url` is an http(s) URL (what a labeling job accepts)."""
        from core.interp import check_url

        check_url(base_url)

    def readable_roots(self) -> list[str]:
        """The folders the dashboard may read files from (storage.access.allowed_roots)."""
        return [str(r) for r in access.allowed_roots(self.settings)]

    def export_folder(self) -> str:
        """Where the dashboard writes exports: the data root's exports/ folder."""
        return str(access.export_folder(self.settings))

    def _export_path(self, out: str) -> str:
        return access.writable(out, self.settings) if self.confined else out

    def discovered(self, sae_id: str) -> dict[str, Any]:
        """The SAE's row once discovery ran (its features folder fetched to this machine)."""
        sae = self.registry.get(SAE, sae_id)
        if sae is None:
            raise UserError(f"no SAE {sae_id!r}; list them with: mistudio saes list")
        if not sae.get("features_path"):
            raise UserError(f"SAE {sae_id!r} has no discovered features; run: mistudio discover run --sae {sae_id}")
        self.local(sae["features_path"])
        return sae

    def model(self, model_id: str) -> dict[str, Any] | None:
        """A registered model's row, or None when it is not (or no longer) registered."""
        return self.registry.get(Model, model_id)

    def masked_database_url(self) -> str:
        """The registry's database URL with any password hidden, for showing."""
        return masked_url(self.settings.database_url)

    def save_upload(self, name: str, data: bytes) -> str:
        """An uploaded text file saved under `<data root>/uploads/<content hash>/<its name>` (written
        atomically; the same content is saved once); returns its path, a source for add_dataset."""
        from core.data import FILE_TYPES
        from core.io import atomic_file

        name = Path(name).name
        if Path(name).suffix.lower() not in FILE_TYPES:
            raise UserError(f"{name} is not one of {', '.join(FILE_TYPES)}; upload a text file of one of those types")
        dest = Path(self.settings.home) / "uploads" / hashlib.sha256(data).hexdigest()[:12] / name
        if not dest.is_file():
            with atomic_file(dest) as tmp:
                tmp.write_bytes(data)
        return str(dest)

    def dataset_row_lengths(self, dataset_id: str):
        """core.data.RowLengths of a tokenized dataset: every row's tokens and source document."""
        from core.data import row_lengths

        return row_lengths(self.local(self._dataset(dataset_id)["path"]))

    def dataset_rows(self, dataset_id: str, row_ids: list[int]) -> dict[int, Any]:
        """The token ids (numpy arrays) of the given rows of a tokenized dataset, by row id."""
        from core.data import read_rows

        return read_rows(self.local(self._dataset(dataset_id)["path"]), row_ids)

    def checkpoints(self, job_id: str) -> list[Path]:
        """A training job's checkpoint files, oldest first, fetched from the artifact store; [] when none."""
        from core.train import checkpoints

        folder = self.artifacts.pull(self.artifacts.checkpoints(job_id))
        return checkpoints(folder) if folder.is_dir() else []

    def _dataset(self, dataset_id: str) -> dict[str, Any]:
        ds = self.registry.get(Dataset, dataset_id)
        if ds is None:
            raise UserError(f"no dataset {dataset_id!r}; list them with: mistudio datasets list")
        return ds


def _get(ref):
    """ray.get that re-raises the JobManager's UserError as itself (one line, no Ray wrapper)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise UserError(str(e.cause)) from None
        raise
