"""Bad inputs are refused with a clear error (field, problem, fix; the CLI prints `error: ... Fix: ...` and exits 2,
no traceback) or handled correctly: absurd plans, PLD work that would not finish, calibration targets no σ meets,
broken --config files, decompression bombs, aliased folders, copies across classes or splits, non-UTF-8 names and
void ledger budgets (issue 15, section 4)."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from PIL import Image

import dpcore.data
import dpcore.data.base
import dpcore.analysis.run_review
from apptest_support import fresh_caches, open_page, texts  # noqa: F401 - fresh_caches is autouse
from dpcore.privacy import accounting
from dpcore.cli import main as cli
from dpcore.store.card import _fmt_factor, guarantee_sentence
from dpcore.cli.ledger import _remaining
from dpcore.config import MAX_EPOCHS, RunConfig
from dpcore.data import ArrayImageList, load_dataset
from dpcore.data.folder import drop_test_copies
from dpcore.errors import ConfigError, DataError, DPCoreError
from dpcore.privacy.ledger import DatasetSummary, Exposure, Ledger
from dpcore.analysis.predict import read_image_file
from dpcore.store.runs import RunStore
from dpcore.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny_cnn", "image_size": 16, "epochs": 1, "device": "cpu", "scope": "head"}


def _main(argv, capsys) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _train(store: RunStore, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(RunConfig(**{**TINY, **kw}), store)


def _noise(path: Path | bytes, seed: int, size: int = 16) -> None:
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG")


def _folder(root: Path, splits=("train", "test"), n: int = 6) -> Path:
    """ROOT/{train,test}/{a,b}/*.png of distinct noise images."""
    seed = 0
    for split in splits:
        for cls in ("a", "b"):
            for i in range(n if split == "train" else max(2, n // 3)):
                seed += 1
                _noise(root / split / cls / f"{i}.png", seed)
    return root


# -- 1. plans past the step bound ----------------------------------------------------------------------------------
def test_absurd_epochs_are_refused_before_any_data_are_read(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        RunConfig(epochs=100_000_000)
    assert e.value.field == "epochs" and f"{MAX_EPOCHS:,}" in str(e.value)
    rc, err = _main(["train", "--epochs", 100_000_000, "--runs-dir", tmp_path, "--quiet"], capsys)
    assert rc == 2 and err.startswith("error: epochs: must be at most") and "Fix:" in err
    assert not list(tmp_path.glob("*/card.json"))


def test_total_steps_are_bounded_with_the_epochs_that_fit():
    with pytest.raises(ConfigError, match=r"143,700,000 steps.*--epochs 695 or fewer") as e:
        accounting.sampling_plan(1437, 1, 100_000)
    assert e.value.field == "epochs"
    with pytest.raises(ConfigError, match="1,000,000"):
        RunConfig(epochs=100_000, batch_size=1).check_against_data(1437)
    assert accounting.sampling_plan(1437, 256, 15).steps == 90  # ordinary plans are untouched


# -- 2. PLD work is bounded; every ε still comes from the accountant -----------------------------------------------
PLD_HANGS = [  # each took > 120 s (or ran out of memory) before the bounds
    ["epsilon", "--noise", "1e-3", "--sample-rate", "0.01", "--steps", "100", "--accountant", "pld"],
    ["calibrate", "--epsilon", "2", "--sample-rate", "1e-9", "--steps", "1000", "--accountant", "pld"],
    ["epsilon", "--noise", "30", "--sample-rate", "0.01", "--steps", "1000000000", "--accountant", "pld"],
    ["calibrate", "--epsilon", "2", "--sample-rate", "0.01", "--steps", "1000000000", "--accountant", "pld"],
    ["calibrate", "--epsilon", "1e4", "--sample-rate", "0.01", "--steps", "100", "--accountant", "pld"],
]


