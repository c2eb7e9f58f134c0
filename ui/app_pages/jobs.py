"""Jobs: start a run (extract → train → discover), watch it live, browse every job."""

from __future__ import annotations

from typing import Any

import streamlit as st

from storage.registry import JOB_STATES
from ui.cli_demo import DEMO_DEFAULTS, DEMO_TRAIN
from ui.widgets import fmt_number, get_client, guard, jobs_frame, model_and_dataset, progress_panel, submit_job

# Form defaults: the demo's run. (A comment, not a docstring: Streamlit's magic would print it.)
DEFAULTS = {"max_tokens": DEMO_DEFAULTS["max_tokens"], "batch_size": 8,
            "expansion_factor": DEMO_TRAIN["expansion_factor"], "k": DEMO_TRAIN["k"], "epochs": DEMO_TRAIN["epochs"],
            "train_batch_size": DEMO_TRAIN["batch_size"], "top_k": 20}

def run_form(client) -> None:
    from core.hooks import SITES

    chosen = model_and_dataset(client, "run")
    if chosen is None:
        return
    model, dataset = chosen
    model_id, dataset_id = model["id"], dataset["id"]
    n_layers, d_model = model["n_layers"], model["d_model"]

    with st.form("pipeline_form"):
        st.markdown("**Extraction**")
        c = st.columns(4)
        # keyed per model: the bound changes with the model's depth
        layer = c[0].number_input("Layer", min_value=0, max_value=n_layers - 1, value=n_layers // 2, step=1,
                                  key=f"layer-{model_id}", help=f"0 to {n_layers - 1}")
        site = c[1].selectbox("Hook site", SITES, index=SITES.index("resid_post"), key="site",
                              help="TransformerLens names: resid_post is the decoder block's output")
        max_tokens = c[2].number_input("Max tokens (0 = all)", min_value=0, value=DEFAULTS["max_tokens"],
                                       step=1000, key="max_tokens",
                                       help=f"the dataset has {fmt_number(dataset['tokens'])} tokens")
        batch_size = c[3].number_input("Batch size (sequences)", min_value=1, value=DEFAULTS["batch_size"],
                                       key="batch_size")
        st.markdown("**Training**")
        architecture = st.selectbox("SAE type", ["topk", "batchtopk", "jumprelu", "standard"], key="architecture",
                                    help="topk: k latents per token (+AuxK); batchtopk: k per token on average, "
                                         "saved as JumpReLU; jumprelu: learned thresholds, L0 penalty; "
                                         "standard: ReLU + L1 penalty")
        c = st.columns(4)
        expansion = c[0].number_input("Expansion factor", min_value=1, value=DEFAULTS["expansion_factor"],
                                      key="expansion_factor",
                                      help=f"SAE width = {d_model} (d_model) × expansion factor")
        k = c[1].number_input("k (latents per token)", min_value=1, value=DEFAULTS["k"], key="k",
                              help="at most the SAE width")
        epochs = c[2].number_input("Epochs", min_value=1, value=DEFAULTS["epochs"], key="epochs")
        train_batch = c[3].number_input("Batch size (tokens)", min_value=1, value=DEFAULTS["train_batch_size"],
                                        step=256, key="train_batch_size")
        st.markdown("**Discovery**")
        c = st.columns(4)
        top_k = c[0].number_input("Top contexts per feature", min_value=1, value=DEFAULTS["top_k"], key="top_k")
        submitted = st.form_submit_button("Start run", type="primary", icon=":material/play_arrow:", key="submit")

    if not submitted:
        return
    spec: dict[str, Any] = {
        "model_id": model_id, "dataset_id": dataset_id, "layer": int(layer), "site": site,
        "batch_size": int(batch_size), "max_tokens": int(max_tokens) or None,
        "train": {"architecture": architecture, "expansion_factor": int(expansion), "k": int(k), "epochs": int(epochs),
                  "batch_size": int(train_batch)},
        "top_k": int(top_k),
    }
    submit_job(client, "pipeline", spec)


def queue_view(client) -> None:
    """Queued jobs in the order they will start; a job's priority can be changed (higher first)."""
    queued = client.queue()
    if not queued:
        st.caption("Nothing is waiting.")
        return
    st.dataframe([{"#": i + 1, "id": j["id"], "kind": j["kind"], "priority": j["priority"],
                   "submitted (UTC)": j["created_at"], "model": j["model_id"]} for i, j in enumerate(queued)],
                 hide_index=True, key="queue_table")
    by_id = {j["id"]: j for j in queued}
    c = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    job_id = c[0].selectbox("Job", list(by_id), key="queue_job")
    priority = c[1].number_input("Priority", value=int(by_id[job_id]["priority"]), step=1, key=f"queue_priority-{job_id}")
    if c[2].button("Set", key="queue_set"):
        client.set_priority(job_id, int(priority))
        st.rerun()
    if c[3].button("Run next", key="queue_next", help="a priority above every other queued job"):
        client.set_priority(job_id, max(j["priority"] for j in queued) + 1)
        st.rerun()


def history_table(client) -> None:
    jobs = client.jobs()
    c = st.columns(5)
    state = c[0].selectbox("State", ["all", *JOB_STATES], key="history_state")
    kind = c[1].selectbox("Kind", ["all", *sorted({j["kind"] for j in jobs})], key="history_kind")
    model = c[2].selectbox("Model", ["all", *sorted({j["model_id"] for j in jobs if j["model_id"]})],
                           key="history_model")
    sae = c[3].selectbox("SAE", ["all", *sorted({j["sae_id"] for j in jobs if j["sae_id"]})], key="history_sae")
    since = c[4].date_input("Since", value=None, key="history_since", help="jobs submitted on or after this day (UTC)")
    wanted = {"state": state, "kind": kind, "model_id": model, "sae_id": sae}
    jobs = [j for j in jobs if all(v == "all" or j[k] == v for k, v in wanted.items())
            and (since is None or j["created_at"].date() >= since)]
    if not jobs:
        st.caption("No jobs match." if client.jobs() else "No jobs yet.")
        return
    dt_fmt = "YYYY-MM-DD HH:mm:ss"
    st.dataframe(
        jobs_frame(jobs), hide_index=True,
        column_order=["id", "kind", "state", "step", "message", "created_at", "started_at", "finished_at",
                      "duration_s", "model_id", "dataset_id", "sae_id"],
        column_config={
            "created_at": st.column_config.DatetimeColumn("created (UTC)", format=dt_fmt),
            "started_at": st.column_config.DatetimeColumn("started (UTC)", format=dt_fmt),
            "finished_at": st.column_config.DatetimeColumn("finished (UTC)", format=dt_fmt),
            "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
            "message": st.column_config.TextColumn("message", width="large"),
        })
    by_id = {j["id"]: j for j in jobs}
    with st.expander("Job details"):
        job_id = st.selectbox("Job", list(by_id), key="detail_job")
        job = by_id[job_id]
        st.json({"spec": job.get("spec"), "result": job.get("result")}, expanded=1)


def page() -> None:
    st.title("Jobs")
    client = get_client()
    st.subheader("New run")
    st.caption("Extract activations at one hook site, train a TopK SAE on them, then find every latent's "
               "top activating contexts.")
    run_form(client)
    st.subheader("Progress")
    progress_panel(client)
    st.subheader("Queue")
    queue_view(client)
    st.subheader("Job history")
    history_table(client)


guard(page)
