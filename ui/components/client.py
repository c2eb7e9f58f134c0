"""The dashboard's one Client and the guard every page body runs in.

The dashboard talks only to `actors.client.Client`. Everything the pages show is read afresh
from the registry and the ProgressActor on every run, so a page refresh (or a restarted UI)
finds running jobs and reattaches to their live numbers on its first poll.
"""

from __future__ import annotations

import logging
from typing import Callable

import streamlit as st

from actors.client import Client, UserError
from ui.components.formatting import error_line

log = logging.getLogger("mistudio.ui")


@st.cache_resource(show_spinner="Connecting to the miStudio Ray cluster…")
def get_client():
    """One Client per dashboard process; settings come from the environment (MISTUDIO_*).

    Connecting attaches to the deployment's Ray cluster, starting the local head when none runs.
    Confined: the dashboard's users read server files only under the allowed roots and export
    only under the data root's exports/ folder.
    """
    return Client(confined=True)


def show_error(error: BaseException | str) -> None:
    """A refusal on the page: one line, length-capped, literal text (formatting.error_line)."""
    st.error(error_line(error), icon=":material/error:")


def guard(body: Callable[[], None], name: str = "page") -> None:
    """Run a page (or fragment) body; show failures as a readable error instead of a traceback.

    `name` keeps the Reconnect button's key unique when a page nests a guarded fragment.
    """
    try:
        body()
    except UserError as e:
        show_error(e)
    except Exception as e:  # noqa: BLE001 - st.rerun/st.stop are BaseExceptions and pass through
        log.exception("dashboard page failed")
        first = error_line(e)
        st.error(f"Something went wrong: {type(e).__name__}: {first}" if first else
                 f"Something went wrong: {type(e).__name__}", icon=":material/error:")
        st.caption("The full traceback is in the dashboard's log. If the Ray cluster restarted, reconnect.")
        if st.button("Reconnect", key=f"reconnect-{name}"):
            get_client.clear()
            st.rerun()
