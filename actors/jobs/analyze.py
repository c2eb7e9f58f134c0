"""analyze: feature analysis of a discovered SAE — logit effects, similar and co-active
features, NLP summaries, measured ablations (core.analysis) — recorded on each feature."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, register
from actors.jobs.discover import need_discovered
from core.analysis import AnalyzeConfig, analyze_features
from core.errors import UserError
from core.latents import check_latents, parse_latents
from core.fields import describe
from storage.registry import SAE, Dataset, Model


@dataclass
class AnalyzeSpec:
    """Feature analysis of a discovered SAE (core.analysis.analyze_features)."""

    sae_id: str
    """The SAE, once its features are discovered."""
    latents: list[int] = field(default_factory=list)
    """Latents to analyse (the CLI and the dashboard take ranges: 0-99,512); empty → every live latent."""
    config: dict[str, Any] = field(default_factory=dict)
    """AnalyzeConfig fields: n_logits, n_similar, n_coactive, nlp, ablation_latents, ablation_top, ..."""


@dataclass
class AnalyzeParams:
    sae_id: str
    sae_path: str
    features_path: str
    dataset_path: str
    """The discovery's dataset (ablations re-read its rows); empty when unknown."""
    latents: list[int] | None
    config: AnalyzeConfig


def analyze_config(values: dict[str, Any]) -> AnalyzeConfig:
    return specs.config(AnalyzeConfig, values, "analysis")


def check(registry, spec: AnalyzeSpec) -> None:
    analyze_config(spec.config).check()
    check_selection(registry, spec.sae_id, spec.latents)


def check_selection(registry, sae_id: str, latents: list[int]) -> None:
    """The SAE has discovered features and every selected latent is one of its latents."""
    if any(int(i) < 0 for i in latents):
        raise UserError(f"latent {min(int(i) for i in latents)} is out of range: latents are numbered from 0")
    if registry is not None:
        sae = need_discovered(registry, sae_id)
        check_latents(latents, int(sae["d_sae"]), f"SAE {sae_id}")


def plans(job: JobContext, spec: AnalyzeSpec) -> list[Plan]:
    sae = job.registry.get(SAE, spec.sae_id)
    model = job.registry.get(Model, sae["model_id"])
    dataset = job.registry.get(Dataset, sae["features_dataset_id"]) if sae["features_dataset_id"] else None
    params = AnalyzeParams(sae["id"], sae["path"], sae["features_path"], dataset["path"] if dataset else "",
                           spec.latents or None, analyze_config(spec.config))
    reads = [sae["path"], sae["features_path"]] + ([dataset["path"]] if dataset else [])
    return [Plan("analyze", params, model=model_ref(model), inputs=reads)]


def run(ctx: RunContext, plan: Plan) -> dict[int, dict[str, Any]]:
    p: AnalyzeParams = plan.params
    model, tok = ctx.model()
    return analyze_features(model, tok, Path(p.sae_path), Path(p.features_path),
                            Path(p.dataset_path) if p.dataset_path else None, p.config, p.latents,
                            progress=ctx.report, should_cancel=ctx.report.should_cancel)


def record(job: JobContext, spec: AnalyzeSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    res = results[0]
    job.state("saving", "recording the analysis")
    job.registry.update_features(plans[0].params.sae_id, [{"latent": int(k), "analysis": v} for k, v in res.items()])
    return {"latents": len(res), "ablations": sum("ablation" in v for v in res.values())}


def latents_flag(text: str) -> list[int]:
    """--latents 0-99,512 (argparse shows a UserError's line as the flag's error)."""
    import argparse

    try:
        return parse_latents(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


KIND = register(Kind(
    "analyze", AnalyzeSpec, check, plans, run, record,
    cli=Command("features", "analyze", aliases={"sae_id": "sae"},
                nested={"config": (lambda: describe(AnalyzeConfig, only=("ablation_top", "nlp")), {})},
                defaults={"latents": None}, types={"latents": latents_flag},
                show=lambda job: json.dumps(job["result"]))))
