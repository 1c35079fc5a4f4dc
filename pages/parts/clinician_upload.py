"""One upload on the Clinician page: the model's output, the image with its blended Grad-CAM, the
probabilities and the report downloads (built in memory when clicked; nothing of the upload is stored)."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import streamlit as st

from dpcore.analysis import saliency as sal  # sal.saliency looked up on each call (tests count its calls)
from dpcore.analysis.report import GRADCAM_EXPLAINED, colour_bar, report_facts, report_json, report_pdf
from dpcore.analysis.uploads import UploadError, decode_upload
from dpcore.errors import DPCoreError
from dpcore.figures import runs as figures

ANALYSES = "cl_analyses"  # session state: (run, upload digest) → (probabilities, Grad-CAM, problem)


def decode(data: bytes, name: str):
    """(image, None) for a usable upload, (None, message) for a refused one."""
    try:
        return decode_upload(data, name), None
    except UploadError as exc:
        return None, str(exc)


def analysis(loaded, lock, image, digest: str):
    """The model's probabilities and Grad-CAM for one upload, kept for this session so that moving the opacity
    slider re-blends the map instead of running the model again."""
    cache = st.session_state.setdefault(ANALYSES, {})
    key = (loaded.run_id, loaded.temperature, digest)  # a recalibrated model gives other probabilities
    if key not in cache:
        probs = loaded.predict_proba([image])[0]
        try:
            with lock:
                cache[key] = (probs, sal.saliency(loaded, image, target_class=int(probs.argmax())), None)
        except DPCoreError as exc:
            cache[key] = (probs, None, str(exc))
    return cache[key]


def report_name(upload_name: str, ext: str) -> str:
    return re.sub(r"[^\w.-]+", "_", Path(upload_name).stem)[:80] + f"-report.{ext}"


def _facts(card, loaded, probs, upload_name, image, result, problem, opacity):
    return report_facts(card=card, class_names=loaded.class_names, probabilities=probs, file_name=upload_name,
                        image_size=image.size, saliency=result, saliency_problem=problem, opacity=opacity,
                        temperature=getattr(loaded, "temperature", None))


def _pdf(*args) -> bytes:
    """Run by Streamlit when the button is clicked (in memory: nothing of the upload touches the disk)."""
    facts = _facts(*args)
    image, result, opacity = args[4], args[5], args[7]
    return report_pdf(facts, image, result, opacity)


def _json(*args) -> bytes:
    return report_json(_facts(*args))


def show_upload(k: int, name: str, data: bytes, card: dict, loaded, lock) -> str | None:
    """One upload: output, image, blended Grad-CAM with its opacity slider and colour bar, probabilities, and
    the report downloads (built only when clicked). Returns the upload's digest (None if it was refused)."""
    st.divider()
    image, problem = decode(data, name)
    if problem:
        st.error(problem, icon="🚫")
        return None
    digest = hashlib.sha256(data).hexdigest()[:16]
    probs, result, sal_problem = analysis(loaded, lock, image, digest)
    top = int(probs.argmax())
    label = loaded.class_names[top]
    st.markdown(f"#### {name}: model output **{label}** ({100 * probs[top]:.1f} %)")
    a, b, c = st.columns([1, 1, 1.4])
    a.image(image, caption="Uploaded image", width="stretch")
    opacity = None
    if result is not None:
        opacity = b.slider("Overlay opacity", 0.0, 1.0, sal.DEFAULT_OPACITY, 0.05, key=f"cl_opacity_{k}_{digest}",
                           help="0 shows the image alone, 1 the Grad-CAM map alone.")
        b.image(result.blended(opacity), width="stretch", output_format="PNG",
                caption=f"{result.method}: regions that raised the score of '{label}' (model input size "
                        f"{result.image.width}×{result.image.height})")
        b.image(colour_bar(label), width="stretch", output_format="PNG")
        b.caption(GRADCAM_EXPLAINED)
    else:
        b.warning(f"No saliency map: {sal_problem}")
    c.plotly_chart(figures.probability_bars_figure(dict(zip(loaded.class_names, map(float, probs)))),
                   key=f"cl-probs-{k}")
    args = (card, loaded, probs, name, image, result, sal_problem, opacity)
    c.caption("Keep this result: the report holds the image, the overlay and its scale, the probabilities, the "
              "model card and the research-use notice. It is built in memory when you click; the app stores "
              "nothing of your image.")
    d1, d2 = c.columns(2)
    d1.download_button("Report (PDF)", functools.partial(_pdf, *args), key=f"cl_pdf_{k}_{digest}",
                       file_name=report_name(name, "pdf"), mime="application/pdf", on_click="ignore", icon="📄",
                       help="The image, the overlay, the probabilities, the model card and the research-use notice. "
                            "Built in memory when clicked; nothing is stored.")
    d2.download_button("Facts (JSON)", functools.partial(_json, *args), key=f"cl_json_{k}_{digest}",
                       file_name=report_name(name, "json"), mime="application/json", on_click="ignore", icon="🧾",
                       help="The same facts, machine-readable: probabilities per class, the model run and card, "
                            "the notice.")
    return digest
