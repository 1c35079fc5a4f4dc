"""The clinician's report (dpcore.analysis.report): a PDF and a JSON file with the same facts, built in memory from a
trained run's card and the model's output; the notice and the ε with its privacy unit are in both."""
from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dpcore.analysis import report
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.analysis.predict import load_run
from dpcore.analysis.saliency import saliency
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=16, epochs=1, epsilon=2.0,
                    batch_size=64, max_physical_batch_size=64, device="cpu")
    run_id = train(cfg, store).run_id
    return load_run(store, run_id), store.card(run_id)


def _facts(loaded, card, image, **kw):
    probs = loaded.predict_proba([image])[0]
    res = saliency(loaded, image)
    facts = report.report_facts(card=card, class_names=loaded.class_names, probabilities=probs,
                                file_name="scan 1.png", image_size=image.size, saliency=res, opacity=0.6, **kw)
    return facts, res


def _pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page\b", pdf))


@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Every string drawn on a report page or colour bar (the PDF holds pictures of text, not text)."""
    seen: list[str] = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        seen.append(text)
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return seen


def test_the_pdf_has_the_notice_image_overlay_probabilities_and_card_on_two_pages(run, drawn):
    loaded, card = run
    image = load_dataset("digits").test.image(5)
    facts, res = _facts(loaded, card, image)
    pdf = report.report_pdf(facts, image, res, 0.6)
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert _pages(pdf) == 2
    text = "\n".join(drawn)
    flat = " ".join(text.split())
    assert report.NOTICE_PLAIN in flat
    eps = card["privacy"]["guarantee_epsilon"]
    assert f"ε = {eps:.3g}, δ = 1e-05 per image (adding or removing one image; RDP accountant)" in flat
    assert "Neighbouring data sets: add/remove one image" in flat
    assert f"Model run: {loaded.run_id}" in flat and "Trained on: Handwritten digits (scikit-learn, demo)" in flat
    assert f"Test balanced accuracy: {100 * card['test_balanced_accuracy']:.1f} %" in flat
    top = int(np.argmax(list(facts["prediction"]["probabilities"].values())))
    assert f"{100 * facts['prediction']['probability']:.1f} %" in text
    assert f"low → high contribution to '{loaded.class_names[top]}'" in text
    assert "opacity 60 %" in flat and "not evidence of disease" in flat
    assert "page 2 of 2" in flat


def test_the_json_holds_the_models_probabilities_the_notice_and_the_guarantee(run):
    loaded, card = run
    image = load_dataset("digits").test.image(7)
    facts, res = _facts(loaded, card, image)
    data = json.loads(report.report_json(facts))
    probs = data["prediction"]["probabilities"]
    assert list(probs) == loaded.class_names
    np.testing.assert_allclose(list(probs.values()), loaded.predict_proba([image])[0], atol=1e-7)
    assert data["prediction"]["class"] == loaded.class_names[res.target_class]
    assert data["notice"] == report.NOTICE_PLAIN and "not a medical device" in data["notice"]
    p = data["privacy"]
    assert p["epsilon"] == pytest.approx(card["privacy"]["guarantee_epsilon"]) and p["unit"] == "image"
    assert p["delta"] == card["delta"] and p["guarantee"] == card["guarantee"]
    assert "per image" in p["headline"] and p["adjacency"].startswith("add/remove one image")
    m = data["model"]
    assert m["run_id"] == loaded.run_id and m["test_roc_auc"] == pytest.approx(card["test_roc_auc"])
    assert m["dataset_title"] == "Handwritten digits (scikit-learn, demo)"
    assert data["image"] == {"width": image.width, "height": image.height, "stored_by_the_app": False}
    assert data["saliency"]["opacity"] == 0.6 and data["saliency"]["method"] == res.method
    perf = data["test_performance"]["per_class"]
    assert set(perf) == set(loaded.class_names)
    first = loaded.class_names[0]
    assert perf[first]["sensitivity"] == pytest.approx(card["test_metrics"]["per_class_recall"][first])


def test_calibration_is_stated_when_the_card_has_it_and_denied_when_not():
    card = {"calibration": {"method": "temperature", "temperature": 1.8, "n_fit": 90}}
    line = report.calibration_line(card)
    assert line.startswith("Probabilities are temperature-scaled (T = 1.8, fitted on 90 images)")
    card["calibration"].update(fit_on="half of the held-out test split (90 images)", ece_before=0.2,
                               ece_after=0.05, evaluated_on="the other half (90 images)")
    line = report.calibration_line(card)
    assert "fitted on half of the held-out test split (90 images)" in line
    assert "0.200 → 0.050 on the other half (90 images)" in line
    assert report.calibration_line(card, temperature=2.5).startswith("Probabilities are temperature-scaled (T = 2.5")
    assert report.calibration_line({}) == report.UNCALIBRATED
    assert report.calibration_line({}, temperature=1.0) == report.UNCALIBRATED


def test_a_patient_level_card_names_the_patient(run):
    _, card = run
    card = copy.deepcopy(card)
    card["privacy"].update(unit="patient", per_image={"epsilon_replace_one": 3.9})
    line = report.privacy_headline(card)
    assert "per patient (adding or removing one patient with all of their images" in line
    facts = report.report_facts(card=card, class_names=["a", "b"], probabilities=[0.3, 0.7], file_name="x.png",
                                image_size=(8, 8))
    assert facts["privacy"]["unit"] == "patient" and facts["privacy"]["epsilon_one_image_of_a_unit"] == 3.9


def test_no_guarantee_is_said_plainly_and_an_infinite_epsilon_stays_strict_json(run):
    _, card = run
    void = copy.deepcopy(card)
    void["privacy"].update(guarantee_holds=False, guarantee_epsilon=math.inf)
    facts = report.report_facts(card=void, class_names=["a", "b"], probabilities=[0.4, 0.6], file_name="x.png",
                                image_size=(8, 8), saliency_problem="no layer")
    assert report.privacy_headline(void).startswith("none — the differential-privacy guarantee does not hold")
    data = json.loads(report.report_json(facts), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["privacy"]["epsilon"] == "inf" and data["privacy"]["guarantee_holds"] is False
    plain = copy.deepcopy(card)
    plain["privacy"] = {"private": False}
    assert report.privacy_headline(plain) == "none — trained without differential privacy"
    assert report.report_facts(card=plain, class_names=["a", "b"], probabilities=[0.4, 0.6], file_name="x.png",
                               image_size=(8, 8))["privacy"]["epsilon"] is None


def test_without_a_saliency_map_the_report_says_why(run, drawn):
    loaded, card = run
    image = Image.new("RGB", (40, 30), (90, 90, 90))
    probs = loaded.predict_proba([image])[0]
    facts = report.report_facts(card=card, class_names=loaded.class_names, probabilities=probs, file_name="g.png",
                                image_size=image.size, saliency_problem="every candidate layer is 1×1")
    pdf = report.report_pdf(facts, image)
    assert pdf.startswith(b"%PDF") and _pages(pdf) == 2
    assert "No saliency map: every candidate layer is 1×1" in " ".join(drawn)
    assert json.loads(report.report_json(facts))["saliency"] == {"method": None,
                                                                 "problem": "every candidate layer is 1×1"}


def test_without_dejavu_the_report_is_drawn_in_ascii(run, drawn, monkeypatch):
    """Pillow's own font has no ε or δ: where DejaVu is not installed the text is spelled out."""
    loaded, card = run
    monkeypatch.setattr(report, "_font_dirs", lambda: [])
    report.clear_fonts()
    try:
        image = load_dataset("digits").test.image(1)
        facts, res = _facts(loaded, card, image)
        assert report.report_pdf(facts, image, res, 0.6).startswith(b"%PDF")
    finally:
        report.clear_fonts()
    text = " ".join(drawn)
    assert "epsilon = " in text and "per image" in text and "ε" not in text
    assert "low -> high contribution" in text


def test_report_facts_refuse_mismatched_probabilities():
    with pytest.raises(ValueError, match="3 probabilities for 2 classes"):
        report.report_facts(card={}, class_names=["a", "b"], probabilities=[0.2, 0.3, 0.5], file_name="x",
                            image_size=(1, 1))


def test_a_void_guarantee_reports_no_finite_epsilon(run):
    """A card whose guarantee does not hold (a non-private ancestor, replayable noise) has guarantee_epsilon None
    and still its run's own ε: the report must not print that ε as if it were a guarantee."""
    _, card = run
    void = copy.deepcopy(card)
    void["privacy"].update(guarantee_holds=False, guarantee_epsilon=None, unit="patient",
                           per_image={"epsilon_replace_one": 0.7})
    assert void.get("epsilon") is not None and math.isfinite(void["epsilon"])
    facts = report.report_facts(card=void, class_names=["a", "b"], probabilities=[0.4, 0.6], file_name="x.png",
                                image_size=(8, 8), saliency_problem="no layer")
    assert math.isinf(facts["privacy"]["epsilon"]) and facts["privacy"]["guarantee_holds"] is False
    assert facts["privacy"]["epsilon_one_image_of_a_unit"] is None  # no per-image promise either