def test_pld_queries_that_hung_now_fail_fast_with_a_fix():
    script = ("import sys, json\nfrom dpcore.cli import main as cli\n"
              f"for argv in {PLD_HANGS!r}:\n"
              "    print('RC', cli.main(argv), flush=True)\n")
    try:
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("a PLD query still runs without bound")
    assert [line for line in out.stdout.splitlines() if line.startswith("RC")] == ["RC 2"] * len(PLD_HANGS), out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(PLD_HANGS) and all("Fix:" in e for e in errors) and "Traceback" not in out.stderr
    assert "too little noise for the PLD accountant" in errors[0] and "at most 1,000,000 steps" in errors[2]


def test_rdp_still_answers_what_pld_refuses():
    sigma = accounting.calibrate_noise(2.0, 1e-5, 0.01, 10**9, "rdp")
    assert 0.995 * 2.0 <= accounting.epsilon(sigma, 0.01, 10**9, 1e-5, "rdp") <= 2.0
    with pytest.raises(ConfigError) as e:
        accounting.epsilon(0.3, 1.0, 10**6, 1e-5, "pld")  # a composed grid of ~1.5e8 points
    assert e.value.field == "steps" and "grid" in e.value.problem


def test_pld_epsilon_is_still_dp_accountings_to_the_last_bit():
    for sigma, q, steps in [(1.1, 0.01, 1000), (0.6, 0.2, 50)]:
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=accounting.PLD_DISCRETIZATION)
        acc.compose(accounting.dp_sgd_event(sigma, q, steps))
        assert accounting.epsilon(sigma, q, steps, 1e-5, "pld") == acc.get_epsilon(1e-5)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=accounting.PLD_DISCRETIZATION)
    for sigma, q, steps in [(1.1, 0.01, 1000), (0.9, 0.05, 200)]:
        acc.compose(accounting.dp_sgd_event(sigma, q, steps))
    assert accounting.compose_events([(1.1, 0.01, 1000), (0.9, 0.05, 200)], 1e-5, "pld") == acc.get_epsilon(1e-5)
    rep = pld_privacy_accountant.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                                               value_discretization_interval=accounting.PLD_DISCRETIZATION)
    rep.compose(accounting.dp_sgd_event(1.1, 0.01, 500))
    assert accounting.epsilon_replace_one(1.1, 0.01, 500, 1e-5) == rep.get_epsilon(1e-5)
    # an event past PLD's bounds composes to ∞ (valid, promises nothing); the ledger keeps RDP's answer
    assert math.isinf(accounting.compose_events([(1e-3, 0.01, 100)], 1e-5, "pld"))
    assert math.isfinite(accounting.compose_events([(1e-3, 0.01, 100)], 1e-5, "rdp"))


# -- 3. an absurd ε is refused, and the card never overflows -------------------------------------------------------
def test_absurd_epsilon_is_refused_and_the_card_factor_never_overflows(tmp_path, capsys):
    with pytest.raises(ConfigError, match="promises nothing") as e:
        RunConfig(epsilon=1000)
    assert e.value.field == "epsilon"
    RunConfig(epsilon=100)  # the bound itself is allowed
    rc, err = _main(["train", "--epsilon", 1000, "--runs-dir", tmp_path, "--quiet"], capsys)
    assert rc == 2 and err.startswith("error: epsilon: must be at most 100")
    assert _fmt_factor(1000) == "10^434" and _fmt_factor(math.inf) == "∞" and _fmt_factor(2) == "7.39"
    assert "10^434" in guarantee_sentence({"private": True, "epsilon": 1000.0, "delta": 1e-5, "accountant": "rdp",
                                           "steps": 6}, "image")


# -- 4. calibration targets that cannot be honoured ----------------------------------------------------------------
@pytest.mark.parametrize("target,delta,accountant,match", [
    (math.inf, 1e-5, "rdp", "must be at most 100"),
    (1e-6, 1e-5, "rdp", r"ε = 0\.003501 at σ = .* and ε = 0 at"),  # RDP's conversion floor: ε jumps to 0
    (2.0, 1e-300, "pld", r"ε = inf at σ = .* and ε = 0\.06"),  # below PLD's truncation: ε jumps from ∞
])
def test_calibration_refuses_targets_no_sigma_meets(target, delta, accountant, match):
    with pytest.raises(ConfigError, match=match) as e:
        accounting.calibrate_noise(target, delta, 0.01, 1000, accountant)
    assert e.value.field == "epsilon" and "Fix" in str(e.value)


