"""extract: run a model over a tokenized dataset and stream the activations at hook sites to
Parquet (core.extract), one activation set per hook."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need_dataset, need_model, register
from actors.jobs.add_model import EMBEDDED_ID
from core import hooks
from core.errors import UserError, at_least_one
from core.extract import extract_activations
from storage.registry import Activation, Dataset, Model, new_id


@dataclass
class ExtractSpec:
    model_id: str
    """The registered model to run."""
    dataset_id: str
    """A dataset tokenized for that model."""
    layers: list[int] = field(default_factory=lambda: [15])
    """Layers to read (on the command line comma-separated, e.g. 5,15)."""
    site: str = "resid_post"
    """The hook site within each layer (core.hooks.SITES)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int | None = None
    """Stop after this many tokens; None or 0 → the whole dataset."""
    exclude_special_tokens: bool = True
    """Leave out BOS, EOS and pad positions by token id (SAELens's rule; they stay in the model's
    input): the attention sink on BOS carries norms ~100× any text token's."""


@dataclass
class ExtractParams:
    model_id: str
    dataset_id: str
    dataset_path: str
    hook_names: list[str]
    out_dir: str
    batch_size: int
    max_tokens: int | None
    exclude_special_tokens: bool


def check(registry, spec: ExtractSpec) -> None:
    at_least_one(batch_size=spec.batch_size)
    specs.zero_for_all(max_tokens=spec.max_tokens)
    if registry is not None:
        check_sites(registry, spec.model_id, spec.dataset_id, spec.layers, spec.site)


def check_sites(registry, model_id: str, dataset_id: str, layers: list[int], site: str) -> dict[str, Any]:
    """The model's row, once the model and dataset are registered and the layers and site exist."""
    model = need_model(registry, model_id)
    need_dataset(registry, dataset_id)
    for layer in layers:
        if not 0 <= layer < model["n_layers"]:
            raise UserError(f"layer {layer} is out of range: {model['id']} has {model['n_layers']} "
                            f"layers (0-{model['n_layers'] - 1}); pick a layer within it")
    if site not in hooks.SITES:
        raise UserError(f"unknown hook site {site!r}; choose one of {', '.join(hooks.SITES)}")
    return model


def plans(job: JobContext, spec: ExtractSpec) -> list[Plan]:
    model = job.registry.get(Model, spec.model_id)
    dataset = job.registry.get(Dataset, spec.dataset_id)
    out = str(job.artifacts.activations(job.id))
    params = ExtractParams(model["id"], dataset["id"], dataset["path"],
                           [hooks.hook_name(layer, spec.site) for layer in spec.layers], out, spec.batch_size,
                           spec.max_tokens, spec.exclude_special_tokens)
    return [Plan("extract", params, model=model_ref(model), inputs=[dataset["path"]], outputs=[out],
                 owned=True)]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    p: ExtractParams = plan.params
    model, tok = ctx.model()
    t0 = time.perf_counter()
    excluded = ctx.excluded(tok, p.exclude_special_tokens)
    stats = extract_activations(model, tok, Path(p.dataset_path), p.hook_names, Path(p.out_dir),
                                batch_size=p.batch_size, max_tokens=p.max_tokens, progress=ctx.report,
                                should_cancel=ctx.report.should_cancel, exclude_token_ids=excluded)
    return {"hooks": {h: s.to_dict() for h, s in stats.items()}, "excluded_token_ids": excluded,
            "seconds": time.perf_counter() - t0}


def record(job: JobContext, spec: ExtractSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: ExtractParams = plans[0].params
    res = results[0]
    # What the SAEs trained on this set record in their cfg.json: the contexts and what was left out.
    contexts = {"prepend_bos": bool((job.registry.get(Dataset, p.dataset_id)["stats"] or {}).get("prepend_bos")),
                "excluded_token_ids": res.get("excluded_token_ids", [])}
    ids = {}
    for name, st in res["hooks"].items():
        st = st | contexts
        ids[name] = new_id("act")
        job.registry.add(Activation(id=ids[name], job_id=job.id, model_id=p.model_id, dataset_id=p.dataset_id,
                                    hook_name=name, path=str(Path(p.out_dir) / name), tokens=st["tokens"],
                                    d_model=st["d_model"], stats=st))
    return {"activation_ids": ids, "seconds": res["seconds"]}


KIND = register(Kind(
    "extract", ExtractSpec, check, plans, run, record,
    cli=Command("extract", "run", aliases={"model_id": "model", "dataset_id": "dataset",
                                           "exclude_special_tokens": "exclude-special"},
                defaults={"model_id": EMBEDDED_ID})))
