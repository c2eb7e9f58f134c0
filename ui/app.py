"""miStudio dashboard: `streamlit run ui/app.py` (or `mistudio ui`).

The pages live in ui/app_pages/; their paths resolve relative to this file. Every page reads
the registry and the live progress through `actors.client.Client` (see ui/components/). When a
password (MISTUDIO_UI_PASSWORD) or an OIDC provider (Streamlit's [auth] secrets) is configured,
only signed-in users get past the first line.
"""

import streamlit as st

from ui.components.signin import signed_in

st.set_page_config(page_title="miStudio", layout="wide")
if not signed_in():
    st.stop()

pages = st.navigation({
    "Data": [
        st.Page("app_pages/datasets.py", title="Datasets", icon=":material/dataset:"),
        st.Page("app_pages/models.py", title="Models", icon=":material/neurology:"),
    ],
    "Run": [
        st.Page("app_pages/jobs.py", title="Jobs", icon=":material/play_circle:", default=True),
        st.Page("app_pages/extraction.py", title="Extraction", icon=":material/download:"),
        st.Page("app_pages/training.py", title="Training", icon=":material/model_training:"),
    ],
    "Explore": [
        st.Page("app_pages/saes.py", title="SAEs", icon=":material/hub:"),
        st.Page("app_pages/features.py", title="Features", icon=":material/insights:"),
        st.Page("app_pages/steering.py", title="Steering", icon=":material/tune:"),
    ],
    "Studio": [
        st.Page("app_pages/templates.py", title="Templates", icon=":material/bookmarks:"),
        st.Page("app_pages/system.py", title="System", icon=":material/monitor_heart:"),
        st.Page("app_pages/settings.py", title="Settings", icon=":material/settings:"),
    ],
})
pages.run()
