"""The Train page's plan before launch: n, T, q, σ and the planned ε (dpcore.training.launch_plan), its
ε-vs-step curve and the guarantee sentence."""
from __future__ import annotations

import streamlit as st

from dpcore.config import RunConfig
from dpcore.figures import runs as figures
from dpcore.privacy import accounting
from dpcore.store.card import guarantee_sentence
from dpcore.training import launch_plan as plans


@st.cache_data(show_spinner="Reading the data set to count its training images and patients…")
def train_size(dataset: str, data_dir: str | None, seed: int, test_fraction: float, medmnist_size: int,
               split: str = "official") -> tuple[int, tuple[str, int] | None]:
    """(training images, (unit, number of patients/lesions) or None where the data name no owners)."""
    return plans.train_size(dataset, data_dir, seed, test_fraction, medmnist_size, split)


@st.cache_data(show_spinner="Calibrating the noise σ for this plan…")
def launch_plan(config_json: str, sizes: tuple) -> plans.LaunchPlan:
    return plans.launch_plan(RunConfig.from_json(config_json), sizes)


@st.cache_data(show_spinner=False)
def epsilon_curve(sigma: float, q: float, steps: int, delta: float, accountant: str) -> list:
    return accounting.epsilon_curve(sigma, q, steps, delta, accountant)


def show_plan(config: RunConfig, plan: plans.LaunchPlan) -> None:
    """The plan's five numbers, and for a private run its ε curve and what it promises."""
    st.subheader("The plan")
    owners, patient = plan.owners, plan.patient
    cols = st.columns(5)
    cols[0].metric("Training images n", f"{plan.n_train:,}", help=(f"in {owners[1]:,} {owners[0]}s, each sampled "
                                                                    "with all of their images" if patient else None))
    cols[1].metric("Steps T", f"{plan.steps:,}", help=f"{config.epochs} epochs × {plan.steps_per_epoch} steps per epoch")
    cols[2].metric("Sample rate q", f"{plan.sample_rate:.4g}", help=f"Each {plan.unit} joins each step "
                   "independently with probability q")
    if config.private:
        cols[3].metric("Noise σ", f"{plan.noise_multiplier:.4g}", help="calibrated by dpcore.privacy.accounting")
        cols[4].metric(f"Planned ε ({config.accountant.upper()})", f"{plan.epsilon:.4g}",
                       help=f"δ = {config.delta:.0e}, per {plan.unit}")
        curve = epsilon_curve(plan.noise_multiplier, plan.sample_rate, plan.steps, config.delta, config.accountant)
        st.plotly_chart(figures.epsilon_curve_figure({config.accountant.upper(): curve}, target=config.epsilon,
                                                     title="ε spent vs training step (planned)"), key="plan-curve")
        st.caption(guarantee_sentence({"private": True, "epsilon": plan.epsilon, "delta": config.delta,
                                       "accountant": config.accountant, "steps": plan.steps,
                                       "unit": plan.unit}, "image")
                   + " Only the noisy model and its test-split results are released: no training loss, no "
                     "statistic of the training images.")
    else:
        cols[3].metric("Noise σ", "0")
        cols[4].metric("ε", "∞")
        st.caption("A non-private run promises nothing about privacy; it is the accuracy ceiling to compare with.")
