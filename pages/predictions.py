"""Predictions: a finished run on its TEST split — gallery, confusion matrix, ROC, per-class metrics."""
import streamlit as st

from dpcore import figures, run_review
from dpcore.errors import DPCoreError
from pages.common import fmt_eps, fmt_pct, run_label, runs_dir, store


@st.cache_data(max_entries=16, show_spinner="Loading test images…")
def gallery(root: str, run_id: str, wrong_only: bool, true_class: str | None, limit: int) -> list:
    return run_review.test_gallery(store(), run_id, misclassified_only=wrong_only, true_class=true_class, limit=limit)


st.title("🔍 Test-set predictions")
st.caption("Only held-out test images are shown here, never training images.")
ready = {r.run_id: r for r in reversed(run_review.ready_runs(store()))}
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

cols = st.columns(4)
cols[0].metric("Test accuracy", fmt_pct(card.get("test_accuracy")))
cols[1].metric("Test ROC-AUC", "—" if card.get("test_roc_auc") is None else f"{card['test_roc_auc']:.3f}")
cols[2].metric("ε per image", fmt_eps((card.get("privacy") or {}).get("guarantee_epsilon") or card.get("epsilon")))
cols[3].metric("Test images", f"{len(preds.labels):,}")

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
st.dataframe(per_class, hide_index=True, column_config={
    "recall (sensitivity)": st.column_config.NumberColumn(format="percent"),
    "precision": st.column_config.NumberColumn(format="percent")})

st.subheader("Gallery")
f1, f2, f3 = st.columns(3)
wrong_only = f1.checkbox("Misclassified only", key="pr_wrong")
true_class = f2.selectbox("True class", ["all", *classes], key="pr_class")
limit = f3.select_slider("Images", [12, 24, 48, 96], value=24, key="pr_limit")
try:
    items = gallery(runs_dir(), run_id, wrong_only, None if true_class == "all" else true_class, limit)
except DPCoreError as exc:
    st.error(str(exc))
    items = []
if not items:
    st.caption("No test image matches these filters.")
grid = st.columns(6)
for k, item in enumerate(items):
    mark = "✅" if item.correct else "❌"
    grid[k % 6].image(item.image, width="stretch",
                      caption=f"{mark} true: {item.true_label} · predicted: {item.predicted_label} "
                              f"({100 * item.confidence:.0f} %)")
