"""The `mistudio` command line: the same jobs as the dashboard, submitted to the same actors.

Every job command submits a spec to the JobManager and follows it with a progress bar until it
ends; a failed job prints its one-line reason and exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.errors import UserError
from core.sae import registry

EMBEDDED_ID = "smollm2-135m-instruct"
DEMO_DEFAULTS = {"layer": 15, "max_tokens": 40_000, "context_length": 256}
DEMO_TRAIN = {"expansion_factor": 8, "k": 32, "epochs": 8, "batch_size": 2048}
"""8x width TopK; several passes over the 40k demo tokens so FVU settles within minutes on a CPU."""


# -- helpers ---------------------------------------------------------------------------
def client(start: bool = True):
    from actors.client import Client  # imported lazily: `mistudio --help` needs no Ray

    return Client(start=start)


def follow(c, job_id: str, quiet: bool = False) -> dict[str, Any]:
    """Show a progress bar per job step until the job ends; exit 1 when it did not complete."""
    bars: dict[str, tqdm] = {}

    def update(job: dict, p: dict) -> None:
        if quiet:
            return
        step = p.get("step") or job.get("step") or job["kind"]
        if not p.get("step") and bars:  # the job manager's own reports (queued, completed) go on the current bar
            label = next(reversed(bars))
        else:  # a step in stages (an analysis: logits, NLP, ablation) gets a bar per stage, each from 0
            label = f"{step} · {p['stage']}" if p.get("stage") else step
        if label not in bars:
            for b in bars.values():
                b.close()
            # Until a step reports a total (loading a model has none) show time and state only.
            bars[label] = tqdm(desc=f"{label:>10}", total=None, unit=p.get("unit") or "it", unit_scale=True,
                               dynamic_ncols=True, leave=True, bar_format="{desc}: {elapsed}{postfix}")
        bar = bars[label]
        if p.get("total") and bar.total != p["total"]:
            bar.total, bar.bar_format = p["total"], None
        if p.get("done") is not None and p.get("step") == step:
            bar.n = p["done"]
        shown = {k: p[k] for k in ("loss", "fvu", "l0", "dead_frac", "features_in_heap", "heap_examples_count")
                 if isinstance(p.get(k), (int, float))}
        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()} | {"state": job["state"]}, refresh=False)
        bar.refresh()

    job = c.wait(job_id, update)
    for b in bars.values():
        b.close()
    if job["state"] != "completed":
        raise SystemExit(f"error: job {job_id} {job['state']}: {job['message']}")
    return job


def run_job(c, kind: str, spec: dict[str, Any], quiet: bool = False, priority: int = 0) -> dict[str, Any]:
    job_id = c.submit(kind, spec, priority=priority)
    if not quiet:
        print(f"submitted {kind} job {job_id}", file=sys.stderr)
    return follow(c, job_id, quiet)


def table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return " ".join(repr(x) for x in v[:5])
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return "" if v is None else str(v)


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers like 5,10, got {text!r}") from None


# -- commands --------------------------------------------------------------------------
def cmd_models(a) -> None:
    if a.action == "estimate":
        return print(estimate(a))
    c = client()
    if a.action == "add":
        print(estimate(a), file=sys.stderr)
        job = run_job(c, "add_model", {"source": a.source, "name": a.name, "dtype": a.dtype,
                                       "quantization": a.quantization, "trust_remote_code": a.trust_remote_code})
        print(f"registered model {job['result']['model_id']}")
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
    if a.action == "add":
        job = run_job(c, "add_dataset", {"model_id": a.model, "source": a.source, "name": a.name,
                                         "text_column": a.text_column, "context_length": a.context_length,
                                         "max_documents": a.max_documents})
        print(f"registered dataset {job['result']['dataset_id']}")
    if a.action == "show":
        return show_dataset(c, a.source)
    table(c.datasets(), ["id", "name", "model_id", "documents", "rows", "tokens", "context_length"])


def show_dataset(c, dataset_id: str) -> None:
    """A dataset's numbers and its row-length histogram, drawn in text."""
    from storage.registry import Dataset

    ds = c.get(Dataset, dataset_id)
    if ds is None:
        raise UserError(f"no dataset {dataset_id!r}; list them with: mistudio datasets list")
    print(f"{ds['id']}  ({ds['source']}, tokenized for {ds['model_id']})")
    print(f"documents {ds['documents']:,}  rows {ds['rows']:,}  tokens {ds['tokens']:,}  "
          f"context length {ds['context_length']}")
    hist = ds["stats"].get("length_hist") or {}
    edges, counts = hist.get("bin_edges", []), hist.get("counts", [])
    top = max(counts, default=0) or 1
    print("row length (tokens)")
    for lo, hi, n in zip(edges, edges[1:], counts):
        print(f"  {lo:>6.0f}-{hi:<6.0f} {'#' * round(40 * n / top):<40} {n:,}")


