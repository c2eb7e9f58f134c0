"""`mistudio jobs`, `templates` and `run`: the queue and its history, saved job forms, and a job
submitted from a YAML/JSON file (checked before any Ray call)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from core.errors import UserError
from ui.cli_output import follow, run_job, table


def client():
    from ui.cli import client as connect

    return connect()


def cmd_jobs(a) -> None:
    from actors import jobs
    from storage.registry import JOB_STATES

    if a.state and a.state not in JOB_STATES:
        raise UserError(f"--state {a.state!r} is not a job state; use one of {', '.join(JOB_STATES)}")
    if a.kind and a.kind not in jobs.names():
        raise UserError(f"--kind {a.kind!r} is not a job kind; use one of {', '.join(jobs.names())}")
    c = client()
    if a.action == "list":
        try:
            since = dt.datetime.fromisoformat(a.since) if a.since else None
        except ValueError:
            raise UserError(f"--since {a.since!r} is not a date; write it as 2026-12-01 or 2026-12-01T14:30") from None
        rows = [j for j in c.jobs(state=a.state) if (not a.kind or j["kind"] == a.kind)
                and (not a.model or j["model_id"] == a.model) and (not a.sae or j["sae_id"] == a.sae)
                and (since is None or j["created_at"] >= since)]
        return table(rows, ["id", "kind", "state", "step", "model_id", "created_at", "message"])
    if a.action == "cancel":
        # The Client's cancel is idempotent (two front ends may race); a person asking to cancel a
        # finished job is told so, with a failing exit status.
        state = c.job(a.job_id)["state"]
        if state in c.final_states():
            raise UserError(f"job {a.job_id} is already {state}; there is nothing to cancel")
        c.cancel(a.job_id)
        print(f"cancel requested for {a.job_id}")
    elif a.action == "priority":
        if a.value is None:
            raise UserError("give the new priority: mistudio jobs priority JOB_ID N (higher starts first)")
        c.set_priority(a.job_id, a.value)
    elif a.action == "queue":
        return table(c.queue(), ["id", "kind", "priority", "created_at", "model_id", "message"])
    elif a.action in ("pause", "finalize"):
        getattr(c, a.action)(a.job_id)
        print(f"{a.action} requested for {a.job_id}: it takes effect at the next chunk boundary")
    elif a.action == "resume":
        c.resume(a.job_id)
        print(f"resuming {a.job_id} from its checkpoint")
        follow(c, a.job_id)
    elif a.action == "retry":
        new = c.retry(a.job_id)
        print(f"retrying {a.job_id} as {new}")
        follow(c, new)
    elif a.action == "watch":
        follow(c, a.job_id)
    elif a.action == "show":
        print(json.dumps(c.job(a.job_id), indent=2, default=str))
        return
    table(c.jobs(state=a.state), ["id", "kind", "state", "step", "model_id", "created_at", "message"])


def cmd_templates(a) -> None:
    from actors.specs import load_job_file

    c = client()
    if a.action == "save":
        if not (a.name and a.file):
            raise UserError("templates save needs a name and --from FILE (a job config with 'kind:')")
        kind, values = load_job_file(a.file, partial=True)
        c.save_template(kind, a.name, values)
        print(f"saved {kind} template {a.name!r}")
    elif a.action == "import":
        if not a.file:
            raise UserError("templates import needs --from FILE (a file written by: mistudio templates export)")
        row = c.import_template(Path(a.file).read_text(), a.file)
        print(f"imported {row['kind']} template {row['name']!r}")
    elif a.action in ("show", "export", "delete"):
        if not (a.kind and a.name):
            raise UserError(f"templates {a.action} needs --kind and a name")
        if a.action == "delete":
            print("deleted" if c.delete_template(a.kind, a.name) else "no such template")
        elif a.action == "export" and a.out:
            from core.io import atomic_file, check_new

            with atomic_file(check_new(a.out, a.overwrite)) as tmp:
                tmp.write_text(c.export_template(a.kind, a.name))
            print(f"wrote {a.out}")
        else:
            print(c.export_template(a.kind, a.name))
        return
    table(c.templates(a.kind), ["kind", "name", "created_at", "values"])


def cmd_run(a) -> None:
    from actors.specs import load_job_file  # validates before any Ray call

    kind, spec = load_job_file(a.config, template=_template_values(a.template))
    c = client()
    if a.no_wait:
        print(c.submit(kind, spec, priority=a.priority))
        return
    job = run_job(c, kind, spec, priority=a.priority)
    print(json.dumps(job["result"], indent=2, default=str))


def _template_values(ref: str | None) -> tuple[str, dict[str, Any]] | None:
    """KIND/NAME → (kind, values) of a saved template, read from the registry."""
    if not ref:
        return None
    kind, _, name = ref.partition("/")
    if not name:
        raise UserError(f"--template {ref!r}: write it as KIND/NAME, e.g. train/my-recipe")
    return kind, client().template(kind, name)["values"]
