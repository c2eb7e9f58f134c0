"""Models: the registered models, registering one (with its memory estimate first), and a model's hook sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from actors.client import Client, UserError
from ui.components.client import get_client, guard, show_error
from ui.components.deletion import delete_panel
from ui.components.formatting import code_span, fmt_number, literal
from ui.components.jobs import progress_panel, submit_job

SOURCES = {
    "embedded": "Embedded SmolLM2-135M",
    "folder": "Local folder",
    "gguf": ".gguf file",
    "hub": "Hugging Face id",
}
PLACEHOLDERS = {
    "folder": "/models/my-model — the folder holding config.json, the weights and the tokenizer",
    "gguf": "/models/my-model.Q4_K_M.gguf",
    "hub": "org/name (needs the hub to be reachable, unless it is cached)",
}
DTYPES = ("float32", "bfloat16", "float16")


def fmt_size(n: float) -> str:
    """Bytes in the decimal units of core.models' estimate line (MB = 10⁶ bytes)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


@st.cache_data(show_spinner="Estimating memory from the model's config…", ttl=120, max_entries=64)
def estimate(source: str, dtype: str, quantization: str, batch_size: int, context_length: int,
             trust_remote_code: bool) -> tuple[dict[str, Any] | None, str]:
    """(the MemoryEstimate's fields, "") or (None, a one-line reason); failures are cached too."""
    try:
        est = Client.estimate_memory(source, dtype=dtype, quantization=quantization, batch_size=batch_size,
                                     context_length=context_length, trust_remote_code=trust_remote_code)
    except UserError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - transformers' many ways to reject a config, shown in one line
        first = (str(e).strip().splitlines() or [""])[0]
        return None, f"cannot estimate the memory of {source}: {type(e).__name__}: {first}".rstrip(": ")
    return vars(est), ""


def check_source(client, kind: str, source: str) -> str:
    """The source as AddModelSpec wants it; UserError if a local one is missing or of the wrong kind."""
    if kind == "embedded":
        return "embedded"
    if not source:
        raise UserError(f"enter a {SOURCES[kind].lower()}")
    if kind == "hub":
        return source
    path = Path(client.server_path(source))  # outside the allowed roots: refused before it is looked at
    if not path.exists():
        raise UserError(f"{source} does not exist on the server; check the path")
    if kind == "folder" and not (path / "config.json").is_file():
        raise UserError(f"{source} has no config.json, so it is not a Hugging Face model folder")
    if kind == "gguf" and (not path.is_file() or path.suffix != ".gguf"):
        raise UserError(f"{source} is not a .gguf file")
    return str(path.resolve())


# -- sections ---------------------------------------------------------------------------------
def models_table(client, models: list[dict[str, Any]]) -> None:
    per_model: dict[str, int] = {}
    for d in client.datasets():
        per_model[d["model_id"]] = per_model.get(d["model_id"], 0) + 1
    cols = ["id", "name", "architecture", "n_layers", "d_model", "n_params", "dtype", "quantization", "source"]
    df = pd.DataFrame([{**{c: m.get(c) for c in cols}, "datasets": per_model.get(m["id"], 0)} for m in models],
                      columns=[*cols, "datasets"])
    st.dataframe(df, hide_index=True, key="m-table",
                 column_config={"n_layers": st.column_config.NumberColumn("layers", format="%d"),
                                "d_model": st.column_config.NumberColumn("d_model", format="%d"),
                                "n_params": st.column_config.NumberColumn("parameters", format="compact"),
                                "source": st.column_config.TextColumn("source", width="medium"),
                                "datasets": st.column_config.NumberColumn("datasets", format="%d",
                                                                          help="datasets tokenized for it")})