def test_calibrate_command_prints_the_refusal(capsys):
    rc, err = _main(["calibrate", "--epsilon", "inf", "--sample-rate", "0.01", "--steps", "100"], capsys)
    assert rc == 2 and err.startswith("error: epsilon:")
    rc, err = _main(["calibrate", "--epsilon", "1e-6", "--sample-rate", "0.01", "--steps", "1000"], capsys)
    assert rc == 2 and "no σ gives ε = 1e-06" in err and "Fix:" in err
    rc, _ = _main(["calibrate", "--epsilon", "2", "--sample-rate", "0.01", "--steps", "1000"], capsys)
    assert rc == 0


# -- 5. --config files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ('{"epochs": 3,', "is not valid JSON"),
    ("[1, 2]", "a run config is a JSON object of fields, got a JSON list"),
    ('"digits"', "got a JSON string"),
    ('{"delta": "small"}', "delta: must be a number"),
])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, content, match):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    rc, err = _main(["train", "--config", path, "--runs-dir", tmp_path / "runs"], capsys)
    assert rc == 2 and err.startswith("error: ") and match in err and "Fix:" in err


# -- 6. predict on a decompression bomb ----------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_a_decompression_bomb_before_decoding(tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 74 bytes declaring 4e8 pixels
    rc, err = _main(["predict", "--run", "any", bomb, "--runs-dir", tmp_path], capsys)
    assert rc == 2 and "400,000,000 pixels" in err and "decompression bomb" in err and "Fix:" in err
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DPCoreError, match="not a readable image"):
        read_image_file(str(tmp_path / "notes.png"))
    with pytest.raises(DPCoreError, match="no such file"):
        read_image_file(str(tmp_path / "missing.png"))


# -- 7. folder data sets: links and copies -------------------------------------------------------------------------
def test_a_class_folder_link_that_loops_is_an_error(tmp_path):
    root = _folder(tmp_path / "d")
    os.symlink("d", root / "train" / "c")
    os.symlink("c", root / "train" / "d")
    with pytest.raises(DataError, match="is a symbolic link that loops. Fix: remove the link"):
        load_dataset("folder", root)


def test_a_looping_image_link_is_reported_unreadable_not_a_crash(tmp_path):
    root = _folder(tmp_path / "d")
    os.symlink("y.png", root / "train" / "a" / "x.png")
    os.symlink("x.png", root / "train" / "a" / "y.png")
    s = load_dataset("folder", root)  # listed; decoding names both files (UnreadableImagesError, --skip-unreadable)
    assert sum(p.endswith(("x.png", "y.png")) for p in s.train.paths) == 2


@pytest.mark.parametrize("target,match", [
    ("..", "leads to .*the data folder itself or a folder above it"),
    ("../..", "leads to .*the data folder itself or a folder above it"),
    ("a", "class folders .* lead to the same images"),
    ("../test/a", "class folders .* lead to the same images"),
])
def test_class_folders_that_alias_other_folders_are_refused(tmp_path, target, match):
    root = _folder(tmp_path / "d")
    os.symlink(target, root / "train" / "ALL")
    with pytest.raises(DataError, match=match):
        load_dataset("folder", root)


@pytest.mark.parametrize("copy_to", ["train/b/copy.png", "test/a/copy.png", "test/b/0.png"])
def test_copies_across_classes_or_splits_are_errors_naming_them(tmp_path, copy_to):
    root = _folder(tmp_path / "d")
    shutil.copy(root / "train" / "a" / "0.png", root / copy_to)
    with pytest.raises(DataError, match="byte-identical copies") as e:
        load_dataset("folder", root)
    assert "train/a/0.png" in str(e.value) and copy_to in str(e.value) and "Fix:" in str(e.value)


