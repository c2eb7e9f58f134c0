"""JobManager: the queue, every job's lifecycle, and the one writer of the registry.

`submit` validates a spec, persists the job as `queued` and shows 0% at once; a dispatcher
thread hands jobs to the ModelWorker in order, one step at a time, and records each state
change (`queued → loading → running → saving → completed | failed | cancelled`) and each
step's outputs (activations, SAEs, features) in the registry.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from actors import specs
from actors.worker import NAMESPACE, ModelWorker, plan_outputs
from core import hooks, models, pipeline
from core.errors import Cancelled, Paused, UserError
from core.features import store as features_store
from core.features.schema import REGISTRY_COLUMNS
from core.io import sweep_tmp
from core.train import checkpoints
from storage import Artifacts, Registry, Settings
from storage.registry import SAE, Activation, Dataset, Experiment, Job, Model, Template, new_id


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "item"


def disk_full_message(e: OSError, home, job_id: str) -> str:
    """One line for a job that ran out of disk: what was being written and how to go on. (Every
    output is written to a temporary path and renamed, so nothing partial is left behind.)"""
    where = f" writing {e.filename}" if e.filename else ""
    return f"the disk is full{where}; free space under {home} and retry: mistudio jobs retry {job_id}"


class _Slot:
    """One ModelWorker as the dispatcher sees it."""

    def __init__(self, index: int):
        self.index = index
        self.name = "model_worker" if index == 0 else f"model_worker-{index}"
        self.actor = None
        self.job: str | None = None
        self.models: set[str] = set()
        self.since = 0.0  # when the job's current step started or last changed state (a heartbeat)
        self.running = False  # the job is in state "running" (loading a model reports no progress)
        self.stalled = ""  # why the watchdog killed this worker, if it did


@ray.remote(num_cpus=0, max_concurrency=16)
class JobManager:
    def __init__(self, settings_env: dict[str, str]):
        self.settings_env = settings_env
        self.settings = Settings.from_env(settings_env)
        self.registry = Registry(self.settings.database_url)
        self.artifacts = Artifacts.of(self.settings)
        self.progress = ray.get_actor("progress", namespace=NAMESPACE)
        self._wake = threading.Event()  # set when a job is queued or reordered
        # one slot per ModelWorker: its actor (started on first use), the job it runs, the models
        # it has loaded (so a job goes where its model already is)
        self._slots = [_Slot(i) for i in range(self.settings.workers)]
        self._slot_of: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._secrets: dict[str, dict[str, str]] = {}
        self._attempts: dict[str, int] = {}  # job → retries used after worker deaths
        self._outputs: dict[str, set[str]] = {}  # job → paths its steps write (swept if a worker dies)
        # Queued jobs simply wait in the registry for this manager; ones a previous manager had
        # started are not followed any more: say so instead of leaving them "running" forever.
        for job in self.registry.active_jobs():
            if job["state"] != "queued":
                self.registry.set_job_state(job["id"], "failed", message="interrupted: the job manager restarted; "
                                            f"retry it with: mistudio jobs retry {job['id']}")
                self.progress.cancel.remote(job["id"])  # a worker still running it stops at its next batch
        threading.Thread(target=self._dispatch, daemon=True, name="dispatcher").start()
        if self.settings.job_stall_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        self._wake.set()

    # -- API -----------------------------------------------------------------------
    def submit(self, kind: str, values: dict[str, Any], secrets: dict[str, str] | None = None,
               priority: int = 0) -> dict[str, Any]:
        """Validate and enqueue; raises UserError (also recorded as a failed job) on bad input.
        Higher `priority` starts first.

        `secrets` (an endpoint's API key) stay in this actor's memory for the job's run and are
        never written to the registry."""
        spec = specs.parse_spec(kind, values)
        refs = {k: getattr(spec, k) for k in ("model_id", "dataset_id", "sae_id") if hasattr(spec, k)}
        job = self.registry.create_job(kind, specs.to_dict(spec), priority=int(priority), **refs)
        try:
            self._validate(kind, spec)
        except UserError as e:
            self.registry.set_job_state(job["id"], "failed", message=str(e))
            raise
        self.progress.report.remote(job["id"], {"phase": "queued", "done": 0, "fraction": 0.0,
                                                "message": "queued, waiting for a worker"})
        if secrets:
            self._secrets[job["id"]] = dict(secrets)
        self._wake.set()
        return job

    def set_state(self, job_id: str, state: str, message: str = "") -> None:
        slot = self._slot_of.get(job_id)
        if slot is not None:  # a worker saying "loading" or "running" is alive and not stuck
            slot.since, slot.running = time.time(), state == "running"
        values = {"message": message} if message else {}
        self.registry.set_job_state(job_id, state, **values)

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.registry.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id!r}; list jobs with: mistudio jobs list")
        ray.get(self.progress.cancel.remote(job_id))
        if job["state"] == "queued":  # never started: cancelled at once
            self._forget(job_id, "cancelled")
            return self.registry.set_job_state(job_id, "cancelled", message="cancelled before it started")
        if job["state"] == "paused":  # nothing runs: its checkpoint stays on disk
            return self.registry.set_job_state(job_id, "cancelled", message="cancelled while paused")
        return job

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """Reorder the queue: a queued job with a higher priority starts before lower ones."""
        job = self._need(Job, job_id, "job", "list jobs with: mistudio jobs list")
        if job["state"] != "queued":
            raise UserError(f"job {job_id} is {job['state']}; only a queued job can be reordered")
        job = self.registry.update(Job, job_id, priority=int(priority))
        self._wake.set()
        return job

    def control(self, job_id: str, what: str) -> dict[str, Any]:
        """Pause or finalize a running training (at its next chunk boundary), or resume a paused
        one from its checkpoint under the same job id."""
        job = self._need(Job, job_id, "job", "list jobs with: mistudio jobs list")
        if job["kind"] != "train":
            raise UserError(f"job {job_id} is a {job['kind']} job; only train jobs pause, resume and finalize "
                            "(cancel stops any job)")
        if what == "resume":
            if job["state"] != "paused":
                raise UserError(f"job {job_id} is {job['state']}, not paused; there is nothing to resume")
            ray.get(self.progress.clear.remote(job_id))
            return self._requeue(job, "queued to resume from its checkpoint", resume=True)
        if what not in ("pause", "finalize"):
            raise UserError(f"unknown request {what!r}; use pause, resume or finalize")
        if job["state"] not in ("loading", "running"):
            raise UserError(f"job {job_id} is {job['state']}; only a running training can {what}")
        ray.get(self.progress.request.remote(job_id, what))
        return job

    def save_template(self, kind: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a template (the manager is the registry's one writer)."""
        if not name.strip():
            raise UserError("a template needs a name")
        specs.check_template(kind, values)
        return self.registry.add(Template(kind=kind, name=name.strip(), values=values))

    def delete_template(self, kind: str, name: str) -> bool:
        return self.registry.delete(Template, kind, name)

    def database_url(self) -> str:
        return self.settings.database_url

    def worker_status(self) -> dict[str, Any] | None:
        """The first worker's status (None before it has started)."""
        return (self.workers_status() or [None])[0]

    def workers_status(self) -> list[dict[str, Any]]:
        """Every started worker's status: device, busy job, models loaded."""
        return [dict(ray.get(s.actor.status.remote()), name=s.name) for s in self._slots if s.actor is not None]

    # -- validation ------------------------------------------------------------------
    def _need(self, table, key: str, what: str, hint: str) -> dict[str, Any]:
        row = self.registry.get(table, key)
        if row is None:
            raise UserError(f"{what} {key!r} is not registered; {hint}")
        return row

    def _validate(self, kind: str, spec) -> None:
        if kind == "add_model" and spec.source != "embedded" and spec.source.endswith(".gguf") \
                and not Path(spec.source).expanduser().exists():
            raise UserError(f"model file {spec.source} does not exist; check the path")
        if kind == "add_dataset":
            self._need(Model, spec.model_id, "model", "add it first with: mistudio models add")
        if kind == "import_sae":
            self._need(Model, spec.model_id, "model", "add it first with: mistudio models add")
            if spec.hook_name:
                hooks.parse_hook_name(spec.hook_name)
        if kind in ("extract", "pipeline"):
            model = self._need(Model, spec.model_id, "model", "add it first with: mistudio models add")
            self._need(Dataset, spec.dataset_id, "dataset", "add it first with: mistudio datasets add")
            layers = spec.layers if kind == "extract" else [spec.layer]
            for layer in layers:
                if not 0 <= layer < model["n_layers"]:
                    raise UserError(f"layer {layer} is out of range: {model['id']} has {model['n_layers']} "
                                    f"layers (0-{model['n_layers'] - 1}); pick a layer within it")
            if spec.site not in hooks.SITES:
                raise UserError(f"unknown hook site {spec.site!r}; choose one of {', '.join(hooks.SITES)}")
            if kind == "pipeline":
                specs.train_config(spec.train).resolved(model["d_model"])
        if kind == "train":
            self._train_inputs(spec)
        if kind == "discover":
            for sae_id in spec.all_sae_ids:
                sae = self._need(SAE, sae_id, "SAE", "list them with: mistudio train list")
                if not sae["model_id"]:
                    raise UserError(f"SAE {sae_id} is not tied to a registered model; import it with --model")
            self._need(Dataset, spec.dataset_id, "dataset", "add it first with: mistudio datasets add")
        if kind == "pipeline":
            specs.discover_config(spec.top_k)
        if kind in ("analyze", "label"):
            sae = self._need(SAE, spec.sae_id, "SAE", "list them with: mistudio train list")
            if not sae["features_path"] or not sae["model_id"]:
                raise UserError(f"SAE {spec.sae_id} has no discovered features yet; run: mistudio discover run "
                                f"--sae {spec.sae_id} --dataset <dataset-id>")
            if kind == "label" and spec.method == "local" and spec.model_id:
                self._need(Model, spec.model_id, "model", "add it first with: mistudio models add")
            if kind == "label" and spec.template:
                self._need(Template, (specs.LABEL_PROMPT, spec.template), "label prompt template",
                           "list them with: mistudio templates list --kind label_prompt")
        if kind == "steer":
            sae = self._need(SAE, spec.sae_id, "SAE", "list them with: mistudio train list")
            if not sae["model_id"]:
                raise UserError(f"SAE {spec.sae_id} is not tied to a registered model; import it with --model")
            if spec.prompt_template:
                self._need(Template, (specs.PROMPT_SETS, spec.prompt_template), "steering prompt template",
                           "list them with: mistudio templates list --kind steering_prompts")
            elif not spec.prompts:
                raise UserError("give at least one prompt (prompts or prompt_template)")

    def _train_inputs(self, spec: specs.TrainSpec) -> dict[str, Any]:
        """Model, datasets (in order) and {hook: d_in, [activation rows per dataset]} of a train spec."""
        if spec.activation_ids:
            acts = [self._need(Activation, a, "activation set", "list them with: mistudio extract list")
                    for a in spec.activation_ids]
            model_ids = {a["model_id"] for a in acts}
            if len(model_ids) != 1:
                raise UserError(f"the activation sets come from different models ({', '.join(sorted(model_ids))}); "
                                "train on one model's activations")
            dataset_ids = list(dict.fromkeys(a["dataset_id"] for a in acts))
            by_hook: dict[str, dict[str, dict]] = {}
            for a in acts:
                by_hook.setdefault(a["hook_name"], {})[a["dataset_id"]] = a
            for hook, sets in by_hook.items():
                if list(sets) != dataset_ids:
                    raise UserError(f"{hook} lacks activations for some of the datasets {', '.join(dataset_ids)} "
                                    "(or lists them in another order); give one activation set per hook and dataset")
            model = self.registry.get(Model, model_ids.pop())
            d_ins = {h: next(iter(sets.values()))["d_model"] for h, sets in by_hook.items()}
        else:
            model = self._need(Model, spec.model_id, "model", "add it first with: mistudio models add")
            dataset_ids = spec.dataset_ids
            for d in dataset_ids:
                self._need(Dataset, d, "dataset", "add it first with: mistudio datasets add")
            for name in spec.hook_names:
                layer, _ = hooks.parse_hook_name(name)
                if layer >= model["n_layers"]:
                    raise UserError(f"layer {layer} is out of range: {model['id']} has {model['n_layers']} "
                                    f"layers (0-{model['n_layers'] - 1}); pick a layer within it")
            by_hook, d_ins = {}, {h: model["d_model"] for h in spec.hook_names}
        for cfg in specs.train_variants(spec):
            for d_in in d_ins.values():
                cfg.resolved(d_in)
        return {"model": model, "datasets": [self.registry.get(Dataset, d) for d in dataset_ids],
                "by_hook": by_hook, "d_ins": d_ins}

    # -- dispatch --------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start queued jobs, highest priority first (then oldest), whenever a worker is free:
        the registry's queue is the one truth, so a reordering or a cancel before a job starts
        just changes what `queue()` returns next. A job goes to a free worker that already has
        its model loaded when there is one."""
        while True:
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            while True:
                with self._lock:
                    free = [s for s in self._slots if s.job is None]
                    queued = self.registry.queue() if free else []
                    if not queued:
                        break
                    job = queued[0]
                    slot = next((s for s in free if job.get("model_id") in s.models), free[0])
                    started = self.registry.set_job_state(job["id"], "loading", message=f"starting on {slot.name}")
                    if started["state"] != "loading":  # cancelled in the meantime
                        continue
                    slot.job, slot.running = job["id"], False
                    self._slot_of[job["id"]] = slot
                threading.Thread(target=self._run_on, args=(job, slot), daemon=True, name=job["id"]).start()

    def _run_on(self, job: dict[str, Any], slot: "_Slot") -> None:
        try:
            self._run(job)
        finally:
            with self._lock:
                slot.job = None
                if job.get("model_id"):
                    slot.models.add(job["model_id"])
                self._slot_of.pop(job["id"], None)
            self._wake.set()

    def _run(self, job: dict[str, Any]) -> None:
        job_id, kind = job["id"], job["kind"]
        spec = specs.parse_spec(kind, job["spec"])
        try:
            result = getattr(self, f"_job_{kind}")(job_id, spec)
        except Exception as e:  # noqa: BLE001 - every failure must land in the job record
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, Cancelled):
                state, message = "cancelled", "cancelled by request"
            elif isinstance(cause, Paused):
                state, message = "paused", str(cause)
            elif isinstance(cause, UserError):
                state, message = "failed", str(cause)
            elif isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                state, message = "failed", disk_full_message(cause, self.settings.home, job_id)
            elif isinstance(e, ray.exceptions.ActorDiedError) and not isinstance(e, ray.exceptions.RayTaskError):
                # (a RayTaskError is the worker reporting some other actor's death, not its own)
                slot = self._slot_of[job_id]
                reason = slot.stalled or "the model worker died"
                slot.actor, slot.models, slot.stalled = None, set(), ""  # the next step starts a fresh one
                for path in self._outputs.pop(job_id, ()):  # what the dead worker was writing
                    sweep_tmp(path)
                if self._requeue_after_worker_death(job, reason):
                    return
                state, message = "failed", f"{reason} and no retries are left; retry it with: " \
                                           f"mistudio jobs retry {job_id}"
            else:
                state, message = "failed", f"{type(cause).__name__}: {cause}"
                traceback.print_exc()
            self._forget(job_id, state)
            self.registry.set_job_state(job_id, state, message=message.splitlines()[0] if message else state)
            self._report_where_it_stopped(job_id, state, message)
            return
        self._forget(job_id, "completed")
        # a job that completed with something to say (a batch with failures) keeps it as its message
        self.registry.set_job_state(job_id, "completed", message=result.get("note", "completed"), result=result)
        self.progress.report.remote(job_id, {"phase": "completed", "fraction": 1.0, "message": "completed"})

    def _forget(self, job_id: str, state: str) -> None:
        """Drop what this actor kept for a job that will not run again (a paused one will)."""
        self._outputs.pop(job_id, None)
        if state != "paused":
            self._secrets.pop(job_id, None)
            self._attempts.pop(job_id, None)

    def _report_where_it_stopped(self, job_id: str, phase: str, message: str) -> None:
        """The job's new phase, keeping its bar where it stopped (a paused bar keeps its fraction)."""
        last = ray.get(self.progress.get.remote(job_id)) or {}
        keep = {k: last[k] for k in ("fraction", "done", "total", "unit", "step") if k in last}
        self.progress.report.remote(job_id, {**keep, "phase": phase, "message": message})

    def _requeue(self, job: dict[str, Any], message: str, resume: bool) -> dict[str, Any]:
        """Queue a job again under its own id; with `resume`, a training continues from its own
        newest checkpoint (exactly as if it had never stopped)."""
        if resume:
            self.registry.update(Job, job["id"], spec={**job["spec"], "resume_job": job["id"]})
        job = self.registry.set_job_state(job["id"], "queued", message=message)
        self._report_where_it_stopped(job["id"], "queued", message)
        self._wake.set()
        return job

    def _requeue_after_worker_death(self, job: dict[str, Any], reason: str) -> bool:
        """Ray reported the worker dead (its health checks, within seconds) or the watchdog
        killed a hung one: queue the job again while retries are left. A training continues from
        its newest checkpoint, anything else starts over (outputs are written atomically and the
        dead writer's temporary files were swept, so nothing partial exists); a pipeline keeps
        the stages it finished."""
        job_id = job["id"]
        attempt = self._attempts.get(job_id, 0) + 1
        if attempt > self.settings.job_retries:
            return False
        self._attempts[job_id] = attempt
        resumed = job["kind"] == "train" and self._has_checkpoint(job_id)
        self._requeue(job, f"{reason}; retry {attempt} of {self.settings.job_retries} on a fresh worker"
                      + (", from the newest checkpoint" if resumed else ""), resume=resumed)
        return True

    def _has_checkpoint(self, job_id: str) -> bool:
        return bool(checkpoints(self.artifacts.pull(self.artifacts.checkpoints(job_id))))

    def _watch(self) -> None:
        """Heartbeat check for workers that are alive (so Ray's health checks pass) but stuck: a
        job in state "running" that has sent no progress report and changed no state for
        `job_stall_s` gets its worker killed, and then goes the way of a worker death. (Loading
        a model, which can take long and reports nothing, is not watched.)"""
        stall = self.settings.job_stall_s
        while True:
            time.sleep(min(5.0, stall / 4))
            with self._lock:
                busy = {s.job: s for s in self._slots if s.job and s.running and s.actor is not None}
            if not busy:
                continue
            latest = ray.get(self.progress.get_many.remote(list(busy)))
            now = time.time()
            for job_id, slot in busy.items():
                heard = max(latest.get(job_id, {}).get("t", 0.0), slot.since)
                with self._lock:  # still that job's worker (it may have just finished)
                    if now - heard > stall and slot.job == job_id and slot.actor is not None:
                        slot.stalled = f"the model worker sent no progress for {stall:g} s and was stopped as hung"
                        ray.kill(slot.actor, no_restart=True)

    def _call(self, job_id: str, step: str, plan: dict[str, Any]) -> dict[str, Any]:
        slot = self._slot_of[job_id]
        if slot.actor is not None:
            try:
                ray.get(slot.actor.status.remote())
            except ray.exceptions.ActorDiedError:  # died while idle (killed, out of memory): no retry is spent
                slot.actor, slot.models = None, set()
        if slot.actor is None:
            slot.actor = self._start_worker(slot)
        slot.since = time.time()
        self._outputs.setdefault(job_id, set()).update(_written_by(plan))
        self.registry.update(Job, job_id, step=step)
        model = self.registry.get(Model, plan["model_id"]) if "model_id" in plan else None
        if model is not None:  # every job loads a model the way it was registered
            plan = {**plan, "model_dtype": model["dtype"], "quantization": model["quantization"]}
        return ray.get(slot.actor.run.remote(job_id, step, plan))

    def _start_worker(self, slot: "_Slot"):
        """The slot's ModelWorker (found by name if it outlived a previous manager), on the GPU
        MISTUDIO_WORKER_GPUS gives it, if any."""
        gpus = [g.strip() for g in self.settings.worker_gpus.split(";")] if self.settings.worker_gpus else []
        env = dict(self.settings_env)
        options: dict[str, Any] = {"num_gpus": self.settings.num_gpus}
        if slot.index < len(gpus):  # pinned explicitly: Ray must not hand out GPUs itself
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot.index]
            options = {"num_gpus": 0, "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": gpus[slot.index]}}}
        if self.settings.worker_resources:
            options["resources"] = json.loads(self.settings.worker_resources)
        return ModelWorker.options(name=slot.name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                                   num_cpus=self.settings.cpus_per_worker, **options).remote(env)

    # -- job kinds: each builds step plans with paths and records the outputs --------------
    def _job_add_model(self, job_id: str, spec: specs.AddModelSpec) -> dict[str, Any]:
        if spec.name:
            name = spec.name
        elif spec.source == "embedded":
            name = models.EMBEDDED_MODEL_NAME
        else:  # a folder or file is named after itself, a hub id stays as written
            name = Path(spec.source).stem if Path(spec.source).exists() else spec.source
        model_id = slug(name)
        out = self.artifacts.model(model_id)
        info = self._call(job_id, "add_model", {"model_id": model_id, "source": spec.source, "out_dir": str(out),
                                                "dtype": spec.dtype, "quantization": spec.quantization,
                                                "trust_remote_code": spec.trust_remote_code})
        self.registry.add(Model(id=model_id, name=name, source=spec.source, **info))
        self.registry.update(Job, job_id, model_id=model_id)
        return {"model_id": model_id}

    def _job_add_dataset(self, job_id: str, spec: specs.AddDatasetSpec) -> dict[str, Any]:
        model = self.registry.get(Model, spec.model_id)
        name = spec.name or (Path(spec.source).stem if spec.source != "builtin" else "stdlib-docs")
        dataset_id = new_id(slug(name))
        out = self.artifacts.dataset(dataset_id)
        stats = self._call(job_id, "add_dataset", {
            "model_id": spec.model_id, "model_path": model["path"], "source": spec.source, "out_dir": str(out),
            "text_column": spec.text_column, "context_length": spec.context_length,
            "max_documents": spec.max_documents})
        self.registry.add(Dataset(id=dataset_id, name=name, source=spec.source, text_column=spec.text_column,
                                  model_id=spec.model_id, context_length=spec.context_length, path=str(out),
                                  documents=stats["documents"], rows=stats["rows"], tokens=stats["tokens"],
                                  stats=stats))
        self.registry.update(Job, job_id, dataset_id=dataset_id)
        return {"dataset_id": dataset_id, **{k: stats[k] for k in ("documents", "rows", "tokens")}}

    def _job_import_sae(self, job_id: str, spec: specs.ImportSAESpec) -> dict[str, Any]:
        model = self.registry.get(Model, spec.model_id)
        work = self.artifacts.home / "imports" / job_id
        try:
            found = self._call(job_id, "import_sae", {
                "source": spec.source, "workdir": str(work), "model_id": model["id"], "model_name": model["name"],
                "d_model": model["d_model"], "n_layers": model["n_layers"], "hook_name": spec.hook_name,
                "format": spec.format})["saes"]
            ids = []
            for f in found:
                sae_id = new_id("sae")
                path = self.artifacts.sae(sae_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                self.artifacts.pull(f["path"]).rename(path)  # a whole, checked SAELens folder: one atomic move
                self.artifacts.push(path)
                name = f"{spec.name or model['id']}/{f['hook_name']}/{f['label']}"
                self.registry.add(SAE(id=sae_id, name=name, model_id=model["id"], hook_name=f["hook_name"],
                                      architecture=f["architecture"], d_in=f["d_in"], d_sae=f["d_sae"], sae_config=f["sae_config"],
                                      path=str(path), metrics={"imported_from": spec.source, "format": f["format"]}))
                ids.append(sae_id)
        finally:
            self.artifacts.remove(work)
        self.registry.update(Job, job_id, sae_id=ids[0])
        return {"sae_ids": ids, "sae_id": ids[0], "note": f"imported {len(ids)} SAE(s)"}

    def _job_extract(self, job_id: str, spec: specs.ExtractSpec) -> dict[str, Any]:
        model = self.registry.get(Model, spec.model_id)
        dataset = self.registry.get(Dataset, spec.dataset_id)
        names = [hooks.hook_name(layer, spec.site) for layer in spec.layers]
        out = self.artifacts.activations(job_id)
        res = self._call(job_id, "extract", {
            "model_id": model["id"], "model_path": model["path"], "dataset_path": dataset["path"],
            "hook_names": names, "out_dir": str(out), "batch_size": spec.batch_size, "max_tokens": spec.max_tokens,
            "exclude_special_tokens": spec.exclude_special_tokens})
        ids = {}
        for name, st in res["hooks"].items():
            ids[name] = new_id("act")
            self.registry.add(Activation(id=ids[name], job_id=job_id, model_id=model["id"], dataset_id=dataset["id"],
                                         hook_name=name, path=str(out / name), tokens=st["tokens"],
                                         d_model=st["d_model"], stats=st))
        return {"activation_ids": ids, "seconds": res["seconds"]}

    def _job_train(self, job_id: str, spec: specs.TrainSpec) -> dict[str, Any]:
        inputs = self._train_inputs(spec)
        model, datasets, d_ins = inputs["model"], inputs["datasets"], inputs["d_ins"]
        first = datasets[0]
        eval_rows = spec.eval_rows
        if eval_rows is None:  # 5% of the rows actually used (an extraction may cover part of the dataset)
            used = [sets[first["id"]]["tokens"] for sets in inputs["by_hook"].values()] or [spec.max_tokens or 0]
            share = min(1.0, used[0] / first["tokens"]) if used[0] else 1.0
            eval_rows = pipeline.default_eval_rows(round(first["rows"] * share))
        runs, saes = [], {}
        for hook, d_in in d_ins.items():
            for cfg in specs.train_variants(spec):
                name = f"{hook}/{cfg.run_name()}-x{cfg.expansion_factor}"
                if name in saes:
                    name = f"{name}-{len(saes)}"
                sae_id = new_id("sae")
                saes[name] = {"id": sae_id, "hook": hook, "path": str(self.artifacts.sae(sae_id)),
                              "meta": {"model_name": model["name"], "hook_name": hook,
                                       "context_size": first["context_length"],
                                       "dataset_path": ",".join(d["source"] for d in datasets)}}
                runs.append({"name": name, "hook_name": hook, "d_in": d_in, "config": cfg.to_dict()})
        plan = {"runs": runs, "saes": saes, "model_id": model["id"], "model_path": model["path"],
                "dataset_paths": [d["path"] for d in datasets], "eval_rows": eval_rows,
                "hook_dirs": {h: [a["path"] for a in sets.values()] for h, sets in inputs["by_hook"].items()},
                "batch_size": spec.batch_size, "max_tokens": spec.max_tokens,
                "exclude_special_tokens": spec.exclude_special_tokens,
                "checkpoint_dir": str(self.artifacts.checkpoints(spec.resume_job or job_id)),
                "checkpoint_every": spec.checkpoint_every, "keep_checkpoints": spec.keep_checkpoints,
                "resume": bool(spec.resume_job), "pausable": self.registry.get(Job, job_id)["kind"] == "train"}
        res = self._call(job_id, "train", plan)
        self.set_state(job_id, "saving", "recording the SAEs")
        act_ids = {h: next(iter(sets.values()))["id"] for h, sets in inputs["by_hook"].items()}
        out = {}
        for name, r in res["runs"].items():
            sae = saes[name]
            self.registry.add(SAE(id=sae["id"], name=f"{model['id']}/{name}", model_id=model["id"],
                                  hook_name=sae["hook"], architecture=r["architecture"], d_in=r["d_in"],
                                  d_sae=r["d_sae"], sae_config=r["sae_config"], path=sae["path"], training_job_id=job_id,
                                  activation_id=act_ids.get(sae["hook"]), metrics=r["metrics"],
                                  history=r["history"]))
            out[name] = {"sae_id": sae["id"], **r["metrics"]}
        first_sae = next(iter(out.values()))
        self.registry.update(Job, job_id, sae_id=first_sae["sae_id"])
        # A single SAE keeps the flat result shape (sae_id + metrics) the CLI and dashboard show.
        return first_sae if len(out) == 1 else {"saes": out, "sae_id": first_sae["sae_id"]}

    def _job_discover(self, job_id: str, spec: specs.DiscoverSpec) -> dict[str, Any]:
        """Each SAE in turn; a failed one is recorded and the next one still runs."""
        sae_ids = spec.all_sae_ids
        results, failures = {}, {}
        for position, sae_id in enumerate(sae_ids, start=1):
            try:
                results[sae_id] = self._discover_one(job_id, spec, sae_id, position, len(sae_ids))
            except Exception as e:  # noqa: BLE001 - the batch goes on; _run sees a cancel or a dead worker
                cause = getattr(e, "cause", None) or e
                if len(sae_ids) == 1 or isinstance(cause, Cancelled) or isinstance(e, ray.exceptions.ActorDiedError):
                    raise
                failures[sae_id] = (str(cause) or type(cause).__name__).splitlines()[0]
        if len(sae_ids) == 1:
            return results[sae_ids[0]]
        if not results:
            raise UserError(f"all {len(sae_ids)} SAEs failed; first: {next(iter(failures.items()))}")
        note = f"{len(results)} of {len(sae_ids)} SAEs discovered"
        if failures:
            note += "; failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
        return {"saes": results, "failed": failures, "sae_id": next(iter(results)), "note": note}

    def _discover_one(self, job_id: str, spec: specs.DiscoverSpec, sae_id: str, position: int,
                      total: int) -> dict[str, Any]:
        sae = self.registry.get(SAE, sae_id)
        model = self.registry.get(Model, sae["model_id"])
        dataset = self.registry.get(Dataset, spec.dataset_id)
        out = self.artifacts.features(sae["id"])
        config = {"top_k": spec.top_k, **spec.config,
                  # the same outlier cut as training, so both see the same tokens
                  "max_norm": sae["metrics"].get("outlier_norm_threshold")}
        res = self._call(job_id, "discover", {
            "model_id": model["id"], "model_path": model["path"], "sae_id": sae_id, "sae_path": sae["path"],
            "dataset_path": dataset["path"], "out_dir": str(out), "config": config,
            "batch_size": spec.batch_size, "max_tokens": spec.max_tokens,
            "exclude_special_tokens": spec.exclude_special_tokens, "position": position, "of": total})
        self.set_state(job_id, "saving", f"recording features of {sae_id}")
        self.artifacts.pull(out)  # written on the worker's node
        rows = features_store.feature_rows(out, REGISTRY_COLUMNS)
        self.registry.replace_features(sae["id"], rows)
        self.registry.update(SAE, sae["id"], features_path=str(out), features_dataset_id=dataset["id"])
        return {k: v for k, v in res.items() if k != "paths"}

    def _job_steer(self, job_id: str, spec: specs.SteerSpec) -> dict[str, Any]:
        sae = self.registry.get(SAE, spec.sae_id)
        model = self.registry.get(Model, sae["model_id"])
        prompts = list(spec.prompts)
        if spec.prompt_template:
            prompts = self.registry.get(Template, (specs.PROMPT_SETS, spec.prompt_template))["values"]["prompts"] + prompts
        record = self._call(job_id, "steer", {
            "model_id": model["id"], "model_path": model["path"], "sae_path": sae["path"], "sae_id": sae["id"],
            "prompts": prompts, "features": spec.features, "mode": spec.mode, "strengths": spec.strengths,
            "generation": spec.generation, "name": spec.name})
        out = {"outputs": record["outputs"]}
        if spec.save:
            exp_id = new_id("exp")
            self.registry.add(Experiment(id=exp_id, name=spec.name or exp_id, sae_id=sae["id"], mode=spec.mode,
                                         record=record))
            out["experiment_id"] = exp_id
        return out

    def _job_analyze(self, job_id: str, spec: specs.AnalyzeSpec) -> dict[str, Any]:
        sae = self.registry.get(SAE, spec.sae_id)
        model = self.registry.get(Model, sae["model_id"])
        dataset = self.registry.get(Dataset, sae["features_dataset_id"]) if sae["features_dataset_id"] else None
        res = self._call(job_id, "analyze", {
            "model_id": model["id"], "model_path": model["path"], "sae_path": sae["path"],
            "features_path": sae["features_path"], "dataset_path": dataset["path"] if dataset else "",
            "latents": spec.latents or None, "config": spec.config})
        self.set_state(job_id, "saving", "recording the analysis")
        self.registry.update_features(sae["id"], [{"latent": int(k), "analysis": v} for k, v in res.items()])
        return {"latents": len(res), "ablations": sum("ablation" in v for v in res.values())}

    def _job_label(self, job_id: str, spec: specs.LabelSpec) -> dict[str, Any]:
        sae = self.registry.get(SAE, spec.sae_id)
        feats = self.registry.features(sae["id"])  # most frequent first
        wanted = set(spec.latents)
        rows = [f for f in feats if (f["latent"] in wanted if wanted else f["n_fired"] > 0)]
        if spec.keep_user_labels:
            rows = [f for f in rows if f["label_source"] != "user"]
        rows = rows[: spec.limit or None]
        model = self.registry.get(Model, spec.model_id or sae["model_id"])
        template = self.registry.get(Template, (specs.LABEL_PROMPT, spec.template))["values"] if spec.template else None
        plan = {"method": spec.method, "features_path": sae["features_path"], "template": template,
                "detection": spec.detection, "base_url": spec.base_url, "endpoint_model": spec.endpoint_model,
                "api_key": self._secrets.get(job_id, {}).get("api_key", ""),
                "features": [{k: f[k] for k in ("latent", "top_tokens", "frequency", "analysis")} for f in rows]}
        if spec.method == "local":
            plan |= {"model_id": model["id"], "model_path": model["path"]}
        res = self._call(job_id, "label", plan)
        if rows and not res["labels"]:  # nothing labeled (an endpoint down, say): the job fails with the reason
            raise UserError(f"no feature was labeled; latent {next(iter(res['errors']))}: "
                            f"{next(iter(res['errors'].values()))}")
        self.set_state(job_id, "saving", "recording labels")
        analyses = {f["latent"]: f["analysis"] for f in rows}
        updates = []
        for latent, lab in res["labels"].items():
            row = {"latent": int(latent), "label": lab["name"], "category": lab["category"],
                   "description": lab["description"], "label_source": lab["source"]}
            if "detection" in lab:
                row["analysis"] = {**analyses[int(latent)], "detection": lab["detection"]}
            updates.append(row)
        self.registry.update_features(sae["id"], [u for u in updates if "analysis" not in u])
        self.registry.update_features(sae["id"], [u for u in updates if "analysis" in u])
        note = f"labeled {len(updates)} of {len(rows)} features"
        if res["errors"]:
            note += f"; {len(res['errors'])} failed, e.g. latent {next(iter(res['errors']))}: " \
                    f"{next(iter(res['errors'].values()))}"
        return {"labeled": len(updates), "failed": res["errors"], "note": note}

    def set_label(self, sae_id: str, latent: int, name: str, category: str = "other",
                  description: str = "") -> dict[str, Any]:
        """A label written by a person (source "user"); an empty name clears the label."""
        from core.interp import CATEGORIES

        if category not in CATEGORIES:
            raise UserError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
        sae = self._need(SAE, sae_id, "SAE", "list them with: mistudio train list")
        if not 0 <= latent < sae["d_sae"]:
            raise UserError(f"latent {latent} is out of range: {sae_id} has latents 0-{sae['d_sae'] - 1}")
        name = " ".join(name.split())
        self.registry.update_features(sae_id, [{"latent": latent, "label": name, "category": category if name else "",
                                                "description": description.strip() if name else "",
                                                "label_source": "user" if name else ""}])
        return {"latent": latent, "label": name}

    def _job_pipeline(self, job_id: str, spec: specs.PipelineSpec) -> dict[str, Any]:
        # A rerun after a worker death keeps the stages this job already recorded.
        acts = self.registry.list(Activation, job_id=job_id)
        if acts:
            act_id = acts[0]["id"]
        else:
            ext = self._job_extract(job_id, specs.ExtractSpec(spec.model_id, spec.dataset_id, [spec.layer],
                                                               spec.site, spec.batch_size, spec.max_tokens,
                                                               spec.exclude_special_tokens))
            (act_id,) = ext["activation_ids"].values()
        trained = self.registry.list(SAE, training_job_id=job_id)
        if trained:
            tr = {"sae_id": trained[0]["id"], **trained[0]["metrics"]}
        else:
            tr = self._job_train(job_id, specs.TrainSpec(
                activation_ids=[act_id], config=spec.train, resume_job=job_id if self._has_checkpoint(job_id) else ""))
        disc = self._job_discover(job_id, specs.DiscoverSpec(
            spec.dataset_id, sae_id=tr["sae_id"], top_k=spec.top_k, batch_size=spec.batch_size,
            max_tokens=spec.max_tokens, exclude_special_tokens=spec.exclude_special_tokens))
        return {"activation_id": act_id, "train": tr, "discover": disc, "sae_id": tr["sae_id"]}


def _written_by(plan: dict[str, Any]) -> list[str]:
    """The paths a step plan writes to: where a killed worker may have left temporary files."""
    return plan_outputs(plan) + [plan[k] for k in ("checkpoint_dir", "workdir") if plan.get(k)]
