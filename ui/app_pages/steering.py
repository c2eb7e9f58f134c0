"""Steering: pick features and strengths, generate beside the unsteered baseline, keep experiments."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from ui.components.client import get_client, guard
from ui.components.formatting import literal
from ui.components.tokens import top_token_text

STEER_OPTIONS = 200  # latents offered by the picker at once (a search finds the others)
MODES = {"compare": "compare — each feature alone", "blend": "blend — all features together",
         "sweep": "sweep — one feature at several strengths"}


def _feature_label(f: dict[str, Any]) -> str:
    return f"{f['latent']} · {f['label'] or top_token_text(f['top_tokens'], 4)}"


def feature_options(client, sae: dict[str, Any], query: str) -> dict[int, dict[str, Any]]:
    """The picker's options: the latents already chosen, then one page of live latents matching
    `query` (most frequent first) — never every latent of a wide SAE."""
    chosen = [int(i) for i in st.session_state.get("steer_latents") or []]
    by = {f["latent"]: f for f in client.features(sae["id"], latents=chosen)} if chosen else {}
    by = {i: by[i] for i in chosen if i in by}
    page = client.feature_page(sae["id"], limit=STEER_OPTIONS, live_only=True, search=query)
    return by | {f["latent"]: f for f in page.rows if f["latent"] not in by}


def steering_form(client, sae: dict[str, Any]) -> dict[str, Any] | None:
    query = st.text_input("Find features", key="steer_search",
                          placeholder="a token, a label or a latent number (else the most frequent are listed)")
    by = feature_options(client, sae, query.strip())
    chosen = st.multiselect("Features", list(by), key="steer_latents", format_func=lambda i: _feature_label(by[i]),
                            max_selections=8, help=f"the first {STEER_OPTIONS} live latents matching the search, most "
                                                   "frequent first; type to narrow the list")
    mode = st.radio("Mode", list(MODES), format_func=MODES.get, key="steer_mode", horizontal=True)
    features, strengths = [], []
    for latent in chosen:
        c = st.columns([3, 2, 2], vertical_alignment="bottom")
        c[0].text(f"{_feature_label(by[latent])} (max activation {by[latent]['max_act']:.3g})")
        edit = c[1].selectbox("Edit", ["add", "clamp"], key=f"steer_edit-{latent}",
                              help="add: strength × unit decoder direction; clamp: hold the activation at strength")
        strength = c[2].number_input("Strength", value=8.0, step=1.0, key=f"steer_strength-{latent}")
        features.append({"latent": latent, "strength": float(strength), "mode": edit})
    if mode == "sweep":
        text = st.text_input("Sweep strengths", "0, 4, 8, 16", key="steer_sweep")
        try:
            strengths = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            st.error("Sweep strengths must be comma-separated numbers, e.g. 0, 4, 8, 16")
            return None
    sets = client.templates("steering_prompts")
    template = st.selectbox("Prompt set", [""] + [t["name"] for t in sets], key="steer_template",
                            format_func=lambda n: n or "(none: type prompts below)")
    prompts = [p for p in st.text_area("Prompts, one per line", "The capital of France is",
                                       key="steer_prompts").splitlines() if p.strip()]
    with st.expander("Generation settings"):
        c = st.columns(6)
        gen = {"max_new_tokens": int(c[0].number_input("Max new tokens", 1, 512, 30, key="steer_max_tokens")),
               "temperature": float(c[1].number_input("Temperature", 0.0, 5.0, 0.0, step=0.1, key="steer_temperature",
                                                      help="0 decodes greedily")),
               "top_p": float(c[2].number_input("Top-p", 0.01, 1.0, 1.0, key="steer_top_p")),
               "top_k": int(c[3].number_input("Top-k", 0, 1000, 0, key="steer_top_k", help="0: all tokens")),
               "repetition_penalty": float(c[4].number_input("Repetition penalty", 0.5, 3.0, 1.0,
                                                             key="steer_repetition")),
               "seed": int(c[5].number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed"))}
    name = st.text_input("Experiment name", key="steer_name", placeholder="optional")
    with st.popover("Save these prompts as a prompt set"):
        set_name = st.text_input("Prompt set name", key="steer_set_name")
        if st.button("Save prompt set", key="steer_save_set") and set_name and prompts:
            client.save_template("steering_prompts", set_name, {"prompts": prompts})
            st.success(f"Saved prompt set {set_name!r}.")
    return {"sae_id": sae["id"], "features": features, "mode": mode, "strengths": strengths, "prompts": prompts,
            "prompt_template": template, "generation": gen, "name": name}


def show_outputs(outputs: list[dict[str, Any]]) -> None:
    """Baseline and steered outputs side by side, one row per prompt."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for o in outputs:
        by_prompt.setdefault(o["prompt"], []).append(o)
    for prompt, rows in by_prompt.items():
        st.markdown("**Prompt:**")
        st.text(prompt)
        cols = st.columns(len(rows))
        for col, o in zip(cols, rows):
            ppl = f"{o['perplexity']:.2f}" if o["perplexity"] is not None else "–"
            col.markdown(f"*{o['label']}* · perplexity {ppl}")
            col.code(o["text"] or "(nothing generated)", language=None, wrap_lines=True)


def page() -> None:
    st.title("Steering")
    client = get_client()
    saes = [s for s in client.saes() if s.get("features_path") and s.get("model_id")]
    if not saes:
        st.info("Steering needs an SAE with discovered features; run extract → train → discover on the Jobs page.",
                icon=":material/info:")
        return
    by_id = {s["id"]: s for s in reversed(saes)}
    sae = by_id[st.selectbox("SAE", list(by_id), key="steer_sae", format_func=lambda i: f"{by_id[i]['name']} · {i}")]
    request = steering_form(client, sae)
    if request is not None and st.button("Generate", key="steer_run", type="primary",
                                         disabled=not request["features"]):
        job_id = client.submit("steer", request)
        with st.spinner(f"Generating on the model worker (job {job_id})…"):
            job = client.wait(job_id, poll=0.3)
        if job["state"] != "completed":
            st.error(f"Steering {job['state']}: {literal(job['message'])}")
        else:
            st.session_state["steer_last"] = job["result"]
    last = st.session_state.get("steer_last")
    if last:
        show_outputs(last["outputs"])
        if last.get("experiment_id"):
            st.caption(f"Saved as experiment `{last['experiment_id']}`.")
    experiments = client.experiments(sae["id"])
    with st.expander(f"Saved experiments ({len(experiments)})"):
        if experiments:
            st.dataframe(pd.DataFrame([{"id": e["id"], "name": e["name"], "mode": e["mode"],
                                        "created": e["created_at"]} for e in experiments]), hide_index=True)
            pick = st.selectbox("Open", [e["id"] for e in experiments], key="steer_open")
            record = client.experiment(pick)["record"]
            show_outputs(record["outputs"])
            st.download_button("Export as JSON", json.dumps(record, indent=1), file_name=f"{pick}.json",
                               mime="application/json", key="steer_export")


guard(page)
