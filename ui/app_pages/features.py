"""Features: an SAE's metrics and training curves, its latents, and each latent's top contexts."""

from __future__ import annotations

import html
import time
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from actors.client import UserError
from ui.components.charts import line_charts
from ui.components.client import get_client, guard, show_error
from ui.components.formatting import fmt_number, literal
from ui.components.forms import LABEL_ENDPOINT as ENDPOINT
from ui.components.tokens import token_html, top_token_text

SORTS = {"frequency": "frequency", "max_act": "max activation", "mean_act": "mean activation"}
PAGE_SIZE = 500  # latents per page of the table (the registry serves one page at a time)
PAGE_TTL_S = 30.0  # how long a rerun may reuse the page shown (labels written by a running job show after it)


def sae_summary(sae: dict[str, Any], definitions: dict) -> None:
    m = sae.get("metrics") or {}

    def explain(key: str) -> str:
        return definitions[key].tooltip()
    c = st.columns(7)
    c[0].metric("FVU", fmt_number(m.get("fvu"), 4), help=explain("fvu"))
    c[1].metric("L0", fmt_number(m.get("l0"), 3), help=explain("l0"))
    dead = m.get("dead_frac")
    c[2].metric("Dead", f"{dead:.1%}" if isinstance(dead, (int, float)) else "–", help=explain("dead_frac"))
    c[3].metric("Explained var. (SAELens)", fmt_number(m.get("explained_variance"), 4),
                help=explain("explained_variance"))
    c[4].metric("CE score (SAELens)", fmt_number(m.get("ce_loss_score"), 4), help=explain("ce_loss_score"))
    c[5].metric("Width", fmt_number(sae.get("d_sae")), help=f"d_in {sae.get('d_in')}")
    c[6].metric("Type", sae.get("architecture", ""), help=sae.get("settings") or None)
    st.caption(f"{sae.get('architecture', '')} SAE on `{sae.get('hook_name')}` of `{sae.get('model_id')}` · "
               f"id `{sae['id']}` · FVU, L0, dead: miStudio's definitions; the others SAELens's (run_evals) — "
               "the SAEs page lists every metric with its definition")
    history = sae.get("history") or []
    with st.expander(f"Training curves ({len(history)} log steps)", expanded=False):
        if not history:
            st.caption("This SAE has no training history (imported?).")
        else:
            df = pd.DataFrame(history)
            x, title = ("tokens", "tokens trained") if "tokens" in df.columns else ("step", "step")
            line_charts(df, x, title, {"loss": "loss", "mse": "MSE", "fvu": "FVU", "l0": "L0",
                                       "dead_frac": "dead fraction"}, columns=3)


def cached_page(client, sae_id: str, number: int, filters: dict[str, Any]):
    """Page `number` of the latents under `filters`. A rerun that keeps them (picking a latent,
    opening an expander) reuses the page it already has for PAGE_TTL_S seconds instead of asking
    the registry again — a search over 65k latents costs a scan; a saved label starts afresh."""
    key = (sae_id, number, tuple(sorted(filters.items())), st.session_state.get("_labels_saved", 0))
    hit = st.session_state.get("_page_cache")
    if hit is not None and hit[0] == key and time.monotonic() - hit[1] < PAGE_TTL_S:
        return hit[2]
    page = client.feature_page(sae_id, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters)
    st.session_state["_page_cache"] = (key, time.monotonic(), page)  # one page, never every latent
    return page


