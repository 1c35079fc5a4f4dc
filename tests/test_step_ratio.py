"""bench.step_ratio: the physical- and logical-step table, its headline line, and the eligibility check.

Timings themselves are not asserted (they are the machine's); the shapes, the K of every row and the headline's
choice of row are.
"""
import json

import pytest
import torch
from torch import nn

from bench import step_ratio as sr


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_parse_plan_reads_k_and_the_presets():
    assert sr.parse_plan("resnet18@64@64/128,vit_tiny_patch16_224@32@32@4") == [
        ("resnet18", 64, [64, 128], 1), ("vit_tiny_patch16_224", 32, [32], 4)]
    assert sr.parse_plan("trainer") is sr.TRAINER_PLAN
    # the default plan is the trainer's defaults: physical batch 128 (BEiT-base: 16), 2 physical batches per step
    assert all(len(p) == 4 and p[3] == 2 for p in sr.TRAINER_PLAN)
    assert {p[0] for p in sr.TRAINER_PLAN} == {"resnet18", "tf_efficientnet_lite0", "vit_tiny_patch16_224",
                                               "beit_base_patch16_224.in22k_ft_in22k"}


def _run(monkeypatch, capsys, tmp_path, argv, default_path=None):
    if default_path:  # the headline's path, with bk as the trainer's pick for it
        monkeypatch.setattr(sr, "DEFAULT_PATH", default_path)
        monkeypatch.setattr(sr.gm, "choose_grad_sample_mode", lambda name, device="cpu", **kw: "bk")
    out_json = tmp_path / "rows.json"
    assert sr.main(argv + ["--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(out_json.read_text())["rows"]


def test_physical_and_logical_steps_side_by_side(monkeypatch, capsys, tmp_path, one_thread):
    path = {"model": "tiny_cnn", "size": 16, "batch": 8, "accumulate": 2}
    lines, rows = _run(monkeypatch, capsys, tmp_path,
                       ["--plan", "tiny_cnn@16@8@2", "--modes", "bk", "--repeats", "2"], path)
    (row,) = rows
    assert row["accumulate"] == 2 and row["batch"] == 8 and set(row["modes"]) == {"hooks", "bk"}
    lg = row["logical"]
    assert lg["accumulate"] == 2 and lg["batch"] == 16 and set(lg["modes"]) == {"hooks", "bk"}
    for m in ("hooks", "bk"):
        assert row["modes"][m]["eligible"] and row["modes"][m]["n"] == 2 and lg["modes"][m]["n"] == 2
        assert lg["modes"][m]["ratio"] == pytest.approx(lg["modes"][m]["s"] / lg["nonprivate_s"])
    assert lg["nonprivate_ips"] == pytest.approx(16 / lg["nonprivate_s"])
    # one markdown table, a physical and a logical column per mode
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 3 and table[0].count("|") == 6 + 2 * 2
    assert "bk: physical step" in table[0] and "bk: logical step" in table[0]
    assert table[2].startswith("| tiny_cnn | 16 | 8 | 2 (16) |")
    assert lines[-1].startswith("step_ratio ") and "K=2 physical batches of 8" in lines[-1]
    assert float(lines[-1].split()[1]) == pytest.approx(lg["modes"]["bk"]["ratio"], abs=0.006)


def test_k1_rows_have_no_logical_column_and_the_headline_says_so(monkeypatch, capsys, tmp_path, one_thread):
    path = {"model": "tiny_cnn", "size": 16, "batch": 8, "accumulate": 2}
    lines, rows = _run(monkeypatch, capsys, tmp_path,
                       ["--plan", "tiny_cnn@16@8@2", "--accumulate", "1", "--modes", "bk", "--repeats", "1"], path)
    assert rows[0]["accumulate"] == 1 and "logical" not in rows[0]
    assert lines[-1].startswith("step_ratio ") and "per physical step: K=1" in lines[-1]


def test_auto_times_only_the_trainers_mode(monkeypatch, capsys, tmp_path, one_thread):
    monkeypatch.setattr(sr.gm, "choose_grad_sample_mode", lambda name, device="cpu", **kw: "bk")
    lines, rows = _run(monkeypatch, capsys, tmp_path, ["--plan", "tiny_cnn@16@8@2", "--modes", "auto",
                                                      "--repeats", "1"])
    assert set(rows[0]["modes"]) == {"bk"} and set(rows[0]["logical"]["modes"]) == {"bk"}
    assert lines[-1] == "step_ratio nan"  # resnet18 was not in this plan


def test_default_run_is_the_trainer_plan_with_auto_modes(monkeypatch):
    seen = {}

    def fake_run_model(name, size, batches, modes, device, repeats, scopes, autocast, log, bn, blocks, k):
        seen[name] = (size, batches, modes, k)
        return []
    monkeypatch.setattr(sr, "run_model", fake_run_model)
    assert sr.main(["--repeats", "1"]) == 0
    assert seen == {p[0]: (p[1], p[2], [sr.gm.choose_grad_sample_mode(p[0], "cpu")], p[3]) for p in sr.TRAINER_PLAN}
    seen.clear()
    monkeypatch.setattr(sr, "write_table", lambda *a, **k: None)
    assert sr.main(["--write-table", "--repeats", "1"]) == 0  # the mode-ranking grid: all modes, K = 1
    assert {n for n, _, _ in sr.FULL_PLAN} == set(seen)
    assert all(v[2] == list(sr.gm.MODES) and v[3] == 1 for v in seen.values())


def test_eligibility_check_turns_dropout_off(one_thread):
    """With Dropout in train mode the two modes' passes would draw other masks and bk would look wrong."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 10))
    checks = sr.check_modes(base, 8, ["hooks", "bk"], torch.device("cpu"))
    assert checks["hooks"] == 0.0 and checks["bk"] < 1e-4
    assert base[3].p == 0.5  # the caller's model is untouched (the check works on a copy)
