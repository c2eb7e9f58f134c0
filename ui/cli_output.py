"""What the `mistudio` CLI prints: progress bars that follow a job, tables, a dataset's
numbers, a feature's page as text."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from core.errors import UserError


LOG_INTERVAL_S = 5.0
"""Without a terminal (output sent to a file or a pipe) a bar prints at most one line per this
many seconds, besides its first and last: a redraw per progress report floods logs."""


def follow(c, job_id: str, quiet: bool = False) -> dict[str, Any]:
    """Show a progress bar per job step until the job ends; exit 1 when it did not complete."""
    bars: dict[str, tqdm] = {}
    terminal = sys.stderr.isatty()
    drawn = [time.monotonic()]  # when a bar last printed

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
        if terminal or time.monotonic() - drawn[0] >= LOG_INTERVAL_S:
            bar.refresh()
            drawn[0] = time.monotonic()

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


# The columns of `mistudio saes list`: (metric key, title naming its convention).
SAE_COLUMNS = [("fvu", "fvu(ours)"), ("l0", "l0"), ("dead_frac", "dead"), ("ce_loss_recovered_zero", "ce_rec(ours)"),
               ("explained_variance", "expl_var(SAELens)"), ("ce_loss_score", "ce_score(SAELens)")]


def sae_table(c) -> None:
    rows = [dict(s, **{title: s["metrics"].get(key) for key, title in SAE_COLUMNS}) for s in c.saes()]
    table(rows, ["id", "hook_name", "architecture", "d_sae", "settings", *(t for _, t in SAE_COLUMNS), "path"])
    print("(ours: miStudio's definitions; SAELens: sae_lens.evals.run_evals's. `mistudio saes show --sae ID` "
          "says what each means.)")


def delete_object(c, kind: str, object_id: str) -> None:
    """Delete a model, dataset, activation set or SAE with its files (refused while in use)."""
    removed = c.delete(kind, object_id)
    print(f"deleted {kind} {object_id}" + (f" and {', '.join(removed)}" if removed else ""))


def show_sae(c, sae_id: str) -> None:
    """One SAE: what it reads, and every headline metric with the definition it follows."""
    sae = next((s for s in c.saes() if s["id"] == sae_id), None)
    if sae is None:
        raise UserError(f"no SAE {sae_id!r}; list them with: mistudio saes list")
    m = sae["metrics"] or {}
    print(f"{sae['id']}  {sae['name']}")
    print(f"{sae['architecture']} at {sae['hook_name']} of {sae['model_id']}: d_in {sae['d_in']} → d_sae "
          f"{sae['d_sae']:,} ({sae['settings']})  stored at {sae['path']}")
    if "eval_tokens" in m:
        print(f"held-out slice: {m.get('eval_rows')} rows, {m['eval_tokens']:,} tokens "
              f"({m.get('eval_excluded_special', 0):,} special, {m.get('excluded_outliers', 0):,} norm outliers "
              "set aside under miStudio's definitions)")
    definitions = c.metric_definitions()
    for convention in dict.fromkeys(d.convention for d in definitions.values()):
        print(f"{convention}'s definitions:")
        for key, d in definitions.items():
            if d.convention == convention and m.get(key) is not None:
                print(f"  {d.label:<16} {_fmt(m[key]):>8}  {d.meaning}")


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
