"""A report a clinician can keep for one prediction: a PDF (Pillow only) and a JSON file with the same facts.

Both are built in memory from the upload, the model's output and the run's card: the uploaded image is the
user's own and is never written to disk. Every fact is gathered once (`report_facts`) and both files are
drawn from it, so the PDF and the JSON cannot disagree. Only what the card releases is used (the noisy
model's test-split metrics and the guarantee), nothing else computed from the private training data.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpcore.store.card import describe_weights
from dpcore.data.titles import dataset_title
from dpcore.training.metrics import clinical_metrics
from dpcore.analysis.run_review import guaranteed_epsilon
from dpcore.analysis.saliency import COLOUR_TABLE, SaliencyResult
from dpcore.analysis.labels import fmt_num, fmt_pct as _pct

NOTICE = ("**Research use only — not a medical device; not a clinical diagnosis.** The output must be interpreted "
          "by a qualified healthcare professional. For research, educational and demonstration purposes only.")
NOTICE_PLAIN = NOTICE.replace("**", "")
GRADCAM_EXPLAINED = (
    "Grad-CAM shows which regions most raised the model's score for the class it names. It is evidence of what "
    "the model used, not evidence of disease: a bright region is not a finding. Values are relative (0 to 1 "
    "within this image), not probabilities. Bright borders, corners or text markers mean the model may rely "
    "on artefacts of the images rather than on anatomy.")
UNCALIBRATED = ("Probabilities from DP-trained models are often over- or under-confident; these are not "
                "calibrated risks.")
REPORT_VERSION = 1

# -- facts --------------------------------------------------------------------------------------------


def fmt_eps(eps) -> str:
    if eps is None or (isinstance(eps, float) and math.isinf(eps)):
        return "∞ (no DP)"
    return f"{eps:.3g}"


def _num(x, spec: str = ".3f") -> str:  # the report prints scores to 3 decimals
    return fmt_num(x, spec)


def privacy_headline(card: dict) -> str:
    """ε, δ and the privacy unit in one plain-text line: the ε the card guarantees (over the lineage)."""
    p = card.get("privacy") or {}
    if not p.get("private"):
        return "none — trained without differential privacy"
    if not p.get("guarantee_holds", True):
        return "none — the differential-privacy guarantee does not hold for this run (see the guarantee below)"
    eps = p.get("guarantee_epsilon") or card.get("epsilon")
    unit = p.get("unit") or "image"
    what = "one image" if unit == "image" else f"one {unit} with all of their images"
    delta = card.get("delta")
    return (f"ε = {fmt_eps(eps)}, δ = {'—' if delta is None else format(delta, '.0e')} per {unit} "
            f"(adding or removing {what}; {str(card.get('accountant')).upper()} accountant)")


def calibration_line(card: dict, temperature: float | None = None) -> str:
    """What the probabilities are: temperature-scaled when the card says so (on which images, and how much it
    helped), else plainly uncalibrated. `temperature`: the one the loaded model applies, when known."""
    cal = card.get("calibration") or {}
    t = temperature if temperature is not None else cal.get("temperature")
    if cal.get("method") == "temperature" and t is not None:
        n = cal.get("n_fit")
        fitted = (f", fitted on {cal['fit_on']}" if cal.get("fit_on")
                  else f", fitted on {n:,} images" if isinstance(n, int) else "")
        before, after = cal.get("ece_before"), cal.get("ece_after")
        ece = (f"; expected calibration error {before:.3f} → {after:.3f}"
               + (f" on {cal['evaluated_on']}" if cal.get("evaluated_on") else "")
               if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "")
        return (f"Probabilities are temperature-scaled (T = {t:.3g}{fitted}{ece}): calibrated on average over "
                "such images, still not a risk for an individual patient.")
    if temperature is not None and not math.isclose(temperature, 1.0):
        return f"Probabilities are temperature-scaled (T = {temperature:.3g}); they are not risks."
    return UNCALIBRATED


def _test_performance(card: dict) -> dict | None:
    confusion = (card.get("test_metrics") or {}).get("confusion_matrix")
    names = (card.get("dataset") or {}).get("class_names") or []
    if not confusion or not names:
        return None
    try:
        m = clinical_metrics(confusion, names)
    except ValueError:
        return None
    return {"n_test_images": m["n"], "balanced_accuracy": m["balanced_accuracy"],
            "near_majority": m["near_majority"], "majority_class": m["majority_class"],
            "rarely_recognised": m["rarely_recognised"],
            "per_class": {c: {k: v[k] for k in ("prevalence", "sensitivity", "specificity", "ppv", "npv", "support")}
                          for c, v in m["per_class"].items()}}


def _privacy(card: dict) -> dict:
    p = card.get("privacy") or {}
    lin = card.get("lineage") or {}
    per_image = p.get("per_image") or {}
    return {
        "private": bool(p.get("private")),
        "guarantee_holds": bool(p.get("private")) and bool(p.get("guarantee_holds", True)),
        # ∞ where the guarantee does not hold (the card then has no guarantee_epsilon: its own ε promises nothing)
        "epsilon": guaranteed_epsilon({"epsilon": card.get("epsilon"), **p}) if p.get("private") else None,
        "delta": card.get("delta") if p.get("private") else None,
        "unit": p.get("unit") or "image",
        "adjacency": p.get("adjacency") or (card.get("privacy_facts") or {}).get("adjacency"),
        "accountant": card.get("accountant"),
        "headline": privacy_headline(card),
        "guarantee": card.get("guarantee", ""),
        "lineage": lin.get("sentence") if lin.get("composed_over_ancestors") and not lin.get("void") else None,
        "group": (p.get("group") or {}).get("sentence") if (p.get("group") or {}).get("largest", 1) > 1 else None,
        "epsilon_one_image_of_a_unit": per_image.get("epsilon_replace_one")
        if p.get("unit") not in (None, "image") and p.get("guarantee_holds", True) else None,
        "test_split": (card.get("privacy_facts") or {}).get("test_split"),
    }


def report_facts(*, card: dict, class_names: Sequence[str], probabilities: Sequence[float], file_name: str,
                 image_size: tuple[int, int], saliency: SaliencyResult | None = None,
                 saliency_problem: str | None = None, opacity: float | None = None,
                 temperature: float | None = None, when: datetime | None = None) -> dict[str, Any]:
    """Everything the report says, JSON-ready. `probabilities` are the model's, in `class_names` order."""
    probs = [float(p) for p in probabilities]
    if len(probs) != len(class_names):
        raise ValueError(f"{len(probs)} probabilities for {len(class_names)} classes")
    top = int(np.argmax(probs))
    ds, model = card.get("dataset") or {}, card.get("model") or {}
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    if saliency is not None:
        sal = {"method": saliency.method, "target_class": class_names[saliency.target_class],
               "opacity": opacity, "scale": "relative: 0 to 1 within this image (not a probability)",
               "what_it_is": GRADCAM_EXPLAINED}
    else:
        sal = {"method": None, "problem": saliency_problem or "not computed"}
    return {
        "report": "DP Explorer — model output for one image", "report_version": REPORT_VERSION,
        "notice": NOTICE_PLAIN,
        "created_utc": when.isoformat(timespec="seconds"),
        "file_name": file_name,
        "image": {"width": int(image_size[0]), "height": int(image_size[1]),
                  "stored_by_the_app": False},
        "prediction": {"class": class_names[top], "probability": probs[top],
                       "probabilities": dict(zip(class_names, probs)),
                       "calibration": calibration_line(card, temperature)},
        "saliency": sal,
        "model": {
            "run_id": card.get("run_id"),
            "dataset": ds.get("name"), "dataset_title": dataset_title(ds.get("name") or "", ds.get("data_dir")),
            "n_train": ds.get("n_train"), "n_test": ds.get("n_test"), "class_names": list(class_names),
            "backbone": model.get("backbone"), "weights": describe_weights(model.get("weights")),
            "fine_tuned": model.get("scope"), "date_trained": str(card.get("date", ""))[:10] or None,
            "test_accuracy": card.get("test_accuracy"),
            "test_balanced_accuracy": card.get("test_balanced_accuracy"),
            "test_roc_auc": card.get("test_roc_auc"),
            "warnings": list(card.get("warnings") or []),
        },
        "privacy": _privacy(card),
        "calibration": card.get("calibration"),
        "test_performance": _test_performance(card),
    }


