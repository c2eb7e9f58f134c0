"""Pickers and defaults that several pages' forms share."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ui.cli_demo import DEMO_DEFAULTS, DEMO_TRAIN
from ui.components.formatting import fmt_number

LABEL_ENDPOINT = "label_endpoint"
"""Session-state key of the labeling endpoint set on the Settings page: {"base_url", "model",
"api_key"}, kept for this browser session only."""

RUN_DEFAULTS = {"max_tokens": DEMO_DEFAULTS["max_tokens"], "batch_size": 8,
                "expansion_factor": DEMO_TRAIN["expansion_factor"], "k": DEMO_TRAIN["k"],
                "epochs": DEMO_TRAIN["epochs"], "train_batch_size": DEMO_TRAIN["batch_size"], "top_k": 20}
"""The Jobs page's run form starts as the demo's run (`mistudio demo`), so the two agree."""


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
