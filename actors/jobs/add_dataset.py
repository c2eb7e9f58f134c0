"""add_dataset: load texts and tokenize them with a registered model's tokenizer into Parquet
token shards (core.data)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors import specs
from actors.jobs import Command, JobContext, Kind, Plan, RunContext, model_ref, need_model, register, slug
from actors.jobs.add_model import EMBEDDED_ID
from core.data import tokenize_dataset
from core.data.texts import check_text_file, corpus_name
from core.errors import UserError
from storage.registry import Dataset, Job, new_id

@dataclass
class AddDatasetSpec:
    model_id: str
    """Datasets are tokenized with this model's tokenizer."""
    source: str = "builtin"
    """A built-in corpus ('stdlib-docs' a.k.a. 'builtin': the standard library's documentation;
    'stdlib-source': its source code, ≈ 9M tokens), a .txt/.jsonl/.parquet/.csv file or a HF dataset id."""
    name: str = ""
    """Registry name; empty → the corpus's or file's name."""
    text_column: str = "text"
    """The column holding the text (jsonl, parquet, csv and HF datasets)."""
    context_length: int = 256
    """Tokens per row; longer documents are split into several rows."""
    max_documents: int | None = None
    """Read at most this many documents; None or 0 → all of them."""
    encoding: str = "utf-8"
    """How local text files (.txt/.jsonl/.csv) are decoded, strictly (e.g. latin-1, cp1252)."""
    prepend_bos: bool = True
    """Start every row with the tokenizer's BOS token, as TransformerLens and SAELens build
    contexts (the model's attention sink then sits on BOS); ignored for a tokenizer without BOS."""


@dataclass
class AddDatasetParams:
    dataset_id: str
    name: str
    source: str
    out_dir: str
    text_column: str
    context_length: int
    max_documents: int | None
    prepend_bos: bool = True
    encoding: str = "utf-8"


def check(registry, spec: AddDatasetSpec) -> None:
    specs.zero_for_all(max_documents=spec.max_documents)
    if spec.context_length < 2:
        raise UserError(f"context length {spec.context_length} is too short; use --context-length 2 or more")
    check_text_file(spec.source, spec.encoding)
    if registry is not None:
        need_model(registry, spec.model_id)


def plans(job: JobContext, spec: AddDatasetSpec) -> list[Plan]:
    model = need_model(job.registry, spec.model_id)
    name = spec.name or corpus_name(spec.source) or Path(spec.source).stem
    dataset_id = new_id(slug(name))
    out = str(job.artifacts.dataset(dataset_id))
    params = AddDatasetParams(dataset_id, name, spec.source, out, spec.text_column, spec.context_length,
                              spec.max_documents, spec.prepend_bos, spec.encoding)
    return [Plan("add_dataset", params, model=model_ref(model), outputs=[out], owned=True)]


def run(ctx: RunContext, plan: Plan) -> dict[str, Any]:
    p: AddDatasetParams = plan.params
    ctx.state("running", f"tokenizing {p.source}")
    stats = tokenize_dataset(ctx.tokenizer(), p.source, Path(p.out_dir), p.text_column, p.context_length,
                             p.max_documents, progress=ctx.report, prepend_bos=p.prepend_bos,
                             encoding=p.encoding)
    return stats.to_dict()


def record(job: JobContext, spec: AddDatasetSpec, plans: list[Plan], results: list[dict]) -> dict[str, Any]:
    p: AddDatasetParams = plans[0].params
    stats = results[0]
    job.registry.add(Dataset(id=p.dataset_id, name=p.name, source=spec.source, text_column=spec.text_column,
                             model_id=spec.model_id, context_length=spec.context_length, path=p.out_dir,
                             documents=stats["documents"], rows=stats["rows"], tokens=stats["tokens"], stats=stats))
    job.registry.update(Job, job.id, dataset_id=p.dataset_id)
    return {"dataset_id": p.dataset_id, **{k: stats[k] for k in ("documents", "rows", "tokens")}}


KIND = register(Kind(
    "add_dataset", AddDatasetSpec, check, plans, run, record, server_paths=("source",),
    cli=Command("datasets", "add", positional="source", aliases={"model_id": "model"},
                defaults={"model_id": EMBEDDED_ID},
                show=lambda job: f"registered dataset {job['result']['dataset_id']}")))