def _jsonable(value):
    """Strict JSON: an infinite ε (no guarantee) is written as the string "inf", not as a bare Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def report_json(facts: dict) -> bytes:
    return json.dumps(_jsonable(facts), indent=2, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")


# -- drawing --------------------------------------------------------------------------------------------
_ASCII = str.maketrans({"ε": "epsilon", "δ": "delta", "→": "->", "≈": "~", "—": "-", "–": "-", "×": "x",
                        "≤": "<=", "≥": ">=", "∞": "inf", "’": "'", "‘": "'", "“": '"', "”": '"', "…": "...",
                        "·": "-", "²": "2", "σ": "sigma"})
_FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]


def _font_dirs() -> list[Path]:
    spec = importlib.util.find_spec("matplotlib")  # it bundles DejaVu; found without importing it
    bundled = [Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"] if spec and spec.origin else []
    return _FONT_DIRS + bundled


_fonts = threading.local()  # one FreeType face per thread: a deferred download is drawn off the script thread


def font(size: int, bold: bool = False) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """(font, unicode) — DejaVu Sans where installed (it has ε, δ, →); else Pillow's own font, which lacks
    them, so text is spelled in ASCII (unicode False)."""
    cache = _fonts.__dict__.setdefault("cache", {})
    if (size, bold) not in cache:
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        path = next((folder / name for folder in _font_dirs() if (folder / name).is_file()), None)
        cache[size, bold] = ((ImageFont.truetype(str(path), size), True) if path is not None
                             else (ImageFont.load_default(size=size), False))
    return cache[size, bold]


def clear_fonts() -> None:
    _fonts.__dict__.pop("cache", None)


def _say(text: str, unicode: bool) -> str:
    return text if unicode else text.translate(_ASCII)


def wrap(text: str, size: int, width: int, bold: bool = False) -> list[str]:
    """`text` broken into lines no wider than `width` pixels at this font size."""
    f, uni = font(size, bold)
    lines: list[str] = []
    for para in _say(text, uni).split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if line and f.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def colour_bar(class_name: str, width: int = 520, size: int = 20) -> Image.Image:
    """The overlay's scale: the colour table from low (left) to high (right), with what it measures."""
    f, _ = font(size)
    pad, bar_h, line_h = 4, max(14, size), int(size * 1.3)
    lines = (wrap(f"low → high contribution to '{class_name}'", size, width - 2 * pad)
             + wrap("relative: 0 to 1 within this image", size, width - 2 * pad))
    top = pad + bar_h + 2
    img = Image.new("RGB", (width, top + line_h * (len(lines) + 1) + pad), "white")
    strip = COLOUR_TABLE[np.linspace(0, 255, width - 2 * pad).round().astype(np.intp)]
    img.paste(Image.fromarray(np.ascontiguousarray(np.repeat(strip[None], bar_h, axis=0)), "RGB"), (pad, pad))
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad, width - pad - 1, pad + bar_h], outline=(80, 80, 80))
    d.text((pad, top), "0 (low)", fill="black", font=f)
    d.text((width - pad, top), "1 (high)", fill="black", font=f, anchor="ra")
    for i, line in enumerate(lines, 1):
        d.text((width // 2, top + line_h * i), line, fill="black" if i < len(lines) else (70, 70, 70), font=f,
               anchor="ma")
    return img


class _Pages:
    """A4 pages at 150 dpi, filled top to bottom; a new page when the next block does not fit."""
    W, H, M, DPI = 1240, 1754, 90, 150
    FOOT = 70

    def __init__(self):
        self.pages: list[Image.Image] = []
        self.new_page()

    def new_page(self) -> None:
        self.pages.append(Image.new("RGB", (self.W, self.H), "white"))
        self.draw = ImageDraw.Draw(self.pages[-1])
        self.y = self.M

    @property
    def width(self) -> int:
        return self.W - 2 * self.M

    def room(self, h: int) -> None:
        if self.y + h > self.H - self.M - self.FOOT:
            self.new_page()

    def text(self, text: str, size: int = 20, bold: bool = False, colour="black", gap: int = 6,
             indent: int = 0) -> None:
        f, _ = font(size, bold)
        for line in wrap(text, size, self.width - indent, bold):
            self.room(int(size * 1.35))
            self.draw.text((self.M + indent, self.y), line, fill=colour, font=f)
            self.y += int(size * 1.35)
        self.y += gap

    def heading(self, text: str) -> None:
        self.room(90)
        self.y += 10
        self.text(text, 28, bold=True, gap=4)
        self.draw.line([self.M, self.y, self.W - self.M, self.y], fill=(180, 180, 180), width=2)
        self.y += 12

    def boxed(self, text: str, size: int = 21) -> None:
        lines = wrap(text, size, self.width - 40, bold=True)
        h = int(size * 1.35) * len(lines) + 30
        self.room(h)
        self.draw.rectangle([self.M, self.y, self.W - self.M, self.y + h], fill=(255, 243, 224),
                            outline=(200, 90, 0), width=3)
        f, _ = font(size, True)
        for i, line in enumerate(lines):
            self.draw.text((self.M + 20, self.y + 15 + i * int(size * 1.35)), line, fill=(120, 40, 0), font=f)
        self.y += h + 16

    def images(self, items: Sequence[tuple[Image.Image, str]], box: int = 440) -> None:
        """Images side by side, each fitted in a `box`-pixel square, caption under each."""
        fitted = [(_fit(im, box), cap) for im, cap in items]
        h = max(im.height for im, _ in fitted) + 60
        self.room(h)
        x = self.M
        f, _ = font(17)
        for im, cap in fitted:
            self.pages[-1].paste(im, (x, self.y))
            for i, line in enumerate(wrap(cap, 17, box)):
                self.draw.text((x, self.y + im.height + 6 + 22 * i), line, fill=(60, 60, 60), font=f)
            x += box + 80
        self.y += h

    def bars(self, values: dict[str, float], highlight: str) -> None:
        f, uni = font(20)
        label_w = min(360, max(int(f.getlength(_say(k, uni))) for k in values) + 20)
        bar_w = self.width - label_w - 120
        for name, p in values.items():
            self.room(34)
            bold = name == highlight
            fb, _ = font(20, bold)
            self.draw.text((self.M, self.y + 2), _say(name, uni)[:40], fill="black", font=fb)
            x0 = self.M + label_w
            self.draw.rectangle([x0, self.y + 4, x0 + bar_w, self.y + 26], outline=(200, 200, 200))
            self.draw.rectangle([x0, self.y + 4, x0 + max(1, int(bar_w * p)), self.y + 26],
                                fill=(31, 119, 180) if not bold else (214, 39, 40))
            self.draw.text((x0 + bar_w + 10, self.y + 2), f"{100 * p:.1f} %", fill="black", font=fb)
            self.y += 34
        self.y += 8

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], size: int = 18) -> None:
        f, uni = font(size)
        fb, _ = font(size, True)
        unit = self.width // (len(header) + 1)  # the first column (names) twice as wide
        for r, row in enumerate([header, *rows]):
            self.room(int(size * 1.6))
            for c, cell in enumerate(row):
                self.draw.text((self.M + (c + (c > 0)) * unit, self.y), _say(str(cell), uni)[:30 if c == 0 else 14],
                               fill="black", font=fb if r == 0 else f)
            self.y += int(size * 1.6)
        self.y += 8

    def footers(self, text: str) -> None:
        f, _ = font(15)
        n = len(self.pages)
        for i, page in enumerate(self.pages, 1):
            d = ImageDraw.Draw(page)
            lines = wrap(f"{text}  —  page {i} of {n}", 15, self.width)
            y = self.H - self.M - 20 * len(lines) + 20
            d.line([self.M, y - 10, self.W - self.M, y - 10], fill=(200, 200, 200))
            for j, line in enumerate(lines):
                d.text((self.M, y + 20 * j), line, fill=(90, 90, 90), font=f)

    def pdf(self, title: str, when: datetime) -> bytes:
        buf = io.BytesIO()
        self.pages[0].save(buf, "PDF", save_all=True, append_images=self.pages[1:], resolution=self.DPI,
                           title=title, author="DP Explorer", subject=_say(NOTICE_PLAIN, False),
                           creationDate=when.utctimetuple(), modDate=when.utctimetuple(), quality=92, subsampling=0)
        return buf.getvalue()


