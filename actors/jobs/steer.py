"""steer: generate with SAE features added or clamped, beside an unsteered baseline
(core.steer); the experiment is kept in the registry."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need, need_sae, register
from core import steer
from core.errors import UserError
from core.fields import describe
from storage.registry import SAE, Experiment, Model, Template, new_id


@dataclass
class SteerSpec:
    """Generate with SAE features steered, beside an unsteered baseline (core.steer)."""

    sae_id: str
    """The SAE whose features steer."""
    prompts: list[str] = field(default_factory=list)
    """Prompts to continue (on the command line, repeat --prompt)."""
    features: list[dict[str, Any]] = field(default_factory=list)
    """[{"latent": 12, "strength": 8.0, "mode": "add" | "clamp"}, ...]; on the command line
    LATENT:STRENGTH[:add|clamp], repeated for several."""
    mode: str = "compare"
    """compare (each feature alone), blend (all together) or sweep (one feature, `strengths`)."""
    strengths: list[float] = field(default_factory=list)
    """sweep: the strengths tried, e.g. 0,4,8,16."""
    generation: dict[str, Any] = field(default_factory=dict)
    """GenerationConfig fields: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, steer_prompt."""
    prompt_template: str = ""
    """Name of a saved steering_prompts template whose prompts come before `prompts`."""
    name: str = ""
    """The experiment's name; empty → its id."""
    save: bool = True
    """Keep the experiment in the registry."""


@dataclass
class SteerParams:
    sae_id: str
    sae_path: str
    prompts: list[str]
    features: list[steer.SteerFeature]
    mode: str
    strengths: list[float]
    generation: steer.GenerationConfig
    name: str


def steer_request(spec: SteerSpec) -> tuple[list[steer.SteerFeature], steer.GenerationConfig]:
    """The features and generation settings of a steer spec, checked (latents are checked
    against the SAE on the worker)."""
    feats = [specs.config(steer.SteerFeature, f, "steering feature") for f in spec.features]
    if spec.mode not in steer.MODES:
        raise UserError(f"steering mode {spec.mode!r} is not one of {', '.join(steer.MODES)}")
    if not feats:
        raise UserError('pick at least one feature: features=[{"latent": 12, "strength": 8.0}]')
    gen = specs.config(steer.GenerationConfig, spec.generation, "generation")
    gen.check()
    return feats, gen


def check(registry, spec: SteerSpec) -> None:
    steer_request(spec)
    if registry is None:
        return
    need_sae(registry, spec.sae_id, tied=True)
    if spec.prompt_template:
        need(registry, Template, (specs.PROMPT_SETS, spec.prompt_template), "steering prompt template",
             "list them with: mistudio templates list --kind steering_prompts")
    elif not spec.prompts:
        raise UserError("give at least one prompt (prompts or prompt_template)")


def plans(job: JobContext, spec: SteerSpec) -> list[Plan]:
    sae = job.registry.get(SAE, spec.sae_id)
    model = job.registry.get(Model, sae["model_id"])
    prompts = list(spec.prompts)
    if spec.prompt_template:
        prompts = job.registry.get(Template, (specs.PROMPT_SETS, spec.prompt_template))["values"]["prompts"] + prompts
    feats, gen = steer_request(spec)
    params = SteerParams(sae["id"], sae["path"], prompts, feats, spec.mode, spec.strengths, gen, spec.name)
    return [Plan("steer", params, model=model_ref(model), inputs=[sae["path"]])]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    """Generations for a steer job; the SAE is loaded fresh (small) onto the model's device."""
    from core.formats.saelens import load_saelens

    p: SteerParams = plan.params
    model, tok = ctx.model()
    sae, cfg = load_saelens(p.sae_path)
    sae = sae.to(next(model.parameters()).device)
    outputs = steer.steer(model, tok, sae, cfg.hook_name, p.prompts, p.features, p.mode, p.generation,
                          p.strengths or None, progress=ctx.report)
    exp = steer.Experiment(p.mode, p.prompts, p.features, p.generation, outputs, hook_name=cfg.hook_name,
                           sae=p.sae_id, strengths=p.strengths, name=p.name)
    return exp.to_dict()


def record(job: JobContext, spec: SteerSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    experiment = results[0]
    out = {"outputs": experiment["outputs"]}
    if spec.save:
        exp_id = new_id("exp")
        job.registry.add(Experiment(id=exp_id, name=spec.name or exp_id, sae_id=spec.sae_id, mode=spec.mode,
                                    record=experiment))
        out["experiment_id"] = exp_id
    return out


def _feature_arg(text: str) -> dict[str, Any]:
    """LATENT:STRENGTH[:add|clamp] → a steering feature."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return {"latent": int(parts[0]), "strength": float(parts[1]), "mode": parts[2] if len(parts) == 3 else "add"}
    except ValueError:
        raise argparse.ArgumentTypeError(f"write a feature as LATENT:STRENGTH[:add|clamp], e.g. 12:8 or 5:3:clamp; "
                                         f"got {text!r}") from None


def _show(job: dict[str, Any]) -> str:
    lines = []
    for o in job["result"]["outputs"]:
        ppl = f"{o['perplexity']:.2f}" if o["perplexity"] is not None else "–"
        lines.append(f"[{o['label']}] (perplexity {ppl})\n  {o['prompt']}{o['text']}")
    if job["result"].get("experiment_id"):
        lines.append(f"saved experiment {job['result']['experiment_id']}")
    return "\n".join(lines)


KIND = register(Kind(
    "steer", SteerSpec, check, plans, run, record,
    cli=Command("steer", "run", aliases={"sae_id": "sae", "prompts": "prompt", "features": "feature"},
                nested={"generation": (lambda: describe(steer.GenerationConfig, only=(
                    "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")), {})},
                required=("features",), repeat=("prompts", "features"), types={"features": _feature_arg},
                choices={"mode": steer.MODES}, defaults={"generation.temperature": 0.0}, show=_show)))
