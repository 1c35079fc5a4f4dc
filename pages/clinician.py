"""Clinician: upload images, see class probabilities, a Grad-CAM overlay and the model card, and download a
report of each. No training data; uploads stay in memory (the report is built in memory on click)."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import functools
import hashlib
import math
import re
import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from dpcore.training import calibration
from dpcore.figures import runs as figures
from dpcore.analysis import run_review
from dpcore.store.card import describe_weights
from dpcore.errors import DPCoreError
from dpcore.data.titles import dataset_title
from dpcore.training.metrics import clinical_metrics
from dpcore.analysis.predict import load_run
from dpcore.analysis.report import (GRADCAM_EXPLAINED, NOTICE, calibration_line, colour_bar, report_facts, report_json,
                           report_pdf)
from dpcore.analysis.saliency import DEFAULT_OPACITY, saliency
from dpcore.analysis.uploads import MAX_UPLOAD_BYTES, UploadError, decode_upload
from dpcore.analysis.labels import fmt_pct
from pages.common import runs_dir, store
from pages.parts.formats import as_percent, pct_column, show_table
from pages.parts.run_panel import privacy_headline, show_guarantee

ANALYSES = "cl_analyses"  # session state: (run, upload digest) → (probabilities, Grad-CAM, problem)


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(root: str, run_id: str, temperature: float):  # noqa: ARG001 - part of the key: recalibrated, reloaded
    return load_run(store(), run_id), threading.Lock()  # the lock: Grad-CAM hooks the model while it runs


def decode(data: bytes, name: str):
    """(image, None) for a usable upload, (None, message) for a refused one."""
    try:
        return decode_upload(data, name), None
    except UploadError as exc:
        return None, str(exc)


def test_performance(card: dict) -> None:
    """Sensitivity, specificity, PPV, NPV per class on the held-out test split, and a warning when the model
    does little better than always answering the most frequent class."""
    confusion = (card.get("test_metrics") or {}).get("confusion_matrix")
    names = (card.get("dataset") or {}).get("class_names") or []
    if not confusion or not names:
        return
    try:
        m = clinical_metrics(confusion, names)
    except ValueError:
        return
    weak = ", ".join(m["rarely_recognised"])
    if m["near_majority"]:
        st.error(f"**This model is close to always answering '{m['majority_class']}'**: test accuracy "
                 f"{fmt_pct(m['accuracy'])} against {fmt_pct(m['majority_rate'])} for that trivial rule"
                 + (f"; it recognises {weak} in fewer than 1 in 4 cases" if weak else "")
                 + ". Do not read its output as evidence for or against any class.", icon="⚠️")
    elif weak:
        st.warning(f"**This model rarely recognises {weak}** (in fewer than 1 in 4 test cases): an answer other "
                   "than those classes says little about them.", icon="⚠️")
    rows = [{"class": name, "prevalence (test)": v["prevalence"], "sensitivity": v["sensitivity"],
             "specificity": v["specificity"], "PPV": v["ppv"], "NPV": v["npv"], "test images": v["support"]}
            for name, v in m["per_class"].items()]
    shares = ("prevalence (test)", "sensitivity", "specificity", "PPV", "NPV")
    show_table(as_percent(pd.DataFrame(rows), shares), key="cl_perf", column_config={k: pct_column(k) for k in shares})
    st.caption(f"On the {m['n']:,} held-out test images: balanced accuracy {fmt_pct(m['balanced_accuracy'])}. "
               "Each class against the rest. PPV and NPV depend on how common a class is: these are at the test "
               "split's prevalence, not at your clinic's.")


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


def analysis(loaded, lock, image, digest: str):
    """The model's probabilities and Grad-CAM for one upload, kept for this session so that moving the opacity
    slider re-blends the map instead of running the model again."""
    cache = st.session_state.setdefault(ANALYSES, {})
    key = (loaded.run_id, loaded.temperature, digest)  # a recalibrated model gives other probabilities
    if key not in cache:
        probs = loaded.predict_proba([image])[0]
        try:
            with lock:
                cache[key] = (probs, saliency(loaded, image, target_class=int(probs.argmax())), None)
        except DPCoreError as exc:
            cache[key] = (probs, None, str(exc))
    return cache[key]


def report_name(upload_name: str, ext: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(upload_name).stem)[:80] + f"-report.{ext}"


def _facts(card, loaded, probs, upload_name, image, result, problem, opacity):
    return report_facts(card=card, class_names=loaded.class_names, probabilities=probs, file_name=upload_name,
                        image_size=image.size, saliency=result, saliency_problem=problem, opacity=opacity,
                        temperature=getattr(loaded, "temperature", None))


def _pdf(*args) -> bytes:
    """Run by Streamlit when the button is clicked (in memory: nothing of the upload touches the disk)."""
    facts = _facts(*args)
    image, result, opacity = args[4], args[5], args[7]
    return report_pdf(facts, image, result, opacity)


def _json(*args) -> bytes:
    return report_json(_facts(*args))


def show_upload(k: int, name: str, data: bytes, card: dict, loaded, lock) -> str | None:
    """One upload: output, image, blended Grad-CAM with its opacity slider and colour bar, probabilities, and
    the report downloads (built only when clicked). Returns the upload's digest (None if it was refused)."""
    st.divider()
    image, problem = decode(data, name)
    if problem:
        st.error(problem, icon="🚫")
        return None
    digest = hashlib.sha256(data).hexdigest()[:16]
    probs, result, sal_problem = analysis(loaded, lock, image, digest)
    top = int(probs.argmax())
    label = loaded.class_names[top]
    st.markdown(f"#### {name}: model output **{label}** ({100 * probs[top]:.1f} %)")
    a, b, c = st.columns([1, 1, 1.4])
    a.image(image, caption="Uploaded image", width="stretch")
    opacity = None
    if result is not None:
        opacity = b.slider("Overlay opacity", 0.0, 1.0, DEFAULT_OPACITY, 0.05, key=f"cl_opacity_{k}_{digest}",
                           help="0 shows the image alone, 1 the Grad-CAM map alone.")
        b.image(result.blended(opacity), width="stretch", output_format="PNG",
                caption=f"{result.method}: regions that raised the score of '{label}' (model input size "
                        f"{result.image.width}×{result.image.height})")
        b.image(colour_bar(label), width="stretch", output_format="PNG")
        b.caption(GRADCAM_EXPLAINED)
    else:
        b.warning(f"No saliency map: {sal_problem}")
    c.plotly_chart(figures.probability_bars_figure(dict(zip(loaded.class_names, map(float, probs)))),
                   key=f"cl-probs-{k}")
    args = (card, loaded, probs, name, image, result, sal_problem, opacity)
    c.caption("Keep this result: the report holds the image, the overlay and its scale, the probabilities, the "
              "model card and the research-use notice. It is built in memory when you click; the app stores "
              "nothing of your image.")
    d1, d2 = c.columns(2)
    d1.download_button("Report (PDF)", functools.partial(_pdf, *args), key=f"cl_pdf_{k}_{digest}",
                       file_name=report_name(name, "pdf"), mime="application/pdf", on_click="ignore", icon="📄",
                       help="The image, the overlay, the probabilities, the model card and the research-use notice. "
                            "Built in memory when clicked; nothing is stored.")
    d2.download_button("Facts (JSON)", functools.partial(_json, *args), key=f"cl_json_{k}_{digest}",
                       file_name=report_name(name, "json"), mime="application/json", on_click="ignore", icon="🧾",
                       help="The same facts, machine-readable: probabilities per class, the model run and card, "
                            "the notice.")
    return digest


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