def features_table(client, sae: dict[str, Any]) -> tuple[pd.DataFrame, dict[int, dict[str, Any]]]:
    c = st.columns([3, 1, 1, 1], vertical_alignment="bottom")
    query = c[0].text_input("Search tokens and labels", key="search", placeholder="a token or label, e.g. def or (  — or a latent number")
    min_freq = c[1].number_input("Min frequency", min_value=0.0, max_value=1.0, value=0.0, step=0.0001,
                                 format="%.4f", key="min_frequency", help="fraction of tokens the latent fires on")
    order = c[2].selectbox("Sort by", list(SORTS), format_func=SORTS.get, key="order_by")
    live_only = c[3].checkbox("Live latents only", value=True, key="live_only")
    c = st.columns([1, 1, 2], vertical_alignment="bottom")
    min_max = c[0].number_input("Min max activation", min_value=0.0, value=0.0, key="min_max_act",
                                help="the latent's largest activation over the data")
    labels = c[1].selectbox("Labels", ["all", "labeled", "unlabeled", *client.label_categories()], key="label_filter",
                            help="labeled or not, or one label category")
    # the registry filters, sorts and slices: the page holds one page of latents, never all of them
    filters = {"order_by": order, "min_frequency": float(min_freq), "live_only": live_only,
               "min_max_act": float(min_max), "labels": labels, "search": query}
    if st.session_state.get("_page_filters") != (sae["id"], filters):  # new filters start at their first page
        st.session_state["_page_filters"] = (sae["id"], filters)
        st.session_state["page"] = 1
    number = int(st.session_state.get("page", 1))
    page = cached_page(client, sae["id"], number, filters)
    pages = max(1, -(-page.total // PAGE_SIZE))
    if number > pages:  # fewer latents match than when the page was picked (e.g. a label changed)
        number = st.session_state["page"] = pages
        page = cached_page(client, sae["id"], number, filters)
    if pages > 1:
        c[2].number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key="page",
                          help=f"{PAGE_SIZE} latents per page")
    rows = page.rows
    by_latent = {r["latent"]: r for r in rows}
    df = pd.DataFrame([{"latent": r["latent"], "label": r["label"], "frequency": r["frequency"], "n_fired": r["n_fired"],
                        "max_act": r["max_act"], "mean_act": r["mean_act"],
                        "top_tokens": top_token_text(r["top_tokens"])} for r in rows],
                      columns=["latent", "label", "frequency", "n_fired", "max_act", "mean_act", "top_tokens"])
    shown = f"{len(df):,}" if page.total <= len(df) else \
        f"{(number - 1) * PAGE_SIZE + 1:,}–{(number - 1) * PAGE_SIZE + len(df):,} of {page.total:,} matching"
    st.caption(f"{shown} of {fmt_number(sae.get('d_sae'))} latents · select a row, or pick a latent below")
    event = st.dataframe(
        df, hide_index=True, key="features_table", on_select="rerun", selection_mode="single-row", height=320,
        column_config={
            "latent": st.column_config.NumberColumn("latent", format="%d"),
            "label": st.column_config.TextColumn("label", width="medium"),
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
        format_func=lambda i: f"{i} · {by_latent[i]['label'] or top_token_text(by_latent[i]['top_tokens'], 5)} · "
                              f"freq {by_latent[i]['frequency']:.4g}")
    doc = client.feature_documents(sae["id"], [latent])[0]
    feature_page(client, sae, doc)


def feature_page(client, sae: dict[str, Any], doc: dict[str, Any]) -> None:
    """Everything known about one feature, rendered from its export document (core.export);
    one piece because it lays out one page top to bottom."""
    latent = doc["feature_index"]
    label_editor(client, sae, doc)
    c = st.columns(4)
    c[0].metric("Frequency", f"{doc['frac_nonzero']:.4%}")
    c[1].metric("Fired on", fmt_number(doc["n_fired"]), help="tokens")
    c[2].metric("Max activation", fmt_number(doc["max_act"], 4))
    c[3].metric("Mean activation", fmt_number(doc["mean_act"], 4))
    left, right = st.columns(2)
    with left:
        st.markdown("**Activation histogram** (log-spaced bins, exact counts)")
        if doc["freq_hist_data_bar_values"]:
            hist = pd.DataFrame({"activation": doc["freq_hist_data_bar_values"],
                                 "tokens": doc["freq_hist_data_bar_heights"]})
            st.altair_chart(alt.Chart(hist).mark_bar().encode(
                x=alt.X("activation:Q", scale=alt.Scale(type="log"), title="activation"),
                y=alt.Y("tokens:Q", title="tokens")).properties(height=180), use_container_width=True)
        else:
            st.caption("No histogram (the latent never fired, or discovery predates histograms).")
    with right:
        st.markdown("**Logit effects**")
        if doc["pos_str"]:
            st.caption(doc["logits_final_norm"])
            st.dataframe(pd.DataFrame({"promotes": doc["pos_str"], "+": doc["pos_values"],
                                       "suppresses": doc["neg_str"], "−": doc["neg_values"]}),
                         hide_index=True, height=200)
        else:
            st.caption("Not analysed yet: press Analyze features above.")
    a, b, n = st.columns(3)
    with a:
        st.markdown("**Similar features** (decoder cosine)")
        st.write(", ".join(f"#{i} ({cos:.2f})" for i, cos in doc["similar_features"][:8]) or "–")
    with b:
        st.markdown("**Co-occurring features** (at its examples' tokens)")
        st.write(", ".join(f"#{x['latent']} ×{x['count']}" for x in doc["coactive_features"][:8]) or "–")
    with n:
        st.markdown("**NLP summary**")
        st.text((doc.get("nlp") or {}).get("summary") or "–")  # words of the contexts: text, never Markdown
    ab = doc.get("ablation") or {}
    if "mean_delta_loss_at_max" in ab:
        st.markdown(f"**Ablation effect** (measured on {ab['n_contexts']} top contexts): next-token loss "
                    f"{ab['mean_delta_loss_at_max']:+.4f} nats at the max token, {ab['mean_delta_loss_after']:+.4f} "
                    f"on average after it; prediction falls most for {literal(', '.join(repr(t) for t in ab['dropped_str'][:5]))}.")
    elif ab.get("error"):
        st.caption(f"Ablation: {literal(ab['error'])}")
    detection = doc.get("detection")
    if detection:
        st.caption(f"Label detection score: balanced accuracy {detection['balanced_accuracy']:.2f} "
                   f"over {detection['n']} texts (0.5 is chance).")
    acts = doc["activations"]
    if not acts:
        st.caption("No stored contexts for this latent (it never fired, or it is below the minimum frequency).")
        return
    top = [x for x in acts if x["bin_min"] == -1]
    quant = [x for x in acts if x["bin_min"] != -1]
    st.markdown(f"**Top {len(top)} contexts** · shading from 0 to the max activation ({doc['max_act']:.3f}); "
                "the outlined token is the context's maximum; hover for values.")
    st.html(_context_rows(top, doc["max_act"]))
    if quant:
        with st.expander(f"Quantile samples ({len(quant)} contexts from across the activation range)"):
            st.html(_context_rows(quant, doc["max_act"], ranges=True))


def _context_rows(acts: list[dict[str, Any]], max_act: float, ranges: bool = False) -> str:
    lines = []
    for a in acts:
        label = html.escape(f"{a['maxValue']:.3f}")
        if ranges:
            label += f'<br><span style="color: #888; font-size: 0.7rem;">{a["bin_min"]:.3g}–{a["bin_max"]:.3g}</span>'
        lines.append(
            '<div style="display: flex; gap: 0.75rem; align-items: baseline; padding: 0.3rem 0; '
            'border-bottom: 1px solid rgba(128,128,128,0.2);">'
            f'<div style="min-width: 4.5rem; font-family: monospace; color: #b34700;">{label}</div>'
            f'<div style="flex: 1;">{token_html(a["tokens"], a["values"], max_act, a["maxValueTokenIndex"])}'
            "</div></div>")
    return "".join(lines)


def label_editor(client, sae: dict[str, Any], doc: dict[str, Any]) -> None:
    ex = doc["explanation"]
    latent = doc["feature_index"]
    # a label and its description are free text (a person's or a model's): shown as typed, never as Markdown
    st.markdown(f"### Latent {latent}: {literal(ex['name']) or '_no label yet_'}")
    if ex["name"]:
        st.caption(literal(f"{ex['category']} · by {ex['source']}" + (f" · {ex['description']}" if ex["description"]
                                                                      else "")))
    with st.expander("Edit label"):
        with st.form(key=f"label-{sae['id']}-{latent}"):
            name = st.text_input("Name", value=ex["name"], key=f"label_name-{latent}")
            cats = list(client.label_categories())
            category = st.selectbox("Category", cats, index=cats.index(ex["category"]) if ex["category"] in cats
                                    else cats.index("other"), key=f"label_category-{latent}")
            description = st.text_area("Description", value=ex["description"], key=f"label_description-{latent}")
            if st.form_submit_button("Save label"):
                client.set_label(sae["id"], latent, name, category, description)
                st.session_state["_labels_saved"] = st.session_state.get("_labels_saved", 0) + 1
                st.success(f"Saved the label of latent {latent}.")
                st.rerun()


def feature_jobs(client, sae: dict[str, Any]) -> None:
    """Start analysis and labeling of this SAE's features (they run as jobs on the worker), of
    every live latent or of the latents typed in the selection field."""
    c = st.columns([1, 1, 1, 2], vertical_alignment="bottom")
    text = c[3].text_input("Latents", key="job_latents", placeholder="all live latents",
                           help="analyse or label only these, e.g. 0-99,512 (empty: every live latent; "
                                "at 65k latents a selection takes seconds instead of minutes)")
    try:
        latents = client.latent_selection(text, sae)
    except UserError as e:
        show_error(e)
        return
    if c[0].button("Analyze features", key="analyze", help="logit effects, neighbours, NLP, measured ablations"):
        job_id = client.submit("analyze", {"sae_id": sae["id"], "latents": latents, "config": {"ablation_top": 8}})
        st.success(f"Started analysis job `{job_id}`; follow it on the Jobs page.")
    endpoint = st.session_state.get(ENDPOINT)
    method = c[1].selectbox("Labeling", ["heuristic", "local", *(["openai"] if endpoint else [])], key="label_method",
                            help="heuristic: from tokens and NLP, instant; local: the SAE's model writes labels; "
                                 "openai: the endpoint set on the Settings page")
    if c[2].button("Auto-label", key="autolabel"):
        spec = {"sae_id": sae["id"], "method": method, "latents": latents,
                "limit": 0 if method == "heuristic" or latents else 50}
        key = None
        if method == "openai":
            spec.update(base_url=endpoint["base_url"], endpoint_model=endpoint["model"])
            key = endpoint["api_key"] or None
        job_id = client.submit("label", spec, api_key=key)
        st.success(f"Started labeling job `{job_id}`; hand-written labels are kept.")


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
    sae_summary(sae, client.metric_definitions())
    st.subheader("Latents")
    feature_jobs(client, sae)
    df, by_latent = features_table(client, sae)
    st.subheader("Feature")
    contexts(client, sae, df["latent"].astype(int).tolist(), by_latent)


guard(page)