def test_copies_within_one_class_warn_and_stay_on_one_side(tmp_path):
    root = tmp_path / "d"
    for k, cls in enumerate(("a", "b")):
        for i in range(10):
            _noise(root / cls / f"{i}.png", 100 * k + i)
    for k in range(3):
        shutil.copy(root / "a" / "0.png", root / "a" / f"copy{k}.png")
    with pytest.warns(UserWarning, match="byte-identical images within one class"):
        s = load_dataset("folder", root, seed=0, test_fraction=0.3)
    assert s.split_info["n_duplicate_files"] == 3 and len(s.split_info["duplicate_files"][0]) == 4
    copies = {str(root / "a" / n) for n in ("0.png", "copy0.png", "copy1.png", "copy2.png")}
    assert copies <= set(s.train.paths) or copies <= set(s.test.paths)


def test_blank_placeholder_copies_are_not_refused(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(3):
                p = tmp_path / split / cls / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(p)  # one flat colour: nothing in it identifies anyone
    s = load_dataset("folder", tmp_path)
    assert s.split_info["n_blank_copies"] == 11 and "duplicate_files" not in s.split_info


def test_the_grouped_resplit_leaves_test_copies_of_training_images_out(tmp_path):
    root = _folder(tmp_path / "d")
    s = load_dataset("folder", root)
    moved = type(s)(name=s.name, class_names=s.class_names, train=s.train, test=s.test.subset(range(len(s.test))),
                    train_metadata=s.train_metadata, test_metadata=s.test_metadata, split_info=dict(s.split_info))
    shutil.copy(s.train.paths[0], tmp_path / "copy.png")
    moved.test.paths[0] = str(tmp_path / "copy.png")  # as a re-split by owner can put two copies apart
    with pytest.warns(UserWarning, match="left out of the test split"):
        out = drop_test_copies(moved)
    assert len(out.test) == len(s.test) - 1 and out.split_info["test_copies_of_train_dropped"] == [moved.test.paths[0]]
    assert out.split_info["n_test"] == len(out.test) and drop_test_copies(s) is s


def test_real_chest_xray_still_loads_with_its_30_copy_sets(shared_data, monkeypatch):
    with pytest.warns(UserWarning, match="30 set"):
        s = load_dataset("folder", shared_data / "chest_xray")
    assert (len(s.train), len(s.test)) == (5216, 624)
    groups = s.split_info["duplicate_files"]
    assert len(groups) == 30 and s.split_info["n_duplicate_files"] == 32
    assert all(len({(g.split("/")[0], g.split("/")[1]) for g in group}) == 1 for group in groups)
    calls = []
    real = dpcore.data.base.hashlib.file_digest
    monkeypatch.setattr(dpcore.data.base.hashlib, "file_digest", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset("folder", shared_data / "chest_xray")
        grouped = load_dataset("folder", shared_data / "chest_xray", split="grouped", seed=3)
    assert not calls  # hashed once per process: the second load only stats the files
    # at seed 3 the one copy pair with two patient ids (test NORMAL2-IM-0095 = -0096) lands on both sides
    assert [Path(p).name for p in grouped.split_info["test_copies_of_train_dropped"]] == ["NORMAL2-IM-0095-0001.jpeg"]
    train_d = set(dpcore.data.base.content_digests(grouped.train))
    assert not train_d & set(dpcore.data.base.content_digests(grouped.test))


# -- 8. the Predictions gallery compares content, not counts -------------------------------------------------------
def test_gallery_refuses_a_training_image_copied_over_a_test_file(tmp_path, monkeypatch):
    root = _folder(tmp_path / "d", n=9)
    runs = tmp_path / "runs"
    assert _train(RunStore(runs), dataset="folder", data_dir=str(root), batch_size=4).status == "done"
    shutil.copy(root / "train" / "a" / "0.png", root / "test" / "a" / "0.png")  # same class: counts, labels unchanged
    at = open_page("pages/predictions.py", runs, monkeypatch)
    assert "byte-identical copies" in texts(at) and "test/a/0.png" in texts(at)
    assert not at.get("imgs")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_runs")
    assert _train(RunStore(root), dataset="digits", batch_size=64).status == "done"
    return root


def test_gallery_withholds_a_test_image_whose_pixels_are_a_training_image(digits_run, monkeypatch):
    real = dpcore.data.load_dataset

    def with_copy(*args, **kwargs):  # an array data set whose test split holds a copy of a training image
        s = real(*args, **kwargs)
        j = int(np.flatnonzero(s.train.labels == s.test.labels[0])[0])
        array = s.test.array.copy()
        array[0] = s.train.array[j]
        s.test = ArrayImageList(array, s.test.labels, s.test.name, _index=s.test.index)
        return s

    monkeypatch.setattr(dpcore.data, "load_dataset", with_copy)
    monkeypatch.setattr(dpcore.analysis.run_review, "load_dataset", with_copy)
    at = open_page("pages/predictions.py", digits_run, monkeypatch)
    warning = " ".join(w.value for w in at.warning)
    assert "1 test image(s) are byte-identical to images this run trained on" in warning
    assert "digits[" in warning


# -- 9. non-UTF-8 file names ---------------------------------------------------------------------------------------
def test_non_utf8_file_names_load_train_and_backfill(tmp_path, monkeypatch, capsys):
    root = _folder(tmp_path / "d")
    odd = os.fsencode(root / "train" / "a") + b"/\xff.png"
    _noise(odd, 999)
    s = load_dataset("folder", root)
    assert os.fsdecode(odd) in s.train.paths
    runs = tmp_path / "runs"
    monkeypatch.setenv("DPCORE_LEDGER", str(tmp_path / "first.sqlite"))
    assert _train(RunStore(runs), dataset="folder", data_dir=str(root), batch_size=4).status == "done"
    monkeypatch.setenv("DPCORE_LEDGER", str(tmp_path / "fresh.sqlite"))  # as if the run predates this ledger
    rc = cli.main(["ledger", "--runs-dir", str(runs), "--backfill"])
    out = capsys.readouterr().out
    assert rc == 0 and "backfilled 1 run(s)" in out
    (ds,) = Ledger().datasets()
    assert ds["n_images"] == len(s.train) + len(s.test)


# -- 10. a void data set has no budget left ------------------------------------------------------------------------
def test_a_void_data_set_reads_none_left_never_infinity(tmp_path, fresh_ledger, capsys):
    _train(RunStore(tmp_path), dataset="digits", epsilon=None, batch_size=128)
    Ledger().set_budget("digits", 4)
    assert cli.main(["ledger", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out.strip().splitlines()[-1].removeprefix("ledger ")).values()
    assert row["void"] is True and row["remaining"] is None and "remaining none (void)" in out
    assert "remaining ∞" not in out


def test_an_rdp_infinity_from_replace_one_runs_is_not_called_void():
    n = 3
    exposure = Exposure(image_ids=np.arange(n), epsilon=np.full(n, 1.5), epsilon_rdp=np.full(n, math.inf),
                        epsilon_pld=np.full(n, 1.5), runs_per_image=np.ones(n, int), evaluated=np.zeros(n, bool),
                        delta=1e-5, void_runs=[])
    s = DatasetSummary("k", "x", n, n, [], exposure, 4.0, None)
    assert _remaining(s, s.epsilon_of("rdp"), "rdp").startswith("n/a under RDP")
    assert _remaining(s, s.epsilon_of("pld"), "pld") == "2.5"


def test_the_accounting_page_names_a_plan_past_the_bounds_instead_of_crashing(tmp_path, monkeypatch):
    from apptest_support import open_page

    at = open_page("pages/accounting.py", tmp_path / "runs", monkeypatch)
    at.number_input(key="ac_n").set_value(10_000_000)
    at.number_input(key="ac_batch").set_value(1)
    at.run()
    assert not at.exception
    assert any("1,000,000" in e.value and "Fix" in e.value for e in at.error), [e.value for e in at.error]
