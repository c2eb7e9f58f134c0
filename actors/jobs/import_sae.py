"""import_sae: SAEs from elsewhere (SAELens, sparsify, dictionary_learning, Gemma Scope files),
checked against a registered model, written as SAELens folders and registered."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.jobs import Command, JobContext, Kind, Plan, RunContext, need_model, register
from core import hooks
from core.errors import UserError
from storage.registry import SAE, Job, new_id


@dataclass
class ImportSAESpec:
    """SAEs from elsewhere, attached to a registered model: SAELens, sparsify, dictionary_learning
    or Gemma Scope files (core.formats), every SAE found under the source."""

    source: str
    """A folder or file, a .zip/.tar(.gz) archive, or a Hugging Face repo id with an optional
    subfolder (owner/name/path/inside)."""
    model_id: str
    """The model the SAEs read; their d_in must match its hook sites."""
    hook_name: str = ""
    """The hook site when the files do not name it (blocks.L.hook_resid_post ...)."""
    format: str = ""
    """One of core.formats.FORMATS; empty → detected."""
    name: str = ""
    """Registry name prefix; empty → the model id and the SAE's hook and folder."""


@dataclass
class ImportParams:
    source: str
    workdir: str
    """The job's work folder: the download or unpacked archive, and the SAELens folders written."""
    model_id: str
    model_name: str
    d_model: int
    n_layers: int
    hook_name: str
    format: str


def check(registry, spec: ImportSAESpec) -> None:
    if registry is None:
        return
    need_model(registry, spec.model_id)
    if spec.hook_name:
        hooks.parse_hook_name(spec.hook_name)


def plans(job: JobContext, spec: ImportSAESpec) -> list[Plan]:
    model = need_model(job.registry, spec.model_id)
    work = str(job.artifacts.home / "imports" / job.id)
    params = ImportParams(spec.source, work, model["id"], model["name"], model["d_model"], model["n_layers"],
                          spec.hook_name, spec.format)
    return [Plan("import_sae", params, scratch=[work])]


def execute(job: JobContext, spec: ImportSAESpec) -> dict[str, Any]:
    """plans → run → record, then the work folder goes whatever happened."""
    (plan,) = plans(job, spec)
    try:
        return record(job, spec, [plan], [job.call(plan)])
    finally:
        job.artifacts.remove(Path(plan.params.workdir))


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    """Every SAE under the source, checked against the model and written as SAELens folders
    under the job's work folder (`record` moves them into place and registers them)."""
    from core import formats
    from core.formats.saelens import save_saelens

    p: ImportParams = plan.params
    work = Path(p.workdir)
    ctx.state("running", f"reading {p.source}")
    root = formats.open_source(p.source, work / "raw")
    found = formats.find_saes(root)
    if not found:
        raise UserError(f"no SAE found under {p.source}; expected SAELens, sparsify, "
                        "dictionary_learning or Gemma Scope files")
    out = []
    for i, f in enumerate(found):
        sae, cfg = formats.import_sae(f.path, format=p.format or f.format, hook_name=p.hook_name or None,
                                      expected_d_in=p.d_model, model_name=p.model_name)
        layer, _ = hooks.parse_hook_name(cfg.hook_name)
        if layer >= p.n_layers:
            raise UserError(f"{f.path.name} reads {cfg.hook_name} but {p.model_id} has "
                            f"{p.n_layers} layers; pick the model it was trained on")
        path = save_saelens(sae, cfg, work / "saes" / str(i))
        ctx.artifacts.push(path)  # the job manager moves it into place, possibly on another node
        label = f.path.name if f.path != root else Path(p.source).name
        out.append({"path": str(path), "hook_name": cfg.hook_name, "architecture": cfg.architecture,
                    "d_in": sae.d_in, "d_sae": sae.d_sae, "sae_config": cfg.type_config.to_dict(), "format": f.format, "label": label})
        ctx.report({"phase": "import", "done": i + 1, "total": len(found), "unit": "SAEs"})
    return {"saes": out}


def record(job: JobContext, spec: ImportSAESpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: ImportParams = plans[0].params
    ids = []
    for f in results[0]["saes"]:
        sae_id = new_id("sae")
        path = job.artifacts.sae(sae_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        job.artifacts.pull(f["path"]).rename(path)  # a whole, checked SAELens folder: one atomic move
        job.artifacts.push(path)
        name = f"{spec.name or p.model_id}/{f['hook_name']}/{f['label']}"
        job.registry.add(SAE(id=sae_id, name=name, model_id=p.model_id, hook_name=f["hook_name"],
                             architecture=f["architecture"], d_in=f["d_in"], d_sae=f["d_sae"], sae_config=f["sae_config"],
                             path=str(path), metrics={"imported_from": spec.source, "format": f["format"]}))
        ids.append(sae_id)
    job.registry.update(Job, job.id, sae_id=ids[0])
    return {"sae_ids": ids, "sae_id": ids[0], "note": f"imported {len(ids)} SAE(s)"}


KIND = register(Kind(
    "import_sae", ImportSAESpec, check, plans, run, record, execute=execute, server_paths=("source",),
    cli=Command("saes", "import", positional="source", aliases={"model_id": "model", "hook_name": "hook"},
                show=lambda job: f"imported {', '.join(job['result']['sae_ids'])}")))
