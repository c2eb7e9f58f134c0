"""train: SAEs, one per hook × variant, from one pass over cached activations or over the model
run on the fly (core.train, with its activation sources, core.train.sources); a training pauses,
resumes and finalizes, and continues from its checkpoints after a worker death."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need, need_dataset, need_model, register
from core import hooks
from core.train import sources
from core.errors import UserError
from core.evals.spliced import evaluate_saved_sae
from core.sae import registry
from core.train import CheckpointConfig, RunSpec, TrainConfig
from storage.registry import SAE, Activation, Dataset, Job, Model, new_id


@dataclass
class TrainSpec:
    """Train one SAE per hook × variant from one pass over the data.

    The data is either cached activations (`activation_ids`: one set per hook and dataset; the
    datasets are mixed) or, with `model_id` + `dataset_ids` + `hook_names`, the model run on the
    fly with no activation cache.
    """

    activation_ids: list[str] = field(default_factory=list)
    """Activation set ids (see: mistudio extract list): several hooks and/or datasets; on the
    command line comma-separated."""
    model_id: str = ""
    """Training on the fly: the model to run."""
    dataset_ids: list[str] = field(default_factory=list)
    """Training on the fly: the datasets, mixed."""
    hook_names: list[str] = field(default_factory=list)
    """Training on the fly: the hook sites, one SAE each per variant."""
    config: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields shared by every SAE (architecture, expansion_factor, k, lr, batch_size, epochs, ...)."""
    variants: list[dict[str, Any]] = field(default_factory=list)
    """TrainConfig overrides, one SAE per hook for each (e.g. [{"k": 16}, {"k": 64}]; on the command
    line --k-variants 16,64, one pass); empty → one SAE per hook."""
    eval_rows: int | None = None
    """Rows of the first dataset held out for evaluation; None → 5% (1 to 64); 0 → evaluate on the training sample."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 → none."""
    keep_checkpoints: int = 2
    """The newest checkpoints kept."""
    resume_job: str = ""
    """Continue from the newest checkpoint of this earlier train job (same settings)."""
    batch_size: int = 8
    """Sequences per forward pass when training on the fly."""
    max_tokens: int | None = None
    """Tokens per dataset when training on the fly; None or 0 → all of them."""
    exclude_special_tokens: bool = True
    """Leave out BOS, EOS and pad positions by token id when training on the fly (cached
    activations were filtered, or not, at extraction; the evaluation follows the training data)."""


@dataclass
class SAEOut:
    """One SAE a training writes."""

    run: RunSpec
    sae_id: str
    path: str
    meta: dict[str, Any]
    """cfg.json metadata: model_name, hook_name, context_size, dataset_path, prepend_bos (the
    excluded token ids and the norm threshold are added on the worker)."""


@dataclass
class TrainParams:
    model_id: str
    saes: list[SAEOut]
    dataset_paths: list[str]
    hook_dirs: dict[str, list[str]]
    """Cached activation folders per hook, one per dataset; empty → the model runs on the fly."""
    activation_ids: dict[str, str]
    """hook → the activation set its SAE is registered as trained on."""
    eval_rows: int
    batch_size: int
    max_tokens: int | None
    exclude_special_tokens: bool
    checkpoint_dir: str
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    pausable: bool
    """The job can be paused and finalized (a pipeline's training cannot)."""
    excluded_special: int | None = None
    """Special-token positions the cached activation sets left out (None: on the fly, counted
    on the worker)."""


class TrainInputs(NamedTuple):
    model: dict[str, Any]
    datasets: list[dict[str, Any]]
    """In order; the first one's leading rows are held out."""
    by_hook: dict[str, dict[str, dict[str, Any]]]
    """hook → dataset id → activation row (empty when training on the fly)."""
    d_ins: dict[str, int]


def train_config(values: dict[str, Any]) -> TrainConfig:
    """A job file's training config: flat, as today's files are, or with the SAE type under
    "sae" (`TrainConfig.from_dict`), its values' types checked."""
    cfg = TrainConfig.from_dict(values)
    specs.check_types(cfg, "training", skip=("sae",))
    specs.check_types(cfg.sae, "training")
    cfg.check()
    return cfg


def train_variants(spec: TrainSpec) -> list[TrainConfig]:
    """The TrainConfig of each variant (config overridden by the variant's fields)."""
    return [train_config(spec.config | v) for v in (spec.variants or [{}])]


