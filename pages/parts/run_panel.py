"""The run panel: progress, live charts, Cancel and Resume of one run, and the guarantee of a stored run as its
card states it."""
from __future__ import annotations

import streamlit as st

from dpcore.analysis.labels import fmt_duration, fmt_eps, fmt_num, fmt_pct
from dpcore.errors import DPCoreError
from pages.common import ACTIVE, manager, run_view, store, watch


def job_panel(run_id: str) -> None:
    """Progress, live charts and Cancel for one run; polls every 2 s while it is queued or running (each
    refresh re-draws three charts in the browser: at 1 s that slowed the watched run 1.8x on 2 cores,
    `bench/watch_ratio.py`)."""
    if run_view(run_id).status in ACTIVE:
        _live_panel(run_id)
    else:
        _panel_body(run_id)


@st.fragment(run_every="2s")
def _live_panel(run_id: str) -> None:
    if _panel_body(run_id) not in ACTIVE:
        st.rerun()  # draw the finished run once more, without the timer


def _panel_body(run_id: str) -> str:
    from dpcore.figures import runs as figures

    view = run_view(run_id)
    cfg = view.config
    plan, step = view.latest("plan"), view.latest("step")
    title = f"{cfg.dataset} / {cfg.backbone} / " + (f"target ε = {cfg.epsilon:g}" if cfg.private else "non-private")
    st.markdown(f"#### Run `{run_id}` — {title}")
    badge = {"queued": "🕒 queued", "running": "🏃 running", "done": "✅ done", "failed": "❌ failed",
             "cancelled": "⏹ cancelled"}.get(view.status, view.status)
    st.markdown(f"**Status:** {badge}", help="Runs execute one at a time in a background worker.")

    if view.status == "queued" and view.job is not None:
        st.info("Queued: it starts when the runs before it have finished.")
    if view.status in ACTIVE and view.job is None:
        st.caption("This run is not in this app's job queue (started from the command line, or before the app "
                   "restarted): its progress is read from the run store; a run whose process ended stays "
                   "'running' there.")
    if plan is not None:
        d = plan.data
        cols = st.columns(5)
        cols[0].metric("Training images n", f"{d.get('n_train', 0):,}")
        cols[1].metric("Steps T", f"{d.get('total_steps', 0):,}")
        cols[2].metric("Noise σ", fmt_num(d.get("noise_multiplier")))
        cols[3].metric("Sample rate q", fmt_num(d.get("sample_rate"), ".4g"))
        cols[4].metric("Device", str(d.get("device", "—")))
    if step is not None and step.total_steps:
        frac = min(1.0, step.step / step.total_steps)
        eta = "" if view.status != "running" else f" · about {fmt_duration(step.eta)} left"
        st.progress(frac, text=f"step {step.step:,} / {step.total_steps:,} · epoch {step.epoch:.2f}{eta}")
    elif view.status == "running":
        st.progress(0.0, text="preparing: loading data, building the model, calibrating σ…")

    cancellable = view.status in ACTIVE and view.job is not None
    if cancellable and st.button("Cancel this run", key=f"cancel-{run_id}", icon="⏹"):
        manager().cancel(run_id)
        st.toast("Cancel requested: the run stops at its next step.")
    if view.status == "done":
        card = store().card(run_id)
        st.success(f"Finished: test accuracy {fmt_pct(card.get('test_accuracy'))}, "
                   f"ROC-AUC {fmt_num(card.get('test_roc_auc'))}. Privacy: {privacy_headline(card)}.")
        show_guarantee(card)
    elif view.status == "failed":
        failed = view.latest("failed")
        st.error(f"The run failed: {failed.message if failed else view.error}")
    elif view.status == "cancelled":
        st.warning("The run was cancelled; the model as it was at that step is saved.")
    if view.status in ("failed", "cancelled"):
        resume_button(run_id)

    if any(ev.kind in ("step", "eval") for ev in view.events):
        figs = figures.training_figures(view.events, target_epsilon=cfg.epsilon,
                                        accountant=cfg.accountant if cfg.private else None,
                                        unit=cfg.privacy_unit if cfg.private else "image")
        cols = st.columns(3 if cfg.private else 2)
        cols[0].plotly_chart(figs["accuracy"], key=f"acc-{run_id}")
        cols[1].plotly_chart(figs["loss"], key=f"loss-{run_id}")
        if cfg.private:
            cols[2].plotly_chart(figs["epsilon"], key=f"eps-{run_id}")
            st.caption("ε grows with every step: each noisy update reveals a little about the data, and the "
                       "accountant adds it up. It ends at (or just below) the target ε.")
    logs = [ev for ev in view.events if ev.kind == "log"]
    if logs:
        with st.expander("Log"):
            st.text("\n".join(ev.message or "" for ev in logs[-30:]))
    return view.status


def resume_button(run_id: str) -> None:
    """Continue a stopped run from its last checkpoint (fresh secret noise; the ledger counts every step)."""
    from dpcore.training import checkpoint

    if not checkpoint.exists(store().run_dir(run_id)):
        return
    job = manager().get(run_id)
    if job is not None and not job.finished:
        return
    if st.button("Resume from the last checkpoint", key=f"resume-{run_id}", icon="▶️",
                 help="Continues with the same plan (σ, q, T) from the last checkpoint. Steps taken after it were "
                      "discarded: they are redone, and the privacy ledger counts them twice."):
        try:
            manager().submit_resume(run_id)
        except (DPCoreError, ValueError) as exc:
            st.error(f"Cannot resume: {exc}")
            return
        watch(run_id)
        st.rerun()


# -- the guarantee of a stored run, as its card states it --------------------------------------
def privacy_headline(card: dict) -> str:
    """The report's one-line ε, δ and unit (dpcore.analysis.report), except that a void guarantee points to the
    guarantee box the page shows below it."""
    from dpcore.analysis import report

    p = card.get("privacy") or {}
    if p.get("private") and not p.get("guarantee_holds", True):
        return "**none** — see below"
    return report.privacy_headline(card)


def show_guarantee(card: dict) -> None:
    """The card's sentence, then what the lineage and the largest patient / lesion change about it."""
    p = card.get("privacy") or {}
    text = card.get("guarantee", "")
    (st.error if text.startswith("NO DP") else st.info)(text)
    lin = card.get("lineage") or {}
    if lin.get("composed_over_ancestors") and not lin.get("void") and lin.get("sentence"):
        st.warning(f"**Lineage:** {lin['sentence']}", icon="🧬")
    group = p.get("group")
    if group and group.get("largest", 1) > 1:
        st.warning(f"**Patients and lesions:** {group['sentence']}", icon="👥")
    per_image = p.get("per_image")
    if p.get("unit") not in (None, "image") and per_image and p.get("guarantee_holds", True):
        unit = p["unit"]
        st.success(f"**{unit.title()}-level privacy:** {unit}s were sampled and clipped as a whole, so the guarantee "
                   f"covers each {unit} with all of their images ({p.get('n_units', 0):,} {unit}s, the largest with "
                   f"{p.get('largest_unit', '?')} images). One single image of a {unit} who has several is protected "
                   f"at ε = {fmt_eps(per_image.get('epsilon_replace_one'))} (changing one image changes that "
                   f"{unit}'s contribution: replace-one, PLD).", icon="🛡️")
