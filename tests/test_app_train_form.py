"""The Train form shows what a preset or a chosen run trained with (not the form's defaults)."""
from __future__ import annotations

import warnings

from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.config import RunConfig
from dpcore.training.presets import build_presets
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train
from pages.train_form import form_state, with_options


def test_a_preset_fills_the_form_with_its_own_settings(tmp_path, monkeypatch):
    at = open_page("pages/home.py", tmp_path, monkeypatch)
    at.button(key="preset-teaching-demo").click().run()
    assert not at.exception, [e.value for e in at.exception]
    preset = build_presets()["teaching-demo"].config
    assert at.number_input(key="tr_size").value == preset.image_size == 16  # was "Image size 0"
    assert at.number_input(key="tr_epochs").value == preset.epochs
    assert at.select_slider(key="tr_eps").value == preset.epsilon
    run = at.query_params["run"]
    run = run[0] if isinstance(run, list) else run
    at.button(key=f"cancel-{run}").click().run()


def test_load_a_runs_settings_into_the_form_including_fields_it_has_no_widget_for(tmp_path, monkeypatch):
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=24, epochs=1, batch_size=64,
                    max_physical_batch_size=64, epsilon=1.3, device="cpu", evals_per_epoch=2, optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_id = train(cfg, RunStore(tmp_path)).run_id
    monkeypatch.setenv("DPCORE_RUNS_DIR", str(tmp_path))
    at = open_page("pages/train.py", tmp_path, monkeypatch)
    at.query_params["run"] = run_id
    at.run()
    at.button(key="load-run-settings").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.number_input(key="tr_size").value == 24
    assert at.select_slider(key="tr_eps").value == 1.3  # not one of the form's steps: added to them
    assert "evals_per_epoch = 2" in texts(at) and "optimizer = sgd" in texts(at)
    at.button(key="launch").click().run()
    launched = RunStore(tmp_path).list_runs()
    new = next(r for r in launched if r.run_id != run_id)
    assert new.config.evals_per_epoch == 2 and new.config.optimizer == "sgd" and new.config.image_size == 24
    assert new.config.epsilon == 1.3
    at.button(key=f"cancel-{new.run_id}").click().run()


def test_form_state_round_trips_every_field_it_has_a_widget_for():
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", image_size=32, epsilon=None, ema_decay=0.999,
                    lr_schedule="cosine", warmup_fraction=0.1, augmult=4, pretrained="none")
    state = form_state(cfg)
    assert state["tr_nonpriv"] and "tr_eps" not in state
    assert state["tr_ema"] and state["tr_ema_decay"] == 0.999 and state["tr_augmult"] == 4
    assert state["tr_hidden"] == {}
    assert with_options([1.0, 2.0], 1.5) == [1.0, 1.5, 2.0] and with_options([1.0], 1.0) == [1.0]


def test_with_several_gpus_the_train_page_offers_to_spread_the_run(tmp_path, monkeypatch):
    from dpcore import environment
    from dpcore.training.jobs import JobManager

    real = environment.describe_machine
    monkeypatch.setattr(environment, "describe_machine", lambda: {**real(), "gpus": 4})
    asked = []
    submit = JobManager.submit

    def recording(self, config, label="", processes=1):
        asked.append(processes)
        return submit(self, config, label)  # trained in one process here: this machine has no GPUs

    monkeypatch.setattr(JobManager, "submit", recording)
    at = open_page("pages/train.py", tmp_path, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    gpus = at.selectbox(key="gpus")
    assert gpus.value == 4 and gpus.options == ["1", "2", "3", "4"]
    gpus.set_value(2).run()
    at.button(key="launch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert asked == [2]
    run = at.query_params["run"]
    at.button(key=f"cancel-{run[0] if isinstance(run, list) else run}").click().run()
