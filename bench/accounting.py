"""Time ε computation and σ calibration (RDP and PLD) for a small plan and an ImageNet-scale plan.

Small: n=5,000, B=256, 10 epochs (q=1/20, T=200). ImageNet: q=16,384/1,281,167, 10 epochs (T=790).
Calibration is timed cold (first target of a plan) and warm (further targets of the same plan, as in
an ε sweep, which reuse the plan's remembered evaluations).

    python -m bench.accounting       # last line: calibrate_seconds_imagenet_pld X.XX
"""
from __future__ import annotations

import time

from dpcore.privacy import accounting

PLANS = {"small": (5000, 256, 10), "imagenet": (1_281_167, 16384, 10)}
DELTA = 1e-5


def main() -> None:
    headline = None
    print(f"{'plan':<9} {'acct':<4} {'q':>9} {'T':>5} {'ε(σ=1) s':>9} {'calib ε=2 s':>12} {'σ':>8} "
          f"{'ε/target':>9} {'warm 5 targets s':>17}")
    for name, (n, b, epochs) in PLANS.items():
        sp = accounting.sampling_plan(n, b, epochs)
        for acct in ("rdp", "pld"):
            t = time.perf_counter()
            accounting.epsilon(1.0, sp.sample_rate, sp.steps, DELTA, acct)
            t_eps = time.perf_counter() - t
            t = time.perf_counter()
            sigma = accounting.calibrate_noise(2.0, DELTA, sp.sample_rate, sp.steps, acct)
            t_cal = time.perf_counter() - t
            ratio = accounting.epsilon(sigma, sp.sample_rate, sp.steps, DELTA, acct) / 2.0
            t = time.perf_counter()
            for target in (0.5, 1.0, 3.0, 4.0, 8.0):
                accounting.calibrate_noise(target, DELTA, sp.sample_rate, sp.steps, acct)
            t_warm = time.perf_counter() - t
            print(f"{name:<9} {acct:<4} {sp.sample_rate:>9.5f} {sp.steps:>5} {t_eps:>9.3f} {t_cal:>12.2f} "
                  f"{sigma:>8.4f} {ratio:>9.4f} {t_warm:>17.2f}")
            if name == "imagenet" and acct == "pld":
                headline = t_cal
    print(f"calibrate_seconds_imagenet_pld {headline:.2f}")


if __name__ == "__main__":
    main()