def _fit(im: Image.Image, box: int) -> Image.Image:
    """Into a box×box square, keeping the aspect ratio; small images (a 16-pixel model input) are enlarged
    with square pixels, so they are not smoothed into something the model never saw."""
    im = im.convert("RGB")
    scale = box / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.NEAREST if scale >= 3 else Image.LANCZOS)


def report_pdf(facts: dict, image: Image.Image, saliency: SaliencyResult | None = None,
               opacity: float | None = None) -> bytes:
    """The report as a PDF of A4 pages (images of text: Pillow writes no PDF text)."""
    return _layout(facts, image, saliency, opacity).pdf(f"DP Explorer report — {facts['file_name']}",
                                                        datetime.fromisoformat(facts["created_utc"]))


def report_pages(facts: dict, image: Image.Image, saliency: SaliencyResult | None = None,
                 opacity: float | None = None) -> list[Image.Image]:
    return _layout(facts, image, saliency, opacity).pages


def _layout(facts: dict, image: Image.Image, saliency: SaliencyResult | None, opacity: float | None) -> _Pages:
    """Page 1: the notice, the image, the overlay and its colour bar, the probabilities. Page 2: the model card."""
    when = datetime.fromisoformat(facts["created_utc"])
    pred, model, priv = facts["prediction"], facts["model"], facts["privacy"]
    doc = _Pages()
    doc.text("DP Explorer — model output for one image", 36, bold=True, gap=10)
    doc.boxed(facts["notice"])
    doc.text(f"File: {facts['file_name']}   ·   Report created: {when.strftime('%Y-%m-%d %H:%M UTC')}", 20)
    doc.text(f"Model output: {pred['class']} ({_pct(pred['probability'])})", 26, bold=True, gap=12)
    w, h = facts["image"]["width"], facts["image"]["height"]
    shown = [(image, f"Uploaded image ({w}×{h} pixels)")]
    if saliency is not None:
        o = 0.4 if opacity is None else opacity
        shown.append((saliency.blended(o), f"{saliency.method}, at the model's input size "
                                           f"{saliency.image.width}×{saliency.image.height}, opacity {100 * o:.0f} %"))
    doc.images(shown)
    if saliency is not None:
        bar = colour_bar(facts["saliency"]["target_class"], width=440)
        doc.room(bar.height)
        doc.pages[-1].paste(bar, (doc.M + 520, doc.y))
        doc.y += bar.height + 10
        doc.text(GRADCAM_EXPLAINED, 18, colour=(50, 50, 50), gap=12)
    else:
        doc.text(f"No saliency map: {facts['saliency'].get('problem')}", 18, gap=12)
    doc.heading("Class probabilities")
    doc.bars(pred["probabilities"], pred["class"])
    doc.text(pred["calibration"], 18, colour=(50, 50, 50))

    doc.new_page()
    doc.heading("Model card")
    facts_lines = [
        ("Model run", model["run_id"]),
        ("Trained on", f"{model['dataset_title']} — {model['n_train'] or 0:,} training images, evaluated on "
                       f"{model['n_test'] or 0:,} held-out test images"),
        ("Classes", ", ".join(model["class_names"])),
        ("Backbone", f"{model['backbone']} (weights: {model['weights']}, fine-tuned: {model['fine_tuned']})"),
        ("Date trained", model["date_trained"] or "—"),
        ("Test accuracy", _pct(model["test_accuracy"])),
        ("Test balanced accuracy", _pct(model["test_balanced_accuracy"])),
        ("Test ROC-AUC", _num(model["test_roc_auc"])),
        ("Calibration", pred["calibration"]),
    ]
    for key, value in facts_lines:
        doc.text(f"{key}: {value}", 20, gap=4)
    doc.heading("Privacy")
    doc.text(f"Guarantee: {priv['headline']}", 20, bold=True)
    for line in (priv["guarantee"], priv["adjacency"] and f"Neighbouring data sets: {priv['adjacency']}",
                 priv["lineage"] and f"Lineage: {priv['lineage']}", priv["group"] and f"Patients: {priv['group']}",
                 priv["epsilon_one_image_of_a_unit"] is not None
                 and f"One single image of a {priv['unit']} with several is protected at "
                     f"ε = {fmt_eps(priv['epsilon_one_image_of_a_unit'])} (replace-one).",
                 priv["test_split"] and f"Test split: {priv['test_split']}"):
        if line:
            doc.text(line, 18)
    perf = facts.get("test_performance")
    if perf:
        doc.heading("Performance on the held-out test split")
        if perf["near_majority"]:
            doc.text(f"Warning: this model is close to always answering '{perf['majority_class']}'. Do not read "
                     "its output as evidence for or against any class.", 19, bold=True, colour=(170, 0, 0))
        rows = [(c, _pct(v["prevalence"]), _pct(v["sensitivity"]), _pct(v["specificity"]), _pct(v["ppv"]),
                 _pct(v["npv"])) for c, v in perf["per_class"].items()]
        doc.table(("class", "prevalence", "sensitivity", "specificity", "PPV", "NPV"), rows)
        doc.text(f"On {perf['n_test_images']:,} test images; each class against the rest. PPV and NPV are at the "
                 "test split's prevalence, not at your clinic's.", 17, colour=(60, 60, 60))
    for warning in model["warnings"]:
        doc.text(f"Warning: {warning}", 17, colour=(150, 60, 0))
    doc.footers(facts["notice"])
    return doc