def cmd_extract(a) -> None:
    c = client()
    if a.action == "run":
        job = run_job(c, "extract", {"model_id": a.model, "dataset_id": a.dataset, "layers": a.layers,
                                     "site": a.site, "batch_size": a.batch_size, "max_tokens": a.max_tokens,
                                     "exclude_special_tokens": a.exclude_special})
        print(json.dumps(job["result"], indent=2))
    rows = [dict(r, mean_norm=r["stats"].get("mean_norm"), median_norm=r["stats"].get("median_norm"),
                 std=r["stats"].get("std")) for r in c.activations()]
    table(rows, ["id", "model_id", "dataset_id", "hook_name", "tokens", "d_model", "mean_norm", "median_norm", "std"])


def cmd_train(a) -> None:
    if a.config:  # `mistudio train --config train.yaml`: the whole spec from a file, checked first
        from actors.specs import load_job_file

        _, spec = load_job_file(a.config, template=("train", {}))
        print(json.dumps(run_job(client(), "train", spec)["result"], indent=2, default=str))
        return
    c = client()
    if a.action == "run":
        cfg = {"architecture": a.architecture, "expansion_factor": a.expansion, "k": a.k, "epochs": a.epochs,
               "batch_size": a.batch_size}
        for flag, key in (("lr", "lr"), ("l1", "l1_coefficient"), ("l0", "l0_coefficient")):
            if getattr(a, flag) is not None:
                cfg[key] = getattr(a, flag)
        spec = {"activation_ids": a.activations.split(","), "config": cfg, "eval_rows": a.eval_rows,
                "checkpoint_every": a.checkpoint_every, "resume_job": a.resume or ""}
        if a.k_variants:
            spec["variants"] = [{"k": int(k)} for k in a.k_variants.split(",")]
        job = run_job(c, "train", spec)
        print(json.dumps(job["result"], indent=2))
    sae_table(c)


def sae_table(c) -> None:
    rows = [dict(s, fvu=s["metrics"].get("fvu"), l0=s["metrics"].get("l0"), dead=s["metrics"].get("dead_frac"),
                 ce_rec=s["metrics"].get("ce_loss_recovered_zero")) for s in c.saes()]
    table(rows, ["id", "hook_name", "architecture", "d_sae", "settings", "fvu", "l0", "dead", "ce_rec", "path"])


def cmd_saes(a) -> None:
    c = client()
    if a.action == "import":
        job = run_job(c, "import_sae", {"source": a.source, "model_id": a.model, "hook_name": a.hook or "",
                                        "format": a.format or "", "name": a.name or ""})
        print(f"imported {', '.join(job['result']['sae_ids'])}")
    if a.action == "export":
        return print(f"wrote {c.export_sae(a.sae, a.out)}")
    sae_table(c)


def cmd_discover(a) -> None:
    c = client()
    if a.action == "run":
        job = run_job(c, "discover", {"sae_id": a.sae, "dataset_id": a.dataset, "top_k": a.top_k,
                                      "max_tokens": a.max_tokens})
        print(json.dumps(job["result"], indent=2))
    if a.latent is not None:
        for ex in c.examples(a.sae, a.latent):
            print(f"{ex['activation']:8.3f}  {''.join(ex['tokens'])!r}")
    elif a.sae:
        table(c.features(a.sae, limit=a.limit), ["latent", "frequency", "max_act", "mean_act", "top_tokens"])


