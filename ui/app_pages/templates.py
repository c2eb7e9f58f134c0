"""Templates: saved job forms, steering prompt sets and labeling prompts — edit, export, import."""

from __future__ import annotations

import json

import streamlit as st

from actors.client import Client, UserError
from ui.components.client import get_client, guard

JOB_KINDS, PROMPT_SETS, LABEL_PROMPT = Client.template_kinds()
KINDS = [*JOB_KINDS, PROMPT_SETS, LABEL_PROMPT]
EXAMPLES = {PROMPT_SETS: {"prompts": ["The weather today is", "My favourite city is"]},
            LABEL_PROMPT: {"name": "short", "system": "", "user": "Name what these have in common:\n{examples}"},
            # a train form's example: the SAE type and width at the training config's own defaults
            "train": {"config": {k: v for k, v in Client.train_defaults().items()
                                 if k in ("architecture", "expansion_factor", "k")}}}


def _values(text: str) -> dict:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"the values are not JSON ({e.msg} at line {e.lineno}); check quotes and commas") from None
    if not isinstance(values, dict):
        raise UserError("the values must be a JSON object: {\"key\": value, ...}")
    return values


def editor(client, kind: str, name: str, values: dict, key: str) -> None:
    """A template's values as editable JSON, with Save, Delete and Export."""
    text = st.text_area("Values (JSON)", json.dumps(values, indent=2), height=220, key=f"tpl-text-{key}")
    c = st.columns(3)
    if c[0].button("Save", key=f"tpl-save-{key}", icon=":material/save:", type="primary"):
        client.save_template(kind, name, _values(text))  # validated: unknown keys and wrong types are refused
        st.success(f"Saved {kind} template `{name}`.", icon=":material/check_circle:")
    if c[1].button("Delete", key=f"tpl-delete-{key}", icon=":material/delete:"):
        client.delete_template(kind, name)
        st.rerun()
    c[2].download_button("Export JSON", client.export_template(kind, name), file_name=f"{kind}-{name}.json",
                         mime="application/json", key=f"tpl-export-{key}", icon=":material/download:")


def saved(client) -> None:
    templates = client.templates()
    if not templates:
        st.caption("No templates yet: save one below, from the Training page, or with `mistudio templates save`.")
        return
    st.dataframe([{"kind": t["kind"], "name": t["name"], "keys": ", ".join(t["values"])} for t in templates],
                 hide_index=True, key="tpl-table")
    labels = {f"{t['kind']} / {t['name']}": t for t in templates}
    t = labels[st.selectbox("Edit", list(labels), key="tpl-pick")]
    editor(client, t["kind"], t["name"], t["values"], key=f"{t['kind']}-{t['name']}")


def create(client) -> None:
    c = st.columns(2)
    kind = c[0].selectbox("Kind", KINDS, key="tpl-new-kind",
                          help="a job kind (its form's fields), a steering prompt set or a labeling prompt")
    name = c[1].text_input("Name", key="tpl-new-name")
    text = st.text_area("Values (JSON)", json.dumps(EXAMPLES.get(kind, {}), indent=2), height=160,
                        key=f"tpl-new-values-{kind}")
    if st.button("Create", key="tpl-create", icon=":material/add:"):
        if not name.strip():
            raise UserError("give the template a name")
        client.save_template(kind, name.strip(), _values(text))
        st.success(f"Saved {kind} template `{name.strip()}`.", icon=":material/check_circle:")


def import_file(client) -> None:
    upload = st.file_uploader("An exported template (.json)", type=["json"], key="tpl-upload")
    if upload is not None and st.button("Import", key="tpl-import", icon=":material/upload:"):
        t = client.import_template(upload.getvalue().decode("utf-8", "replace"), where=upload.name)
        st.success(f"Imported {t['kind']} template `{t['name']}`.", icon=":material/check_circle:")


def page() -> None:
    st.title("Templates")
    client = get_client()
    st.caption("Named settings for every job kind, steering prompt sets and labeling prompts, kept in the registry. "
               "Exported files carry their kind and import anywhere.")
    guard(lambda: saved(client), name="tpl-saved")
    st.subheader("New template")
    guard(lambda: create(client), name="tpl-new")
    st.subheader("Import")
    guard(lambda: import_file(client), name="tpl-import")


guard(page)
