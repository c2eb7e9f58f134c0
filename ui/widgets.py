"""Widgets shared by the dashboard's pages: the client, the live progress panel, charts, token shading.

The dashboard talks only to `actors.client.Client`. Everything here reads the registry and the
ProgressActor afresh on every run, so a page refresh (or a restarted UI) finds running jobs
and reattaches to their live numbers on its first poll.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
from typing import Any, Callable

import altair as alt
import pandas as pd
import streamlit as st

from core.errors import UserError
from storage.registry import FINAL_STATES

log = logging.getLogger("mistudio.ui")

POLL_S = 1.5
"""Seconds between progress polls while a job runs (workers report about once a second)."""

PIPELINE_STEPS = {"pipeline": ("extract", "train", "discover")}

LABEL_ENDPOINT = "label_endpoint"
"""Session-state key of the labeling endpoint set on the Settings page: {"base_url", "model",
"api_key"}, kept for this browser session only."""

TRAIN_METRICS = {"loss": "loss", "fvu": "FVU", "l0": "L0", "dead_frac": "dead fraction"}
DISCOVER_METRICS = {"features_in_heap": "features with examples", "heap_examples_count": "examples collected"}


# -- the client ---------------------------------------------------------------------------
@st.cache_resource(show_spinner="Connecting to the miStudio Ray cluster…")
def get_client():
    """One Client per dashboard process; settings come from the environment (MISTUDIO_*).

    Connecting attaches to the deployment's Ray cluster, starting the local head when none runs.
    """
    from actors.client import Client  # imported here so an import failure shows as a page error

    return Client()


def guard(body: Callable[[], None], name: str = "page") -> None:
    """Run a page (or fragment) body; show failures as a readable error instead of a traceback.

    `name` keeps the Reconnect button's key unique when a page nests a guarded fragment.
    """
    try:
        body()
    except UserError as e:
        st.error(str(e), icon=":material/error:")
    except Exception as e:  # noqa: BLE001 - st.rerun/st.stop are BaseExceptions and pass through
        log.exception("dashboard page failed")
        first = (str(e).strip().splitlines() or [""])[0]
        st.error(f"Something went wrong: {type(e).__name__}: {first}" if first else
                 f"Something went wrong: {type(e).__name__}", icon=":material/error:")
        st.caption("The full traceback is in the dashboard's log. If the Ray cluster restarted, reconnect.")
        if st.button("Reconnect", key=f"reconnect-{name}"):
            get_client.clear()
            st.rerun()


# -- sign-in -----------------------------------------------------------------------------------
PASSWORD_ENV = "MISTUDIO_UI_PASSWORD"


def _oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets.toml at all
        return False


def signed_in() -> bool:
    """Whether this browser session may see the app; draws the sign-in form when not. Open when
    neither a password (MISTUDIO_UI_PASSWORD) nor an OIDC provider ([auth] in Streamlit's
    secrets.toml, Streamlit's built-in st.login) is configured."""
    import hmac
    import os

    if _oidc_configured():
        if st.user.get("is_logged_in"):  # a mapping: absent until the provider has answered
            return True
        st.title("miStudio")
        st.button("Sign in", on_click=st.login, type="primary", key="oidc-login")
        return False
    password = os.environ.get(PASSWORD_ENV, "")
    if not password or st.session_state.get("signed_in"):
        return True
    st.title("miStudio")
    with st.form("sign_in"):
        given = st.text_input("Password", type="password", key="password")
        if st.form_submit_button("Sign in", type="primary"):
            if hmac.compare_digest(given.encode(), password.encode()):
                st.session_state["signed_in"] = True
                st.rerun()
            st.error("Wrong password.", icon=":material/error:")
    return False


# -- formatting -----------------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def fmt_number(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def submit_job(client, kind: str, spec: dict[str, Any]) -> str | None:
    """Submit a job and say so on the page: its id, or the one-line reason it was refused."""
    try:
        job_id = client.submit(kind, spec)
    except UserError as e:
        st.error(str(e), icon=":material/error:")
        return None
    st.success(f"Submitted {kind} job `{job_id}` — it is queued; its progress is below.", icon=":material/check_circle:")
    return job_id


# -- model and dataset pickers --------------------------------------------------------------------
HOW_TO_ADD_MODEL = ("No model is registered yet: register one on the **Models** page (the embedded SmolLM2-135M "
                    "works offline), or from a terminal with `mistudio models add`.")


def how_to_add_dataset(model_id: str) -> str:
    return (f"No dataset is tokenized for `{model_id}` yet (datasets are tokenized with a model's tokenizer): add one "
            f"on the **Datasets** page, or from a terminal with `mistudio datasets add --model {model_id}`.")


def model_and_dataset(client, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A model and one of its datasets picked side by side, or None (with how to add one) when
    there is none yet. `key` keeps the widgets of different pages apart."""
    models = client.models()
    if not models:
        st.info(HOW_TO_ADD_MODEL, icon=":material/info:")
        return None
    by_id = {m["id"]: m for m in models}
    left, right = st.columns(2)
    model_id = left.selectbox(
        "Model", list(by_id), key=f"{key}-model",
        format_func=lambda i: f"{by_id[i]['name']} — {by_id[i]['architecture']}, {by_id[i]['n_layers']} layers, "
                              f"d_model {by_id[i]['d_model']}")
    datasets = {d["id"]: d for d in client.datasets() if d["model_id"] == model_id}
    if not datasets:
        st.info(how_to_add_dataset(model_id), icon=":material/info:")
        return None
    dataset_id = right.selectbox(
        "Dataset", list(datasets), key=f"{key}-dataset-{model_id}",
        format_func=lambda i: f"{datasets[i]['name']} — {fmt_number(datasets[i]['tokens'])} tokens, "
                              f"context {datasets[i]['context_length']}")
    return by_id[model_id], datasets[dataset_id]


# -- charts ---------------------------------------------------------------------------------
def line_charts(df: pd.DataFrame, x: str, x_title: str, metrics: dict[str, str], columns: int = 2,
                color: str | None = None, height: int = 180) -> int:
    """One small line chart per metric present in `df` (metrics differ in scale); returns how many."""
    present = [(c, t) for c, t in metrics.items() if c in df.columns and df[c].notna().any()]
    if not present or x not in df.columns:
        return 0
    cols = st.columns(min(columns, len(present)))
    for i, (col, title) in enumerate(present):
        keep = [x, col] + ([color] if color and color in df.columns else [])
        data = df[keep].dropna(subset=[x, col])
        enc = {
            "x": alt.X(f"{x}:Q", title=x_title),
            "y": alt.Y(f"{col}:Q", title=title, scale=alt.Scale(zero=False)),
            "tooltip": [alt.Tooltip(f"{x}:Q", title=x_title, format=",.4~g"),
                        alt.Tooltip(f"{col}:Q", title=title, format=",.4~g")],
        }
        if color and color in data.columns:
            enc["color"] = alt.Color(f"{color}:N", title=color)
        chart = (alt.Chart(data, title=title).mark_line(point=len(data) < 3).encode(**enc)
                 .properties(height=height))
        cols[i % len(cols)].altair_chart(chart, width="stretch")
    return len(present)


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """A job's progress points as a frame with `elapsed_s` since its first point."""
    if not history:
        return pd.DataFrame()
    df = pd.DataFrame(history)
    if "t" in df.columns:
        df["elapsed_s"] = df["t"] - df["t"].min()
    if "step" in df.columns:
        df["step"] = df["step"].fillna("").astype(str)
    return df


def job_charts(history: list[dict[str, Any]]) -> None:
    """Live charts over a job's whole history: training metrics, discovery heap, throughput."""
    df = history_frame(history)
    if df.empty or "elapsed_s" not in df.columns:
        st.caption("No progress points yet.")
        return
    drawn = 0
    train = df[df["loss"].notna()] if "loss" in df.columns else df.iloc[0:0]
    if not train.empty:
        st.markdown("**Training**")
        drawn += line_charts(train, "elapsed_s", "time (s)", TRAIN_METRICS)
    disc = df[df[[c for c in DISCOVER_METRICS if c in df.columns]].notna().any(axis=1)] \
        if any(c in df.columns for c in DISCOVER_METRICS) else df.iloc[0:0]
    if not disc.empty:
        st.markdown("**Discovery**")
        drawn += line_charts(disc, "elapsed_s", "time (s)", DISCOVER_METRICS)
    if "samples_per_s" in df.columns and df["samples_per_s"].notna().any():
        st.markdown("**Throughput**")
        drawn += line_charts(df, "elapsed_s", "time (s)", {"samples_per_s": "samples / s"}, columns=1,
                             color="step" if "step" in df.columns and (df["step"] != "").any() else None)
    if not drawn:
        st.caption("No metrics to chart yet.")


# -- the progress panel -------------------------------------------------------------------------
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
    steps = PIPELINE_STEPS.get(job["kind"])
    if steps and step in steps:
        parts.append(f"(step {steps.index(step) + 1} of {len(steps)})")
    if p.get("stage"):  # a step in stages (an analysis) counts each stage from 0: say which one
        parts.append(str(p["stage"]))
    done, total = _num(p.get("done")), _num(p.get("total"))
    if done is not None and total:
        parts.append(f"{fmt_number(int(done))} / {fmt_number(int(total))} {p.get('unit') or ''}".rstrip())
    parts.append(f"{frac:.0%}")
    if state in FINAL_STATES:
        parts.append(f"— {state}")
    return frac, " · ".join(parts)


def job_card(client, job: dict[str, Any], active: bool) -> None:
    """One job: bar, state/step/message, rate, ETA, live metrics, charts and a Cancel button."""
    p = client.progress(job["id"]) or {}
    head, btn = st.columns([5, 1], vertical_alignment="center")
    head.markdown(f"**{job['kind']}** `{job['id']}` — **{job['state']}**"
                  + (f" · step `{job['step']}`" if job.get("step") else ""))
    if job["state"] not in FINAL_STATES and btn.button("Cancel", key=f"cancel-{job['id']}", icon=":material/cancel:"):
        client.cancel(job["id"])
        st.toast(f"Cancel requested for {job['id']}")
        st.rerun()
    if job["kind"] == "train":
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
        st.caption(" · ".join(bits))
    live = [("loss", "loss", 4), ("fvu", "FVU", 4), ("l0", "L0", 3), ("dead_frac", "dead", None),
            ("features_in_heap", "features with examples", None), ("heap_examples_count", "examples", None)]
    shown = [(label, p[k], d) for k, label, d in live if _num(p.get(k)) is not None]
    if shown:
        cols = st.columns(len(shown))
        for col, (label, v, digits) in zip(cols, shown):
            value = f"{v:.1%}" if label == "dead" else fmt_number(v, digits) if digits else fmt_number(v)
            col.metric(label, value)
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
            finished = next((j for j in client.jobs() if j["state"] in FINAL_STATES), None)
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


# -- tables -----------------------------------------------------------------------------------
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


# -- token shading ------------------------------------------------------------------------------
_WS = "color: #999;"


def visible_token(token: str) -> str:
    """A token's text, HTML-escaped, with whitespace made visible (newline ↵, tab ⇥, spaces ·)."""
    if token == "":
        return f'<span style="{_WS}">∅</span>'
    if token.strip() == "":  # a whitespace-only token would be invisible: mark every character
        marks = {"\n": "↵", "\t": "⇥", "\r": "␍", " ": "·"}
        out = "".join(marks.get(ch, "␣") for ch in token)
        return f'<span style="{_WS}">{out}</span>' + "<br>" * token.count("\n")
    text = html.escape(token)
    text = text.replace("\r", f'<span style="{_WS}">␍</span>')
    text = text.replace("\t", f'<span style="{_WS}">⇥</span>')
    return text.replace("\n", f'<span style="{_WS}">↵</span><br>')


def token_html(tokens: list[str], acts: list[float], max_act: float | None = None,
               highlight: int | None = None) -> str:
    """Tokens as spans shaded by activation (0 → clear, `max_act` → full orange).

    Pass the latent's max activation so contexts of one feature are shaded on one scale; the
    activation of each token is in its tooltip, and `highlight` outlines one token (the max).
    """
    acts = [float(a) if a is not None else 0.0 for a in acts]
    scale = max_act if max_act and max_act > 0 else max([a for a in acts if math.isfinite(a)] or [0.0])
    scale = scale if scale > 0 else 1.0
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = min(max(a / scale, 0.0), 1.0) if math.isfinite(a) else 0.0
        style = f"background-color: rgba(255, 127, 14, {alpha:.2f}); border-radius: 3px; padding: 0 1px;"
        if i == highlight:
            style += " outline: 1.5px solid #b34700;"
        title = html.escape(f"{tok!r}: {a:.3f}", quote=True)
        spans.append(f'<span style="{style}" title="{title}">{visible_token(tok)}</span>')
    return ('<div style="font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; '
            'white-space: pre-wrap; line-height: 1.9; word-break: break-word;">' + "".join(spans) + "</div>")


def top_token_text(top_tokens: Any, n: int = 8) -> str:
    """A feature's top tokens as one readable string (entries may be str, [tok, count] or dicts)."""
    out = []
    for t in list(top_tokens or [])[:n]:
        if isinstance(t, dict):
            t = t.get("token", next(iter(t.values()), ""))
        elif isinstance(t, (list, tuple)) and t:
            t = t[0]
        out.append(repr(str(t)))
    return " ".join(out)