def cmd_features(a) -> None:
    c = client()
    if a.action == "analyze":
        cfg = {"ablation_top": a.ablation_top, "nlp": not a.no_nlp}
        job = run_job(c, "analyze", {"sae_id": a.sae, "latents": a.latents or [], "config": cfg})
        print(json.dumps(job["result"]))
    elif a.action == "autolabel":
        job = run_job(c, "label", {"sae_id": a.sae, "method": a.method, "latents": a.latents or [], "limit": a.limit,
                                   "model_id": a.label_model or "", "base_url": a.base_url or "",
                                   "endpoint_model": a.endpoint_model or "", "template": a.template or "",
                                   "detection": a.detection})
        print(job["message"])
    elif a.action == "label":
        if a.latent is None or a.name is None:
            raise UserError("features label needs --latent and --name (an empty --name clears the label)")
        c.set_label(a.sae, a.latent, a.name, a.category, a.description)
        print(f"latent {a.latent}: {a.name!r}" if a.name else f"latent {a.latent}: label cleared")
    elif a.action == "export":
        if not a.out:
            raise UserError("features export needs --out (a folder for neuronpedia, a .zip for bundle)")
        print(f"wrote {c.export_features(a.sae, a.format, a.out, a.latents)}")
    else:
        if a.latent is None:
            raise UserError("features show needs --latent")
        print(feature_text(c.feature_documents(a.sae, [a.latent])[0]))


def feature_text(doc: dict[str, Any]) -> str:
    """A feature page as text: label, numbers, logit effects, neighbours, NLP, ablation, contexts."""
    ex = doc["explanation"]
    lines = [f"latent {doc['feature_index']}: {ex['name'] or '(no label)'}"
             + (f" [{ex['category']}, {ex['source']}]" if ex["name"] else ""),
             f"  frequency {doc['frac_nonzero']:.4%}  max {doc['max_act']:.4g}  mean {doc['mean_act']:.4g}"]
    if ex["description"]:
        lines.append(f"  {ex['description']}")
    if doc["pos_str"]:
        lines.append("  promotes  " + " ".join(repr(t) for t in doc["pos_str"][:8]))
        lines.append("  suppresses " + " ".join(repr(t) for t in doc["neg_str"][:8]))
    if doc["similar_features"]:
        lines.append("  similar   " + ", ".join(f"#{i} ({c:.2f})" for i, c in doc["similar_features"][:5]))
    if doc["coactive_features"]:
        lines.append("  co-active " + ", ".join(f"#{x['latent']} ×{x['count']}" for x in doc["coactive_features"][:5]))
    if doc.get("nlp"):
        lines.append(f"  NLP: {doc['nlp']['summary']}")
    ab = doc.get("ablation") or {}
    if "mean_delta_loss_at_max" in ab:
        lines.append(f"  ablation: next-token loss {ab['mean_delta_loss_at_max']:+.4f} nats at the max token, "
                     f"{ab['mean_delta_loss_after']:+.4f} after ({ab['n_contexts']} contexts)")
    for a in doc["activations"]:
        kind = "top" if a["bin_min"] == -1 else f"q {a['bin_min']:.3g}-{a['bin_max']:.3g}"
        toks = a["tokens"]
        i = a["maxValueTokenIndex"]
        text = "".join(toks[:i]) + "[[" + toks[i] + "]]" + "".join(toks[i + 1:])
        lines.append(f"  {kind:>16} {a['maxValue']:8.3f}  {text!r}")
    return "\n".join(lines)


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


def cmd_steer(a) -> None:
    c = client()
    if a.action == "run":
        gen = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
               "top_k": a.top_k, "repetition_penalty": a.repetition_penalty, "seed": a.seed}
        job = run_job(c, "steer", {"sae_id": a.sae, "prompts": a.prompt or [], "features": a.feature or [],
                                   "mode": a.mode, "strengths": a.strengths or [], "generation": gen,
                                   "prompt_template": a.prompt_template or "", "name": a.name})
        for o in job["result"]["outputs"]:
            ppl = f"{o['perplexity']:.2f}" if o["perplexity"] is not None else "–"
            print(f"[{o['label']}] (perplexity {ppl})\n  {o['prompt']}{o['text']}")
        if job["result"].get("experiment_id"):
            print(f"saved experiment {job['result']['experiment_id']}")
    elif a.action == "export":
        from core.io import atomic_file

        text = json.dumps(c.experiment(a.experiment)["record"], indent=1)
        if a.out:
            with atomic_file(Path(a.out)) as tmp:
                tmp.write_text(text)
            print(f"wrote {a.out}")
        else:
            print(text)
    else:
        table(c.experiments(a.sae), ["id", "name", "sae_id", "mode", "created_at"])


def cmd_jobs(a) -> None:
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
            from core.io import atomic_file

            with atomic_file(Path(a.out)) as tmp:
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


