"""Job kinds: one file each (`actors/jobs/<kind>.py`), registered here by name.

A kind's file reads as a sentence of typed objects: its spec (what a user asks for, a dataclass
whose field docstrings are the CLI's help) → `check(registry, spec)` → `plans(job, spec)`, the
steps the ModelWorker runs, each a `Plan` naming the model it needs and the paths it reads and
writes → `run(ctx, plan)` on the worker → `record(job, spec, plans, results)`, the registry rows
of the results and the job's result. The JobManager and the ModelWorker know this protocol and
never a kind's name, so a new kind is a new file plus its line at the bottom of this one, and a
kind that returns several plans (shards) needs no change elsewhere.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from core.data import special_token_ids
from core.errors import UserError
from core.fields import FieldInfo
from storage.registry import SAE, Dataset, Model


@dataclass(frozen=True)
class ModelRef:
    """A registered model as a step loads it: the precision it was registered with."""

    id: str
    path: str
    dtype: str = "float32"
    quantization: str = "none"


def model_ref(row: dict[str, Any]) -> ModelRef:
    """The ModelRef of a registry Model row."""
    return ModelRef(row["id"], row["path"], row.get("dtype") or "float32", row.get("quantization") or "none")


@dataclass
class Plan:
    """One step a ModelWorker runs: `kind`'s `run` with `params` (that kind's typed dataclass)."""

    kind: str
    """The kind whose `run` executes this step (also the step the job shows)."""
    params: Any
    model: ModelRef | None = None
    """The model the step may load (None: it needs none)."""
    inputs: list[str] = field(default_factory=list)
    """Artifact folders it reads, pulled from the artifact store before it runs."""
    outputs: list[str] = field(default_factory=list)
    """Artifact folders it writes, pushed to the artifact store when it succeeds."""
    scratch: list[str] = field(default_factory=list)
    """Other folders it writes (checkpoints, work folders): swept of temporary files when its
    worker dies mid-write, pushed by the step itself if at all."""
    owned: bool = False
    """The outputs are named by ids this job minted (a new SAE, dataset or activation set), so
    no other run writes them: a run whose record is refused (taken over) removes them."""


@dataclass
class RunContext:
    """What a kind's `run` gets on the ModelWorker."""

    job_id: str
    device: str
    """"cuda" or "cpu": where this worker puts models and trains."""
    report: Any
    """actors.progress.Reporter: report(dict), .should_cancel(), .requested()."""
    artifacts: Any
    """storage.Artifacts: pull/push folders when an artifact store is configured."""
    models: Any
    """The worker's core.models.ModelCache (a step that registers a model keeps it loaded there)."""
    model: Callable[[], tuple[Any, Any]]
    """(model, tokenizer) of the plan's model, loaded (state `loading`) only when missing."""
    tokenizer: Callable[[], Any]
    """The plan's model's tokenizer: the loaded model's, or loaded alone."""
    state: Callable[..., None]
    """state(name, message="") → the JobManager records the job's state before the step goes on."""

    def excluded(self, tokenizer, exclude_special_tokens: bool) -> list[int]:
        """Token ids kept out of activations, training, evaluation and candidates: BOS, EOS and
        pad (core.data.special_token_ids, SAELens's rule), unless turned off."""
        return special_token_ids(tokenizer) if exclude_special_tokens else []


@dataclass
class JobContext:
    """What a kind's `plans`, `record` and `execute` get in the JobManager: the job, the registry
    (the manager is its one writer) and a way to run a plan on the job's worker."""

    id: str
    registry: Any
    """storage.Registry."""
    artifacts: Any
    """storage.Artifacts: where outputs go (`artifacts.sae(id)`, ...)."""
    call: Callable[[Plan], Any]
    """Run a plan on the job's ModelWorker and return its result."""
    state: Callable[..., None]
    """state(name, message="") → the job's recorded state."""
    secrets: dict[str, str] = field(default_factory=dict)
    """What the submitter gave for this run only (an endpoint's API key); never stored."""
    has_checkpoint: Callable[[str], bool] = lambda job_id: False
    """Whether a job left training checkpoints (a rerun continues from them)."""
    fatal: Callable[[BaseException], bool] = lambda error: True
    """Whether an error from `call` ends the job at once (a cancel, the worker's death) rather
    than one item of a batch."""
    recording: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """A block whose registry writes are one transaction (storage.fencing: all land or none)."""


