"""What the Runs page computes from the store, as rows and choices (the page only draws them; the CLI may read
them too): the runs overview, curves to compare, sweep and frontier points, subgroup-fairness tables, the runs
that can resume and the named experiments with stored runs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dpcore.analysis import run_review
from dpcore.analysis.labels import compare_label, fmt_duration
from dpcore.store.events import Event
from dpcore.store.runs import RunRecord, RunStore

WEIGHTS = {"none": "scratch", "hub": "pretrained"}


def overview_rows(store: RunStore) -> list[dict[str, Any]]:
    """`run_review.runs_table` plus the columns the overview reads: duration as text, 'data set / backbone' and
    'scope, weights' (scratch / pretrained), so one table names a run's recipe in two columns."""
    rows = run_review.runs_table(store)
    for r in rows:
        r["duration"] = fmt_duration(r["duration_s"])
        r["data"] = f"{r['dataset']} / {r['backbone']}"
        r["recipe"] = f"{r['scope']}, {WEIGHTS.get(r['pretrained'], r['pretrained'])}"
    return rows


def compare_events(store: RunStore, records: dict[str, RunRecord], chosen: list[str]) -> dict[str, list[Event]]:
    """The event streams of the chosen runs by their legend label (compare_label), for a curve comparison."""
    return {compare_label(records[i]): store.events(i) for i in chosen}


def sweep_run_ids(jobs) -> list[str]:
    """The point runs of every ε sweep among `jobs` (newest first, as the job manager lists them)."""
    from dpcore.training.jobs import SweepJob

    return [rid for job in jobs if isinstance(job, SweepJob) for rid in job.run_ids]


def sweep_point_rows(points, unit: str) -> list[dict[str, Any]]:
    """A sweep's finished points with the privacy unit their ε is stated for (None for the non-private baseline)."""
    return [{**p.to_dict(), "unit": unit if p.target_epsilon is not None else None} for p in points]


def frontier_rows(dp_points: list[dict], plain_points: list[dict], used=()) -> list[dict[str, Any]]:
    """The frontier's points as table rows; `answer` marks the runs the smallest-ε answer reads (`used`)."""
    return [{"run_id": p["run_id"], "epsilon": p["epsilon"], "unit": p.get("unit"), "accuracy": p["accuracy"],
             "balanced_accuracy": p["balanced_accuracy"], "roc_auc": p["roc_auc"],
             "answer": p["run_id"] in used} for p in dp_points + plain_points]


def has_metadata(record: RunRecord) -> bool:
    """Whether a run's data name per-example metadata to group by: HAM10000, or a folder with a metadata.csv."""
    if record.dataset == "ham10000":
        return True
    return (record.dataset == "folder" and bool(record.config.data_dir)
            and (Path(record.config.data_dir) / "metadata.csv").is_file())


def fairness_candidates(store: RunStore) -> list[str]:
    """Finished runs whose data have metadata, newest first: those a subgroup-fairness report can read."""
    return [r.run_id for r in run_review.ready_runs(store) if has_metadata(r)][::-1]


def fairness_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """One run's fairness report (fairness.run_fairness) as rows, one per group."""
    pos = rep.get("positive_class")
    return [{"group": g, "n": r["n"], "accuracy": r["accuracy"], "majority share": r.get("majority_baseline"),
             "balanced accuracy": r["balanced_accuracy"],
             "ROC-AUC": r["roc_auc"], f"{pos} recall" if pos else "positive recall": r.get("positive_recall"),
             "in gap": g in rep["gap_groups"],
             "note": rep["excluded_from_gap"].get(g) or (r["roc_auc_note"] or "")} for g, r in rep["groups"].items()]


def fairness_compare_rows(comp: dict[str, Any]) -> list[dict[str, Any]]:
    """Two runs' fairness comparison (fairness.compare) as rows, one per group, each metric once per run."""
    pos = comp["reports"][0].get("positive_class")
    la, lb = comp["a"]["label"], comp["b"]["label"]
    rows = []
    for r in comp["rows"]:
        row = {"group": r["group"], "n": r["n"], "in gap": not (r["small"] or r["unknown"]),
               "majority share": r.get("majority_baseline")}
        for m, t in (("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc."), ("roc_auc", "AUC"),
                     ("positive_recall", f"{pos} recall" if pos else "pos. recall")):
            row[f"{t} {la}"], row[f"{t} {lb}"] = r[f"{m}_a"], r[f"{m}_b"]
        rows.append(row)
    return rows


def fairness_gap_rows(comp: dict[str, Any]) -> list[dict[str, Any]]:
    """The largest gap between groups per metric for both runs of a comparison, and their difference."""
    from dpcore.analysis import fairness

    la, lb = comp["a"]["label"], comp["b"]["label"]
    return [{"metric": m, f"gap {la}": (comp["gaps_a"].get(m) or {}).get("gap"),
             f"worst {la}": (comp["gaps_a"].get(m) or {}).get("worst_group"),
             f"gap {lb}": (comp["gaps_b"].get(m) or {}).get("gap"),
             f"worst {lb}": (comp["gaps_b"].get(m) or {}).get("worst_group"),
             "difference": comp["gap_difference"].get(m)} for m in fairness.GAP_METRICS if m in comp["gaps_a"]]


def resumable_runs(store: RunStore, records: dict[str, RunRecord]) -> list[str]:
    """Failed or cancelled runs that left a checkpoint (in `records` order): those can continue from it."""
    from dpcore.training import checkpoint

    return [i for i in records if records[i].status in ("failed", "cancelled")
            and checkpoint.exists(store.run_dir(i))]


def stored_experiments(store: RunStore) -> list:
    """The named experiments (valid ones) that have runs tagged in this store."""
    from dpcore.analysis import experiments as ex

    tagged = {(t.get("experiment"), t.get("version")) for t in ex.read_tags(store.root).values()}
    return [e for _, e in ex.list_experiments() if not isinstance(e, ex.ExperimentError)
            and (e.name, e.version) in tagged]
