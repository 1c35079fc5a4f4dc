"""The numbers inside each figure (trace x/y), for 0, 1 and many events."""
import numpy as np
import plotly.graph_objects as go
import pytest

from dpcore.store.events import Event
from dpcore.figures.runs import (compare_runs_figure, confusion_matrix_figure, epsilon_curve_figure, frontier_figure,
                            heatmap_figure, probability_bars_figure, roc_curve_figure, training_figures)


def _metrics(acc, loss=0.5):
    return {"accuracy": acc, "balanced_accuracy": acc - 0.1, "roc_auc": acc + 0.05, "loss": loss}


def _events(n_steps=4):
    ev = [Event("started", "r"), Event("plan", "r", total_steps=n_steps)]
    for s in range(1, n_steps + 1):
        ev.append(Event("step", "r", step=s, loss=2.0 / s, epsilon=0.5 * s if s % 2 == 0 else None))
        if s % 2 == 0:
            ev.append(Event("eval", "r", step=s, metrics=_metrics(0.2 * s, loss=1.0 / s)))
    return ev


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def test_epsilon_curve_lines_and_target():
    fig = epsilon_curve_figure({"RDP": [(2, 1.0), (1, 0.5)], "PLD": [(1, 0.4), (2, 0.9)]}, target=2.0)
    assert isinstance(fig, go.Figure)
    assert list(_trace(fig, "RDP").x) == [1, 2] and list(_trace(fig, "RDP").y) == [0.5, 1.0]
    assert list(_trace(fig, "PLD").y) == [0.4, 0.9]
    lines = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == 2.0


def test_training_figures_many_events():
    figs = training_figures(_events(4), target_epsilon=3.0)
    assert set(figs) == {"accuracy", "loss", "epsilon"}
    acc = figs["accuracy"]
    assert list(_trace(acc, "test accuracy").x) == [2, 4]
    assert list(_trace(acc, "test accuracy").y) == pytest.approx([0.4, 0.8])
    assert list(_trace(acc, "balanced accuracy").y) == pytest.approx([0.3, 0.7])
    assert list(_trace(acc, "ROC-AUC").y) == pytest.approx([0.45, 0.85])
    loss = figs["loss"]
    assert list(_trace(loss, "training-batch loss (non-private run)").x) == [1, 2, 3, 4]
    assert list(_trace(loss, "training-batch loss (non-private run)").y) == pytest.approx([2.0, 1.0, 2 / 3, 0.5])
    assert list(_trace(loss, "test-split loss").y) == pytest.approx([0.5, 0.25])
    eps = figs["epsilon"]
    assert list(eps.data[0].x) == [2, 4] and list(eps.data[0].y) == [1.0, 2.0]  # steps without ε left out
    assert [s.y0 for s in eps.layout.shapes] == [3.0]


@pytest.mark.parametrize("events", [[], [Event("started", "r")], [Event("step", "r", step=1, loss=1.0)]])
def test_training_figures_zero_or_one_event(events):
    figs = training_figures(events)
    assert all(isinstance(f, go.Figure) for f in figs.values())
    assert all(len(t.x) == 0 for t in figs["accuracy"].data)
    assert len(figs["epsilon"].data[0].x) == 0 and not figs["epsilon"].layout.shapes
    if events and events[0].kind == "step":
        assert list(_trace(figs["loss"], "training-batch loss (non-private run)").y) == [1.0]


def test_non_private_eval_with_none_roc_auc_is_skipped():
    ev = [Event("eval", "r", step=1, metrics={"accuracy": 0.5, "roc_auc": None, "loss": 1.0})]
    acc = training_figures(ev)["accuracy"]
    assert list(_trace(acc, "test accuracy").y) == [0.5] and len(_trace(acc, "ROC-AUC").x) == 0


def test_compare_runs_one_line_per_run():
    fig = compare_runs_figure({"a": _events(2), "b": _events(4), "empty": []}, metric="roc_auc")
    assert [t.name for t in fig.data] == ["a", "b", "empty"]
    assert list(fig.data[1].x) == [2, 4] and list(fig.data[1].y) == pytest.approx([0.45, 0.85])
    assert len(fig.data[2].x) == 0


