"""Jobs on the page: the live progress panel, one card per job with its controls, submitting a
job, and the jobs table.

Cards read the registry and the ProgressActor afresh on every run, so a refreshed page (or a
restarted UI) reattaches to running jobs and their live numbers on its first poll.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pandas as pd
import streamlit as st

from actors.client import Client, UserError
from ui.components.charts import job_charts
from ui.components.client import guard, show_error
from ui.components.formatting import fmt_duration, fmt_number, literal

POLL_S = 1.5
"""Seconds between progress polls while a job runs (workers report about once a second)."""



def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def submit_job(client, kind: str, spec: dict[str, Any]) -> str | None:
    """Submit a job and say so on the page: its id, or the one-line reason it was refused."""
    try:
        job_id = client.submit(kind, spec)
    except UserError as e:
        show_error(e)
        return None
    st.success(f"Submitted {kind} job `{job_id}` — it is queued; its progress is below.", icon=":material/check_circle:")
    return job_id


def _bar(job: dict[str, Any], p: dict[str, Any]) -> tuple[float, str]:
    """The progress bar's fraction and text for a job and its latest progress point."""
    state = job["state"]
    if state == "completed":
        return 1.0, "completed"
    frac = _num(p.get("fraction"))
    if frac is None:
        done, total = _num(p.get("done")), _num(p.get("total"))
        frac = min(done / total, 1.0) if done is not None and total else 0.0
    frac = min(max(frac, 0.0), 1.0)
    if state == "queued":
        return frac, p.get("message") or job.get("message") or "queued, waiting for a worker"
    step = p.get("step") or job.get("step") or p.get("phase") or job["kind"]
    parts = [str(step)]
    steps = Client.job_kind(job["kind"])["steps"]
    if steps and step in steps:
        parts.append(f"(step {steps.index(step) + 1} of {len(steps)})")
    if p.get("stage"):  # a step in stages (an analysis) counts each stage from 0: say which one
        parts.append(str(p["stage"]))
    done, total = _num(p.get("done")), _num(p.get("total"))
    if done is not None and total:
        parts.append(f"{fmt_number(int(done))} / {fmt_number(int(total))} {p.get('unit') or ''}".rstrip())
    parts.append(f"{frac:.0%}")
    if state in Client.final_states():
        parts.append(f"— {state}")
    return frac, " · ".join(parts)


def job_card(client, job: dict[str, Any], active: bool) -> None:
    """One job: bar, state/step/message, rate, ETA, live metrics, charts and a Cancel button."""
    p = client.progress(job["id"]) or {}
    head, btn = st.columns([5, 1], vertical_alignment="center")
    head.markdown(f"**{job['kind']}** `{job['id']}` — **{job['state']}**"
                  + (f" · step `{job['step']}`" if job.get("step") else ""))
    if job["state"] not in Client.final_states() and btn.button("Cancel", key=f"cancel-{job['id']}", icon=":material/cancel:"):
        client.cancel(job["id"])
        st.toast(f"Cancel requested for {job['id']}")
        st.rerun()
    if client.job_kind(job["kind"])["pausable"]:
        training_controls(client, job, btn)
    if job["state"] in ("failed", "cancelled") and btn.button("Retry", key=f"retry-{job['id']}",
                                                              icon=":material/replay:", help="run the same spec again"):
        st.toast(f"Retrying {job['id']} as {client.retry(job['id'])}")
        st.rerun()
    frac, text = _bar(job, p)
    st.progress(frac, text=text)
    message = job.get("message") or p.get("message") or ""
    bits = [message] if message else []
    if active:
        if _num(p.get("samples_per_s")):
            bits.append(f"{fmt_number(p['samples_per_s'], 3)} {p.get('unit') or 'samples'}/s")
        if _num(p.get("eta_s")) is not None:
            bits.append(f"ETA {fmt_duration(p['eta_s'])}")
    elif job.get("started_at") and job.get("finished_at"):
        bits.append(f"took {fmt_duration((job['finished_at'] - job['started_at']).total_seconds())}")
    if bits:
        st.caption(literal(" · ".join(bits)))  # a job's message may quote names and files users typed
    live = [("loss", "loss", 4), ("fvu", "FVU", 4), ("l0", "L0", 3), ("dead_frac", "dead", None),
            ("features_in_heap", "features with examples", None), ("heap_examples_count", "examples", None)]
    shown = [(k, label, p[k], d) for k, label, d in live if _num(p.get(k)) is not None]
    if shown:
        definitions = client.metric_definitions()  # whose definition a number follows, in its tooltip
        cols = st.columns(len(shown))
        for col, (key, label, v, digits) in zip(cols, shown):
            value = f"{v:.1%}" if label == "dead" else fmt_number(v, digits) if digits else fmt_number(v)
            col.metric(label, value, help=definitions[key].tooltip() if key in definitions else None)
    with st.expander("Charts", expanded=active):
        job_charts(client.history(job["id"]))


