"""Features: an SAE's metrics and training curves, its latents, and each latent's top contexts."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import streamlit as st

from ui.widgets import fmt_number, get_client, guard, line_charts, token_html, top_token_text

SORTS = {"frequency": "frequency", "max_act": "max activation", "mean_act": "mean activation"}


def sae_summary(sae: dict[str, Any]) -> None:
    m = sae.get("metrics") or {}
    c = st.columns(6)
    c[0].metric("FVU", fmt_number(m.get("fvu"), 4), help="fraction of variance unexplained (lower is better)")
    c[1].metric("L0", fmt_number(m.get("l0"), 3), help="latents active per token")
    dead = m.get("dead_frac")
    c[2].metric("Dead", f"{dead:.1%}" if isinstance(dead, (int, float)) else "–",
                help="latents that did not fire for the dead-token window")
    c[3].metric("MSE", fmt_number(m.get("mse"), 4))
    c[4].metric("Width", fmt_number(sae.get("d_sae")), help=f"d_in {sae.get('d_in')}")
    c[5].metric("k", fmt_number(sae.get("k")))
    st.caption(f"{sae.get('architecture', '')} SAE on `{sae.get('hook_name')}` of `{sae.get('model_id')}` · "
               f"id `{sae['id']}`")
    history = sae.get("history") or []
    with st.expander(f"Training curves ({len(history)} log steps)", expanded=False):
        if not history:
            st.caption("This SAE has no training history (imported?).")
        else:
            df = pd.DataFrame(history)
            x, title = ("tokens", "tokens trained") if "tokens" in df.columns else ("step", "step")
            line_charts(df, x, title, {"loss": "loss", "mse": "MSE", "fvu": "FVU", "l0": "L0",
                                       "dead_frac": "dead fraction"}, columns=3)


def _matches(row: dict[str, Any], query: str) -> bool:
    q = query.lower()
    if q.strip().isdigit() and int(q) == row["latent"]:
        return True
    return any(q in str(t[0] if isinstance(t, (list, tuple)) and t else t).lower()
               for t in row.get("top_tokens") or [])


def features_table(client, sae: dict[str, Any]) -> tuple[pd.DataFrame, dict[int, dict[str, Any]]]:
    c = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    query = c[0].text_input("Search top tokens", key="search", placeholder="a token, e.g. def or (  — or a latent number")
    min_freq = c[1].number_input("Min frequency", min_value=0.0, max_value=1.0, value=0.0, step=0.0001,
                                 format="%.4f", key="min_frequency", help="fraction of tokens the latent fires on")
    order = c[2].selectbox("Sort by", list(SORTS), format_func=SORTS.get, key="order_by")
    live_only = c[3].checkbox("Live latents only", value=True, key="live_only")
    rows = client.features(sae["id"], order_by=order, min_frequency=float(min_freq))
    if live_only:
        rows = [r for r in rows if r["n_fired"] > 0]
    if query:
        rows = [r for r in rows if _matches(r, query)]
    by_latent = {r["latent"]: r for r in rows}
    df = pd.DataFrame([{"latent": r["latent"], "frequency": r["frequency"], "n_fired": r["n_fired"],
                        "max_act": r["max_act"], "mean_act": r["mean_act"],
                        "top_tokens": top_token_text(r["top_tokens"])} for r in rows],
                      columns=["latent", "frequency", "n_fired", "max_act", "mean_act", "top_tokens"])
    st.caption(f"{len(df):,} of {fmt_number(sae.get('d_sae'))} latents · select a row, or pick a latent below")
    event = st.dataframe(
        df, hide_index=True, key="features_table", on_select="rerun", selection_mode="single-row", height=320,
        column_config={
            "latent": st.column_config.NumberColumn("latent", format="%d"),
            "frequency": st.column_config.NumberColumn("frequency", format="%.5f", help="fraction of tokens"),
            "n_fired": st.column_config.NumberColumn("fired", format="%d", help="tokens it fired on"),
            "max_act": st.column_config.NumberColumn("max act", format="%.3f"),
            "mean_act": st.column_config.NumberColumn("mean act", format="%.3f", help="mean over firing tokens"),
            "top_tokens": st.column_config.TextColumn("top tokens", width="large"),
        })
    picked = getattr(getattr(event, "selection", None), "rows", None) or []
    if picked and picked[0] < len(df):
        latent = int(df.iloc[picked[0]]["latent"])
        if st.session_state.get("_table_pick") != latent:  # a new row click drives the latent picker
            st.session_state["_table_pick"] = latent
            st.session_state["latent"] = latent
    return df, by_latent


def contexts(client, sae: dict[str, Any], latents: list[int], by_latent: dict[int, dict[str, Any]]) -> None:
    if not latents:
        st.caption("No latent matches the filters.")
        return
    # A latent picked for another SAE (or filtered out) means nothing here: start at the top.
    if st.session_state.get("latent") not in latents or st.session_state.get("latent_sae") != sae["id"]:
        st.session_state.pop("latent", None)
    st.session_state["latent_sae"] = sae["id"]
    latent = st.selectbox(
        "Latent", latents, key="latent",
        format_func=lambda i: f"{i} · freq {by_latent[i]['frequency']:.4g} · {top_token_text(by_latent[i]['top_tokens'], 5)}")
    feat = by_latent[latent]
    c = st.columns(4)
    c[0].metric("Frequency", f"{feat['frequency']:.4%}")
    c[1].metric("Fired on", fmt_number(feat["n_fired"]), help="tokens")
    c[2].metric("Max activation", fmt_number(feat["max_act"], 4))
    c[3].metric("Mean activation", fmt_number(feat["mean_act"], 4))
    examples = client.examples(sae["id"], latent)
    if not examples:
        st.caption("No stored contexts for this latent (it never fired on the dataset).")
        return
    st.caption(f"Top {len(examples)} contexts · shading from 0 to the latent's max activation "
               f"({feat['max_act']:.3f}); the outlined token is where the context's maximum sits; hover for values.")
    lines = []
    for ex in sorted(examples, key=lambda e: e.get("rank", 0)):
        label = html.escape(f"{ex['activation']:.3f}")
        lines.append(
            '<div style="display: flex; gap: 0.75rem; align-items: baseline; padding: 0.3rem 0; '
            'border-bottom: 1px solid rgba(128,128,128,0.2);">'
            f'<div style="min-width: 4.5rem; font-family: monospace; color: #b34700;">{label}</div>'
            f'<div style="flex: 1;">{token_html(ex["tokens"], ex["acts"], feat["max_act"], ex.get("max_index"))}'
            "</div></div>")
    st.html("".join(lines))


def page() -> None:
    st.title("Features")
    client = get_client()
    saes = client.saes()
    ready = [s for s in saes if s.get("features_path")]
    if not ready:
        hint = "Start a run on the Jobs page (extract → train → discover)."
        if saes:
            hint += (f" {len(saes)} trained SAE(s) still need discovery: "
                     "`mistudio discover run --sae <sae-id> --dataset <dataset-id>`.")
        st.info("No SAE has discovered features yet. " + hint, icon=":material/info:")
        return
    by_id = {s["id"]: s for s in reversed(ready)}  # newest first
    sae_id = st.selectbox("SAE", list(by_id), key="sae", format_func=lambda i: f"{by_id[i]['name']} · {i}")
    if len(ready) < len(saes):
        st.caption(f"{len(saes) - len(ready)} SAE(s) without discovered features are not listed.")
    sae = by_id[sae_id]
    sae_summary(sae)
    st.subheader("Latents")
    df, by_latent = features_table(client, sae)
    st.subheader("Top contexts")
    contexts(client, sae, df["latent"].astype(int).tolist(), by_latent)


guard(page)