def cmd_demo(a) -> None:
    from actors import cluster
    from storage import Settings

    settings = Settings.from_env()
    started = not settings.ray_address and cluster.recorded_head(settings) is None
    c = client()
    summary = run_demo(c, a.layer, a.max_tokens)
    print(summary)
    if os.environ.get("DEMO_SERVE", "1") == "0":
        if started:
            cluster.stop_head(settings)
        return
    serve(a.port)


def run_demo(c, layer: int, max_tokens: int) -> str:
    """Embedded model + built-in corpus → extraction → TopK SAE → discovery; returns the summary."""
    if not any(m["id"] == EMBEDDED_ID for m in c.models()):
        run_job(c, "add_model", {"source": "embedded"})
    datasets = [d for d in c.datasets() if d["source"] == "builtin" and d["model_id"] == EMBEDDED_ID
                and d["context_length"] == DEMO_DEFAULTS["context_length"]]
    if datasets:
        dataset_id = datasets[0]["id"]
    else:
        dataset_id = run_job(c, "add_dataset", {"model_id": EMBEDDED_ID, "source": "builtin",
                                                "context_length": DEMO_DEFAULTS["context_length"]})["result"]["dataset_id"]
    job = run_job(c, "pipeline", {"model_id": EMBEDDED_ID, "dataset_id": dataset_id, "layer": layer,
                                  "max_tokens": max_tokens, "train": DEMO_TRAIN})
    sae_id = job["result"]["sae_id"]
    # the feature pages then show logit effects, NLP summaries, measured ablations and labels
    run_job(c, "analyze", {"sae_id": sae_id, "config": {"ablation_top": 8}})
    run_job(c, "label", {"sae_id": sae_id, "method": "heuristic"})
    return demo_summary(c, job)


def demo_summary(c, job: dict[str, Any]) -> str:
    from storage.registry import Activation

    res = job["result"]
    tr, disc = res["train"], res["discover"]
    act = c.get(Activation, res["activation_id"])
    lines = [
        "",
        f"miStudio demo — job {job['id']} completed",
        f"  tokens extracted : {act['tokens']:,} at {act['hook_name']}",
        f"  SAE              : {res['sae_id']} (TopK, {disc['n_latents']} latents)",
        f"  FVU (held-out)   : {tr['fvu']:.4f}",
        f"  L0               : {tr['l0']:.1f}",
        f"  dead latents     : {100 * tr['dead_frac']:.2f}%",
        f"  CE loss recovered: {tr['ce_loss_recovered_zero']:.3f} vs zero ablation, "
        f"{tr['ce_loss_recovered_mean']:.3f} vs mean ablation (KL {tr['kl_sae']:.3f}; "
        f"{tr['eval_rows']} held-out rows)",
        f"  live features    : {disc['live_features']:,}",
        "  most frequent live features:",
    ]
    for f in c.features(res["sae_id"], limit=5):
        tops = ", ".join(repr(t) for t in f["top_tokens"])
        lines.append(f"    #{f['latent']:<6} freq {f['frequency']:.4f}  max {f['max_act']:.2f}  top tokens: {tops}")
        ab = (f["analysis"] or {}).get("ablation") or {}
        extra = f"  ablation {ab['mean_delta_loss_at_max']:+.3f} nats" if "mean_delta_loss_at_max" in ab else ""
        lines.append(f"            label: {f['label'] or '–'} ({f['category'] or '–'}){extra}")
    return "\n".join(lines)


def serve(port: int) -> None:
    app = Path(__file__).with_name("app.py")
    print(f"serving the dashboard on http://localhost:{port} (Ctrl-C to stop)")
    subprocess.run([sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "localhost",
                    "--server.port", str(port), "--server.headless", "true",
                    "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"], check=False)


def cmd_ui(a) -> None:
    client()  # start or attach to the cluster before the app needs it
    serve(a.port)


