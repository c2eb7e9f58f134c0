"""Training: SAEs on cached activations or on the fly, from presets or saved templates; live
charts of the whole run; checkpoints to resume from."""

from __future__ import annotations

from typing import Any

import streamlit as st

from actors.client import UserError
from ui.components.client import get_client, guard, show_error
from ui.components.formatting import fmt_number
from ui.components.jobs import progress_panel

SCHEDULE = ("expansion_factor", "batch_size", "epochs", "optimizer", "autocast")
OPTIMIZERS = {"signum": "signum — schedule-free sign-SGD, constant lr (the default; sparsify's optimizer)",
              "adam": "adam — Adam, lr warm-up then decay (SAELens's and older sparsify's recipe)"}
PRECISIONS = {None: "auto — bf16 where native and faster (a GPU; a CPU with avx512_bf16 or AMX, measured), else fp32",
              True: "bf16 — even where emulated (slower)",
              False: "fp32 — everywhere (the same numbers on every CPU)"}
# The form's fields beside the SAE type's own (which come with their defaults and help from the
# type's config dataclass, through the Client). Comments, not docstrings: Streamlit's magic prints them.


def _types(client) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in client.sae_types()}


def _apply(values: dict[str, Any]) -> None:
    """Put a type's defaults or a template's values into the form's widgets (a callback: it runs
    before the widgets are drawn)."""
    for name, value in values.items():
        st.session_state[f"t-{name}"] = value


def _type_defaults(sae_type: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: f["default"] for f in sae_type["fields"]}


def _template_values(client, values: dict[str, Any]) -> dict[str, Any]:
    types, defaults = _types(client), client.train_defaults()
    config = values.get("config", {})
    arch = config.get("architecture", defaults["architecture"])
    arch = arch if arch in types else defaults["architecture"]  # a template naming an unknown type loads the default
    own = _type_defaults(types[arch])
    return {"architecture": arch, **{k: defaults[k] for k in SCHEDULE}, **own, "d_sae": config.get("d_sae") or 0,
            **{k: v for k, v in config.items() if k in own or k in SCHEDULE},
            **{k: values[k] for k in ("checkpoint_every", "keep_checkpoints") if k in values}}


def template_picker(client) -> None:
    """The SAE type (choosing one loads its defaults) and a saved train template to load."""
    types, defaults = _types(client), client.train_defaults()
    st.session_state.setdefault("t-architecture", defaults["architecture"])
    for name in SCHEDULE:
        st.session_state.setdefault(f"t-{name}", defaults[name])
    templates = {t["name"]: t["values"] for t in client.templates("train")}
    c = st.columns([3, 2, 1], vertical_alignment="bottom")
    c[0].selectbox("SAE type", list(types), key="t-architecture",
                   format_func=lambda a: f"{a} — {types[a]['about']}",
                   on_change=lambda: _apply(_type_defaults(types[st.session_state["t-architecture"]])))
    if templates:
        name = c[1].selectbox("Template", list(templates), key="t-template")
        c[2].button("Load template", key="t-load-template", on_click=_apply,
                    args=(_template_values(client, templates[name]),))
    else:
        c[1].caption("No saved train templates yet: save this form as one below.")


