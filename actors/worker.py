"""ModelWorker: a long-lived Ray actor that keeps models loaded and runs job steps.

It owns the expensive resources (loaded models, a GPU when configured) and runs a step `Plan`
from the JobManager with the plan's kind's `run` (actors/jobs/), pulling the plan's inputs
first and pushing its outputs after. It never writes the registry: results go back to the
JobManager as plain values of numbers and paths. Heavy work runs on one thread
(the "work" group); status queries use their own group so they answer while a job runs.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from actors import jobs
from actors.jobs import ModelRef, Plan, RunContext
from actors.progress import Reporter
from core import models
from storage.artifacts import Artifacts
from storage.settings import Settings

NAMESPACE = "mistudio"


@ray.remote(concurrency_groups={"work": 1, "status": 2})
class ModelWorker:
    def __init__(self, settings_env: dict[str, str]):
        self.settings = Settings.from_env(settings_env)
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1 by default); size torch on purpose.
        torch.set_num_threads(self.settings.cpus_per_worker)
        # a GPU from Ray (num_gpus) or pinned explicitly (MISTUDIO_WORKER_GPUS): CUDA_VISIBLE_DEVICES says which
        wants_gpu = self.settings.num_gpus > 0 or bool(self.settings.worker_gpus)
        self.device = "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"
        self.models = models.ModelCache(self.settings.worker_models)  # (model, tokenizer) by model id
        self.busy: str | None = None
        self.progress = ray.get_actor("progress", namespace=NAMESPACE)
        self.artifacts = Artifacts.of(self.settings)  # pulls inputs / pushes outputs with an artifact store

    # -- status (answers while a job runs) ----------------------------------------
    @ray.method(concurrency_group="status")
    def status(self) -> dict[str, Any]:
        return {"loaded": list(self.models), "busy": self.busy, "device": self.device,
                "node_id": ray.get_runtime_context().get_node_id(),
                "quantization": {k: models.quantization_of(m) for k, (m, _) in self.models.items()},
                "threads": torch.get_num_threads(), "pid": os.getpid(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    # -- work ----------------------------------------------------------------------
    @ray.method(concurrency_group="work")
    def run(self, job_id: str, plan: Plan) -> Any:
        """Run one step of a job by its kind's `run`; raises UserError / Cancelled / anything else
        to the manager."""
        self.busy = job_id
        report = Reporter(self.progress, job_id, plan.kind)
        try:
            report({"phase": plan.kind, "done": 0, "message": f"{plan.kind}: starting"}, force=True)
            for path in ([plan.model.path] if plan.model else []) + plan.inputs:
                self.artifacts.pull(path)
            ctx = RunContext(job_id, self.device, report, self.artifacts, self.models,
                             model=lambda: self._model(job_id, plan.model),
                             tokenizer=lambda: self._tokenizer(plan.model),
                             state=lambda state, message="": self._state(job_id, state, message))
            result = jobs.get(plan.kind).run(ctx, plan)
            for path in plan.outputs:
                self.artifacts.push(path)
            report.flush()
            return result
        finally:
            self.busy = None

    def _state(self, job_id: str, state: str, message: str = "") -> None:
        # Waited on so the manager records it before it can see this step's outcome. Looked up
        # each time: this worker outlives a job manager that is restarted.
        manager = ray.get_actor("job_manager", namespace=NAMESPACE)
        ray.get(manager.set_state.remote(job_id, state, message))

    def _model(self, job_id: str, ref: ModelRef):
        """The plan's model, loading it (state `loading`) only when this worker lacks it, with the
        precision it was registered with."""
        if ref.id not in self.models:
            self._state(job_id, "loading", f"loading model {ref.id}")
            self.models.make_room()
            self.models[ref.id] = models.load_model(ref.path, device=self.device, dtype=ref.dtype,
                                                    quantization=ref.quantization)
        self._state(job_id, "running")
        return self.models[ref.id]

    def _tokenizer(self, ref: ModelRef):
        """The model's tokenizer: the loaded model's, or read alone (no weights loaded)."""
        if ref.id in self.models:
            return self.models[ref.id][1]
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ref.path)
