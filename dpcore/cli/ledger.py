"""`python -m dpcore ledger`: what every image of every data set has spent, over all runs on this machine."""
from __future__ import annotations

import json
import math

from dpcore.privacy.ledger import DatasetSummary, Ledger, LedgerError
from dpcore.store.backfill import backfill


def add_commands(subparsers, add_runs_dir) -> dict:
    p = subparsers.add_parser(
        "ledger", help="privacy spent per image: every run that trained on each image, composed (RDP, PLD)",
        description="The machine's privacy ledger (~/.dpcore/ledger.sqlite, or $DPCORE_LEDGER) records every "
                    "use of every image, identified by content: its (σ, q, T, δ), or that it carried no "
                    "guarantee (non-private, replayable noise, pretraining on data declared public, audits). "
                    "Each image's ε composes every run that trained on it; a data set's headline is its "
                    "most-exposed image. Deleted runs keep their entries. Last line: `ledger {json}`.")
    add_runs_dir(p)
    p.add_argument("--ledger", default=None, help="ledger file (default: $DPCORE_LEDGER or ~/.dpcore/ledger.sqlite)")
    p.add_argument("--dataset", default=None, help="part of a data set's name (default: all)")
    p.add_argument("--set-budget", type=float, default=None, metavar="EPS",
                   help="the largest ε any one image of the data set may reach (needs --dataset); 0 removes it")
    p.add_argument("--budget-delta", type=float, default=None, help="δ at which the budget is stated")
    p.add_argument("--accountant", choices=("rdp", "pld"), default=None,
                   help="whose composed ε counts against the budget (default: per image the tighter of RDP and PLD)")
    p.add_argument("--entries", action="store_true", help="also list every use")
    p.add_argument("--backfill", action="store_true",
                   help="first record the stored runs of --runs-dir that the ledger does not know yet, from their cards")
    return {"ledger": _cmd_ledger}


