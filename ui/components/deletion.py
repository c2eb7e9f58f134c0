"""The delete panel every object page shows: pick one, confirm, delete it with its files."""

from __future__ import annotations

from typing import Any

import streamlit as st


def delete_panel(client, kind: str, rows: list[dict[str, Any]], label: str = "name") -> None:
    """Delete one of `rows` (objects of `kind`: model, dataset, activation, sae) after a
    confirmation; the Client refuses, in one line, while a job uses it or others need it."""
    done = st.session_state.pop(f"del-{kind}-done", None)
    if done:  # said after the rerun that redrew the page without the deleted object
        st.success(done, icon=":material/check_circle:")
    if not rows:
        return
    by_id = {r["id"]: r for r in rows}
    with st.expander(f"Delete a {'activation set' if kind == 'activation' else kind}", icon=":material/delete:"):
        with st.form(f"del-{kind}-form"):
            object_id = st.selectbox("Which", list(by_id), key=f"del-{kind}",
                                     format_func=lambda i: f"{i} · {by_id[i].get(label) or ''}")
            sure = st.checkbox("Yes, delete it and its files", key=f"del-{kind}-sure")
            go = st.form_submit_button("Delete", key=f"del-{kind}-go", icon=":material/delete:")
        if go:
            if not sure:
                st.warning("Tick the box to confirm: the registry entry and its files are removed.",
                           icon=":material/warning:")
                return
            client.delete(kind, object_id)
            st.session_state[f"del-{kind}-done"] = f"Deleted {object_id}."
            st.rerun()  # the rest of the page was drawn from the list that still held it
