"""`python -m dpcore epsilon | calibrate`: the accountant alone, no training."""
from __future__ import annotations

from dpcore.privacy import accounting


def add_commands(subparsers, add_runs_dir) -> dict:
    e = subparsers.add_parser("epsilon", help="ε of a DP-SGD plan (σ, q, T, δ)")
    add_runs_dir(e)
    e.add_argument("--noise", type=float, required=True, help="noise multiplier σ")
    e.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    e.add_argument("--steps", type=int, required=True)
    e.add_argument("--delta", type=float, default=1e-5)
    e.add_argument("--accountant", default="rdp", choices=accounting.ACCOUNTANTS)

    c = subparsers.add_parser("calibrate", help="smallest σ whose ε is at most the target")
    add_runs_dir(c)
    c.add_argument("--epsilon", type=float, required=True)
    c.add_argument("--delta", type=float, default=1e-5)
    c.add_argument("--sample-rate", type=float, required=True)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--accountant", default="rdp", choices=accounting.ACCOUNTANTS)

    return {"epsilon": _cmd_epsilon, "calibrate": _cmd_calibrate}


def _cmd_epsilon(args) -> int:
    eps = accounting.epsilon(args.noise, args.sample_rate, args.steps, args.delta, args.accountant)
    print(f"epsilon {eps:.6g}  (sigma={args.noise:g}, q={args.sample_rate:g}, T={args.steps}, "
          f"delta={args.delta:g}, {args.accountant.upper()})")
    return 0


def _cmd_calibrate(args) -> int:
    sigma = accounting.calibrate_noise(args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant)
    eps = accounting.epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant)
    print(f"sigma {sigma:.6g}  (gives epsilon={eps:.6g} <= {args.epsilon:g} at q={args.sample_rate:g}, "
          f"T={args.steps}, delta={args.delta:g}, {args.accountant.upper()})")
    return 0
