"""Settings: where this studio keeps its data and finds its cluster, and the labeling endpoint."""

from __future__ import annotations

import streamlit as st

from actors.client import UserError
from ui.components.client import get_client, guard, show_error
from ui.components.formatting import code_span
from ui.components.forms import LABEL_ENDPOINT as ENDPOINT


def labeling_endpoint() -> dict[str, str] | None:
    """The OpenAI-compatible endpoint set on this page in this browser session, if any."""
    return st.session_state.get(ENDPOINT)


def deployment(client) -> None:
    s = client.settings
    st.dataframe([
        {"setting": "data root", "value": str(s.home), "environment variable": "MISTUDIO_HOME"},
        {"setting": "database", "value": client.masked_database_url(), "environment variable": "MISTUDIO_DATABASE_URL"},
        {"setting": "Ray address", "value": s.ray_address or "local head under the data root",
         "environment variable": "MISTUDIO_RAY_ADDRESS"},
        {"setting": "GPUs per model worker", "value": str(s.num_gpus), "environment variable": "MISTUDIO_NUM_GPUS"},
        {"setting": "CPU cores per model worker", "value": str(s.cpus_per_worker),
         "environment variable": "MISTUDIO_WORKER_CPUS"},
        {"setting": "model workers", "value": str(s.workers), "environment variable": "MISTUDIO_WORKERS"},
        {"setting": "GPU of each worker", "value": s.worker_gpus or "assigned by Ray",
         "environment variable": "MISTUDIO_WORKER_GPUS"},
        {"setting": "worker placement (Ray resources)", "value": s.worker_resources or "any node",
         "environment variable": "MISTUDIO_WORKER_RESOURCES"},
        {"setting": "models kept loaded per worker", "value": str(s.worker_models),
         "environment variable": "MISTUDIO_WORKER_MODELS"},
        {"setting": "retries after a worker dies", "value": str(s.job_retries),
         "environment variable": "MISTUDIO_JOB_RETRIES"},
        {"setting": "seconds without progress before a worker counts as hung",
         "value": f"{s.job_stall_s:g}" if s.job_stall_s > 0 else "never", "environment variable": "MISTUDIO_JOB_STALL_S"},
        {"setting": "artifact store", "value": client.masked(s.artifact_root) or "none (the data root alone)",
         "environment variable": "MISTUDIO_ARTIFACT_ROOT"},
        {"setting": "server files the dashboard may read", "value": " : ".join(client.readable_roots()),
         "environment variable": "MISTUDIO_ALLOWED_ROOTS"},
        {"setting": "where the dashboard writes exports", "value": client.export_folder(), "environment variable": ""},
        {"setting": "labeling endpoint of the server's key", "value": client.masked(client.server_label_endpoint())
         or "none (the server's key is sent nowhere)", "environment variable": "MISTUDIO_LABEL_BASE_URL"},
    ], hide_index=True, key="settings-table")
    st.caption("These come from the environment of `mistudio ui`; set the variables and restart it to change them "
               "(every CLI command and the dashboard read the same ones).")


def endpoint_form(client) -> None:
    current = labeling_endpoint() or {}
    with st.form("endpoint_form"):
        base_url = st.text_input("Base URL", value=current.get("base_url", ""), placeholder="http://127.0.0.1:8000/v1",
                                 key="endpoint-url")
        model = st.text_input("Model name", value=current.get("model", ""), key="endpoint-model")
        api_key = st.text_input("API key", type="password", key="endpoint-key",
                                help="kept in this browser session's memory only and sent with each labeling job; "
                                     "empty: no key, unless the Base URL is the server's own endpoint "
                                     "(MISTUDIO_LABEL_BASE_URL), which gets the server's key")
        c = st.columns(2)
        saved = c[0].form_submit_button("Use this endpoint", type="primary", key="endpoint-save")
        cleared = c[1].form_submit_button("Forget it", key="endpoint-clear")
    if saved:
        try:
            client.check_label_endpoint(base_url)
        except UserError as e:
            show_error(e)
            return
        # a key typed for another endpoint is not carried over to this one
        kept = current.get("api_key", "") if current.get("base_url") == base_url.strip() else ""
        st.session_state[ENDPOINT] = {"base_url": base_url.strip(), "model": model.strip() or "default",
                                      "api_key": api_key or kept}
        st.success("The Features page's Auto-label now offers this endpoint (method “openai”).",
                   icon=":material/check_circle:")
    if cleared:
        st.session_state.pop(ENDPOINT, None)
        st.info("Forgotten.", icon=":material/info:")
    if labeling_endpoint():
        e = labeling_endpoint()
        st.caption(f"In use: {code_span(e['base_url'])}, model {code_span(e['model'])}, "
                   f"key {'set' if e['api_key'] else 'not set'}.")


def page() -> None:
    st.title("Settings")
    client = get_client()
    st.subheader("Deployment")
    deployment(client)
    st.subheader("Labeling endpoint")
    st.caption("Any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, Ollama) can write feature "
               "labels: the model worker POSTs feature contexts to the address given here. The key is never written "
               "to disk or the registry.")
    endpoint_form(client)


guard(page)
