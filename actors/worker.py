"""ModelWorker: a long-lived Ray actor that keeps models loaded and runs job steps.

It owns the expensive resources (loaded models, a GPU when configured) and translates a step
plan from the JobManager into `core.pipeline` calls. It never writes the registry: results go
back to the JobManager as plain dicts of numbers and paths. Heavy work runs on one thread
(the "work" group); status queries use their own group so they answer while a job runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.progress import Reporter
from core import models, pipeline, steer
from core.features import DiscoverConfig
from core.errors import UserError
from core.train import CheckpointConfig, RunSpec, TrainConfig
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
    def run(self, job_id: str, step: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Run one step of a job; raises UserError / Cancelled / anything else to the manager."""
        self.busy = job_id
        report = Reporter(self.progress, job_id, step)
        try:
            report({"phase": step, "done": 0, "message": f"{step}: starting"}, force=True)
            for path in plan_inputs(plan):
                self.artifacts.pull(path)
            result = getattr(self, f"_{step}")(job_id, plan, report)
            for path in plan_outputs(plan):
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

    def _model(self, job_id: str, plan: dict[str, Any]):
        """The plan's model, loading it (state `loading`) only when this worker lacks it, with the
        precision it was registered with."""
        model_id = plan["model_id"]
        if model_id not in self.models:
            self._state(job_id, "loading", f"loading model {model_id}")
            self.models.make_room()
            self.models[model_id] = models.load_model(plan["model_path"], device=self.device,
                                                      dtype=plan.get("model_dtype", "float32"),
                                                      quantization=plan.get("quantization", "none"))
        self._state(job_id, "running")
        return self.models[model_id]

    @staticmethod
    def _excluded(plan: dict[str, Any], tok) -> list[int]:
        return list(tok.all_special_ids) if plan.get("exclude_special_tokens") else []

    def _add_model(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        self._state(job_id, "loading", f"loading {plan['source']}")
        source, out_dir = plan["source"], Path(plan["out_dir"])
        if source == "embedded":
            source = str(models.embedded_gguf_path())
        if source.endswith(".gguf"):
            self.artifacts.pull(out_dir)  # converted on another node already?
            if not out_dir.exists():  # converting once makes every later load fast
                models.convert_gguf(Path(source), out_dir)
            path = str(out_dir)
        else:
            path = source
        self.models.make_room()
        model, tok = models.load_model(path, device=self.device, dtype=plan["dtype"],
                                       trust_remote_code=plan["trust_remote_code"],
                                       quantization=plan["quantization"])
        if path != str(out_dir) and not Path(path).exists():
            self._state(job_id, "saving")  # a hub model: keep a local copy so later loads are offline
            from core.io import atomic_dir
            with atomic_dir(out_dir) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
            path = str(out_dir)
        self.models[plan["model_id"]] = (model, tok)
        # the dtype asked for: a quantized model's first parameter may be packed integers
        return {"path": path, **models.model_info(model).__dict__, "dtype": plan["dtype"],
                "quantization": models.quantization_of(model)}

    def _add_dataset(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        from transformers import AutoTokenizer

        self._state(job_id, "running", f"tokenizing {plan['source']}")
        if plan["model_id"] in self.models:
            tok = self.models[plan["model_id"]][1]
        else:
            tok = AutoTokenizer.from_pretrained(plan["model_path"])
        stats = pipeline.tokenize_dataset(tok, plan["source"], Path(plan["out_dir"]), plan["text_column"],
                                          plan["context_length"], plan["max_documents"], progress=report)
        return stats.to_dict()

    def _import_sae(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        """Every SAE under the source, checked against the model and written as SAELens folders
        under the job's work folder (the manager moves them into place and registers them)."""
        from core import formats, hooks
        from core.formats.saelens import save_saelens

        work = Path(plan["workdir"])
        self._state(job_id, "running", f"reading {plan['source']}")
        root = formats.open_source(plan["source"], work / "raw")
        found = formats.find_saes(root)
        if not found:
            raise UserError(f"no SAE found under {plan['source']}; expected SAELens, sparsify, "
                                        "dictionary_learning or Gemma Scope files")
        out = []
        for i, f in enumerate(found):
            sae, cfg = formats.import_sae(f.path, format=plan["format"] or f.format,
                                          hook_name=plan["hook_name"] or None, expected_d_in=plan["d_model"],
                                          model_name=plan["model_name"])
            layer, _ = hooks.parse_hook_name(cfg.hook_name)
            if layer >= plan["n_layers"]:
                raise UserError(f"{f.path.name} reads {cfg.hook_name} but {plan['model_id']} has "
                                            f"{plan['n_layers']} layers; pick the model it was trained on")
            path = save_saelens(sae, cfg, work / "saes" / str(i))
            self.artifacts.push(path)  # the job manager moves it into place, possibly on another node
            label = f.path.name if f.path != root else Path(plan["source"]).name
            out.append({"path": str(path), "hook_name": cfg.hook_name, "architecture": cfg.architecture,
                        "d_in": sae.d_in, "d_sae": sae.d_sae, "sae_config": cfg.type_config.to_dict(), "format": f.format, "label": label})
            report({"phase": "import", "done": i + 1, "total": len(found), "unit": "SAEs"})
        return {"saes": out}

    def _extract(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        model, tok = self._model(job_id, plan)
        t0 = time.perf_counter()
        stats = pipeline.extract_activations(
            model, tok, Path(plan["dataset_path"]), plan["hook_names"], Path(plan["out_dir"]),
            batch_size=plan["batch_size"], max_tokens=plan["max_tokens"],
            progress=report, should_cancel=report.should_cancel, exclude_token_ids=self._excluded(plan, tok))
        return {"hooks": {h: s.to_dict() for h, s in stats.items()}, "seconds": time.perf_counter() - t0}

    def _train(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        runs = [RunSpec(r["name"], r["hook_name"], r["d_in"], TrainConfig.from_dict(r["config"])) for r in plan["runs"]]
        if self.device == "cuda":
            runs = [r._replace(cfg=dataclasses.replace(r.cfg, device="cuda")) for r in runs]
        first = Path(plan["dataset_paths"][0])
        if plan["hook_dirs"]:  # cached activations
            self._state(job_id, "running")
            hook_dirs = {h: [Path(p) for p in dirs] for h, dirs in plan["hook_dirs"].items()}
            source, runs, holdout = pipeline.cached_training(hook_dirs, runs, plan["eval_rows"])
        else:  # on the fly: the model runs as the trainer consumes
            model, tok = self._model(job_id, plan)
            source, holdout = pipeline.live_training(model, tok, [Path(p) for p in plan["dataset_paths"]], runs,
                                                     plan["eval_rows"], plan["batch_size"], plan["max_tokens"],
                                                     exclude_token_ids=self._excluded(plan, tok))
        # always a folder: a pause writes its checkpoint there even without periodic ones. Each one
        # is published as written (with an artifact store), so a retry on another node resumes from it.
        ck = CheckpointConfig(Path(plan["checkpoint_dir"]), plan["checkpoint_every"], plan["keep_checkpoints"],
                              resume=plan["resume"], on_save=self.artifacts.push if self.artifacts.store else None)
        saes = plan["saes"]
        results = pipeline.train_runs(source, runs, {n: Path(s["path"]) for n, s in saes.items()},
                                      {n: s["meta"] for n, s in saes.items()}, holdout_tokens=holdout,
                                      checkpoint=ck, progress=report, should_cancel=report.should_cancel,
                                      requested=report.requested if plan["pausable"] else None)
        out = {}
        for name, result in results.items():
            metrics = dict(result.final)
            if plan["eval_rows"]:  # CE loss recovered and KL need the model on the held-out rows
                model, tok = self._model(job_id, plan)
                metrics |= _renamed(pipeline.evaluate_saved_sae(
                    model, tok, Path(saes[name]["path"]), first, plan["eval_rows"],
                    outlier_norm_threshold=result.final["outlier_norm_threshold"],
                    progress=report, should_cancel=report.should_cancel), {"tokens": "eval_tokens", "dead_frac": "eval_dead_frac"})
            cfg = result.sae.config()
            out[name] = {"metrics": metrics, "history": result.history, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
                         "sae_config": cfg.type_config.to_dict(), "architecture": cfg.architecture}
        return {"runs": out}

    def _discover(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        model, tok = self._model(job_id, plan)
        where = {"sae_id": plan["sae_id"], "sae_position": plan["position"], "sae_total": plan["of"]}
        summary = pipeline.discover_features(
            model, tok, Path(plan["sae_path"]), Path(plan["dataset_path"]), Path(plan["out_dir"]),
            DiscoverConfig(**plan["config"]), batch_size=plan["batch_size"], max_tokens=plan["max_tokens"],
            progress=lambda p: report({**p, **where}), should_cancel=report.should_cancel,
            exclude_token_ids=self._excluded(plan, tok))
        return summary._asdict()

    def _analyze(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        model, tok = self._model(job_id, plan)
        cfg = pipeline.AnalyzeConfig(**plan["config"])
        return pipeline.analyze_features(model, tok, Path(plan["sae_path"]), Path(plan["features_path"]),
                                         Path(plan["dataset_path"]) if plan["dataset_path"] else None, cfg,
                                         plan["latents"], progress=report,
                                         should_cancel=report.should_cancel)

    def _label(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        from core import interp as label

        labeler = None
        if plan["method"] == "local":
            model, tok = self._model(job_id, plan)
            labeler = label.LocalLabeler(model, tok, plan["model_id"])
        elif plan["method"] == "openai":
            labeler = label.OpenAILabeler(plan["base_url"], plan["endpoint_model"], api_key=plan["api_key"])
        self._state(job_id, "running")
        template = label.PromptTemplate(**plan["template"]) if plan["template"] else label.DEFAULT_TEMPLATE
        return label.label_features(labeler, plan["features"], Path(plan["features_path"]), template,
                                    detection=plan["detection"], progress=report, should_cancel=report.should_cancel)

    def _steer(self, job_id: str, plan: dict[str, Any], report: Reporter) -> dict[str, Any]:
        """Generations for a steer job; the SAE is loaded fresh (small) onto the model's device."""
        from core.formats.saelens import load_saelens

        model, tok = self._model(job_id, plan)
        sae, cfg = load_saelens(plan["sae_path"])
        sae = sae.to(next(model.parameters()).device)
        feats = [steer.SteerFeature(**f) for f in plan["features"]]
        gen = steer.GenerationConfig(**plan["generation"])
        outputs = steer.steer(model, tok, sae, cfg.hook_name, plan["prompts"], feats, plan["mode"], gen,
                              plan["strengths"] or None, progress=report)
        exp = steer.Experiment(plan["mode"], plan["prompts"], feats, gen, outputs, hook_name=cfg.hook_name,
                               sae=plan["sae_id"], strengths=plan["strengths"], name=plan["name"])
        return exp.to_dict()


def _renamed(d: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`d` with some keys renamed: the evaluation's `tokens` are not the tokens trained on, and its
    `dead_frac` (never fired on the small held-out slice) is not training's (no firing for
    `dead_tokens` tokens), so both are kept under their own names."""
    return {names.get(k, k): v for k, v in d.items()}


def plan_inputs(plan: dict[str, Any]) -> list[str]:
    """The artifact folders a step plan reads (pulled from the artifact store first)."""
    paths = [plan[k] for k in ("model_path", "dataset_path", "sae_path", "features_path") if plan.get(k)]
    paths += plan.get("dataset_paths", []) + [p for dirs in plan.get("hook_dirs", {}).values() for p in dirs]
    return paths + ([plan["checkpoint_dir"]] if plan.get("resume") else [])


def plan_outputs(plan: dict[str, Any]) -> list[str]:
    """The artifact folders a step plan writes (pushed to the artifact store when it succeeds;
    checkpoints are pushed as they are written)."""
    return ([plan["out_dir"]] if plan.get("out_dir") else []) + [s["path"] for s in plan.get("saes", {}).values()]
