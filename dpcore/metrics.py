"""Test-split metrics (scikit-learn): what the run card and the charts report."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, ROC-AUC (binary, or macro one-vs-rest), per-class recall, confusion.

    ROC-AUC is None when it is undefined (a class absent from y_true); for multi-class it is the
    macro average over the classes present, and `roc_auc_classes` says which those were.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    present = sorted(set(y_true.tolist()))
    auc, auc_classes = None, present
    if k == 2 and len(present) == 2:
        auc = float(roc_auc_score(y_true, probs[:, 1]))
    elif k > 2 and len(present) >= 2:
        per_class = [roc_auc_score(y_true == c, probs[:, c]) for c in present]
        auc = float(np.mean(per_class))
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "roc_auc": auc,
        "roc_auc_classes": [class_names[c] for c in auc_classes],
        "per_class_recall": {name: float(r) for name, r in zip(class_names, recalls)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