@dataclass(frozen=True)
class Command:
    """Where a kind sits in the `mistudio` CLI; its flags are generated from the spec."""

    command: str
    """The subcommand (`train`), declared with its other actions in ui/cli.py."""
    action: str
    """The action that submits this kind (`run`)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """field → the flag it has always had where that differs from the field (activation_ids →
    activations); both names work."""
    nested: dict[str, tuple[Callable[[], list[FieldInfo]], dict[str, str]]] = field(default_factory=dict)
    """A dict field whose keys get flags of their own: field → (a function listing those keys,
    e.g. `core.fields.describe(cls, only=...)`, {key: flag where it is not --key-name}). Only
    the keys given go into the spec; the dataclass's default applies."""
    skip: tuple[str, ...] = ()
    """Fields with no flag (set from a file: `mistudio run`)."""
    required: tuple[str, ...] = ()
    """Fields this action needs although the spec has a default for them."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Flag defaults that differ from the spec's (`model_id` → the embedded model; a nested key
    as "field.key")."""
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The values a flag accepts, where the spec leaves them open ("field" or "field.key")."""
    types: dict[str, Callable[[str], Any]] = field(default_factory=dict)
    """How a flag's text becomes the field's value where a plain type does not say it."""
    repeat: tuple[str, ...] = ()
    """List fields given by repeating the flag (--prompt a --prompt b)."""
    positional: str = ""
    """The field the command's positional argument fills (a source)."""
    show: Callable[[dict[str, Any]], str] | None = None
    """What to print for the completed job; None → its result as JSON."""


@dataclass(frozen=True)
class Kind:
    """A registered job kind: the functions of its file."""

    name: str
    spec: type
    check: Callable[[Any, Any], None]
    """check(registry, spec): one-line UserErrors; registry None → only what the spec alone says
    (a job file checked before any Ray call)."""
    plans: Callable[[JobContext, Any], list[Plan]] | None = None
    run: Callable[[RunContext, Plan], Any] | None = None
    """run(ctx, plan) on the ModelWorker: a step of this kind (also of a kind composing it)."""
    record: Callable[[JobContext, Any, list[Plan], list[Any]], dict[str, Any]] | None = None
    """(A kind that composes others' steps in its own `execute` may have no plans, run or record.)"""
    execute: Callable[[JobContext, Any], dict[str, Any]] | None = None
    """The whole job when it is more than plans → run each → record (stages, a batch that goes
    on past a failure)."""
    resume: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    """spec values → the values that continue from this job's own newest checkpoint; a kind
    with it can pause, resume and finalize, and continues after a worker death."""
    secrets: Callable[[dict[str, Any], str | None], dict[str, str] | None] | None = None
    """(spec values, the api_key given) → what this run needs that is never stored."""
    steps: tuple[str, ...] = ()
    """The steps a composing kind runs in order (shown as "step 2 of 3")."""
    server_paths: tuple[str, ...] = ()
    """Spec fields that may name a file or folder on the server (besides a hub id or a built-in
    name): the dashboard's Client confines them to the allowed roots (storage.access)."""
    cli: Command | None = None

    def info(self) -> dict[str, Any]:
        """What a front end shows of the kind: whether it can pause/resume/finalize, its steps."""
        return {"name": self.name, "pausable": self.resume is not None, "steps": list(self.steps)}


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind (each kind file calls this once, when imported)."""
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The kind named `name`, with a one-line error for a name no file registered."""
    if name not in _KINDS:
        raise UserError(f"unknown job kind {name!r}; choose one of {', '.join(_KINDS)}")
    return _KINDS[name]


def kinds() -> list[Kind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def names() -> list[str]:
    return list(_KINDS)


def need(registry, table, key, what: str, hint: str) -> dict[str, Any]:
    """The registry row `key` of `table`, or a one-line error saying how to get it."""
    row = registry.get(table, key)
    if row is None:
        raise UserError(f"{what} {key!r} is not registered; {hint}")
    return row


def need_model(registry, model_id: str) -> dict[str, Any]:
    return need(registry, Model, model_id, "model", "add it first with: mistudio models add")


def need_dataset(registry, dataset_id: str) -> dict[str, Any]:
    return need(registry, Dataset, dataset_id, "dataset", "add it first with: mistudio datasets add")


def need_sae(registry, sae_id: str, tied: bool = False) -> dict[str, Any]:
    """An SAE's row; with `tied`, one whose model is registered (a job runs that model)."""
    sae = need(registry, SAE, sae_id, "SAE", "list them with: mistudio saes list")
    if tied and not sae["model_id"]:
        raise UserError(f"SAE {sae_id} is not tied to a registered model; import it with --model")
    return sae


def slug(text: str) -> str:
    """A registry id made of a name: lower case, dashes, at most 48 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "item"


def execute(job: JobContext, kind: Kind, spec, finish: Callable[[dict[str, Any]], Any] | None = None
            ) -> dict[str, Any]:
    """Run a job: its kind's own `execute`, or plans → run each on the worker → record.

    `finish(result)` (the manager's "completed") is written in the same transaction as
    `record`'s rows: a run that loses its job between the two leaves neither behind."""
    if kind.execute is not None:
        result = kind.execute(job, spec)
        if finish is not None:
            finish(result)
        return result
    plans = kind.plans(job, spec)
    results = [job.call(plan) for plan in plans]
    with job.recording():
        result = kind.record(job, spec, plans, results)
        if finish is not None:
            finish(result)
    return result


# Each file registers its kind when imported; this order is the order kinds are listed in.
from actors.jobs import add_model, add_dataset, import_sae, extract, train  # noqa: E402,F401,I001
from actors.jobs import discover, pipeline, steer, analyze, label  # noqa: E402,F401,I001
