"""Extraction: pick layers × hook sites, see what it will cost, start it and watch it."""

from __future__ import annotations

import streamlit as st

from actors.client import UserError
from ui.components.client import get_client, guard, show_error
from ui.components.deletion import delete_panel
from ui.components.formatting import fmt_bytes, fmt_duration, fmt_number
from ui.components.forms import model_and_dataset
from ui.components.jobs import progress_panel

BYTES_PER_VALUE = 4  # activations are stored as float32 (core/extract.py)


def measured_rate(client, model_id: str) -> float | None:
    """Tokens/s of this model's most recent completed extraction (per hook written), or None."""
    tokens_of: dict[str, int] = {}
    for a in client.activations():
        tokens_of[a["job_id"]] = tokens_of.get(a["job_id"], 0) + a["tokens"]
    for job in client.jobs(state="completed", model_id=model_id, kind="extract"):
        if not job.get("started_at") or not job.get("finished_at"):
            continue
        tokens = tokens_of.get(job["id"], 0)
        seconds = (job["finished_at"] - job["started_at"]).total_seconds()
        if tokens and seconds > 0:
            return tokens / seconds
    return None


def extract_form(client) -> None:
    chosen = model_and_dataset(client, "extract")
    if chosen is None:
        return
    model, dataset = chosen
    n_layers = model["n_layers"]
    # no st.form: the estimate follows every change
    c = st.columns(2)
    layers = c[0].multiselect("Layers", list(range(n_layers)), default=[n_layers // 2], key=f"x-layers-{model['id']}")
    sites = c[1].multiselect("Hook sites", client.hook_sites(), default=["resid_post"], key="x-sites",
                             help="resid_pre: the block's input; resid_post: its output; mlp_out, attn_out: "
                                  "what the MLP and attention add to the residual stream")
    c = st.columns(3)
    max_tokens = c[0].number_input("Max tokens (0 = all)", min_value=0, value=0, step=1000, key="x-max-tokens",
                                   help=f"the dataset has {fmt_number(dataset['tokens'])} tokens")
    batch_size = c[1].number_input("Batch size (sequences)", min_value=1, value=8, key="x-batch-size")
    exclude = c[2].checkbox("Leave out special tokens", value=True, key="x-exclude-special",
                            help="BOS, EOS and pad stay in the model's input but their activations are not "
                                 "stored (BOS holds the attention sink's massive activation)")
    tokens = min(int(max_tokens) or dataset["tokens"], dataset["tokens"])
    hooks = [client.hook_name(layer, site) for site in sites for layer in sorted(layers)]
    size = tokens * model["d_model"] * BYTES_PER_VALUE * len(hooks)
    rate = measured_rate(client, model["id"])
    timing = (f"about {fmt_duration(tokens * len(hooks) / rate)} at this model's last measured "
              f"{fmt_number(rate)} tokens/s per hook" if rate else "time: unknown until a first extraction runs")
    st.caption(f"{len(hooks)} hook(s) × {fmt_number(tokens)} tokens × d_model {model['d_model']} × float32 ≈ "
               f"**{fmt_bytes(size)}** on disk · {timing}. One forward pass serves every layer of a site and "
               "stops after the deepest one.")
    submitted = st.button("Start extraction", type="primary", icon=":material/play_arrow:", key="x-submit")
    if not submitted:
        return
    if not hooks:
        st.error("Pick at least one layer and one hook site.", icon=":material/error:")
        return
    ids = []
    try:
        for site in sites:  # one job per site; each runs all its layers from one forward pass
            ids.append(client.submit("extract", {
                "model_id": model["id"], "dataset_id": dataset["id"], "layers": sorted(int(x) for x in layers),
                "site": site, "batch_size": int(batch_size), "max_tokens": int(max_tokens) or None,
                "exclude_special_tokens": bool(exclude)}))
    except UserError as e:
        show_error(e)
        return
    st.success(f"Submitted {', '.join(f'`{i}`' for i in ids)}; progress is below.", icon=":material/check_circle:")


def activations_table(client) -> None:
    rows = client.activations()
    if not rows:
        st.caption("No activations extracted yet.")
        return
    st.dataframe([{"id": a["id"], "hook": a["hook_name"], "model": a["model_id"], "dataset": a["dataset_id"],
                   "tokens": a["tokens"], "d_model": a["d_model"],
                   "size": fmt_bytes(a["tokens"] * a["d_model"] * BYTES_PER_VALUE), "job": a["job_id"],
                   "created (UTC)": a["created_at"]} for a in rows], hide_index=True, key="x-activations")


def page() -> None:
    st.title("Extraction")
    client = get_client()
    st.caption("Run the model over a dataset and store the activations at chosen hook sites "
               "(TransformerLens names, `blocks.{L}.hook_{site}`) for training SAEs.")
    extract_form(client)
    st.subheader("Progress")
    progress_panel(client)
    st.subheader("Extracted activations")
    activations_table(client)
    guard(lambda: delete_panel(client, "activation", client.activations(), label="hook_name"), name="del-activation")


guard(page)
