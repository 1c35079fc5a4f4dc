"""Accounting: the privacy arithmetic of DP-SGD alone (no training). Every number comes from dpcore.privacy.accounting."""
from pages.banner import keep_app_navigation

keep_app_navigation()  # first: a deep link on a fresh server must run through app.py

import streamlit as st

from dpcore.privacy import accounting
from dpcore.figures import runs as figures
from dpcore.errors import ConfigError
from pages.common import show_config_error

BATCHES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
EPOCHS = [1, 2, 3, 5, 10, 20, 30, 50, 100]


@st.cache_data(show_spinner="Calibrating σ…")
def calibrate(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return accounting.calibrate_noise(eps, delta, q, steps, accountant)


@st.cache_data(show_spinner=False)
def spent(sigma: float, q: float, steps: int, delta: float, accountant: str) -> float:
    return accounting.epsilon(sigma, q, steps, delta, accountant)


@st.cache_data(show_spinner="Computing ε along the way…")
def curve(sigma: float, q: float, steps: int, delta: float, accountant: str) -> list:
    points = accounting.checkpoint_steps(steps, 60 if accountant == "rdp" else 15)
    return accounting.epsilon_curve(sigma, q, steps, delta, accountant, steps=points)


@st.cache_data(show_spinner="Filling the ε map…")
def epsilon_grid(n: int, sigma: float, delta: float, batches: tuple, epochs: tuple) -> list[list[float]]:
    return accounting.epsilon_grid(n, sigma, delta, batches, epochs, "rdp")


st.title("🧮 Privacy accounting")
st.markdown("How ε follows from the noise σ, the sampling rate q = 1/⌈n/B⌉ and the number of steps "
            "T = epochs·⌈n/B⌉ — without training anything. Smaller ε = stronger privacy.")

c1, c2, c3 = st.columns(3)
n = c1.number_input("Training images n", 10, 10_000_000, 5_000, key="ac_n")
batch = c1.number_input("Expected batch size B", 1, 1_000_000, 256, key="ac_batch")
epochs = c2.number_input("Epochs", 1, 10_000, 10, key="ac_epochs")
delta = c2.select_slider("δ", [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8], value=1e-5, format_func=lambda v: f"{v:.0e}",
                         key="ac_delta")
mode = c3.radio("Given", ["target ε (find σ)", "noise σ (find ε)"], key="ac_mode")
if mode.startswith("target"):
    target = c3.number_input("Target ε", 0.01, 100.0, 1.0, key="ac_eps")
else:
    sigma_in = c3.number_input("Noise multiplier σ", 0.1, 100.0, 1.0, key="ac_sigma")

if batch > n:
    st.error(f"**batch**: B = {batch} is larger than n = {n}.  \n**Fix:** choose B ≤ n.")
    st.stop()
try:
    sampling = accounting.sampling_plan(int(n), int(batch), int(epochs))
except ConfigError as exc:  # a plan past the step bound: say which field and the fix
    show_config_error(exc)
    st.stop()
spe, q, total = sampling.steps_per_epoch, sampling.sample_rate, sampling.steps
st.markdown(f"q = 1/{spe} = **{q:.4g}**, T = {int(epochs)} × {spe} = **{total:,}** steps.")

curves, rows = {}, []
for acc in accounting.ACCOUNTANTS:
    try:
        sigma = calibrate(float(target), float(delta), q, total, acc) if mode.startswith("target") else float(sigma_in)
        eps_t = spent(sigma, q, total, float(delta), acc)
        curves[acc.upper()] = curve(sigma, q, total, float(delta), acc)
    except ConfigError as exc:  # e.g. PLD refuses a plan it cannot compose in bounded time: RDP still answers
        st.warning(f"**{acc.upper()}**: {exc.problem}. {exc.fix}.")
        continue
    rows.append({"accountant": acc.upper(), "σ": sigma, "ε after T steps": eps_t})
if not rows:
    st.stop()

cols = st.columns(2)
for col, row in zip(cols, rows):
    if mode.startswith("target"):
        col.metric(f"σ for ε = {target:g} ({row['accountant']})", f"{row['σ']:.4f}",
                   help=f"ε actually reached: {row['ε after T steps']:.4f}")
    else:
        col.metric(f"ε after {total:,} steps ({row['accountant']})", f"{row['ε after T steps']:.4f}")
st.dataframe(rows, hide_index=True)
st.plotly_chart(figures.epsilon_curve_figure(curves, target=float(target) if mode.startswith("target") else None,
                                             title="ε spent vs step: RDP and PLD"), key="ac-curves")
st.caption("Both accountants give valid upper bounds on the same mechanism; PLD is tighter, so it needs less "
           "noise for the same ε (or reports a smaller ε for the same σ).")

st.subheader("ε over batch size × epochs")
sigma_map = rows[0]["σ"]
st.markdown(f"Fixed noise σ = {sigma_map:.4g}" + (" (the RDP-calibrated σ above)" if mode.startswith("target") else "")
            + f", δ = {delta:.0e}, n = {n:,}, RDP accountant. Larger batches sample each image more often; "
            "more epochs take more steps — both spend more ε.")
batches = tuple(b for b in BATCHES if b <= n)
if batches:
    z = epsilon_grid(int(n), float(sigma_map), float(delta), batches, tuple(EPOCHS))
    st.plotly_chart(figures.heatmap_figure([str(b) for b in batches], [str(e) for e in EPOCHS], z,
                                           "batch size B", "epochs", "ε", title="ε spent (RDP)"), key="ac-map")