def test_frontier_log_axis_sorted_and_nonprivate_lines():
    dp = [{"epsilon": 8.0, "accuracy": 0.9, "roc_auc": 0.95, "run_id": "b", "label": "ε=8"},
          {"epsilon": 0.5, "accuracy": 0.6, "roc_auc": 0.7, "run_id": "a", "label": "ε=0.5"}]
    npv = [{"epsilon": None, "accuracy": 0.97, "roc_auc": 0.99, "run_id": "c", "label": "baseline"}]
    fig = frontier_figure(dp, npv)
    assert fig.layout.xaxis.type == "log"
    assert list(fig.data[0].x) == [0.5, 8.0] and list(fig.data[0].y) == [0.6, 0.9]
    assert list(fig.data[0].customdata) == ["a", "b"]
    assert [(s.y0, s.line.dash) for s in fig.layout.shapes] == [(0.97, "dash")]
    fig = frontier_figure(dp, npv, metric="roc_auc")
    assert list(fig.data[0].y) == [0.7, 0.95] and fig.layout.shapes[0].y0 == 0.99
    assert isinstance(frontier_figure([], []), go.Figure)


def test_confusion_matrix_counts():
    fig = confusion_matrix_figure([[5, 1], [2, 7]], ["normal", "pneumonia"])
    hm = fig.data[0]
    assert [list(r) for r in hm.z] == [[5, 1], [2, 7]] and list(hm.x) == ["normal", "pneumonia"]
    with pytest.raises(ValueError, match="class names"):
        confusion_matrix_figure([[1]], ["a", "b"])


def test_roc_binary_and_multiclass():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.35, 0.65], [0.2, 0.8]])
    fig = roc_curve_figure(labels, probs, ["normal", "pneumonia"])
    curves = [t for t in fig.data if t.name != "chance"]
    assert len(curves) == 1 and curves[0].name == "pneumonia (AUC 1.000)"
    assert curves[0].x[0] == 0 and curves[0].y[-1] == 1
    assert list(_trace(fig, "chance").x) == [0, 1]

    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])  # class 3 absent: no curve for it
    probs = rng.dirichlet(np.ones(4), size=len(labels))
    fig = roc_curve_figure(labels, probs, ["a", "b", "c", "d"])
    names = [t.name for t in fig.data if t.name != "chance"]
    assert [n.split(" (")[0] for n in names] == ["a", "b", "c"]


def test_probability_bars_sorted_top_first():
    fig = probability_bars_figure({"a": 0.2, "b": 0.7, "c": 0.1})
    assert list(fig.data[0].y) == ["c", "a", "b"] and list(fig.data[0].x) == [0.1, 0.2, 0.7]
    assert fig.data[0].orientation == "h"


def test_heatmap_values_and_shape_check():
    fig = heatmap_figure([1, 2, 3], [0.5, 1.0], [[1, 2, 3], [4, 5, 6]], "epochs", "σ", "ε", title="ε grid")
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [0.5, 1.0]
    assert [list(r) for r in fig.data[0].z] == [[1, 2, 3], [4, 5, 6]]
    assert fig.layout.xaxis.title.text == "epochs" and fig.layout.title.text == "ε grid"
    with pytest.raises(ValueError, match="shape"):
        heatmap_figure([1, 2], [1], [[1, 2, 3]], "x", "y", "z")


