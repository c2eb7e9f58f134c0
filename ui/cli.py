"""The `mistudio` command line: the same jobs as the dashboard, submitted to the same actors.

Every job command submits a spec to the JobManager and follows it with a progress bar until it
ends; a failed job prints its one-line reason and exits with status 1. The job commands' flags
are made from the kinds' spec dataclasses (ui/cli_flags.py); what is printed is in ui/cli_output.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import UserError
from ui.cli_demo import DEMO_DEFAULTS, check_host, cmd_demo, serve
from ui.cli_jobs import cmd_jobs, cmd_run, cmd_templates
from ui.cli_output import delete_object, feature_text, run_job, sae_table, show_dataset, show_sae, table

# -- helpers ---------------------------------------------------------------------------
def client(start: bool = True):
    from actors.client import Client  # imported lazily: `mistudio --help` needs no Ray

    return Client(start=start)


def submit_flags(c, a) -> dict[str, Any] | None:
    """When `mistudio COMMAND ACTION` submits a job kind: the job made of the flags, followed to
    its end and shown; else None."""
    from ui import cli_flags

    kind = cli_flags.kind_of(a.command, getattr(a, "action", None))
    if kind is None:
        return None
    job = run_job(c, kind.name, cli_flags.spec_values(kind, a))
    print(kind.cli.show(job) if kind.cli.show else json.dumps(job["result"], indent=2, default=str))
    return job


# -- commands --------------------------------------------------------------------------
def cmd_models(a) -> None:
    if a.action == "estimate":
        return print(estimate(a))
    c = client()
    if a.action == "delete":
        return delete_object(c, "model", a.source)
    if a.action == "add":
        print(estimate(a), file=sys.stderr)
    submit_flags(c, a)
    table(c.models(), ["id", "architecture", "n_layers", "d_model", "n_params", "dtype", "quantization", "path"])


def estimate(a) -> str:
    """The memory a model will need at the chosen precision, read from its config before loading."""
    from core import models

    source = models.embedded_gguf_path() if a.source == "embedded" else a.source
    est = models.estimate_memory(source, dtype=a.dtype, quantization=a.quantization, batch_size=a.batch_size,
                                 context_length=a.context_length, trust_remote_code=a.trust_remote_code)
    return f"memory estimate: {est.detail}"


def cmd_datasets(a) -> None:
    c = client()
    if a.action == "delete":
        return delete_object(c, "dataset", a.source)
    submit_flags(c, a)
    if a.action == "show":
        return show_dataset(c, a.source)
    table(c.datasets(), ["id", "name", "model_id", "documents", "rows", "tokens", "context_length"])


def cmd_extract(a) -> None:
    c = client()
    if a.action == "delete":
        return delete_object(c, "activation", a.activation_id)
    submit_flags(c, a)
    rows = [dict(r, mean_norm=r["stats"].get("mean_norm"), median_norm=r["stats"].get("median_norm"),
                 std=r["stats"].get("std")) for r in c.activations()]
    table(rows, ["id", "model_id", "dataset_id", "hook_name", "tokens", "d_model", "mean_norm", "median_norm", "std"])


def cmd_train(a) -> None:
    if a.config:  # `mistudio train --config train.yaml`: the whole spec from a file, checked first
        from actors.specs import load_job_file
        from ui import cli_flags

        kind = cli_flags.kind_of(a.command, "run")
        _, spec = load_job_file(a.config, template=(kind.name, {}))
        print(json.dumps(run_job(client(), kind.name, spec)["result"], indent=2, default=str))
        return
    c = client()
    submit_flags(c, a)
    sae_table(c)


def cmd_saes(a) -> None:
    c = client()
    submit_flags(c, a)
    if a.action == "export":
        return print(f"wrote {c.export_sae(a.sae, a.out, a.overwrite)}")
    if a.action == "show":
        return show_sae(c, a.sae)
    if a.action == "delete":
        return delete_object(c, "sae", a.sae)
    sae_table(c)


def cmd_discover(a) -> None:
    c = client()
    submit_flags(c, a)
    if a.latent is not None:
        for ex in c.examples(a.sae_id, a.latent):
            print(f"{ex['activation']:8.3f}  {''.join(ex['tokens'])!r}")
    elif a.sae_id:
        c.discovered(a.sae_id)  # an unknown or undiscovered SAE is an error, not an empty table
        table(c.features(a.sae_id, limit=a.limit), ["latent", "frequency", "max_act", "mean_act", "top_tokens"])


def cmd_features(a) -> None:
    c = client()
    if submit_flags(c, a) is None:
        {"label": _label_by_hand, "export": _export_features, "show": _show_feature}[a.action](c, a)


def _label_by_hand(c, a) -> None:
    if a.latent is None or a.name is None:
        raise UserError("features label needs --latent and --name (an empty --name clears the label)")
    c.set_label(a.sae_id, a.latent, a.name, a.category, a.description)
    print(f"latent {a.latent}: {a.name!r}" if a.name else f"latent {a.latent}: label cleared")


def _export_features(c, a) -> None:
    if not a.out:
        raise UserError("features export needs --out (a folder for neuronpedia, a .zip for bundle)")
    print(f"wrote {c.export_features(a.sae_id, a.format, a.out, a.latents, a.overwrite)}")


def _show_feature(c, a) -> None:
    if a.latent is None:
        raise UserError("features show needs --latent")
    print(feature_text(c.feature_documents(a.sae_id, [a.latent])[0]))


def cmd_steer(a) -> None:
    c = client()
    if submit_flags(c, a) is not None:
        return
    if a.action == "export":
        from core.io import atomic_file, check_new

        text = json.dumps(c.experiment(a.experiment)["record"], indent=1)
        if a.out:
            with atomic_file(check_new(a.out, a.overwrite)) as tmp:
                tmp.write_text(text)
            print(f"wrote {a.out}")
        else:
            print(text)
    else:
        table(c.experiments(a.sae_id), ["id", "name", "sae_id", "mode", "created_at"])


def cmd_ui(a) -> None:
    check_host(a.host)  # before the cluster starts: nothing is left running after a refusal
    client()  # start or attach to the cluster before the app needs it
    serve(a.port, a.host)


def cmd_stop(a) -> None:
    from actors import cluster
    from storage import Settings

    print("stopped the local Ray head" if cluster.stop_head(Settings.from_env()) else "no local Ray head was running")


# -- parser ------------------------------------------------------------------------------
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the job flags of `command` only (or of every command when None), so that
    `mistudio --help` loads no engine. One piece: it reads top to bottom as the command list
    of `mistudio --help`, each with the flags that are not a job spec's field."""
    p = argparse.ArgumentParser(prog="mistudio", description="Mechanistic-interpretability studio.")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True)

    def job_flags(parser: argparse.ArgumentParser, name: str, positional_help: str = "") -> None:
        if command in (None, name):
            from ui import cli_flags

            cli_flags.add_flags(parser, name, positional_help)
            parser.set_defaults(job_flags=True)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded model, then serve the dashboard")
    d.add_argument("--layer", type=int, default=DEMO_DEFAULTS["layer"])
    d.add_argument("--max-tokens", type=int, default=DEMO_DEFAULTS["max_tokens"])
    d.add_argument("--port", type=int, default=8501)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="submit a job described in a YAML/JSON file (kind + fields), validated first")
    r.add_argument("config", help="e.g. train.yaml with 'kind: train' and the spec's fields")
    r.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    r.add_argument("--template", default=None, help="KIND/NAME of a saved template; the file's fields override it")
    r.add_argument("--priority", type=int, default=0, help="higher starts before lower among queued jobs")
    r.set_defaults(fn=cmd_run)

    u = sub.add_parser("ui", help="serve the dashboard (on localhost unless --host)")
    u.add_argument("--port", type=int, default=8501)
    u.add_argument("--host", default="localhost",
                   help="address to listen on, e.g. 0.0.0.0 for every interface; anything but localhost needs "
                        "MISTUDIO_UI_PASSWORD or OIDC (README: Serving a team)")
    u.set_defaults(fn=cmd_ui)

    s = sub.add_parser("stop", help="stop the local Ray head recorded under the data root")
    s.set_defaults(fn=cmd_stop)

    m = sub.add_parser("models", help="register and list models")
    m.add_argument("action", choices=["add", "list", "estimate", "delete"])
    job_flags(m, "models")
    m.add_argument("--batch-size", type=int, default=8, help="for the estimate: sequences per forward")
    m.add_argument("--context-length", type=int, default=256, help="for the estimate: tokens per sequence")
    m.set_defaults(fn=cmd_models)

    ds = sub.add_parser("datasets", help="tokenize and list datasets")
    ds.add_argument("action", choices=["add", "list", "show", "delete"])
    job_flags(ds, "datasets", "add: a built-in corpus ('stdlib-docs' a.k.a. 'builtin', 'stdlib-source'), a "
                              ".txt/.jsonl/.parquet/.csv file or a Hugging Face dataset id; show, delete: a "
                              "dataset id")
    ds.set_defaults(fn=cmd_datasets)

    e = sub.add_parser("extract", help="extract hooked activations to Parquet")
    e.add_argument("action", choices=["run", "list", "delete"])
    e.add_argument("activation_id", nargs="?", default=None, help="delete: the activation set's id")
    job_flags(e, "extract")
    e.set_defaults(fn=cmd_extract)

    t = sub.add_parser("train", help="train SAEs on extracted activations (one per hook × variant)")
    t.add_argument("action", nargs="?", choices=["run", "list"], default="list")
    t.add_argument("--config", default=None, help="a YAML/JSON file with the train job's fields (kind: train "
                                                  "optional), validated before anything runs")
    job_flags(t, "train")
    t.set_defaults(fn=cmd_train)

    sa = sub.add_parser("saes", help="list SAEs, import them from the field's formats, export SAELens folders")
    sa.add_argument("action", choices=["list", "show", "import", "export", "delete"])
    job_flags(sa, "saes", "import: a folder, .zip/.tar.gz archive or Hugging Face repo id (owner/name[/subfolder]) "
                          "of SAELens, sparsify, dictionary_learning or Gemma Scope SAEs")
    sa.add_argument("--sae", help="show, export, delete: the SAE id")
    sa.add_argument("--out", help="export: the folder to write (SAELens: cfg.json + sae_weights.safetensors)")
    sa.add_argument("--overwrite", action="store_true", help="export: replace what is at --out")
    sa.set_defaults(fn=cmd_saes)

    di = sub.add_parser("discover", help="find every latent's top activating contexts")
    di.add_argument("action", choices=["run", "show"])
    job_flags(di, "discover")
    di.add_argument("--latent", type=int, default=None, help="show this latent's top contexts")
    di.add_argument("--limit", type=int, default=20)
    di.set_defaults(fn=cmd_discover)

    fe = sub.add_parser("features", help="a feature's page, labels, analysis and exports")
    fe.add_argument("action", choices=["show", "label", "analyze", "autolabel", "export"])
    job_flags(fe, "features")
    fe.add_argument("--latent", type=int, default=None)
    fe.add_argument("--name", default=None, help="label: the label's name ('' clears it)")
    fe.add_argument("--category", default="other")
    fe.add_argument("--description", default="")
    fe.add_argument("--format", default="neuronpedia", choices=["neuronpedia", "bundle"])
    fe.add_argument("--out", default=None)
    fe.add_argument("--overwrite", action="store_true", help="export: replace what is at --out")
    fe.set_defaults(fn=cmd_features)

    st = sub.add_parser("steer", help="generate with SAE features added or clamped, beside the unsteered baseline")
    st.add_argument("action", choices=["run", "list", "export"])
    job_flags(st, "steer")
    st.add_argument("--experiment", help="export: the experiment id")
    st.add_argument("--out", default=None, help="export: write here instead of stdout")
    st.add_argument("--overwrite", action="store_true", help="export: replace the file at --out")
    st.set_defaults(fn=cmd_steer)

    tp = sub.add_parser("templates", help="save, list, export and import job forms and prompt sets as JSON")
    tp.add_argument("action", choices=["list", "show", "save", "delete", "export", "import"])
    tp.add_argument("name", nargs="?")
    tp.add_argument("--kind", default=None, help="job kind (train, discover, ...), steering_prompts or label_prompt")
    tp.add_argument("--from", dest="file", default=None, help="save: a job config file; import: an exported template")
    tp.add_argument("--out", default=None, help="export: write here instead of stdout")
    tp.add_argument("--overwrite", action="store_true", help="export: replace the file at --out")
    tp.set_defaults(fn=cmd_templates)

    j = sub.add_parser("jobs", help="list, watch, show, cancel and retry jobs; pause, resume and finalize training")
    j.add_argument("action", choices=["list", "queue", "watch", "show", "cancel", "retry", "priority", "pause",
                                      "resume", "finalize"])
    j.add_argument("job_id", nargs="?")
    j.add_argument("value", nargs="?", type=int, help="priority: the job's new priority")
    j.add_argument("--state", default=None)
    j.add_argument("--kind", default=None, help="list: only this job kind")
    j.add_argument("--model", default=None, help="list: only jobs on this model")
    j.add_argument("--sae", default=None, help="list: only jobs on this SAE")
    j.add_argument("--since", default=None, help="list: only jobs submitted since this UTC date/time (2026-12-01)")
    j.set_defaults(fn=cmd_jobs)
    return p