def cmd_stop(a) -> None:
    from actors import cluster
    from storage import Settings

    print("stopped the local Ray head" if cluster.stop_head(Settings.from_env()) else "no local Ray head was running")


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistudio", description="Mechanistic-interpretability studio.")
    sub = p.add_subparsers(dest="command", required=True)

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

    u = sub.add_parser("ui", help="serve the dashboard on localhost")
    u.add_argument("--port", type=int, default=8501)
    u.set_defaults(fn=cmd_ui)

    s = sub.add_parser("stop", help="stop the local Ray head recorded under the data root")
    s.set_defaults(fn=cmd_stop)

    m = sub.add_parser("models", help="register and list models")
    m.add_argument("action", choices=["add", "list", "estimate"])
    m.add_argument("source", nargs="?", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct), a model folder, a .gguf file or a Hugging Face id")
    m.add_argument("--name", default="")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"],
                   help="bitsandbytes loading: 8bit (LLM.int8) or 4bit (NF4); every job loads the model this way")
    m.add_argument("--trust-remote-code", action="store_true")
    m.add_argument("--batch-size", type=int, default=8, help="for the estimate: sequences per forward")
    m.add_argument("--context-length", type=int, default=256, help="for the estimate: tokens per sequence")
    m.set_defaults(fn=cmd_models)

    ds = sub.add_parser("datasets", help="tokenize and list datasets")
    ds.add_argument("action", choices=["add", "list", "show"])
    ds.add_argument("source", nargs="?", default="builtin",
                    help="add: 'builtin' (stdlib docs), a .txt/.jsonl/.parquet/.csv file or a Hugging Face dataset id; "
                         "show: a dataset id")
    ds.add_argument("--model", default=EMBEDDED_ID, help="model whose tokenizer to use")
    ds.add_argument("--name", default="")
    ds.add_argument("--text-column", default="text")
    ds.add_argument("--context-length", type=int, default=256)
    ds.add_argument("--max-documents", type=int, default=None)
    ds.set_defaults(fn=cmd_datasets)

    e = sub.add_parser("extract", help="extract hooked activations to Parquet")
    e.add_argument("action", choices=["run", "list"])
    e.add_argument("--model", default=EMBEDDED_ID)
    e.add_argument("--dataset")
    e.add_argument("--layers", type=_layers, default=[15], help="comma-separated layers, e.g. 5,15")
    e.add_argument("--site", default="resid_post")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--exclude-special", action="store_true",
                   help="leave BOS/EOS and other special tokens out of the activations")
    e.set_defaults(fn=cmd_extract)

    t = sub.add_parser("train", help="train SAEs on extracted activations (one per hook × variant)")
    t.add_argument("action", nargs="?", choices=["run", "list"], default="list")
    t.add_argument("--config", default=None, help="a YAML/JSON file with the train job's fields (kind: train "
                                                  "optional), validated before anything runs")
    t.add_argument("--activations", help="activation set id(s), comma-separated: several hooks and/or datasets "
                                         "(see: mistudio extract list)")
    t.add_argument("--architecture", default=registry.DEFAULT, choices=registry.names())
    t.add_argument("--expansion", type=int, default=8)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--k-variants", default=None, help="comma-separated k values: one SAE per value, one pass")
    t.add_argument("--l1", type=float, default=None, help="L1 coefficient (standard)")
    t.add_argument("--l0", type=float, default=None, help="L0 coefficient (jumprelu)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--eval-rows", type=int, default=None, help="rows held out for evaluation (default 5%%, ≤64)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: none)")
    t.add_argument("--resume", default=None, help="continue from the checkpoints of this earlier train job")
    t.set_defaults(fn=cmd_train)

    sa = sub.add_parser("saes", help="list SAEs, import them from the field's formats, export SAELens folders")
    sa.add_argument("action", choices=["list", "import", "export"])
    sa.add_argument("source", nargs="?", help="import: a folder, .zip/.tar.gz archive or Hugging Face repo id "
                                              "(owner/name[/subfolder]) of SAELens, sparsify, dictionary_learning "
                                              "or Gemma Scope SAEs")
    sa.add_argument("--model", help="import: the registered model the SAEs read")
    sa.add_argument("--hook", default=None, help="import: the hook site when the files do not name it")
    sa.add_argument("--format", default=None, help="import: skip detection (saelens, sparsify, ...)")
    sa.add_argument("--name", default=None, help="import: a registry name prefix")
    sa.add_argument("--sae", help="export: the SAE id")
    sa.add_argument("--out", help="export: the folder to write (SAELens: cfg.json + sae_weights.safetensors)")
    sa.set_defaults(fn=cmd_saes)

    di = sub.add_parser("discover", help="find every latent's top activating contexts")
    di.add_argument("action", choices=["run", "show"])
    di.add_argument("--sae")
    di.add_argument("--dataset")
    di.add_argument("--top-k", type=int, default=20)
    di.add_argument("--max-tokens", type=int, default=None)
    di.add_argument("--latent", type=int, default=None, help="show this latent's top contexts")
    di.add_argument("--limit", type=int, default=20)
    di.set_defaults(fn=cmd_discover)

    fe = sub.add_parser("features", help="a feature's page, labels, analysis and exports")
    fe.add_argument("action", choices=["show", "label", "analyze", "autolabel", "export"])
    fe.add_argument("--sae")
    fe.add_argument("--latent", type=int, default=None)
    fe.add_argument("--latents", type=_layers, default=None, help="comma-separated latents (default: all live)")
    fe.add_argument("--name", default=None, help="label: the label's name ('' clears it)")
    fe.add_argument("--category", default="other")
    fe.add_argument("--description", default="")
    fe.add_argument("--ablation-top", type=int, default=8, help="analyze: measure the ablation of this many latents")
    fe.add_argument("--no-nlp", action="store_true", help="analyze: skip the spaCy summaries")
    fe.add_argument("--method", default="heuristic", choices=["heuristic", "local", "openai"])
    fe.add_argument("--limit", type=int, default=0, help="autolabel: at most this many latents, most frequent first")
    fe.add_argument("--label-model", default=None, help="autolabel local: a registered model (default: the SAE's)")
    fe.add_argument("--base-url", default=None, help="autolabel openai: e.g. http://127.0.0.1:8000/v1")
    fe.add_argument("--endpoint-model", default=None, help="autolabel openai: the served model's name")
    fe.add_argument("--template", default=None, help="autolabel: a saved label_prompt template")
    fe.add_argument("--detection", action="store_true", help="autolabel: score each label by detection")
    fe.add_argument("--format", default="neuronpedia", choices=["neuronpedia", "bundle"])
    fe.add_argument("--out", default=None)
    fe.set_defaults(fn=cmd_features)

    st = sub.add_parser("steer", help="generate with SAE features added or clamped, beside the unsteered baseline")
    st.add_argument("action", choices=["run", "list", "export"])
    st.add_argument("--sae")
    st.add_argument("--feature", type=_feature_arg, action="append",
                    help="LATENT:STRENGTH[:add|clamp]; repeat for several features")
    st.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    st.add_argument("--prompt-template", default=None, help="a saved steering_prompts template")
    st.add_argument("--mode", default="compare", choices=["compare", "blend", "sweep"])
    st.add_argument("--strengths", type=lambda t: [float(x) for x in t.split(",")], default=None,
                    help="sweep: comma-separated strengths, e.g. 0,4,8,16")
    st.add_argument("--max-new-tokens", type=int, default=40)
    st.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    st.add_argument("--top-p", type=float, default=1.0)
    st.add_argument("--top-k", type=int, default=0)
    st.add_argument("--repetition-penalty", type=float, default=1.0)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--name", default="")
    st.add_argument("--experiment", help="export: the experiment id")
    st.add_argument("--out", default=None, help="export: write here instead of stdout")
    st.set_defaults(fn=cmd_steer)

    tp = sub.add_parser("templates", help="save, list, export and import job forms and prompt sets as JSON")
    tp.add_argument("action", choices=["list", "show", "save", "delete", "export", "import"])
    tp.add_argument("name", nargs="?")
    tp.add_argument("--kind", default=None, help="job kind (train, discover, ...), steering_prompts or label_prompt")
    tp.add_argument("--from", dest="file", default=None, help="save: a job config file; import: an exported template")
    tp.add_argument("--out", default=None, help="export: write here instead of stdout")
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


REQUIRED = {("extract", "run"): ["dataset"], ("train", "run"): ["activations"],
            ("discover", "run"): ["sae", "dataset"], ("discover", "show"): ["sae"],
            ("steer", "run"): ["sae", "feature"], ("features", "show"): ["sae"], ("features", "label"): ["sae"],
            ("features", "analyze"): ["sae"], ("features", "autolabel"): ["sae"], ("features", "export"): ["sae"], ("steer", "export"): ["experiment"],
            ("jobs", "watch"): ["job_id"], ("jobs", "show"): ["job_id"], ("jobs", "cancel"): ["job_id"]}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name in REQUIRED.get((a.command, getattr(a, "action", None)), []):
        if getattr(a, name) is None:
            flag = name if name == "job_id" else f"--{name.replace('_', '-')}"
            parser.error(f"{a.command} {a.action} needs {flag}")
    try:
        a.fn(a)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
