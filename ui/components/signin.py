"""The gate in front of the whole app: a shared password or an OIDC provider, or open."""

from __future__ import annotations

import hmac
import os

import streamlit as st

PASSWORD_ENV = "MISTUDIO_UI_PASSWORD"


def oidc_configured() -> bool:
    """Whether Streamlit's secrets (.streamlit/secrets.toml in the working folder or the home
    folder) hold an [auth] section; readable before the app runs (`mistudio ui --host`)."""
    try:
        return "auth" in st.secrets
    except FileNotFoundError:  # no secrets.toml at all
        return False


def sign_in_configured() -> bool:
    """A password or an OIDC provider guards the app: what serving beyond localhost requires."""
    return bool(os.environ.get(PASSWORD_ENV)) or oidc_configured()


def signed_in() -> bool:
    """Whether this browser session may see the app; draws the sign-in form when not. Open when
    neither a password (MISTUDIO_UI_PASSWORD) nor an OIDC provider ([auth] in Streamlit's
    secrets.toml, Streamlit's built-in st.login) is configured."""
    if oidc_configured():
        if st.user.get("is_logged_in"):  # a mapping: absent until the provider has answered
            return True
        st.title("miStudio")
        st.button("Sign in", on_click=st.login, type="primary", key="oidc-login")
        return False
    password = os.environ.get(PASSWORD_ENV, "")
    if not password or st.session_state.get("signed_in"):
        return True
    st.title("miStudio")
    with st.form("sign_in"):
        given = st.text_input("Password", type="password", key="password")
        if st.form_submit_button("Sign in", type="primary"):
            if hmac.compare_digest(given.encode(), password.encode()):
                st.session_state["signed_in"] = True
                st.rerun()
            st.error("Wrong password.", icon=":material/error:")
    return False
