"""Predictions: a finished run on its TEST split — gallery, confusion matrix, ROC, per-class metrics."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import pandas as pd
import streamlit as st

from dpcore.training import calibration
from dpcore.figures import calibration as calibration_figures, runs as figures
from dpcore.analysis import run_review
from dpcore.data import load_dataset
from dpcore.data.base import content_digests
from dpcore.errors import DPCoreError
from dpcore.analysis.labels import fmt_eps, fmt_pct, run_label
from pages.common import runs_dir, store
from pages.parts.formats import as_percent, pct_column, show_table


@st.cache_data(max_entries=16, show_spinner="Loading test images…")
def gallery(root: str, run_id: str, wrong_only: bool, true_class: str | None, limit: int) -> tuple[list, list[str]]:
    """(items to show, sources withheld): a test image whose content (sha256) is that of a training image is never
    shown, whatever the counts and labels say (a training image copied over a test file looks like a test image)."""
    items = run_review.test_gallery(store(), run_id, misclassified_only=wrong_only, true_class=true_class, limit=limit)
    if not items:
        return items, []
    cfg = store().get_run(run_id).config
    splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, test_fraction=cfg.test_fraction,
                          cache_dir=cfg.cache_dir, medmnist_size=cfg.medmnist_size, split=cfg.split)
    trained = set(content_digests(splits.train)) - {None}
    where = {splits.test.source(i): i for i in range(len(splits.test))}
    shown = content_digests(splits.test, [where[item.source] for item in items])
    return ([item for item, d in zip(items, shown) if d not in trained],
            [item.source for item, d in zip(items, shown) if d in trained])


st.title("🔍 Test-set predictions")
st.caption("Only held-out test images are shown here, never training images.")
ready = {r.run_id: r for r in run_review.clinician_order(store())}  # private, medical, best test AUC first
if not ready:
    st.info("No finished run yet: train one first.")
    st.page_link("pages/train.py", label="Go to Train", icon="🏋️")
    st.stop()

run_id = st.selectbox("Run", list(ready), format_func=lambda i: run_label(ready[i]), key="pr_run")
try:
    card = store().card(run_id)
    preds = run_review.load_test_predictions(store(), run_id)
except DPCoreError as exc:
    st.error(str(exc))
    st.stop()
classes = list(preds.class_names)

cols = st.columns(5)
cols[0].metric("Test accuracy", fmt_pct(card.get("test_accuracy")))
cols[1].metric("Balanced accuracy", fmt_pct(card.get("test_balanced_accuracy")),
               help="the mean of the per-class recalls: a model that always answers the commonest class scores "
                    "1 / (number of classes)")
cols[2].metric("Test ROC-AUC", "—" if card.get("test_roc_auc") is None else f"{card['test_roc_auc']:.3f}")
unit = (card.get("privacy") or {}).get("unit") or "image"
cols[3].metric(f"ε per {unit}", fmt_eps((card.get("privacy") or {}).get("guarantee_epsilon") or card.get("epsilon")))
cols[4].metric("Test images", f"{len(preds.labels):,}")

left, right = st.columns(2)
metrics = card.get("test_metrics") or {}
if metrics.get("confusion_matrix"):
    left.plotly_chart(figures.confusion_matrix_figure(metrics["confusion_matrix"], classes), key="pr-cm")
right.plotly_chart(figures.roc_curve_figure(preds.labels, preds.probs, classes), key="pr-roc")

st.subheader("Per-class metrics")
matrix = metrics.get("confusion_matrix") or []
per_class = []
for i, name in enumerate(classes):
    support = sum(matrix[i]) if matrix else None
    predicted = sum(row[i] for row in matrix) if matrix else None
    per_class.append({"class": name, "test images": support,
                      "recall (sensitivity)": (metrics.get("per_class_recall") or {}).get(name),
                      "precision": (matrix[i][i] / predicted) if predicted else None})
show_table(as_percent(pd.DataFrame(per_class), ["recall (sensitivity)", "precision"]), column_config={
    "recall (sensitivity)": pct_column("recall (sensitivity)"), "precision": pct_column("precision")})

st.subheader("Calibration")
cal = card.get("calibration")
if cal and cal.get("method") == "temperature":
    c1, c2, c3 = st.columns(3)
    c1.metric("Temperature T", f"{cal['temperature']:.3f}",
              help=f"fitted on {cal['fit_on']}: probabilities become softmax(logits / T)")
    c2.metric("ECE, evaluation half", f"{100 * cal['ece_before']:.1f} % → {100 * cal['ece_after']:.1f} %",
              help="expected calibration error: the mean gap between confidence and accuracy over "
                   f"{cal.get('n_bins', calibration.N_BINS)} confidence bins, on the {cal['n_eval']} test images "
                   "T was not fitted on")
    c3.metric("NLL, evaluation half", f"{cal['nll_before']:.3f} → {cal['nll_after']:.3f}")
    st.plotly_chart(calibration_figures.reliability_figure(cal), key="pr-reliability")
    side = "over-confident" if cal["temperature"] > 1 else "under-confident"
    st.caption(f"Below the diagonal the model is more sure than it is right. T > 1 softens its probabilities, "
               f"T < 1 sharpens them: this model was {side} on held-out images; the Clinician page shows the "
               f"calibrated probabilities. T was fitted on {cal['fit_on']} and judged on the other {cal['n_eval']}. "
               "Accuracy and the confusion matrix are unchanged (dividing the logits by T never changes the "
               "predicted class); the ROC curve and gallery above and below show the model's own probabilities. "
               "No training image is used, so ε is unchanged.")
elif cal:
    st.info(f"This run has no calibrated probabilities: {cal.get('reason', 'no temperature was fitted')}")
else:
    st.info("This run was stored before calibration existed, so its probabilities are the model's own. Compute a "
            f"temperature from its test predictions with `python -m dpcore temperature {run_id}`, or here.")
    if st.button("Calibrate this run", key="pr_calibrate"):
        try:
            calibration.calibrate_run(store(), run_id)
        except DPCoreError as exc:
            st.error(str(exc))
        else:
            st.rerun()

st.subheader("Gallery")
f1, f2, f3 = st.columns(3)
wrong_only = f1.checkbox("Misclassified only", key="pr_wrong")
true_class = f2.selectbox("True class", ["all", *classes], key="pr_class")
limit = f3.select_slider("Images", [12, 24, 48, 96], value=24, key="pr_limit")
try:
    items, withheld = gallery(runs_dir(), run_id, wrong_only, None if true_class == "all" else true_class, limit)
except DPCoreError as exc:
    st.error(str(exc))
    items, withheld = [], []
if withheld:
    st.warning(f"{len(withheld)} test image(s) are byte-identical to images this run trained on and are not shown "
               f"(the guarantee is about training images; none is published here): {', '.join(withheld[:5])}. "
               "Fix: remove the copies from the test data, and train again to measure the model on true test images.")
if not items:
    st.caption("No test image matches these filters.")
grid = st.columns(6)
for k, item in enumerate(items):
    mark = "✅" if item.correct else "❌"
    grid[k % 6].image(item.image, width="stretch",
                      caption=f"{mark} true: {item.true_label} · predicted: {item.predicted_label} "
                              f"({100 * item.confidence:.0f} %)")
