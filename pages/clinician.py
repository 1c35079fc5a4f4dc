"""Clinician: upload images, see class probabilities, a Grad-CAM overlay and the model card, and download a
report of each. No training data; uploads stay in memory (the report is built in memory on click)."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import math
import threading

import streamlit as st

from dpcore.training import calibration
from dpcore.analysis import run_review
from dpcore.store.card import describe_weights
from dpcore.errors import DPCoreError
from dpcore.data.titles import dataset_title
from dpcore.analysis.predict import load_run
from dpcore.analysis.report import NOTICE, calibration_line
from dpcore.analysis.uploads import MAX_UPLOAD_BYTES
from dpcore.analysis.labels import fmt_pct
from pages.common import runs_dir, store
from pages.parts.run_panel import privacy_headline, show_guarantee
from pages.parts.clinician_card import test_performance
from pages.parts.clinician_upload import ANALYSES, show_upload


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(root: str, run_id: str, temperature: float):  # noqa: ARG001 - part of the key: recalibrated, reloaded
    return load_run(store(), run_id), threading.Lock()  # the lock: Grad-CAM hooks the model while it runs


st.title("🩺 Clinician view")
st.warning(NOTICE, icon="⚠️")
ready = {r.run_id: r for r in run_review.clinician_order(store())}  # private, medical, best test AUC first
if not ready:
    st.info("No trained model yet: a model must be trained (Train page) before it can be used here.")
    st.stop()
demo = {i for i, r in ready.items() if r.dataset in run_review.DEMO_DATASETS}
if demo and len(demo) < len(ready) and not st.checkbox(
        f"Also list the {len(demo)} demo model(s) (digits, CIFAR-10: not medical images)", key="cl_demo"):
    ready = {i: r for i, r in ready.items() if i not in demo}


def describe(run_id: str) -> str:
    r = ready[run_id]
    data = dataset_title(r.dataset, r.config.data_dir)
    eps = run_review.guaranteed_epsilon(r.privacy or {}) if r.private else None
    privacy = ("non-private" if not r.private else "no DP guarantee" if eps is None or math.isinf(eps)
               else f"ε={eps:.3g} per {(r.privacy or {}).get('unit') or 'image'}")
    auc = (r.metrics or {}).get("roc_auc")
    return f"{data} · {r.backbone} · {privacy}" + (f" · AUC {auc:.3f}" if auc is not None else "") + f" · {run_id}"


run_id = st.selectbox("Model", list(ready), format_func=describe, key="cl_run")
try:
    card = store().card(run_id)
except DPCoreError as exc:
    st.error(str(exc))
    st.stop()
ds, model_info = card.get("dataset", {}), card.get("model", {})

with st.expander("Model card", expanded=True):
    c1, c2 = st.columns(2)
    c1.markdown(f"**Trained on:** {dataset_title(ds.get('name'), ds.get('data_dir'))} — {ds.get('n_train', 0):,} "
                "training images, "
                f"evaluated on {ds.get('n_test', 0):,} held-out test images  \n"
                f"**Classes:** {', '.join(ds.get('class_names', []))}  \n"
                f"**Backbone:** {model_info.get('backbone')} (weights: {describe_weights(model_info.get('weights'))}, "
                f"fine-tuned: {model_info.get('scope')})  \n"
                f"**Date trained:** {str(card.get('date', ''))[:10]}")
    c2.markdown(f"**Test accuracy:** {fmt_pct(card.get('test_accuracy'))} (balanced: "
                f"{fmt_pct(card.get('test_balanced_accuracy'))})  \n"
                f"**Test ROC-AUC:** {'—' if card.get('test_roc_auc') is None else format(card['test_roc_auc'], '.3f')}  \n"
                f"**Privacy:** {privacy_headline(card)}  \n"
                f"**Probabilities:** {calibration_line(card)}")
    show_guarantee(card)
    for w in card.get("warnings") or []:
        st.caption(f"⚠ {w}")
    test_performance(card)


uploads = st.file_uploader("Images (PNG or JPEG)", type=["png", "jpg", "jpeg"], accept_multiple_files=True,
                           key="cl_upload", max_upload_size=max(1, MAX_UPLOAD_BYTES // (1024 * 1024)),
                           help="Images are processed in memory and not stored.")
if uploads:
    try:
        loaded, lock = loaded_model(runs_dir(), run_id, calibration.temperature_of(card))
    except DPCoreError as exc:
        st.error(f"This model cannot be loaded: {exc}")
        st.stop()
    shown = {(run_id, loaded.temperature, show_upload(k, u.name, u.getvalue(), card, loaded, lock))
             for k, u in enumerate(uploads)}
    st.session_state[ANALYSES] = {key: v for key, v in st.session_state.get(ANALYSES, {}).items() if key in shown}
    st.caption(calibration_line(card, getattr(loaded, "temperature", None)) + " " + NOTICE)
else:
    st.session_state.pop(ANALYSES, None)
