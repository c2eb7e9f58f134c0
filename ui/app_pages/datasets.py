"""Datasets: the tokenized datasets, adding one, and a look inside one (lengths, rows, tokenization)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from actors.client import Client, UserError
from ui.components.client import get_client, guard, show_error
from ui.components.deletion import delete_panel
from ui.components.formatting import code_span, fmt_number, literal
from ui.components.jobs import progress_panel, submit_job
from ui.components.tokens import visible_token

SOURCES = {
    "builtin": "Built-in corpus",  # one of client.builtin_corpora()
    "path": "File on the server",
    "upload": "Upload a file",
    "hub": "Hugging Face dataset",
}
PREVIEW_TEXT = "The capital of France is Paris.\n\tdef main():  return 42"
CHIP_COLORS = ("rgba(31, 119, 180, 0.15)", "rgba(255, 127, 14, 0.18)")


# -- helpers ----------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the tokenizer…", max_entries=8)
def load_tokenizer(path: str):
    return Client.load_tokenizer(path)


def tokenizer_for(client, model_id: str):
    """The tokenizer of a registered model, or None (with a caption saying why)."""
    model = client.model(model_id)
    if model is None:
        st.caption(f"Model `{model_id}` is no longer registered, so its tokenizer is unavailable.")
        return None
    try:
        return load_tokenizer(client.local(model["path"]))
    except Exception as e:  # noqa: BLE001 - a missing or unreadable folder: fall back to token ids
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        st.caption(f"Cannot load the tokenizer of `{model_id}` from {code_span(model['path'])} ({literal(first)}); "
                   "showing token ids.")
        return None


def token_chips(tokens: list[str], ids: list[int]) -> str:
    """Tokens as alternately shaded chips, whitespace made visible, each id in its tooltip."""
    spans = []
    for i, (tok, tid) in enumerate(zip(tokens, ids)):
        style = f"background-color: {CHIP_COLORS[i % 2]}; border-radius: 3px; padding: 0 2px; margin: 0 1px;"
        title = html.escape(f"{tok!r}: id {tid}", quote=True)
        spans.append(f'<span style="{style}" title="{title}">{visible_token(tok)}</span>')
    return ('<div style="font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; '
            'white-space: pre-wrap; line-height: 2; word-break: break-word;">' + "".join(spans) + "</div>")


@st.cache_data(show_spinner="Reading the token shards…", max_entries=16)
def row_lengths(_client, dataset_id: str, path: str) -> pd.DataFrame:
    """Tokens and source document of every row (row_id order), read from the dataset's shards.
    `path`, the dataset's folder, keys the cache with the id: ids repeat across data roots."""
    rows = _client.dataset_row_lengths(dataset_id)
    return pd.DataFrame({"tokens": rows.tokens, "doc_id": rows.doc_ids})


def length_histogram(lengths: np.ndarray, high: int | None = None, bins: int = 40) -> pd.DataFrame:
    """Counts of `lengths` in equal bins from 0 to `high` (default: the longest)."""
    high = int(high or max(int(lengths.max(initial=1)), 1))
    counts, edges = np.histogram(lengths, bins=min(bins, high), range=(0, high))
    return pd.DataFrame({"start": edges[:-1], "end": edges[1:], "count": counts})


def check_path(client, source: str) -> str:
    """A data file or folder on the server, inside the allowed roots, as AddDatasetSpec wants it;
    UserError if it is not one."""
    if not source:
        raise UserError("enter the path of a data file (or folder of them) on the server")
    path = Path(client.server_path(source))  # outside the allowed roots: refused before it is looked at
    if not path.exists():
        raise UserError(f"data file not found: {source}; check the path")
    file_types = Client.data_file_types()
    if path.is_file() and path.suffix.lower() not in file_types:
        raise UserError(f"{source} is not one of {', '.join(file_types)}; convert it or pick another file")
    return str(path.resolve())


