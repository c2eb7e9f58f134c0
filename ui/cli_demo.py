"""`mistudio demo`: the embedded model and the built-in corpus through extraction, a TopK SAE,
discovery, analysis and labels, a summary printed, then the dashboard served."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from core.errors import UserError
from ui.cli_output import run_job

DEMO_DEFAULTS = {"layer": 15, "max_tokens": 40_000, "context_length": 256}
DEMO_TRAIN = {"expansion_factor": 8, "k": 32, "epochs": 8, "batch_size": 2048}
"""8x width TopK; several passes over the 40k demo tokens so FVU settles within minutes on a CPU."""


def cmd_demo(a) -> None:
    from actors import cluster
    from storage import Settings
    from ui.cli import client

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
    from actors.jobs.add_model import EMBEDDED_ID

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
        f"  held-out metrics : {tr['eval_rows']} rows; miStudio's definitions, then SAELens's (README: Evaluation)",
        f"  FVU (held-out)   : {tr['fvu']:.4f}",
        f"  L0               : {tr['l0']:.1f}",
        f"  dead latents     : {100 * tr['dead_frac']:.2f}%",
        f"  CE loss recovered: {tr['ce_loss_recovered_zero']:.3f} vs zero ablation, "
        f"{tr['ce_loss_recovered_mean']:.3f} vs mean ablation (KL {tr['kl_sae']:.3f})",
        f"  SAELens's evals  : explained_variance {tr['explained_variance']:.4f}, ce_loss_score "
        f"{tr['ce_loss_score']:.3f}, kl_div_score {tr['kl_div_score']:.3f} (KL {tr['kl_div_with_sae']:.3f})",
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


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_host(host: str) -> None:
    """Serving beyond this machine needs sign-in: a UserError, before anything starts, when
    neither MISTUDIO_UI_PASSWORD nor an OIDC provider is configured."""
    from ui.components.signin import PASSWORD_ENV, sign_in_configured

    if host not in LOOPBACK and not sign_in_configured():
        raise UserError(f"refusing to serve the dashboard on {host} with no sign-in; set {PASSWORD_ENV} or "
                        "configure OIDC ([auth] in .streamlit/secrets.toml), see README \"Serving a team\"")


def serve(port: int, host: str = "localhost") -> None:
    check_host(host)
    app = Path(__file__).with_name("app.py")
    shown = f"[{host}]" if ":" in host else host
    print(f"serving the dashboard on http://{shown}:{port} (Ctrl-C to stop)")
    from ui.supervise import supervise  # (imports Ray: not for `mistudio --help`)

    # supervised: restarted on a new head when the Ray head dies (ui/supervise.py)
    supervise([sys.executable, "-m", "streamlit", "run", str(app), "--server.address", host,
               "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"])