SAE, JOB = ("sae_id", "--sae"), ("job_id", "job_id")
REQUIRED = {("discover", "show"): [SAE], ("features", "show"): [SAE], ("features", "label"): [SAE],
            ("features", "export"): [SAE], ("steer", "export"): [("experiment", "--experiment")],
            ("jobs", "watch"): [JOB], ("jobs", "show"): [JOB], ("jobs", "cancel"): [JOB],
            ("saes", "show"): [("sae", "--sae")], ("saes", "delete"): [("sae", "--sae")],
            ("extract", "delete"): [("activation_id", "the activation set's id")]}
"""What the actions that submit no job need (a job action's needs come from its spec)."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((x for x in argv if not x.startswith("-")), "")  # "" → no job flags needed (--help)
    parser = build_parser(command)
    a = parser.parse_args(argv)
    action = getattr(a, "action", None)
    needs = [flag for dest, flag in REQUIRED.get((a.command, action), []) if getattr(a, dest) is None]
    if not needs and getattr(a, "job_flags", False) and not getattr(a, "config", None):
        from ui import cli_flags

        kind = cli_flags.kind_of(a.command, action)
        needs = cli_flags.missing(kind, a) if kind is not None else []
    if needs:
        parser.error(f"{a.command} {action} needs {needs[0]}")
    try:
        a.fn(a)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    except Exception as e:  # noqa: BLE001 - anything else is one line too, the traceback on request
        if a.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise SystemExit(f"error: {type(e).__name__}: {first} (mistudio --debug ... shows the traceback)") from None


if __name__ == "__main__":
    main()