def source_picker(client) -> dict[str, Any] | None:
    """What to train on: cached activations (one or several sets, mixed) or the model on the fly."""
    mode = st.radio("Train on", ["cached activations", "the model, on the fly (no cache)"], horizontal=True,
                    key="t-source")
    if mode == "cached activations":
        acts = {a["id"]: a for a in client.activations()}
        if not acts:
            st.info("No activations extracted yet: extract some on the **Extraction** page, or train on the fly.",
                    icon=":material/info:")
            return None
        chosen = st.multiselect(
            "Activation sets (one SAE per hook; several datasets at one hook are mixed)", list(acts),
            default=[list(acts)[-1]], key="t-activations",
            format_func=lambda i: f"{acts[i]['hook_name']} · {acts[i]['model_id']} · {acts[i]['dataset_id']} · "
                                  f"{fmt_number(acts[i]['tokens'])} tokens")
        return {"activation_ids": chosen} if chosen else None
    models = {m["id"]: m for m in client.models()}
    if not models:
        st.info("No model registered yet: add one on the **Models** page.", icon=":material/info:")
        return None
    c = st.columns(2)
    model_id = c[0].selectbox("Model", list(models), key="t-model")
    datasets = {d["id"]: d for d in client.datasets() if d["model_id"] == model_id}
    dataset_ids = c[1].multiselect("Datasets (mixed)", list(datasets), default=list(datasets)[:1],
                                   key=f"t-datasets-{model_id}", format_func=lambda i: datasets[i]["name"])
    n_layers = models[model_id]["n_layers"]
    c = st.columns(3)
    layers = c[0].multiselect("Layers", list(range(n_layers)), default=[n_layers // 2], key=f"t-layers-{model_id}")
    sites = c[1].multiselect("Hook sites", client.hook_sites(), default=["resid_post"], key="t-sites")
    max_tokens = c[2].number_input("Max tokens per dataset (0 = all)", min_value=0, value=0, step=1000,
                                   key="t-max-tokens")
    hooks = [client.hook_name(layer, site) for site in sites for layer in sorted(layers)]
    if not dataset_ids or not hooks:
        return None
    return {"model_id": model_id, "dataset_ids": dataset_ids, "hook_names": hooks,
            "max_tokens": int(max_tokens) or None}


def type_fields(sae_type: dict[str, Any]) -> dict[str, Any]:
    """A number input per setting of the SAE type, labelled and explained by its config field."""
    fields = sae_type["fields"]
    values = {}
    for where, f in zip(st.columns(max(len(fields), 1)), fields):
        st.session_state.setdefault(f"t-{f['name']}", f["default"])
        whole = isinstance(f["default"], int)
        values[f["name"]] = where.number_input(f["name"].replace("_", " "), key=f"t-{f['name']}", help=f["help"],
                                               min_value=1 if whole else 0.0, format=None if whole else "%.4g")
    return values


def train_form(client) -> None:
    template_picker(client)
    source = source_picker(client)
    arch = st.session_state["t-architecture"]
    number = lambda where, label, name, **kw: where.number_input(label, key=f"t-{name}", **kw)
    st.session_state.setdefault("t-d_sae", 0)
    with st.form("train_form"):
        c = st.columns(4)
        values = {
            "expansion_factor": number(c[0], "Expansion factor", "expansion_factor", min_value=1,
                                       help="SAE width = d_model × this, unless Latents is set"),
            "batch_size": number(c[2], "Batch (tokens per step)", "batch_size", min_value=1, step=256),
            "epochs": number(c[3], "Epochs", "epochs", min_value=1),
        }
        width = number(c[1], "Latents (0 = expansion × d_model)", "d_sae", min_value=0, step=1024,
                       help="the SAE's width as a number, e.g. 16384 or 65536; overrides the expansion factor")
        if width:
            values["d_sae"] = width
        values |= type_fields(_types(client)[arch])
        c = st.columns(2)
        optimizer = c[0].selectbox("Optimizer", OPTIMIZERS, key="t-optimizer", format_func=OPTIMIZERS.get)
        autocast = c[1].selectbox("Encoder matmul", PRECISIONS, key="t-autocast", format_func=PRECISIONS.get,
                                  help="bf16 autocast of the encoder's matmul; weights stay fp32")
        c = st.columns(3)
        st.session_state.setdefault("t-checkpoint_every", 0)
        st.session_state.setdefault("t-keep_checkpoints", 2)
        every = number(c[0], "Checkpoint every (steps, 0 = none)", "checkpoint_every", min_value=0)
        keep = number(c[1], "Keep newest checkpoints", "keep_checkpoints", min_value=1)
        save_as = c[2].text_input("Save as template (name)", key="t-save-as")
        c = st.columns(2)
        submitted = c[0].form_submit_button("Start training", type="primary", icon=":material/play_arrow:",
                                            key="t-submit")
        saved = c[1].form_submit_button("Save template", icon=":material/save:", key="t-save")
    precision = {} if autocast is None else {"autocast": autocast}
    spec = {"config": {"architecture": arch, "optimizer": optimizer, **precision,
                       **{k: int(v) if isinstance(v, int) else float(v) for k, v in values.items()}},
            "checkpoint_every": int(every), "keep_checkpoints": int(keep)}
    try:
        if saved:
            if not save_as.strip():
                raise UserError("give the template a name to save it under")
            client.save_template("train", save_as.strip(), spec)
            st.success(f"Saved the train template `{save_as.strip()}`.", icon=":material/check_circle:")
        if submitted:
            if source is None:
                raise UserError("pick what to train on: at least one activation set, or a model, dataset, layer "
                                "and hook site")
            job_id = client.submit("train", {**source, **spec})
            st.success(f"Submitted train job `{job_id}`; its live charts are below.", icon=":material/check_circle:")
    except UserError as e:
        show_error(e)


def checkpoints(client) -> None:
    """Train jobs that left checkpoints, each resumable as a new job from its newest one."""
    rows = []
    for job in client.jobs(kind="train"):
        found = client.checkpoints(job["id"])
        if found:
            rows.append((job, found))
    if not rows:
        st.caption("No checkpoints yet (set “Checkpoint every” above to take them).")
        return
    for job, found in rows:
        c = st.columns([4, 1], vertical_alignment="center")
        c[0].markdown(f"`{job['id']}` — **{job['state']}** · {len(found)} checkpoint(s), newest `{found[-1].name}`")
        if job["state"] != "completed" and c[1].button("Resume", key=f"t-resume-{job['id']}",
                                                       icon=":material/restart_alt:",
                                                       help="a new train job continues from the newest checkpoint "
                                                            "exactly as the uninterrupted run would"):
            try:
                new = client.submit("train", {**(job.get("spec") or {}), "resume_job": job["id"]})
                st.success(f"Submitted `{new}`, resuming `{job['id']}`.", icon=":material/check_circle:")
            except UserError as e:
                show_error(e)


def page() -> None:
    st.title("Training")
    client = get_client()
    st.caption("Train sparse autoencoders: one per hook × settings, from one pass over the data. Stop a run with "
               "Cancel below; a run with checkpoints can be resumed.")
    train_form(client)
    st.subheader("Progress")
    progress_panel(client)
    st.subheader("Checkpoints")
    checkpoints(client)


guard(page)