def check(registry, spec: TrainSpec) -> None:
    cached, live = bool(spec.activation_ids), bool(spec.model_id or spec.dataset_ids or spec.hook_names)
    if cached == live:
        which = "got both" if cached else "got neither"
        raise UserError("a train spec needs either activation_ids (cached activations) or model_id + dataset_ids + "
                        f"hook_names (train on the fly), not both; {which}")
    if live and not (spec.model_id and spec.dataset_ids and spec.hook_names):
        raise UserError("training on the fly needs model_id, dataset_ids and hook_names")
    if spec.eval_rows is not None and spec.eval_rows < 0:
        raise UserError(f"eval_rows={spec.eval_rows} must be 0 or more")
    if spec.checkpoint_every < 0 or spec.keep_checkpoints < 1:
        raise UserError("checkpoint_every must be ≥ 0 and keep_checkpoints ≥ 1")
    train_variants(spec)
    if registry is not None:
        inputs(registry, spec)


def inputs(registry, spec: TrainSpec) -> TrainInputs:
    """Model, datasets and activation sets of a train spec, checked to fit together."""
    if spec.activation_ids:
        acts = [need(registry, Activation, a, "activation set", "list them with: mistudio extract list")
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
        model = registry.get(Model, model_ids.pop())
        d_ins = {h: next(iter(sets.values()))["d_model"] for h, sets in by_hook.items()}
    else:
        model = need_model(registry, spec.model_id)
        dataset_ids = spec.dataset_ids
        for d in dataset_ids:
            need_dataset(registry, d)
        for name in spec.hook_names:
            layer, _ = hooks.parse_hook_name(name)
            if layer >= model["n_layers"]:
                raise UserError(f"layer {layer} is out of range: {model['id']} has {model['n_layers']} "
                                f"layers (0-{model['n_layers'] - 1}); pick a layer within it")
        by_hook, d_ins = {}, {h: model["d_model"] for h in spec.hook_names}
    for cfg in train_variants(spec):
        for d_in in d_ins.values():
            cfg.resolved(d_in)
    return TrainInputs(model, [registry.get(Dataset, d) for d in dataset_ids], by_hook, d_ins)


def plans(job: JobContext, spec: TrainSpec, pausable: bool = True) -> list[Plan]:
    """One step training every SAE; `pausable` False for a training inside another job."""
    model, datasets, by_hook, d_ins = inputs(job.registry, spec)
    first = datasets[0]
    eval_rows = spec.eval_rows
    if eval_rows is None:  # 5% of the rows actually used (an extraction may cover part of the dataset)
        used = [sets[first["id"]]["tokens"] for sets in by_hook.values()] or [spec.max_tokens or 0]
        share = min(1.0, used[0] / first["tokens"]) if used[0] else 1.0
        eval_rows = sources.default_eval_rows(round(first["rows"] * share))
    exclude, excluded_special = spec.exclude_special_tokens, None
    if by_hook:  # cached: the activation sets were filtered, or not, at extraction
        sets = list(next(iter(by_hook.values())).values())
        exclude = any(a["stats"].get("excluded_token_ids") or a["stats"].get("excluded_special") for a in sets)
        excluded_special = sum(int(a["stats"].get("excluded_special", 0)) for a in sets)
    saes: list[SAEOut] = []
    for hook, d_in in d_ins.items():
        for cfg in train_variants(spec):
            name = f"{hook}/{cfg.run_name()}-x{cfg.expansion_factor}"
            if name in {s.run.name for s in saes}:
                name = f"{name}-{len(saes)}"
            sae_id = new_id("sae")
            meta = {"model_name": model["name"], "hook_name": hook, "context_size": first["context_length"],
                    "dataset_path": ",".join(d["source"] for d in datasets),
                    "prepend_bos": all((d["stats"] or {}).get("prepend_bos", False) for d in datasets)}
            saes.append(SAEOut(RunSpec(name, hook, d_in, cfg), sae_id, str(job.artifacts.sae(sae_id)), meta))
    hook_dirs = {h: [a["path"] for a in sets.values()] for h, sets in by_hook.items()}
    ck = str(job.artifacts.checkpoints(spec.resume_job or job.id))
    params = TrainParams(model["id"], saes, [d["path"] for d in datasets], hook_dirs,
                         {h: next(iter(sets.values()))["id"] for h, sets in by_hook.items()}, eval_rows,
                         spec.batch_size, spec.max_tokens, exclude, ck, spec.checkpoint_every,
                         spec.keep_checkpoints, bool(spec.resume_job), pausable, excluded_special)
    reads = params.dataset_paths + [p for dirs in hook_dirs.values() for p in dirs] + ([ck] if params.resume else [])
    return [Plan("train", params, model=model_ref(model), inputs=reads, outputs=[s.path for s in saes], owned=True,
                 scratch=[ck])]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    p: TrainParams = plan.params
    runs = [s.run for s in p.saes]
    if ctx.device == "cuda":
        runs = [r._replace(cfg=dataclasses.replace(r.cfg, device="cuda")) for r in runs]
    first = Path(p.dataset_paths[0])
    excluded_ids = ctx.excluded(ctx.tokenizer(), p.exclude_special_tokens)
    excluded_special = p.excluded_special
    if p.hook_dirs:  # cached activations
        ctx.state("running")
        hook_dirs = {h: [Path(d) for d in dirs] for h, dirs in p.hook_dirs.items()}
        source, runs, holdout = sources.cached_training(hook_dirs, runs, p.eval_rows)
    else:  # on the fly: the model runs as the trainer consumes
        model, tok = ctx.model()
        dirs = [Path(d) for d in p.dataset_paths]
        source, holdout = sources.live_training(model, tok, dirs, runs, p.eval_rows, p.batch_size, p.max_tokens,
                                                exclude_token_ids=excluded_ids)
        excluded_special = sources.special_positions(dirs, p.max_tokens, excluded_ids)
    # always a folder: a pause writes its checkpoint there even without periodic ones. Each one
    # is published as written (with an artifact store), so a retry on another node resumes from it.
    ck = CheckpointConfig(Path(p.checkpoint_dir), p.checkpoint_every, p.keep_checkpoints, resume=p.resume,
                          on_save=ctx.artifacts.push if ctx.artifacts.store else None)
    by_name = {s.run.name: s for s in p.saes}
    metas = {n: s.meta | {"exclude_special_tokens": excluded_ids or False} for n, s in by_name.items()}
    results = sources.train_runs(source, runs, {n: Path(s.path) for n, s in by_name.items()},
                                 metas, holdout_tokens=holdout, checkpoint=ck,
                                 progress=ctx.report, should_cancel=ctx.report.should_cancel,
                                 requested=ctx.report.requested if p.pausable else None)
    out = {}
    for name, result in results.items():
        metrics = dict(result.final) | {"excluded_special": excluded_special}
        if p.eval_rows:  # CE loss recovered and KL need the model on the held-out rows
            model, tok = ctx.model()
            metrics |= _renamed(evaluate_saved_sae(
                model, tok, Path(by_name[name].path), first, p.eval_rows,
                outlier_norm_threshold=result.final["outlier_norm_threshold"], exclude_token_ids=excluded_ids,
                progress=ctx.report, should_cancel=ctx.report.should_cancel),
                {"tokens": "eval_tokens", "dead_frac": "eval_dead_frac", "excluded_special": "eval_excluded_special"})
        cfg = result.sae.config()
        out[name] = {"metrics": metrics, "history": result.history, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
                     "sae_config": cfg.type_config.to_dict(), "architecture": cfg.architecture}
    return {"runs": out}


def _renamed(d: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`d` with some keys renamed: the evaluation's `tokens` are not the tokens trained on, and its
    `dead_frac` (never fired on the small held-out slice) is not training's (no firing for
    `dead_tokens` tokens), so both are kept under their own names."""
    return {names.get(k, k): v for k, v in d.items()}


def record(job: JobContext, spec: TrainSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: TrainParams = plans[0].params
    job.state("saving", "recording the SAEs")
    by_name = {s.run.name: s for s in p.saes}
    out = {}
    for name, r in results[0]["runs"].items():
        sae = by_name[name]
        job.registry.add(SAE(id=sae.sae_id, name=f"{p.model_id}/{name}", model_id=p.model_id,
                             hook_name=sae.run.hook_name, architecture=r["architecture"], d_in=r["d_in"],
                             d_sae=r["d_sae"], sae_config=r["sae_config"], path=sae.path, training_job_id=job.id,
                             activation_id=p.activation_ids.get(sae.run.hook_name), metrics=r["metrics"],
                             history=r["history"]))
        out[name] = {"sae_id": sae.sae_id, **r["metrics"]}
    first_sae = next(iter(out.values()))
    job.registry.update(Job, job.id, sae_id=first_sae["sae_id"])
    # A single SAE keeps the flat result shape (sae_id + metrics) the CLI and dashboard show.
    return first_sae if len(out) == 1 else {"saes": out, "sae_id": first_sae["sae_id"]}


def _k_variants(text: str) -> list[dict[str, Any]]:
    return [{"k": int(k)} for k in text.split(",")]


KIND = register(Kind(
    "train", TrainSpec, check, plans, run, record,
    resume=lambda values, job_id: {**values, "resume_job": job_id},
    cli=Command(
        "train", "run",
        aliases={"activation_ids": "activations", "variants": "k-variants", "resume_job": "resume"},
        # The config's flags: its own fields and every SAE type's knobs (TrainConfig.flat_fields),
        # under the names they have always had where those differ.
        nested={"config": (TrainConfig.flat_fields, {"expansion_factor": "expansion", "l1_coefficient": "l1",
                                         "l0_coefficient": "l0"})},
        skip=("model_id", "dataset_ids", "hook_names", "batch_size", "max_tokens", "exclude_special_tokens"),
        required=("activation_ids",),
        choices={"config.architecture": tuple(registry.names())},
        types={"variants": _k_variants})))
