"""Runs table, frontier points, stored test predictions and the test-only gallery."""
import numpy as np
import pytest
from PIL import Image

import dpcore.analysis.run_review as insp
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.errors import DPCoreError
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real tiny DP run, a recorded non-private run, a failed run and a queued run."""
    st = RunStore(tmp_path_factory.mktemp("runs"))
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, epsilon=2.0,
                    batch_size=128, max_physical_batch_size=128)
    dp = train(cfg, st).run_id
    npv = st.create_run(cfg.replace(epsilon=None))
    st.set_status(npv, "running")
    st.record_results(npv, {"accuracy": 0.95, "balanced_accuracy": 0.94, "roc_auc": 0.99},
                      {"private": False, "epsilon": None})
    st.set_status(npv, "done")
    failed = st.create_run(cfg.replace(backbone="resnet18"))
    st.set_status(failed, "running")
    st.set_status(failed, "failed", error="boom")
    queued = st.create_run(cfg.replace(dataset="folder", data_dir="/nowhere"))
    return st, {"dp": dp, "npv": npv, "failed": failed, "queued": queued}


def test_runs_table(store):
    st, ids = store
    rows = {r["run_id"]: r for r in insp.runs_table(st)}
    assert list(rows) == [ids["dp"], ids["npv"], ids["failed"], ids["queued"]]
    keys = {"run_id", "status", "dataset", "backbone", "pretrained", "scope", "private", "epsilon", "target_epsilon",
            "delta", "accountant", "test_accuracy", "test_roc_auc", "duration_s", "created", "unit"}
    assert all(set(r) == keys for r in rows.values())
    assert rows[ids["dp"]]["unit"] == "image" and rows[ids["npv"]]["unit"] is None  # the privacy unit ε is per
    dp = rows[ids["dp"]]
    card = st.card(ids["dp"])
    assert dp["status"] == "done" and dp["private"] and dp["target_epsilon"] == 2.0
    assert dp["epsilon"] == pytest.approx(card["epsilon"]) and 0 < dp["epsilon"] <= 2.0 + 1e-9
    assert dp["test_accuracy"] == pytest.approx(card["test_accuracy"]) and dp["accountant"] == "rdp"
    assert dp["duration_s"] > 0 and dp["created"].endswith("+00:00")
    assert rows[ids["npv"]]["epsilon"] is None and rows[ids["npv"]]["delta"] is None
    assert rows[ids["failed"]]["epsilon"] is None and rows[ids["failed"]]["status"] == "failed"
    assert rows[ids["queued"]]["duration_s"] is None and rows[ids["queued"]]["test_accuracy"] is None


def test_frontier(store):
    st, ids = store
    assert insp.frontier_groups(st) == [("digits", "tiny_cnn", "full", "none")]
    dp, npv = insp.frontier_points(st, "digits", "tiny_cnn")
    assert [p["run_id"] for p in dp] == [ids["dp"]] and [p["run_id"] for p in npv] == [ids["npv"]]
    assert dp[0]["epsilon"] == pytest.approx(st.card(ids["dp"])["epsilon"]) and dp[0]["label"].startswith("ε=")
    assert npv[0]["accuracy"] == 0.95 and npv[0]["epsilon"] is None and "non-private" in npv[0]["label"]
    assert all({"epsilon", "accuracy", "roc_auc", "run_id", "label"} <= set(p) for p in dp + npv)
    assert insp.frontier_points(st, "digits", "resnet18") == ([], [])
    assert insp.frontier_points(st, "digits", "tiny_cnn", "head", "none") == ([], [])  # full-scope runs only
    assert insp.frontier_points(st, "digits", "tiny_cnn", "full", "none") == (dp, npv)


def test_ready_runs(store):
    st, ids = store
    assert [r.run_id for r in insp.ready_runs(st)] == [ids["dp"]]  # the recorded run has no model file


def test_load_test_predictions(store):
    st, ids = store
    tp = insp.load_test_predictions(st, ids["dp"])
    assert tp.probs.shape == (360, 10) and tp.labels.shape == tp.test_index.shape == (360,)
    assert tp.class_names == [str(i) for i in range(10)]
    np.testing.assert_allclose(tp.probs.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(DPCoreError, match="no test_predictions.npz"):
        insp.load_test_predictions(st, ids["npv"])


def test_gallery_shows_only_test_images(store):
    st, ids = store
    splits = load_dataset("digits", seed=0, test_fraction=0.2)
    test_sources = {splits.test.source(i) for i in range(len(splits.test))}
    train_sources = {splits.train.source(i) for i in range(len(splits.train))}
    items = insp.test_gallery(st, ids["dp"], limit=500)
    assert len(items) == 360
    assert {it.source for it in items} <= test_sources and not {it.source for it in items} & train_sources
    tp = insp.load_test_predictions(st, ids["dp"])
    first = items[0]  # the classes in turn, each in test-split order: the first test image of class 0
    row = int(np.flatnonzero(tp.labels == 0)[0])
    assert isinstance(first.image, Image.Image) and first.image.mode == "RGB"
    assert first.true_label == tp.class_names[0]
    assert first.confidence == pytest.approx(tp.probs[row].max()) and first.correct == (
        first.true_label == first.predicted_label)
    assert np.array_equal(np.asarray(first.image), np.asarray(splits.test.image(int(tp.test_index[row]))))
    mixed = insp.test_gallery(st, ids["dp"], limit=20)  # "all" shows every class, not the first one only
    assert sorted(it.true_label for it in mixed) == sorted(tp.class_names * 2)

    wrong = insp.test_gallery(st, ids["dp"], misclassified_only=True, limit=500)
    assert wrong and all(not it.correct for it in wrong)
    assert len(wrong) == int((tp.probs.argmax(1) != tp.labels).sum())
    threes = insp.test_gallery(st, ids["dp"], true_class="3", limit=5)
    assert len(threes) == 5 and all(it.true_label == "3" for it in threes)
    with pytest.raises(DPCoreError, match="'cat' is not a class"):
        insp.test_gallery(st, ids["dp"], true_class="cat")


def test_gallery_refuses_changed_or_missing_data(store, tmp_path):
    st, ids = store
    run_dir = st.run_dir(ids["dp"])
    npz = run_dir / "test_predictions.npz"
    original = npz.read_bytes()
    try:
        with np.load(npz) as f:
            probs, labels, index = f["probs"], f["labels"], f["test_index"]
        np.savez(npz, probs=probs, labels=(labels + 1) % 10, test_index=index)
        with pytest.raises(DPCoreError, match="have changed since it was trained"):
            insp.test_gallery(st, ids["dp"])
    finally:
        npz.write_bytes(original)

    # a folder run whose data folder is gone: copy the DP run under a folder config
    folder_cfg = RunConfig(dataset="folder", data_dir=str(tmp_path / "gone"), backbone="tiny_cnn", image_size=16)
    rid = st.create_run(folder_cfg)
    for name in ("test_predictions.npz", "card.json", "model.safetensors"):
        (st.run_dir(rid) / name).write_bytes((run_dir / name).read_bytes())
    st.set_status(rid, "running")
    st.set_status(rid, "done")
    with pytest.raises(DPCoreError, match=r"cannot be shown.*no longer loads.*gone"):
        insp.test_gallery(st, rid)
    st.delete_run(rid)


def test_clinician_sees_the_best_private_medical_model_first(tmp_path):
    """Not the newest run: private with a holding guarantee first, medical before the digits demo, then test AUC."""
    from dpcore.analysis import run_review
    from dpcore.config import RunConfig
    from dpcore.store.runs import RunStore

    store = RunStore(tmp_path)
    made = {}
    for name, dataset, eps, auc, holds in [("private xray .90", "folder", 1.0, 0.90, True),
                                           ("private xray .95", "folder", 1.0, 0.95, True),
                                           ("non-private xray .99", "folder", None, 0.99, None),
                                           ("void xray .97", "folder", 1.0, 0.97, False),
                                           ("private digits .99", "digits", 1.0, 0.99, True)]:
        cfg = RunConfig(dataset=dataset, data_dir=str(tmp_path) if dataset == "folder" else None, epsilon=eps)
        run_id = store.create_run(cfg)
        (store.run_dir(run_id) / "model.safetensors").write_bytes(b"x")
        privacy = {"private": eps is not None, "epsilon": eps, "guarantee_holds": holds,
                   "guarantee_epsilon": eps if holds else None}
        store.record_results(run_id, {"roc_auc": auc}, privacy)
        store.set_status(run_id, "running")
        store.set_status(run_id, "done")
        made[run_id] = name
    order = [made[r.run_id] for r in run_review.clinician_order(store)]
    assert order == ["private xray .95", "private xray .90", "private digits .99", "non-private xray .99",
                     "void xray .97"]
