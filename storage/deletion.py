"""Deleting a model, dataset, activation set or SAE: its registry row and its files together.

Refused (one line, naming what to do) while a job that is not finished mentions the object, and
while other objects need it: a model's datasets, activation sets and SAEs; a dataset's activation
sets and the SAEs whose feature examples point into its rows. An activation set goes without its
SAEs (they stand on their own; their `activation_id`, provenance only, is cleared); an SAE takes
its features with it. Only files under the data root are removed: a model registered from a
user's own folder keeps that folder.

Order, so that nothing is left half-deleted: the files are first renamed to hidden siblings
(atomic), then the rows go in one transaction; if that fails the files are renamed back, and
only once it has committed are the renamed files removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy import update as sql_update

from core.errors import UserError
from storage.registry import FINAL_STATES, SAE, Activation, Dataset, Feature, Job, Model, Registry

KINDS = {"model": Model, "dataset": Dataset, "activation": Activation, "sae": SAE}
LIST_COMMANDS = {"model": "models list", "dataset": "datasets list", "activation": "extract list", "sae": "saes list"}


def jobs_using(registry: Registry, object_id: str) -> list[str]:
    """Ids of the jobs not yet finished (queued, running, paused) whose row or spec names `object_id`."""
    quoted = json.dumps(object_id)  # as a whole JSON string: "tiny-llama" is not in "tiny-llama/topk"
    with registry.session() as s:
        jobs = s.scalars(select(Job).where(Job.state.not_in(FINAL_STATES)).order_by(Job.created_at)).all()
        return [j.id for j in jobs
                if object_id in (j.model_id, j.dataset_id, j.sae_id) or quoted in json.dumps(j.spec)]


def dependents(registry: Registry, kind: str, object_id: str) -> list[str]:
    """The objects that need this one to work, as "kind id"."""
    if kind == "model":
        found = [("dataset", registry.list(Dataset, model_id=object_id)),
                 ("activation set", registry.list(Activation, model_id=object_id)),
                 ("SAE", registry.list(SAE, model_id=object_id))]
    elif kind == "dataset":
        found = [("activation set", registry.list(Activation, dataset_id=object_id)),
                 ("SAE (its feature examples)", registry.list(SAE, features_dataset_id=object_id))]
    else:
        found = []
    return [f"{what} {row['id']}" for what, rows in found for row in rows]


def delete(registry: Registry, home: Path, kind: str, object_id: str, store=None) -> list[str]:
    """Delete the object and the files of it under `home`; returns the paths removed. `store`:
    the artifact store (storage.store.ArtifactStore), whose copies are removed too."""
    if kind not in KINDS:
        raise UserError(f"cannot delete a {kind!r}; one of: {', '.join(KINDS)}")
    row = registry.get(KINDS[kind], object_id)
    if row is None:
        raise UserError(f"no {kind} {object_id!r}; list them with: mistudio {LIST_COMMANDS[kind]}")
    busy = jobs_using(registry, object_id)
    if busy:
        raise UserError(f"{kind} {object_id} is used by job {', '.join(busy)}, not finished; wait for it or "
                        f"cancel it (mistudio jobs cancel {busy[0]}), then delete")
    needed = dependents(registry, kind, object_id)
    if needed:
        shown = ", ".join(needed[:5]) + (f" and {len(needed) - 5} more" if len(needed) > 5 else "")
        raise UserError(f"{kind} {object_id} is needed by {shown}; delete those first")
    paths = [Path(p) for p in (row.get("path"), row.get("features_path")) if p]
    ours = [p for p in paths if p.resolve().is_relative_to(Path(home).resolve()) and p.exists()]
    moved = [(p, p.with_name(f".deleting-{p.name}-{uuid.uuid4().hex[:8]}")) for p in ours]
    for p, aside in moved:
        os.replace(p, aside)
    try:
        _delete_rows(registry, kind, object_id)
    except BaseException:
        for p, aside in moved:
            os.replace(aside, p)
        raise
    for p, aside in moved:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
        if store is not None:
            store.delete(p)
    return [str(p) for p in ours]


def _delete_rows(registry: Registry, kind: str, object_id: str) -> None:
    table = KINDS[kind]
    with registry.session() as s, s.begin():
        if kind == "sae":
            s.execute(sql_delete(Feature).where(Feature.sae_id == object_id))
        if kind == "activation":
            s.execute(sql_update(SAE).where(SAE.activation_id == object_id).values(activation_id=None))
        s.execute(sql_delete(table).where(table.id == object_id))