def test_figures_never_import_streamlit():
    import subprocess
    import sys
    code = ("import sys, dpcore.figures.runs, dpcore.analysis.uploads, dpcore.analysis.saliency, dpcore.environment, dpcore.training.presets, "
            "dpcore.analysis.run_review; assert 'streamlit' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probability_bars_label_every_class():
    from dpcore.figures.runs import probability_bars_figure

    fig = probability_bars_figure({"NORMAL": 0.72, "PNEUMONIA": 0.28})
    assert list(fig.layout.yaxis.tickvals) == ["PNEUMONIA", "NORMAL"]


def test_weights_are_described_in_plain_words():
    from dpcore.store.card import describe_weights

    assert describe_weights({"source": "none"}) == "random initialisation (no pretraining)"
    assert "timm hub" in describe_weights({"source": "hub", "name": "resnet18.a1_in1k"})
    assert "sha256 abcdef012345" in describe_weights({"source": "file", "name": "w.safetensors", "sha256": "abcdef0123456789"})


def test_score_axes_stay_within_zero_and_one_and_accuracies_read_as_percent():
    dp = [{"epsilon": 0.5, "accuracy": 0.62, "roc_auc": 0.97, "run_id": "a"},
          {"epsilon": 8.0, "accuracy": 1.0, "roc_auc": 1.0, "run_id": "b"}]
    fig = frontier_figure(dp, [{"accuracy": 0.99, "roc_auc": 1.0, "run_id": "c"}])
    lo, hi = fig.layout.yaxis.range
    assert 0 <= lo <= 0.62 and hi == 1.0 and fig.layout.yaxis.tickformat == ".0%"  # was autoscaled up to 1.5
    auc = frontier_figure(dp, [], metric="roc_auc")
    assert auc.layout.yaxis.range[1] == 1.0 and auc.layout.yaxis.tickformat is None
    acc = training_figures(_events(4))["accuracy"]
    assert list(acc.layout.yaxis.range) == [0, 1]
    assert list(compare_runs_figure({"a": _events(2)}, metric="accuracy").layout.yaxis.range) == [0, 1]


def test_the_log_epsilon_axis_has_plain_one_two_five_ticks():
    dp = [{"epsilon": e, "accuracy": 0.8, "run_id": str(e)} for e in (0.25, 1.0, 8.0)]
    x = frontier_figure(dp, []).layout.xaxis
    assert x.type == "log" and list(x.ticktext) == ["0.2", "0.5", "1", "2", "5", "10"]
    assert list(x.tickvals) == [0.2, 0.5, 1, 2, 5, 10]
    lone = frontier_figure(dp[1:2], []).layout.xaxis
    assert list(lone.ticktext) == ["0.5", "1", "2"]


def test_legends_sit_in_one_row_under_the_plot():
    figs = [training_figures(_events(4))["accuracy"], frontier_figure([], []), compare_runs_figure({"a": []})]
    for fig in figs:
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0


def test_test_accuracy_stays_visible_over_an_equal_balanced_accuracy():
    ev = [Event("eval", "r", step=s, metrics={"accuracy": 0.5, "balanced_accuracy": 0.5, "roc_auc": 0.7})
          for s in (1, 2)]
    acc = training_figures(ev)["accuracy"]
    top, bal = _trace(acc, "test accuracy"), _trace(acc, "balanced accuracy")
    # a wide translucent band under a thin dashed line: both show where they coincide
    assert acc.data[0].name == "test accuracy" and top.opacity < 1 and bal.line.dash == "dash"
    assert top.line.width >= 3 * bal.line.width and top.marker.size > bal.marker.size
    assert top.line.color != bal.line.color


def test_the_frontier_marks_the_runs_an_answer_comes_from():
    dp = [{"epsilon": 1.0, "accuracy": 0.8, "run_id": "a"}, {"epsilon": 4.0, "accuracy": 0.95, "run_id": "b"}]
    fig = frontier_figure(dp, [], highlight=["a", "b"], target=0.9, answer_epsilon=2.6)
    marked = _trace(fig, "runs the answer comes from")
    assert list(marked.customdata) == ["a", "b"] and list(marked.x) == [1.0, 4.0]
    answer = next(t for t in fig.data if t.name.startswith("answer"))
    assert list(answer.x) == [2.6] and list(answer.y) == [0.9]
    assert [s.y0 for s in fig.layout.shapes] == [0.9]


def test_experiment_comparison_axes_match_the_frontier():
    from dpcore.figures.experiments import comparison_figure

    rows = [{"arm": f"ε={e}", "group": "DP", "private": True, "epsilon": e, "accuracy": a, "run_id": str(e)}
            for e, a in ((0.5, 0.7), (2.0, 0.9))]
    fig = comparison_figure(rows, "accuracy")
    assert fig.layout.yaxis.range[1] == 1.0 and fig.layout.yaxis.tickformat == ".0%"
    assert list(fig.layout.xaxis.ticktext) == ["0.5", "1", "2"] and fig.layout.legend.orientation == "h"


def test_the_live_epsilon_curve_names_its_accountant_and_unit():
    events = [Event(kind="step", run_id="r", step=s, epsilon=0.1 * s) for s in range(1, 4)]
    fig = training_figures(events, target_epsilon=2.0, accountant="pld", unit="patient")["epsilon"]
    assert fig.data[0].name == "ε spent per patient (PLD)" and "PLD" in fig.layout.title.text
