"""A run's stored test-split predictions (test_predictions.npz): what its last evaluation released beside the
model, read back for the review pages, calibration and fairness."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpcore.errors import DPCoreError
from dpcore.store.runs import RunStore


@dataclass
class TestPredictions:
    probs: np.ndarray  # (N, classes)
    labels: np.ndarray  # (N,) true class indices
    test_index: np.ndarray  # (N,) index of each row in the run's test split
    class_names: list[str]

    __test__ = False  # not a pytest test class


def _class_names(store: RunStore, run_id: str) -> list[str]:
    try:
        return list(store.card(run_id)["dataset"]["class_names"])
    except (DPCoreError, KeyError):
        from dpcore.store.model_io import read_metadata

        weights = store.run_dir(run_id) / "model.safetensors"
        if not weights.is_file():
            raise DPCoreError(f"run {run_id} has neither a model card nor a model file, so its class names are "
                              "unknown. Fix: pick a finished run") from None
        return list(read_metadata(weights)["class_names"])


def load_test_predictions(store: RunStore, run_id: str) -> TestPredictions:
    """The stored test-split probabilities of a run (saved at its last evaluation)."""
    path = store.run_dir(run_id) / "test_predictions.npz"
    if not path.is_file():
        status = store.get_run(run_id).status
        raise DPCoreError(f"run {run_id} has no test_predictions.npz (status: {status}); runs store them when "
                          "they finish with at least one evaluation. Fix: pick a finished run, or train it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            probs, labels, index = npz["probs"], npz["labels"], npz["test_index"]
    except Exception as e:
        raise DPCoreError(f"{path} cannot be read ({type(e).__name__}: {e}). Fix: train the run again") from e
    names = _class_names(store, run_id)
    if probs.ndim != 2 or probs.shape[1] != len(names) or not len(probs) == len(labels) == len(index):
        raise DPCoreError(f"{path} is inconsistent: probs {probs.shape}, {len(labels)} labels, {len(index)} "
                          f"indices, {len(names)} classes. Fix: train the run again")
    return TestPredictions(probs=probs, labels=labels.astype(np.int64), test_index=index.astype(np.int64),
                           class_names=names)
