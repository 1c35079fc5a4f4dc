"""The Clinician page, driven headless by AppTest: per upload an opacity slider that re-blends Grad-CAM without
running it again, a colour bar and what the map is not, and the report downloads (PDF and JSON).

The downloads are deferred (built on click), which AppTest cannot click; the callables Streamlit registers for
them are captured here and run exactly as Streamlit runs them when the browser asks for the file
(tests/test_browser.py clicks the real button)."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.runtime.media_file_manager import MediaFileManager

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.config import RunConfig
from dpcore.data import load_dataset
from dpcore.analysis.predict import load_run
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

TINY = {"dataset": "digits", "backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "batch_size": 64,
        "max_physical_batch_size": 64, "epsilon": 2.0, "device": "cpu"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A runs folder holding one finished DP run on digits (a few seconds on a CPU)."""
    root = tmp_path_factory.mktemp("runs_clinician")
    result = train(RunConfig(**TINY), RunStore(root))
    assert result.status == "done"
    return root, result.run_id


@pytest.fixture
def downloads(monkeypatch) -> dict[str, object]:
    """file name → the callable Streamlit would run when that deferred download is clicked."""
    seen: dict[str, object] = {}
    original = MediaFileManager.add_deferred

    def capture(self, data_callable, mimetype, coordinates, file_name=None, **kw):
        seen[file_name] = data_callable
        return original(self, data_callable, mimetype, coordinates, file_name=file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", capture)
    return seen


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _digit(i: int) -> Image.Image:
    return load_dataset("digits").test.image(i).convert("RGB").resize((64, 64), Image.NEAREST)


def _images(at) -> dict[str, str]:
    """caption (or '') → media URL, of every st.image on the page, in order (repeated captions keep the first)."""
    out: dict[str, str] = {}
    for el in at.get("image"):
        for img in el.proto.imgs:
            out.setdefault(img.caption or f"#{len(out)}", img.url)
    return out


def test_each_upload_gets_a_slider_the_overlay_a_colour_bar_and_both_reports(finished, downloads, monkeypatch):
    root, run_id = finished
    at = open_page("pages/clinician.py", root, monkeypatch)
    uploads = [("one.png", _png(_digit(0))), ("two.png", _png(_digit(1)))]
    at.file_uploader(key="cl_upload").set_value([(n, d, "image/png") for n, d in uploads]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.slider) == 2 and len({s.key for s in at.slider}) == 2  # one slider per upload, own keys
    assert all(s.value == pytest.approx(0.4) for s in at.slider)
    buttons = {b.label: [] for b in at.download_button}
    for b in at.download_button:
        buttons[b.label].append(b)
    assert len(buttons["Report (PDF)"]) == 2 and len(buttons["Facts (JSON)"]) == 2
    assert all(b.proto.deferred_file_id and not b.disabled for b in at.download_button)
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert sum(c.startswith("Grad-CAM on ") for c in captions) == 2
    assert len(at.get("image")) == 6  # per upload: the image, the overlay, its colour bar
    shown = texts(at)
    assert "evidence of what the model used, not evidence of disease" in shown
    assert "relative (0 to 1 within this image)" in shown

    loaded = load_run(RunStore(root), run_id)
    expected = loaded.predict_proba([Image.open(io.BytesIO(uploads[0][1]))])[0]
    facts = json.loads(downloads["one-report.json"]())
    assert list(facts["prediction"]["probabilities"]) == loaded.class_names
    np.testing.assert_allclose(list(facts["prediction"]["probabilities"].values()), expected, atol=1e-6)
    assert facts["file_name"] == "one.png" and facts["model"]["run_id"] == run_id
    assert facts["saliency"]["opacity"] == pytest.approx(0.4)
    assert "not a medical device" in facts["notice"] and facts["privacy"]["unit"] == "image"
    pdf = downloads["one-report.pdf"]()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b", pdf)) == 2
    assert downloads["two-report.pdf"]().startswith(b"%PDF")


def test_moving_the_slider_reblends_without_running_grad_cam_again(finished, downloads, monkeypatch):
    import dpcore.analysis.saliency

    calls = []
    real = dpcore.analysis.saliency.saliency

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpcore.analysis.saliency, "saliency", counted)  # the page imports it from here on every run
    root, _ = finished
    at = open_page("pages/clinician.py", root, monkeypatch)
    at.file_uploader(key="cl_upload").set_value([("scan.png", _png(_digit(2)), "image/png")]).run()
    assert len(calls) == 1
    overlay_at = {}
    for opacity in (0.0, 0.4, 1.0):
        at.slider[0].set_value(opacity).run()
        assert not at.exception, [e.value for e in at.exception]
        overlay_at[opacity] = next(u for c, u in _images(at).items() if c.startswith("Grad-CAM on "))
    assert len(calls) == 1, "Grad-CAM was computed again for an opacity change"
    assert len(set(overlay_at.values())) == 3  # three different pictures
    facts = json.loads(downloads["scan-report.json"]())
    assert facts["saliency"]["opacity"] == pytest.approx(1.0)  # the report has the opacity on screen


def _with_calibration(root: Path, run_id: str, runs: Path, calibration: dict | None) -> Path:
    """A copy of the runs folder whose card has `calibration` (None: no calibration at all)."""
    shutil.copytree(root, runs)
    card_path = RunStore(runs).run_dir(run_id) / "card.json"
    card = json.loads(card_path.read_text())
    card.pop("calibration", None)
    if calibration is not None:
        card["calibration"] = calibration
    card_path.write_text(json.dumps(card))
    return runs


def test_an_uncalibrated_card_says_its_probabilities_are_not_calibrated(finished, downloads, tmp_path, monkeypatch):
    root, run_id = finished
    runs = _with_calibration(root, run_id, tmp_path / "runs", None)
    at = open_page("pages/clinician.py", runs, monkeypatch)
    assert "these are not calibrated risks" in texts(at)
    at.file_uploader(key="cl_upload").set_value([("scan.png", _png(_digit(4)), "image/png")]).run()
    facts = json.loads(downloads["scan-report.json"]())
    assert facts["calibration"] is None and "not calibrated risks" in facts["prediction"]["calibration"]


def test_a_calibrated_card_says_so_in_the_card_and_the_report(finished, downloads, tmp_path, monkeypatch):
    root, run_id = finished
    runs = _with_calibration(root, run_id, tmp_path / "runs",
                             {"method": "temperature", "temperature": 1.7, "n_fit": 180})
    at = open_page("pages/clinician.py", runs, monkeypatch)
    assert "temperature-scaled (T = 1.7, fitted on 180 images)" in texts(at)
    at.file_uploader(key="cl_upload").set_value([("scan.png", _png(_digit(3)), "image/png")]).run()
    facts = json.loads(downloads["scan-report.json"]())
    assert facts["calibration"]["temperature"] == 1.7
    assert facts["prediction"]["calibration"].startswith("Probabilities are temperature-scaled (T = 1.7")