def memory_estimate(client, kind: str, source: str, dtype: str, quantization: str, trust_remote_code: bool) -> None:
    c = st.columns([1, 1, 3])
    batch_size = c[0].number_input("Batch size (sequences)", min_value=1, value=8, key="m-est-batch-size",
                                   help="for the estimate only: sequences per forward")
    context_length = c[1].number_input("Context length (tokens)", min_value=1, value=256, step=64,
                                       key="m-est-context-length", help="for the estimate only: tokens per sequence")
    if kind != "embedded" and not source:
        c[2].caption("Enter a source to see its memory estimate.")
        return
    if kind in ("folder", "gguf"):
        try:
            source = client.server_path(source)
        except UserError as e:
            show_error(e)
            return
    est, error = estimate("embedded" if kind == "embedded" else source, dtype, quantization, int(batch_size),
                          int(context_length), trust_remote_code)
    if est is None:
        show_error(error)
        return
    m = st.columns(4)
    m[0].metric("Weights", fmt_size(est["weights_bytes"]), help="parameters and buffers at this precision")
    m[1].metric("Activations", fmt_size(est["activations_bytes"]),
                help="peak extra memory of one no-grad forward of batch × context tokens")
    m[2].metric("Total", fmt_size(est["total_bytes"]))
    m[3].metric("Parameters", fmt_number(est["n_params"]))
    st.caption(f"memory estimate: {est['detail']}")


def register_form(client) -> None:
    kind = st.radio("Source", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="m-source-kind")
    source = ""
    if kind != "embedded":
        source = st.text_input(SOURCES[kind], key=f"m-source-{kind}", placeholder=PLACEHOLDERS[kind]).strip()
    c = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    name = c[0].text_input("Name", key="m-name",
                           placeholder="default: SmolLM2-135M-Instruct, the folder's or file's name, or the id")
    dtype = c[1].selectbox("dtype", DTYPES, key="m-dtype")
    quantization = c[2].selectbox("Quantization", client.quantizations(), key="m-quantization",
                                  help="bitsandbytes loading for every job on this model: 8bit (LLM.int8) or "
                                       "4bit (NF4)")
    trust_remote_code = c[3].checkbox("Trust remote code", value=False, key="m-trust-remote-code",
                                      help="run the model repository's own Python code; only for sources you trust")
    st.markdown("**Memory estimate** (read from the config; no weights are loaded)")
    memory_estimate(client, kind, source, dtype, quantization, trust_remote_code)
    if not st.button("Register model", type="primary", icon=":material/add:", key="m-submit",
                     disabled=kind != "embedded" and not source):
        return
    try:
        source = check_source(client, kind, source)
    except UserError as e:
        show_error(e)
        return
    submit_job(client, "add_model", {"source": source, "name": name.strip(), "dtype": dtype,
                                     "quantization": quantization, "trust_remote_code": trust_remote_code})


def model_details(client, models: list[dict[str, Any]]) -> None:
    sites = client.hook_sites()
    by_id = {m["id"]: m for m in models}
    model_id = st.selectbox("Model", list(by_id), key="m-selected",
                            format_func=lambda i: f"{by_id[i]['name']} ({i})")
    m = by_id[model_id]
    c = st.columns(5)
    c[0].metric("Layers", fmt_number(m["n_layers"]))
    c[1].metric("d_model", fmt_number(m["d_model"]))
    c[2].metric("Parameters", fmt_number(m["n_params"]))
    c[3].metric("Vocabulary", fmt_number(m["vocab_size"]))
    c[4].metric("Precision", m["dtype"] if m["quantization"] == "none" else f"{m['quantization']} + {m['dtype']}")
    st.caption(f"{literal(m['architecture'])} · source {code_span(m['source'])} · path {code_span(m['path'])}")
    st.markdown(f"**Hook sites** — {m['n_layers'] * len(sites):,} in all: every decoder block's residual stream "
                "before and after it, and what its attention and MLP add to it")
    hooks = pd.DataFrame([{"layer": layer, **{site: client.hook_name(layer, site) for site in sites}}
                          for layer in range(m["n_layers"])])
    st.dataframe(hooks, hide_index=True, key=f"m-hooks-{model_id}", height=min(400, 38 + 35 * len(hooks)),
                 column_config={"layer": st.column_config.NumberColumn("layer", format="%d")})


def page() -> None:
    st.title("Models")
    client = get_client()
    models = client.models()
    if models:
        models_table(client, models)
        guard(lambda: delete_panel(client, "model", models), name="del-model")
    else:
        st.caption("No model yet: register one below (the embedded SmolLM2-135M works offline).")
    st.subheader("Register a model")
    register_form(client)
    st.subheader("Progress")
    progress_panel(client)
    if models:
        st.subheader("Inside a model")
        model_details(client, models)


guard(page)
