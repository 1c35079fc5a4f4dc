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


def clinical_metrics(confusion, class_names: list[str]) -> dict:
    """Per class, one class against the rest, at the test split's prevalence: sensitivity, specificity, PPV,
    NPV; the majority-class rate; whether the model is near what always answering the majority class would score
    (accuracy within 5 points of it); and the classes it almost never recognises (recall below 25 %).

    PPV and NPV depend on prevalence: these are at the test split's, not at a clinic's (the caller says so)."""
    cm = np.asarray(confusion, dtype=float)
    n = cm.sum()
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names) or n <= 0:
        raise ValueError("a square confusion matrix with one row per class and at least one example is needed")
    true_counts = cm.sum(axis=1)

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b > 0 else None

    per_class = {}
    for c, name in enumerate(class_names):
        tp = cm[c, c]
        fn = true_counts[c] - tp
        fp = cm[:, c].sum() - tp
        tn = n - tp - fn - fp
        per_class[name] = {"prevalence": float(true_counts[c] / n), "sensitivity": ratio(tp, tp + fn),
                           "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
                           "support": int(true_counts[c])}
    accuracy = float(np.trace(cm) / n)
    majority = int(true_counts.argmax())
    majority_rate = float(true_counts[majority] / n)
    recalls = [v["sensitivity"] for v in per_class.values() if v["sensitivity"] is not None]
    weak = [name for name, v in per_class.items() if v["sensitivity"] is not None and v["sensitivity"] < 0.25]
    return {"n": int(n), "accuracy": accuracy, "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
            "majority_class": class_names[majority], "majority_rate": majority_rate, "per_class": per_class,
            "near_majority": accuracy <= majority_rate + 0.05, "rarely_recognised": weak}