def training_controls(client, job: dict[str, Any], where) -> None:
    """Pause / Finalize for a running training, Resume for a paused one."""
    buttons = {"running": [("Pause", "pause", ":material/pause:", "save a checkpoint at the next chunk boundary "
                                                                    "and stop; Resume continues exactly"),
                           ("Finalize", "finalize", ":material/flag:", "stop at the next chunk boundary and save "
                                                                       "the SAE as it is, evaluated")],
               "paused": [("Resume", "resume", ":material/play_arrow:", "continue from the checkpoint")]}
    for label, action, icon, help_ in buttons.get(job["state"], []):
        if where.button(label, key=f"{action}-{job['id']}", icon=icon, help=help_):
            getattr(client, action)(job["id"])
            st.toast(f"{label} requested for {job['id']}")
            st.rerun()


def progress_panel(client, poll_s: float = POLL_S) -> None:
    """Live progress of every active job (and the most recent finished one).

    The fragment polls every `poll_s` seconds only while something runs: the interval is
    decided by the full run, and when the set of active jobs changes the fragment asks for a
    full rerun, which refreshes the rest of the page and stops (or restarts) the timer.
    """
    active_ids = tuple(j["id"] for j in client.active_jobs())

    @st.fragment(run_every=poll_s if active_ids else None)
    def panel() -> None:
        def body() -> None:
            active = client.active_jobs()
            if tuple(j["id"] for j in active) != active_ids:
                st.rerun()  # a job started or ended: refresh the page, re-decide the timer
            finished = next((j for j in client.jobs() if j["state"] in Client.final_states()), None)
            if not active:
                st.caption("Nothing is running." + (" Most recent job:" if finished else ""))
            for job in active:
                with st.container(border=True):
                    job_card(client, job, active=True)
            for job in client.jobs(state="paused"):  # waiting for Resume: shown, never polled for
                with st.container(border=True):
                    job_card(client, job, active=False)
            if finished:
                with st.container(border=True):
                    job_card(client, finished, active=False)

        guard(body, name="progress")

    panel()


def jobs_frame(jobs: list[dict[str, Any]]) -> pd.DataFrame:
    cols = ["id", "kind", "state", "step", "message", "model_id", "dataset_id", "sae_id",
            "created_at", "started_at", "finished_at"]
    df = pd.DataFrame([{c: j.get(c) for c in cols} for j in jobs], columns=cols)
    if not df.empty:
        end = df["finished_at"].where(df["finished_at"].notna(), pd.Timestamp(dt.datetime.now(dt.timezone.utc)
                                                                              .replace(tzinfo=None)))
        df["duration_s"] = (pd.to_datetime(end) - pd.to_datetime(df["started_at"])).dt.total_seconds()
    else:
        df["duration_s"] = pd.Series(dtype=float)
    return df
