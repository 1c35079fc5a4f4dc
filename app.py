"""DP Explorer: the Streamlit app. This file only routes; each page lives in pages/.

Run: DPCORE_RUNS_DIR=runs streamlit run app.py
(.streamlit/config.toml binds it to localhost; every page warns when it is reachable from the network.)
"""
import sys

import streamlit as st

from pages.banner import show_network_warning

st.set_page_config(page_title="DP Explorer", page_icon="🔒", layout="wide")
show_network_warning()

PAGES = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/train.py", title="Train", icon="🏋️"),
    st.Page("pages/accounting.py", title="Accounting", icon="🧮"),
    st.Page("pages/runs.py", title="Runs", icon="📋"),
    st.Page("pages/experiments.py", title="Experiments", icon="🧪"),
    st.Page("pages/predictions.py", title="Predictions", icon="🔍"),
    st.Page("pages/audit.py", title="Audit", icon="🕵️"),
    st.Page("pages/ledger.py", title="Privacy budget", icon="💰"),
    st.Page("pages/clinician.py", title="Clinician", icon="🩺"),
]

page = st.navigation(PAGES)
if "torch" not in sys.modules and page.url_path:  # a cold start on any page but Home (which paints first itself)
    with st.spinner("Starting the engine (torch, timm): a few seconds, on the first page load only…"):
        import pages.common  # noqa: F401 - every page's imports, loaded behind words instead of a blank page
try:
    page.run()
except Exception as exc:  # noqa: BLE001 - only the store's errors are caught, below
    from dpcore.store.runs import StoreError  # imported here: torch loads with the page, not before its first words

    if not isinstance(exc, StoreError):
        raise
    # a damaged index, a full disk, a read-only folder: say what to do, not just the type
    st.error(f"The runs folder cannot be used: {exc}")