# -- sections ---------------------------------------------------------------------------------
def datasets_table(datasets: list[dict[str, Any]]) -> None:
    cols = ["id", "name", "model_id", "source", "documents", "rows", "tokens", "context_length"]
    st.dataframe(pd.DataFrame([{c: d.get(c) for c in cols} for d in datasets], columns=cols), hide_index=True,
                 key="ds-table",
                 column_config={"model_id": st.column_config.TextColumn("model"),
                                "source": st.column_config.TextColumn("source", width="medium"),
                                "context_length": st.column_config.NumberColumn("context length", format="%d")})


def add_form(client) -> None:
    models = {m["id"]: m for m in client.models()}
    if not models:
        st.info("No model is registered yet: datasets are tokenized with a model's tokenizer, so register one "
                "on the **Models** page first.", icon=":material/info:")
        return
    kind = st.radio("Source", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="ds-source-kind")
    with st.form("ds-add-form"):
        c = st.columns(2)
        model_id = c[0].selectbox("Model (its tokenizer)", list(models), key="ds-model",
                                  format_func=lambda i: f"{models[i]['name']} — {models[i]['architecture']}")
        name = c[1].text_input("Name", key="ds-name", placeholder="default: the corpus's or the file's name")
        source, upload = client.builtin_dataset(), None
        if kind == "builtin":
            corpora = client.builtin_corpora()
            source = st.selectbox("Corpus", list(corpora), key="ds-corpus", format_func=lambda n: f"{n} — {corpora[n]}",
                                  help="shipped with Python, available offline")
        elif kind == "path":
            source = st.text_input("Path on the server", key="ds-path",
                                   placeholder="texts.jsonl — .txt, .jsonl, .parquet, .csv, or a folder of them",
                                   help=f"inside {', '.join(client.readable_roots())}; a relative name is looked "
                                        "up in the first")
        elif kind == "upload":
            upload = st.file_uploader("File", type=[t.lstrip(".") for t in client.data_file_types()], key="ds-upload",
                                      help="saved under the data root's uploads/ folder, then tokenized")
        else:
            source = st.text_input("Dataset id", key="ds-hub", placeholder="org/name (needs the hub to be reachable)")
        c = st.columns(3)
        text_column = c[0].text_input("Text column", value="text", key="ds-text-column",
                                      help=".jsonl, .parquet, .csv and hub datasets: the column holding the text")
        context_length = c[1].number_input("Context length (tokens per row)", min_value=2, value=256, step=64,
                                           key="ds-context-length")
        max_documents = c[2].number_input("Max documents (0 = all)", min_value=0, value=0, step=100,
                                          key="ds-max-documents")
        prepend_bos = st.checkbox("Start every row with BOS", value=True, key="ds-prepend-bos",
                                  help="as TransformerLens and SAELens build contexts: the attention sink then "
                                       "sits on BOS, which is left out by id; ignored if the tokenizer has no BOS")
        submitted = st.form_submit_button("Add dataset", type="primary", icon=":material/add:", key="ds-submit")
    if not submitted:
        return
    try:
        if kind == "path":
            source = check_path(client, source.strip())
        elif kind == "upload":
            if upload is None:
                raise UserError("choose a file to upload first")
            source = client.save_upload(upload.name, upload.getvalue())
        elif kind == "hub" and not source.strip():
            raise UserError("enter a Hugging Face dataset id, e.g. org/name")
    except UserError as e:
        show_error(e)
        return
    submit_job(client, "add_dataset", {"model_id": model_id, "source": source.strip(), "name": name.strip(),
                                       "text_column": text_column.strip() or "text",
                                       "context_length": int(context_length),
                                       "max_documents": int(max_documents) or None,
                                       "prepend_bos": bool(prepend_bos)})


def stats_section(ds: dict[str, Any]) -> None:
    stats = ds.get("stats") or {}
    tokens, rows = stats.get("tokens", ds["tokens"]), stats.get("rows", ds["rows"])
    c = st.columns(5)
    c[0].metric("Documents", fmt_number(stats.get("documents", ds["documents"])))
    c[1].metric("Rows", fmt_number(rows))
    c[2].metric("Tokens", fmt_number(tokens))
    c[3].metric("Context length", fmt_number(stats.get("context_length", ds["context_length"])))
    c[4].metric("Mean row length", f"{tokens / rows:.1f}" if rows else "–", help="tokens per row")
    st.caption(f"id `{ds['id']}` · source {code_span(ds['source'])} · text column {code_span(ds['text_column'])} · "
               f"tokenized for `{ds['model_id']}` · rows start with BOS: "
               f"{'yes' if stats.get('prepend_bos') else 'no'} · {code_span(ds['path'])}")


