"""Clinician: upload images, see class probabilities, a Grad-CAM overlay and the model card. No training data."""
import math
import threading

import streamlit as st

from dpcore import figures, run_review
from dpcore.card import describe_weights
from dpcore.errors import DPCoreError
from dpcore.data.titles import dataset_title
from dpcore.metrics import clinical_metrics
from dpcore.predict import load_run
from dpcore.saliency import saliency
from dpcore.uploads import MAX_UPLOAD_BYTES, UploadError, decode_upload
from pages.common import fmt_pct, privacy_headline, runs_dir, show_guarantee, store

NOTICE = ("**Research use only — not a medical device; not a clinical diagnosis.** The output must be interpreted "
          "by a qualified healthcare professional. For research, educational and demonstration purposes only.")


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(root: str, run_id: str):
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
    pct = st.column_config.NumberColumn(format="percent")
    st.dataframe(rows, hide_index=True, key="cl_perf", column_config={
        k: pct for k in ("prevalence (test)", "sensitivity", "specificity", "PPV", "NPV")})
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
    c2.markdown(f"**Test accuracy:** {fmt_pct(card.get('test_accuracy'))}  \n"
                f"**Test ROC-AUC:** {'—' if card.get('test_roc_auc') is None else format(card['test_roc_auc'], '.3f')}  \n"
                f"**Privacy:** {privacy_headline(card)}")
    show_guarantee(card)
    for w in card.get("warnings") or []:
        st.caption(f"⚠ {w}")
    test_performance(card)

uploads = st.file_uploader("Images (PNG or JPEG)", type=["png", "jpg", "jpeg"], accept_multiple_files=True,
                           key="cl_upload", max_upload_size=max(1, MAX_UPLOAD_BYTES // (1024 * 1024)),
                           help="Images are processed in memory and not stored.")
if uploads:
    try:
        loaded, lock = loaded_model(runs_dir(), run_id)
    except DPCoreError as exc:
        st.error(f"This model cannot be loaded: {exc}")
        st.stop()
    for k, upload in enumerate(uploads):
        st.divider()
        image, problem = decode(upload.getvalue(), upload.name)
        if problem:
            st.error(problem, icon="🚫")
            continue
        probs = loaded.predict_proba([image])[0]
        top = int(probs.argmax())
        st.markdown(f"#### {upload.name}: model output **{loaded.class_names[top]}** ({100 * probs[top]:.1f} %)")
        a, b, c = st.columns([1, 1, 2])
        a.image(image, caption="Uploaded image", width="stretch")
        try:
            with lock:
                result = saliency(loaded, image, target_class=top)
            b.image(result.overlay, caption=f"{result.method}: regions that drove '{loaded.class_names[top]}'",
                    width="stretch")
        except DPCoreError as exc:
            b.warning(f"No saliency map: {exc}")
        c.plotly_chart(figures.probability_bars_figure(dict(zip(loaded.class_names, map(float, probs)))),
                       key=f"cl-probs-{k}")
    st.caption("Probabilities from DP-trained models are often over- or under-confident; they are not calibrated "
               "risks. " + NOTICE)
