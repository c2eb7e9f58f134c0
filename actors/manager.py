"""JobManager: the queue, every job's lifecycle, and the one writer of the registry.

`submit` checks a spec (its kind's `check`, actors/jobs/), persists the job as `queued` and
shows 0% at once; a dispatcher thread hands jobs to free ModelWorkers, highest priority first,
and runs each as its kind says (plans → a worker runs each → record), recording each state
change (`queued → loading → running → saving → completed | failed | cancelled`). A watchdog
stops hung workers; a job whose worker died is retried. No kind is named here.

Every write a run makes goes through a FencedRegistry holding the run's attempt token
(storage.fencing): the token changes whenever the job starts, is requeued, cancelled or marked
interrupted by a restarted manager, so the run of a manager or worker that lost the job (its
Ray head died and a new head took over) is refused its next write and just stops.
"""

from __future__ import annotations

import errno
import json
import threading
import time
import traceback
from typing import Any

import ray

from actors import jobs, specs
from actors.jobs.label import write_user_label
from actors.worker import NAMESPACE, ModelWorker
from core.errors import Cancelled, Paused, UserError
from core.io import sweep_tmp
from core.train import checkpoints
from storage import Artifacts, Registry, Settings
from storage.fencing import FencedRegistry, StaleAttempt, claim
from storage.portable import recorded
from storage.registry import Job, Template

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
        self.artifacts = Artifacts.of(self.settings)
        self.registry = Registry.of(self.settings, self.artifacts)
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
        self._owned: dict[str, set[str]] = {}  # job → outputs under ids it minted (removed if taken over)
        self._runs: dict[str, FencedRegistry] = {}  # job → the registry as its current run here writes it
        # Queued jobs simply wait in the registry for this manager; ones a previous manager had
        # started are not followed any more: say so instead of leaving them "running" forever.
        for job in self.registry.active_jobs():
            if job["state"] != "queued":  # a new attempt: the old run's writes are refused from now on
                claim(self.registry, job["id"], "failed", only_from=(job["state"],),
                      message=f"interrupted: the job manager restarted; retry it with: mistudio jobs retry {job['id']}")
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
            jobs.get(kind).check(self.registry, spec)
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
        """A state change from the job's run (or its worker); StaleAttempt when no run of this
        manager owns the job any more (the worker's step then stops)."""
        run = self._runs.get(job_id)
        if run is None:
            raise StaleAttempt(f"job {job_id} is not run by this job manager")
        slot = self._slot_of.get(job_id)
        if slot is not None:  # a worker saying "loading" or "running" is alive and not stuck
            slot.since, slot.running = time.time(), state == "running"
        values = {"message": message} if message else {}
        run.set_job_state(job_id, state, **values)

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.registry.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id!r}; list jobs with: mistudio jobs list")
        ray.get(self.progress.cancel.remote(job_id))
        if job["state"] == "queued":  # never started: cancelled at once
            self._forget(job_id, "cancelled")
            return claim(self.registry, job_id, "cancelled", only_from=("queued",),
                         message="cancelled before it started") or self.registry.get(Job, job_id)
        if job["state"] == "paused":  # nothing runs: its checkpoint stays on disk
            return claim(self.registry, job_id, "cancelled", only_from=("paused",),
                         message="cancelled while paused") or self.registry.get(Job, job_id)
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
        if jobs.get(job["kind"]).resume is None:
            pausable = " and ".join(k.name for k in jobs.kinds() if k.resume is not None)
            raise UserError(f"job {job_id} is a {job['kind']} job; only {pausable} jobs pause, resume and finalize "
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

    def set_label(self, sae_id: str, latent: int, name: str, category: str = "other",
                  description: str = "") -> dict[str, Any]:
        """A label written by a person (source "user"); an empty name clears the label."""
        return write_user_label(self.registry, sae_id, latent, name, category, description)

    def database_url(self) -> str:
        return self.settings.database_url

    def worker_status(self) -> dict[str, Any] | None:
        """The first worker's status (None before it has started)."""
        return (self.workers_status() or [None])[0]

    def workers_status(self) -> list[dict[str, Any]]:
        """Every started worker's status: device, busy job, models loaded."""
        return [dict(ray.get(s.actor.status.remote()), name=s.name) for s in self._slots if s.actor is not None]

    def _need(self, table, key: str, what: str, hint: str) -> dict[str, Any]:
        return jobs.need(self.registry, table, key, what, hint)

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
                    # a fresh attempt: this run alone may write the job from now on
                    started = claim(self.registry, job["id"], "loading", only_from=("queued",),
                                    message=f"starting on {slot.name}")
                    if started is None:  # cancelled (or started elsewhere) in the meantime
                        continue
                    slot.job, slot.running = job["id"], False
                    self._slot_of[job["id"]] = slot
                    self._runs[job["id"]] = FencedRegistry(self.registry, job["id"], started["attempt"])
                threading.Thread(target=self._run_on, args=(job, slot), daemon=True, name=job["id"]).start()

    def _run_on(self, job: dict[str, Any], slot: "_Slot") -> None:
        run = self._runs[job["id"]]
        try:
            self._run(job, run)
        except Exception as e:  # noqa: BLE001 - only a refused write is expected here
            if _stale(e) is None:
                raise
            # the job was taken over (a restarted manager, a new Ray head): nothing more to write
            print(f"job {job['id']}: this run stops here: {_stale(e)}", flush=True)
            self._remove_unrecorded(job["id"])
            self._forget(job["id"], "failed")
        finally:
            with self._lock:
                slot.job = None
                if job.get("model_id"):
                    slot.models.add(job["model_id"])
                self._slot_of.pop(job["id"], None)
                if self._runs.get(job["id"]) is run:  # (not a later run of the job, requeued meanwhile)
                    del self._runs[job["id"]]
            self._wake.set()

    def _run(self, job: dict[str, Any], run: FencedRegistry) -> None:
        """Run a job and record how it ended, every write fenced by `run` (its attempt); the
        result rows and the completion are one transaction."""
        job_id, kind = job["id"], jobs.get(job["kind"])
        spec = specs.parse_spec(kind.name, job["spec"])
        context = jobs.JobContext(job_id, run, self.artifacts, call=lambda plan: self._call(job_id, plan, run),
                                  state=lambda state, message="": self.set_state(job_id, state, message),
                                  secrets=self._secrets.get(job_id, {}), has_checkpoint=self._has_checkpoint,
                                  fatal=_fatal, recording=run.atomic)
        # a job that completed with something to say (a batch with failures) keeps it as its message
        finish = lambda result: claim(run, job_id, "completed", message=result.get("note", "completed"),  # noqa: E731
                                      result=result)
        try:
            jobs.execute(context, kind, spec, finish=finish)
        except Exception as e:  # noqa: BLE001 - every failure must land in the job record
            cause = getattr(e, "cause", None) or e
            if _stale(e) is not None:
                raise
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
                if self._requeue_after_worker_death(job, reason, run):
                    return
                state, message = "failed", f"{reason} and no retries are left; retry it with: " \
                                           f"mistudio jobs retry {job_id}"
            else:
                state, message = "failed", f"{type(cause).__name__}: {cause}"
                traceback.print_exc()
            self._forget(job_id, state)
            claim(run, job_id, state, message=message.splitlines()[0] if message else state)
            self._report_where_it_stopped(job_id, state, message)
            return
        self._forget(job_id, "completed")
        self.progress.report.remote(job_id, {"phase": "completed", "fraction": 1.0, "message": "completed"})

    def _remove_unrecorded(self, job_id: str) -> None:
        """A run that was taken over wrote folders under ids it minted itself (a new SAE, dataset
        or activation set) which no record will ever name: remove them rather than leave orphans
        beside what the run that took over records. A folder some row names stays."""
        with self.registry.engine.connect() as conn:
            for path in self._owned.pop(job_id, ()):
                if not recorded(conn, path, self.settings.home):
                    self.artifacts.remove(path)
                    sweep_tmp(path)

    def _forget(self, job_id: str, state: str) -> None:
        """Drop what this actor kept for a job that will not run again (a paused one will)."""
        self._outputs.pop(job_id, None)
        self._owned.pop(job_id, None)
        if state != "paused":
            self._secrets.pop(job_id, None)
            self._attempts.pop(job_id, None)

    def _report_where_it_stopped(self, job_id: str, phase: str, message: str) -> None:
        """The job's new phase, keeping its bar where it stopped (a paused bar keeps its fraction)."""
        last = ray.get(self.progress.get.remote(job_id)) or {}
        keep = {k: last[k] for k in ("fraction", "done", "total", "unit", "step") if k in last}
        self.progress.report.remote(job_id, {**keep, "phase": phase, "message": message})

    def _requeue(self, job: dict[str, Any], message: str, resume: bool, registry: Registry | None = None
                 ) -> dict[str, Any]:
        """Queue a job again under its own id (a new attempt); with `resume`, a training
        continues from its own newest checkpoint (exactly as if it had never stopped).
        `registry`: the run's fenced registry when a run requeues its own job."""
        registry = registry or self.registry
        if resume:
            registry.update(Job, job["id"], spec=jobs.get(job["kind"]).resume(job["spec"], job["id"]))
        job = claim(registry, job["id"], "queued", only_from=("paused",), message=message) or \
            registry.get(Job, job["id"])
        self._report_where_it_stopped(job["id"], "queued", message)
        self._wake.set()
        return job

    def _requeue_after_worker_death(self, job: dict[str, Any], reason: str, run: FencedRegistry) -> bool:
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
        resumed = jobs.get(job["kind"]).resume is not None and self._has_checkpoint(job_id)
        self._requeue(job, f"{reason}; retry {attempt} of {self.settings.job_retries} on a fresh worker"
                      + (", from the newest checkpoint" if resumed else ""), resume=resumed, registry=run)
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

    def _call(self, job_id: str, plan: jobs.Plan, run: FencedRegistry) -> Any:
        """Run one plan on the job's worker (started, or restarted if it died while idle)."""
        slot = self._slot_of[job_id]
        if slot.actor is not None:
            try:
                ray.get(slot.actor.status.remote())
            except ray.exceptions.ActorDiedError:  # died while idle (killed, out of memory): no retry is spent
                slot.actor, slot.models = None, set()
        if slot.actor is None:
            slot.actor = self._start_worker(slot)
        slot.since = time.time()
        self._outputs.setdefault(job_id, set()).update(plan.outputs + plan.scratch)
        if plan.owned:
            self._owned.setdefault(job_id, set()).update(plan.outputs)
        run.update(Job, job_id, step=plan.kind)
        return ray.get(slot.actor.run.remote(job_id, plan))

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


def _stale(error: BaseException) -> str | None:
    """The message of the StaleAttempt behind `error` (raised here, or by this manager's
    set_state under a worker's step and carried back by Ray), else None."""
    for _ in range(4):
        if isinstance(error, StaleAttempt):
            return str(error).splitlines()[0]
        error = getattr(error, "cause", None)
    return None


def _fatal(error: BaseException) -> bool:
    """The worker died under a plan (the whole job goes the worker-death way), or the run lost
    its job: a batch of items does not go on to the next one."""
    return isinstance(error, ray.exceptions.ActorDiedError) or _stale(error) is not None
