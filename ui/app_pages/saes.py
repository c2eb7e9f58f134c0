"""SAEs: every trained or imported SAE with its evaluation; import from the field's formats;
export as a SAELens folder or Neuronpedia feature files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import streamlit as st

from actors.client import UserError
from ui.components.client import get_client, guard
from ui.components.deletion import delete_panel
from ui.components.formatting import fmt_number
from ui.components.jobs import progress_panel


def metric_titles(definitions: dict) -> dict[str, str]:
    """{metric key: column title naming the definition it follows}, e.g. "FVU · miStudio"."""
    return {key: f"{m.label} · {m.convention}" for key, m in definitions.items()}


def sae_frame(saes: list[dict], titles: dict[str, str]) -> pd.DataFrame:
    rows = []
    for s in saes:
        m = s.get("metrics") or {}
        rows.append({"id": s["id"], "name": s["name"], "model": s["model_id"], "hook": s["hook_name"],
                     "type": s["architecture"], "d_sae": s["d_sae"], "settings": s["settings"],
                     **{title: m.get(key) for key, title in titles.items()},
                     "features": "yes" if s.get("features_path") else "no",
                     "source": m.get("imported_from", "trained")})
    return pd.DataFrame(rows)


def definitions_table(definitions: dict) -> None:
    """What each column means and whose definition it follows."""
    with st.expander("What the numbers mean", icon=":material/info:"):
        st.dataframe(pd.DataFrame([{"column": f"{m.label} · {m.convention}", "definition": m.meaning}
                                   for m in definitions.values()]), hide_index=True, key="sae-definitions")


def import_form(client) -> None:
    models = [m["id"] for m in client.models()]
    if not models:
        st.info("Register the model the SAEs read first, on the **Models** page.", icon=":material/info:")
        return
    with st.form("import_form"):
        source = st.text_input("Source", key="imp-source", placeholder="/path/to/sae-folder, an archive "
                               "(.zip, .tar.gz), or owner/repo[/subfolder] on the Hugging Face Hub")
        c = st.columns(4)
        model_id = c[0].selectbox("Model", models, key="imp-model")
        hook = c[1].text_input("Hook (when the files do not say)", key="imp-hook",
                               placeholder="blocks.6.hook_resid_post")
        fmt = c[2].selectbox("Format", ["detect", *client.sae_formats()], key="imp-format")
        name = c[3].text_input("Name prefix", key="imp-name")
        submitted = st.form_submit_button("Import", type="primary", icon=":material/upload:", key="imp-submit")
    if submitted:
        if not source.strip():
            raise UserError("give a source: a folder, an archive or a Hugging Face repo id")
        job_id = client.submit("import_sae", {"source": source.strip(), "model_id": model_id,
                                              "hook_name": hook.strip(), "format": "" if fmt == "detect" else fmt,
                                              "name": name.strip()})
        st.success(f"Submitted import job `{job_id}`; it is checked against {model_id} before anything is "
                   "registered.", icon=":material/check_circle:")


def zipped(folder: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                z.write(f, f.name)
    return buf.getvalue()


def export_panel(client, saes: list[dict]) -> None:
    by_id = {s["id"]: s for s in saes}
    sae = by_id[st.selectbox("SAE", list(by_id), key="exp-sae", format_func=lambda i: f"{by_id[i]['name']} · {i}")]
    st.caption(f"`{sae['hook_name']}` · {sae['architecture']} · d_in {sae['d_in']} → d_sae {fmt_number(sae['d_sae'])}"
               f" · stored at `{sae['path']}`")
    c = st.columns(2)
    # the zip is built when the button is pressed, not on every rerun (a 65k-latent SAE's weights are ~300 MB)
    c[0].download_button("Download SAELens folder (.zip)", lambda: zipped(client.local(sae["path"])),
                         file_name=f"{sae['id']}.zip",
                         mime="application/zip", key="exp-zip", icon=":material/download:",
                         help="cfg.json + sae_weights.safetensors: SAELens's SAE.load_from_disk reads it")
    with c[1].form("export_form"):
        out = st.text_input("…or write it on the server, under exports/", key="exp-out",
                            help=f"a new folder or file name inside {client.export_folder()}")
        kind = st.radio("As", ["SAELens folder", "Neuronpedia feature JSON", "dashboard bundle"], horizontal=True,
                        key="exp-kind")
        overwrite = st.checkbox("Overwrite", value=False, key="exp-overwrite",
                                help="replace a file or folder already there (otherwise the export is refused)")
        go = st.form_submit_button("Export", key="exp-go")
    if go:
        if not out.strip():
            raise UserError("give the folder to write into")
        if kind == "SAELens folder":
            where = client.export_sae(sae["id"], out.strip(), overwrite)
        else:
            where = client.export_features(sae["id"], "neuronpedia" if kind.startswith("Neuronpedia") else "bundle",
                                           out.strip(), overwrite=overwrite)
        st.success(f"Wrote `{where}`.", icon=":material/check_circle:")


def page() -> None:
    st.title("SAEs")
    client = get_client()
    saes = client.saes()
    if saes:
        definitions = client.metric_definitions()
        titles = metric_titles(definitions)
        st.dataframe(sae_frame(saes, titles), hide_index=True, key="sae-table",
                     column_config={t: st.column_config.NumberColumn(t, format="%.4g") for t in titles.values()})
        st.caption("Metrics are measured on a held-out slice after training, each under the definition its column "
                   "names: miStudio's (special tokens and norm outliers left clean) or SAELens's (run_evals: every "
                   "non-special position spliced, every position ablated). CE loss recovered / CE score: 1 = as "
                   "good as the model, 0 = as bad as ablating the site. Imported SAEs have none until they are "
                   "retrained here.")
        definitions_table(definitions)
        guard(lambda: delete_panel(client, "sae", saes), name="del-sae")
    else:
        st.caption("No SAEs yet: train one on the Training page, or import one below.")
    st.subheader("Import")
    guard(lambda: import_form(client), name="sae-import")
    st.subheader("Progress")
    progress_panel(client)
    if saes:
        st.subheader("Export")
        guard(lambda: export_panel(client, saes), name="sae-export")


guard(page)
