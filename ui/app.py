"""miStudio dashboard: `streamlit run ui/app.py` (or `mistudio ui`).

The pages live in ui/app_pages/; their paths resolve relative to this file. Every page reads
the registry and the live progress through `actors.client.Client` (see ui/widgets.py).
"""

import streamlit as st

st.set_page_config(page_title="miStudio", layout="wide")

pages = st.navigation([
    st.Page("app_pages/jobs.py", title="Jobs", icon=":material/play_circle:", default=True),
    st.Page("app_pages/features.py", title="Features", icon=":material/insights:"),
    st.Page("app_pages/steering.py", title="Steering", icon=":material/tune:"),
    st.Page("app_pages/system.py", title="System", icon=":material/monitor_heart:"),
])
pages.run()