def _f(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    return "∞" if math.isinf(v) else f"{v:.{digits}g}"


def _print_summary(s: DatasetSummary, entries: bool, accountant: str | None = None) -> None:
    e = s.exposure
    print(f"== {s.name}: {s.n_images:,} images, {s.n_trained:,} trained on")
    voiding = [r for r in s.runs if r.voids]
    print(f"uses      : {len(s.runs)} ({sum(r.guaranteed for r in s.runs)} DP-SGD, {len(voiding)} without a guarantee)")
    rdp = s.epsilon_of("rdp")
    rdp_text = "n/a: patient-level runs are replace-one per image, which only PLD composes" if (
        math.isinf(rdp) and not math.isinf(s.epsilon_of("pld"))) else _f(rdp)
    print(f"per image : most-exposed image ε = {_f(s.epsilon)} (RDP {rdp_text}, PLD "
          f"{_f(s.epsilon_of('pld'))}) at δ = {_f(s.delta, 3)}; median image ε = {_f(s.to_dict()['epsilon_median'])}")
    hist = e.histogram()
    shown = ", ".join(f"ε {_f(eps)}: {n:,}" for eps, n in hist[:8]) + (" …" if len(hist) > 8 else "")
    print(f"histogram : {shown}")
    if s.n_void:
        print(f"VOID      : {s.n_void:,} images were used without a guarantee (ε = ∞) by "
              + ", ".join(f"{r.run_id} ({r.kind}{', ' + r.label if r.label else ''})" for r in voiding[:5]))
    both = s.to_dict()["n_evaluated_and_trained"]
    if both:
        print(f"evaluated : {both:,} images trained on were also in some run's test split, whose metrics were "
              "released without DP")
    if s.budget_epsilon is None:
        print("budget    : none set (python -m dpcore ledger --dataset NAME --set-budget EPS)")
    else:
        spent = s.epsilon_of(accountant)
        by = accountant.upper() if accountant else "per image the tighter of RDP and PLD"
        print(f"budget    : ε = {s.budget_epsilon:g} per image; most-exposed image at {_f(spent)} ({by}), "
              f"remaining {_remaining(s, spent, accountant)}")
    if entries:
        for r in s.runs:
            what = (f"σ={r.noise_multiplier:.4g} q={r.sample_rate:.4g} T={r.steps} δ={r.delta:g} ε={_f(r.epsilon)}"
                    + (f" per {r.unit}" if r.per_unit else "")
                    if r.guaranteed else f"no guarantee ({r.kind}), {r.steps} step(s)")
            extra = " [over budget, allowed]" if r.over_budget else ""
            print(f"  {r.run_id}  {r.shown_status:<11} {r.n_train or 0:>6} imgs  {r.label or '':<28} {what}{extra}")


def _remaining(s: DatasetSummary, spent: float, accountant: str | None) -> str:
    """What is left of the budget. A void data set has nothing left (never "∞": ∞ spent leaves −∞); an ε that is
    ∞ only because RDP cannot compose replace-one runs says so instead of calling the data set void."""
    if s.void:
        return "none (void)"
    if math.isinf(spent):
        return f"n/a under {(accountant or 'rdp').upper()} (patient-level runs compose under PLD only)"
    return _f(s.budget_epsilon - spent)


def _print_owners(ledger: Ledger, s: DatasetSummary) -> dict | None:
    """The per-patient (per-lesion) line, where the runs recorded whose images they were."""
    ox = ledger.owner_exposure(s.key)
    if not ox.owners:
        return None
    d = ox.to_dict()
    unit = "lesion" if any(r.unit == "lesion" for r in s.runs) else "patient"
    print(f"per {unit:<6}: most-exposed {unit} ({d['worst_owner']}) ε = {_f(d['epsilon_max'])} at δ = "
          f"{_f(d['delta_of_max'], 3)}; median {unit} ε = {_f(d['epsilon_median'])} ({d['n_owners']:,} {unit}s; "
          f"{unit}-level runs by their own ε, image-level runs by group privacy where they held several images)")
    if d["n_without_owner_record"]:
        print(f"            ({d['n_without_owner_record']:,} training images of earlier runs have no {unit} "
              "recorded and are not in this figure)")
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _cmd_ledger(args) -> int:
    try:
        ledger = Ledger(args.ledger)
        if args.backfill:
            added = backfill(args.runs_dir, ledger)
            print(f"backfilled {len(added)} run(s) from their cards" + (f": {', '.join(added)}" if added else ""))
        if args.set_budget is not None:
            if not args.dataset:
                raise LedgerError("--set-budget needs --dataset. Fix: name the data set (part of its name)")
            ledger.set_budget(ledger.resolve(args.dataset), args.set_budget or None, args.budget_delta)
        keys = [ledger.resolve(args.dataset)] if args.dataset else [d["key"] for d in ledger.datasets()]
    except LedgerError as exc:
        print(f"Error: {exc}")
        return 2
    if not keys:
        print(f"The ledger {ledger.path} has no entries yet: every training run adds one.")
    summaries = [ledger.summary(k) for k in keys]
    owners = {}
    for s in summaries:
        _print_summary(s, args.entries, args.accountant)
        owners[s.key] = _print_owners(ledger, s)
    out = {}
    for s in summaries:
        row = s.to_dict()
        row["per_owner"] = owners[s.key]
        row["accountant"] = args.accountant or "per image min(rdp, pld)"
        row["spent"] = s.epsilon_of(args.accountant)
        row["remaining"] = None if s.budget_epsilon is None or math.isinf(row["spent"]) else \
            s.budget_epsilon - row["spent"]
        row["void"] = s.void  # JSON has no ∞: a void data set's spent and remaining read null, this says why
        row["histogram"] = [[None if math.isinf(e) else e, n] for e, n in s.exposure.histogram()]
        out[s.name] = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
    print("ledger " + json.dumps(out, sort_keys=True))
    return 0
