"""label: name features — heuristic (no model), local (a registered model) or openai (an
OpenAI-compatible endpoint) — optionally scored by detection (core.interp); and the labels a
person writes by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need, need_model, register
from actors.jobs.analyze import check_selection, latents_flag
from core.errors import UserError
from storage.registry import SAE, Model, Template

LABEL_METHODS = ("heuristic", "local", "openai")


@dataclass
class LabelSpec:
    """Label features: heuristic (no model), local (a registered Hugging Face model) or openai
    (an OpenAI-compatible endpoint: the worker POSTs feature contexts to `base_url`; its key is
    the one given, or the submitting process's MISTUDIO_LABEL_API_KEY when `base_url` is that
    process's MISTUDIO_LABEL_BASE_URL)."""

    sae_id: str
    """The SAE, once its features are discovered."""
    method: str = "heuristic"
    """heuristic, local or openai."""
    latents: list[int] = field(default_factory=list)
    """Latents to label (the CLI and the dashboard take ranges: 0-99,512); empty → live latents, most
    frequent first, up to `limit`."""
    limit: int = 0
    """At most this many latents (0: all)."""
    model_id: str = ""
    """local: the labeling model; empty → the SAE's own model."""
    base_url: str = ""
    """openai: e.g. http://127.0.0.1:8000/v1."""
    endpoint_model: str = ""
    """openai: the model name the endpoint serves."""
    template: str = ""
    """A saved label_prompt template; empty → the default prompt."""
    detection: bool = False
    """Also score each label by detection (local and openai)."""
    keep_user_labels: bool = True
    """Leave labels a person wrote alone."""


@dataclass
class LabelParams:
    sae_id: str
    method: str
    features_path: str
    features: list[dict[str, Any]]
    """The registry rows of the latents to label: latent, top_tokens, frequency, analysis."""
    template: dict[str, Any] | None
    """A label_prompt template's values; None → the default prompt."""
    detection: bool
    base_url: str
    endpoint_model: str
    api_key: str
    """openai: from the submitter, held in memory for this run only."""


def check(registry, spec: LabelSpec) -> None:
    if spec.method not in LABEL_METHODS:
        raise UserError(f"labeling method {spec.method!r} is not one of {', '.join(LABEL_METHODS)}")
    if spec.method == "openai" and not (spec.base_url and spec.endpoint_model):
        raise UserError("openai labeling needs base_url (e.g. http://127.0.0.1:8000/v1) and endpoint_model")
    if spec.method == "openai":
        from core.interp import check_url

        check_url(spec.base_url)
    if spec.limit < 0:
        raise UserError(f"limit={spec.limit} must be 0 (all) or more")
    check_selection(registry, spec.sae_id, spec.latents)
    if registry is None:
        return
    if spec.method == "local" and spec.model_id:
        need_model(registry, spec.model_id)
    if spec.template:
        need(registry, Template, (specs.LABEL_PROMPT, spec.template), "label prompt template",
             "list them with: mistudio templates list --kind label_prompt")


def secrets(values: dict[str, Any], api_key: str | None) -> dict[str, str] | None:
    """An openai labeling's endpoint key: given, or this process's MISTUDIO_LABEL_API_KEY /
    OPENAI_API_KEY when the job's base_url is the endpoint that key is bound to
    (MISTUDIO_LABEL_BASE_URL), never a URL a user typed; it travels with the job in memory only."""
    if values.get("method") != "openai":
        return None
    from core.interp import environment_key

    key = api_key or environment_key(str(values.get("base_url") or ""))
    return {"api_key": key} if key else None


def plans(job: JobContext, spec: LabelSpec) -> list[Plan]:
    sae = job.registry.get(SAE, spec.sae_id)
    wanted = spec.latents or None  # a selection reads only its rows from the registry
    feats = job.registry.features(sae["id"], latents=wanted)  # most frequent first
    rows = feats if wanted else [f for f in feats if f["n_fired"] > 0]
    if spec.keep_user_labels:
        rows = [f for f in rows if f["label_source"] != "user"]
    rows = rows[: spec.limit or None]
    template = job.registry.get(Template, (specs.LABEL_PROMPT, spec.template))["values"] if spec.template else None
    params = LabelParams(sae["id"], spec.method, sae["features_path"],
                         [{k: f[k] for k in ("latent", "top_tokens", "frequency", "analysis")} for f in rows],
                         template, spec.detection, spec.base_url, spec.endpoint_model,
                         job.secrets.get("api_key", ""))
    model = model_ref(job.registry.get(Model, spec.model_id or sae["model_id"])) if spec.method == "local" else None
    return [Plan("label", params, model=model, inputs=[sae["features_path"]])]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    from core import interp as label

    p: LabelParams = plan.params
    labeler = None
    if p.method == "local":
        model, tok = ctx.model()
        labeler = label.LocalLabeler(model, tok, plan.model.id)
    elif p.method == "openai":
        labeler = label.OpenAILabeler(p.base_url, p.endpoint_model, api_key=p.api_key)
    ctx.state("running")
    template = label.PromptTemplate(**p.template) if p.template else label.DEFAULT_TEMPLATE
    return label.label_features(labeler, p.features, Path(p.features_path), template, detection=p.detection,
                                progress=ctx.report, should_cancel=ctx.report.should_cancel)


def record(job: JobContext, spec: LabelSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: LabelParams = plans[0].params
    res = results[0]
    if p.features and not res["labels"]:  # nothing labeled (an endpoint down, say): the job fails with the reason
        raise UserError(f"no feature was labeled; latent {next(iter(res['errors']))}: "
                        f"{next(iter(res['errors'].values()))}")
    job.state("saving", "recording labels")
    analyses = {f["latent"]: f["analysis"] for f in p.features}
    updates = []
    for latent, lab in res["labels"].items():
        row = {"latent": int(latent), "label": lab["name"], "category": lab["category"],
               "description": lab["description"], "label_source": lab["source"]}
        if "detection" in lab:
            row["analysis"] = {**analyses[int(latent)], "detection": lab["detection"]}
        updates.append(row)
    job.registry.update_features(p.sae_id, [u for u in updates if "analysis" not in u])
    job.registry.update_features(p.sae_id, [u for u in updates if "analysis" in u])
    note = f"labeled {len(updates)} of {len(p.features)} features"
    if res["errors"]:
        note += f"; {len(res['errors'])} failed, e.g. latent {next(iter(res['errors']))}: " \
                f"{next(iter(res['errors'].values()))}"
    return {"labeled": len(updates), "failed": res["errors"], "note": note}


def write_user_label(registry, sae_id: str, latent: int, name: str, category: str = "other",
                     description: str = "") -> dict[str, Any]:
    """A label written by a person (source "user"); an empty name clears the label."""
    from core.interp import CATEGORIES

    if category not in CATEGORIES:
        raise UserError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
    sae = need(registry, SAE, sae_id, "SAE", "list them with: mistudio saes list")
    if not 0 <= latent < sae["d_sae"]:
        raise UserError(f"latent {latent} is out of range: {sae_id} has latents 0-{sae['d_sae'] - 1}")
    name = " ".join(name.split())
    registry.update_features(sae_id, [{"latent": latent, "label": name, "category": category if name else "",
                                       "description": description.strip() if name else "",
                                       "label_source": "user" if name else ""}])
    return {"latent": latent, "label": name}


KIND = register(Kind(
    "label", LabelSpec, check, plans, run, record, secrets=secrets,
    cli=Command("features", "autolabel", aliases={"sae_id": "sae", "model_id": "label-model"},
                choices={"method": LABEL_METHODS}, defaults={"latents": None},
                types={"latents": latents_flag}, show=lambda job: job["message"])))
