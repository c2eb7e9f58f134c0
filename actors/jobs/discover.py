"""discover: every latent's top activating contexts, quantile samples, histograms and
statistics for one SAE or several in turn (core.features), recorded as the SAE's features."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need_dataset, need_sae, register
from core.features import DiscoverConfig, discover_features
from core.features import store as features_store
from core.features.schema import REGISTRY_COLUMNS
from core.errors import Cancelled, UserError, at_least_one
from storage.registry import SAE, Dataset, Model


@dataclass
class DiscoverSpec:
    """Discovery for one SAE (`sae_id`) or several run one after another (`sae_ids`), continuing
    past a failed one."""

    dataset_id: str
    """The dataset whose tokens are searched (tokenized for the SAE's model)."""
    sae_id: str = ""
    """The SAE to discover."""
    sae_ids: list[str] = field(default_factory=list)
    """Several SAEs, one after another."""
    top_k: int = 20
    """Top activating examples kept per latent."""
    config: dict[str, Any] = field(default_factory=dict)
    """Other DiscoverConfig fields: n_quantiles, quantile_examples, one_per_document, min_frequency,
    window_before, window_after, ..."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int | None = None
    """Stop after this many tokens; None or 0 → the whole dataset."""
    exclude_special_tokens: bool = True
    """Leave BOS, EOS and pad positions out of the candidates and statistics, by token id (they
    stay in the model's input)."""

    @property
    def all_sae_ids(self) -> list[str]:
        return list(dict.fromkeys([self.sae_id, *self.sae_ids] if self.sae_id else self.sae_ids))


@dataclass
class DiscoverParams:
    sae_id: str
    sae_path: str
    dataset_id: str
    dataset_path: str
    out_dir: str
    config: DiscoverConfig
    batch_size: int
    max_tokens: int | None
    exclude_special_tokens: bool
    position: int
    """This SAE's place in the job's batch (shown with its progress)."""
    of: int


def discover_config(top_k: int, values: dict[str, Any] | None = None) -> DiscoverConfig:
    at_least_one(top_k=top_k)
    values = dict(values or {})
    if "top_k" in values or "max_norm" in values:
        raise UserError("set top_k as its own field; max_norm comes from the SAE's training run")
    return specs.config(DiscoverConfig, {"top_k": top_k, **values}, "discovery")


def need_discovered(registry, sae_id: str) -> dict[str, Any]:
    """An SAE's row once its features are discovered (what analysis and labeling read)."""
    sae = need_sae(registry, sae_id)
    if not sae["features_path"] or not sae["model_id"]:
        raise UserError(f"SAE {sae_id} has no discovered features yet; run: mistudio discover run "
                        f"--sae {sae_id} --dataset <dataset-id>")
    return sae


def check(registry, spec: DiscoverSpec) -> None:
    if not spec.all_sae_ids:
        raise UserError("a discover spec needs sae_id or sae_ids")
    discover_config(spec.top_k, spec.config)
    at_least_one(batch_size=spec.batch_size)
    specs.zero_for_all(max_tokens=spec.max_tokens)
    if registry is not None:
        for sae_id in spec.all_sae_ids:
            need_sae(registry, sae_id, tied=True)
        need_dataset(registry, spec.dataset_id)


def plans(job: JobContext, spec: DiscoverSpec) -> list[Plan]:
    """One step per SAE."""
    dataset = job.registry.get(Dataset, spec.dataset_id)
    out = []
    for position, sae_id in enumerate(spec.all_sae_ids, start=1):
        sae = job.registry.get(SAE, sae_id)
        model = job.registry.get(Model, sae["model_id"])
        features = str(job.artifacts.features(sae["id"]))
        # the same outlier cut as training, so both see the same tokens
        config = DiscoverConfig(**{"top_k": spec.top_k, **spec.config,
                                   "max_norm": sae["metrics"].get("outlier_norm_threshold")})
        params = DiscoverParams(sae_id, sae["path"], dataset["id"], dataset["path"], features, config,
                                spec.batch_size, spec.max_tokens, spec.exclude_special_tokens, position,
                                len(spec.all_sae_ids))
        out.append(Plan("discover", params, model=model_ref(model), inputs=[sae["path"], dataset["path"]],
                        outputs=[features]))
    return out


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    p: DiscoverParams = plan.params
    model, tok = ctx.model()
    where = {"sae_id": p.sae_id, "sae_position": p.position, "sae_total": p.of}
    summary = discover_features(model, tok, Path(p.sae_path), Path(p.dataset_path), Path(p.out_dir), p.config,
                                batch_size=p.batch_size, max_tokens=p.max_tokens,
                                progress=lambda m: ctx.report({**m, **where}), should_cancel=ctx.report.should_cancel,
                                exclude_token_ids=ctx.excluded(tok, p.exclude_special_tokens))
    return summary._asdict()


def record(job: JobContext, spec: DiscoverSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    """Each SAE's features into the registry; the job's result (one SAE: its summary)."""
    done = {p.params.sae_id: _record_one(job, p, r) for p, r in zip(plans, results)}
    return _summary(spec, done, {})


def _record_one(job: JobContext, plan: Plan, res: dict[str, Any]) -> dict[str, Any]:
    p: DiscoverParams = plan.params
    job.state("saving", f"recording features of {p.sae_id}")
    out = job.artifacts.pull(p.out_dir)  # written on the worker's node
    rows = features_store.feature_rows(out, REGISTRY_COLUMNS)
    job.registry.replace_features(p.sae_id, rows)
    job.registry.update(SAE, p.sae_id, features_path=str(p.out_dir), features_dataset_id=p.dataset_id)
    return {k: v for k, v in res.items() if k != "paths"}


def execute(job: JobContext, spec: DiscoverSpec) -> dict[str, Any]:
    """Each SAE in turn, recorded as it finishes; a failed one is noted and the next one still runs."""
    steps = plans(job, spec)
    results, failures = {}, {}
    for plan in steps:
        try:
            results[plan.params.sae_id] = _record_one(job, plan, job.call(plan))
        except Exception as e:  # noqa: BLE001 - the batch goes on; the manager sees a cancel or a dead worker
            cause = getattr(e, "cause", None) or e
            if len(steps) == 1 or isinstance(cause, Cancelled) or job.fatal(e):
                raise
            failures[plan.params.sae_id] = (str(cause) or type(cause).__name__).splitlines()[0]
    return _summary(spec, results, failures)


def _summary(spec: DiscoverSpec, results: dict[str, dict], failures: dict[str, str]) -> dict[str, Any]:
    sae_ids = spec.all_sae_ids
    if len(sae_ids) == 1:
        return results[sae_ids[0]]
    if not results:
        raise UserError(f"all {len(sae_ids)} SAEs failed; first: {next(iter(failures.items()))}")
    note = f"{len(results)} of {len(sae_ids)} SAEs discovered"
    if failures:
        note += "; failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
    return {"saes": results, "failed": failures, "sae_id": next(iter(results)), "note": note}


KIND = register(Kind(
    "discover", DiscoverSpec, check, plans, run, record, execute=execute,
    cli=Command("discover", "run", aliases={"sae_id": "sae", "dataset_id": "dataset"},
                skip=("sae_ids", "config"), required=("sae_id",))))