def length_section(ds: dict[str, Any], frame: pd.DataFrame) -> None:
    unit = st.radio("Length of each", ["row", "document"], horizontal=True, key="ds-length-unit",
                    help="rows are chunks of at most the context length; a document's tokens are its rows' sum")
    if unit == "row":
        hist = length_histogram(frame["tokens"].to_numpy(), high=ds["context_length"])
    else:
        hist = length_histogram(frame.groupby("doc_id")["tokens"].sum().to_numpy())
    counted = f"{unit}s"
    chart = alt.Chart(hist, title=f"Tokens per {unit}").mark_bar().encode(
        x=alt.X("start:Q", bin="binned", title=f"tokens per {unit}"),
        x2="end:Q",
        y=alt.Y("count:Q", title=counted),
        tooltip=[alt.Tooltip("start:Q", title="from", format=",.0f"), alt.Tooltip("end:Q", title="to", format=",.0f"),
                 alt.Tooltip("count:Q", title=counted, format=",")],
    ).properties(height=220)
    st.altair_chart(chart, width="stretch")


def sample_section(client, ds: dict[str, Any], frame: pd.DataFrame, tok) -> None:
    row = int(st.number_input("Row", min_value=0, max_value=len(frame) - 1, value=0, step=1,
                              key=f"ds-row-{ds['id']}", help=f"0 to {len(frame) - 1:,}"))
    ids = [int(i) for i in client.dataset_rows(ds["id"], [row])[row]]
    st.caption(f"row {row:,} · {len(ids)} tokens · document {int(frame['doc_id'].iat[row]):,}")
    if tok is None:
        st.code(" ".join(map(str, ids)), language=None, wrap_lines=True)
        return
    text, tokens, raw = st.tabs(["Text", "Tokens", "Token ids"])
    text.code(tok.decode(ids), language=None, wrap_lines=True)
    with tokens:
        st.html(token_chips([tok.decode([i]) for i in ids], ids))
    raw.code(" ".join(map(str, ids)), language=None, wrap_lines=True)


def preview_section(ds: dict[str, Any], tok) -> None:
    if tok is None:
        return
    text = st.text_area("Text", value=PREVIEW_TEXT, key="ds-preview-text", height=100)
    ids = tok(text)["input_ids"] if text else []
    st.markdown(f"**{len(ids):,} tokens** with `{ds['model_id']}`'s tokenizer (special tokens included, as in "
                "the dataset)")
    if ids:
        st.html(token_chips([tok.decode([i]) for i in ids], ids))


def dataset_details(client, datasets: list[dict[str, Any]]) -> None:
    by_id = {d["id"]: d for d in datasets}
    dataset_id = st.selectbox("Dataset", list(reversed(by_id)), key="ds-selected",
                              format_func=lambda i: f"{by_id[i]['name']} ({i}) — {fmt_number(by_id[i]['tokens'])} "
                                                    f"tokens, {by_id[i]['model_id']}")
    ds = by_id[dataset_id]
    stats_section(ds)
    frame = row_lengths(client, ds["id"], ds["path"])
    tok = tokenizer_for(client, ds["model_id"])
    left, right = st.columns(2)
    with left:
        st.markdown("**Length distribution**")
        length_section(ds, frame)
    with right:
        st.markdown("**Rows**")
        sample_section(client, ds, frame, tok)
    st.markdown("**Tokenization preview**")
    preview_section(ds, tok)


def page() -> None:
    st.title("Datasets")
    client = get_client()
    datasets = client.datasets()
    if datasets:
        datasets_table(datasets)
        guard(lambda: delete_panel(client, "dataset", datasets), name="del-dataset")
    else:
        st.caption("No dataset yet: add one below.")
    st.subheader("Add a dataset")
    add_form(client)
    st.subheader("Progress")
    progress_panel(client)
    if datasets:
        st.subheader("Inside a dataset")
        dataset_details(client, datasets)


guard(page)
