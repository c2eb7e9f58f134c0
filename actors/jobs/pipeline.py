"""pipeline: extraction → training → discovery at one hook site, composed of the extract,
train and discover kinds' steps; a rerun after a worker death keeps the stages it recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.jobs import JobContext, Kind, execute as run_kind, register
from actors.jobs import discover, extract, train
from storage.registry import SAE, Activation


@dataclass
class PipelineSpec:
    """Extraction → training → discovery at one hook site."""

    model_id: str
    """The registered model to run."""
    dataset_id: str
    """A dataset tokenized for that model: extracted, trained on and searched."""
    layer: int = 15
    """The layer to read."""
    site: str = "resid_post"
    """The hook site within the layer (core.hooks.SITES)."""
    batch_size: int = 8
    """Sequences per forward pass (extraction and discovery)."""
    max_tokens: int | None = None
    """Tokens extracted and searched; None or 0 → the whole dataset."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields (architecture, expansion_factor, k, epochs, batch_size, ...)."""
    top_k: int = 20
    """Top activating examples kept per latent."""
    exclude_special_tokens: bool = True
    """Leave out BOS, EOS and pad positions by token id from extraction and discovery (they stay
    in the model's input)."""


def check(registry, spec: PipelineSpec) -> None:
    train.train_config(spec.train)
    if registry is None:
        return
    model = extract.check_sites(registry, spec.model_id, spec.dataset_id, [spec.layer], spec.site)
    train.train_config(spec.train).resolved(model["d_model"])
    discover.discover_config(spec.top_k)


def execute(job: JobContext, spec: PipelineSpec) -> dict[str, Any]:
    """The three stages in order, each skipped when this job already recorded it."""
    acts = job.registry.list(Activation, job_id=job.id)
    if acts:
        act_id = acts[0]["id"]
    else:
        ext = run_kind(job, extract.KIND, extract.ExtractSpec(spec.model_id, spec.dataset_id, [spec.layer], spec.site,
                                                              spec.batch_size, spec.max_tokens,
                                                              spec.exclude_special_tokens))
        (act_id,) = ext["activation_ids"].values()
    trained = job.registry.list(SAE, training_job_id=job.id)
    if trained:
        tr = {"sae_id": trained[0]["id"], **trained[0]["metrics"]}
    else:
        tspec = train.TrainSpec(activation_ids=[act_id], config=spec.train,
                                resume_job=job.id if job.has_checkpoint(job.id) else "")
        steps = train.plans(job, tspec, pausable=False)
        tr = train.record(job, tspec, steps, [job.call(p) for p in steps])
    disc = discover.execute(job, discover.DiscoverSpec(
        spec.dataset_id, sae_id=tr["sae_id"], top_k=spec.top_k, batch_size=spec.batch_size,
        max_tokens=spec.max_tokens, exclude_special_tokens=spec.exclude_special_tokens))
    return {"activation_id": act_id, "train": tr, "discover": disc, "sae_id": tr["sae_id"]}


KIND = register(Kind("pipeline", PipelineSpec, check, execute=execute, steps=("extract", "train", "discover")))
