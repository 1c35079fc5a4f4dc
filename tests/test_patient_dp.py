"""Patient-level DP-SGD (``privacy_unit = "patient"``): patients are Poisson-sampled, each patient's mean
gradient is clipped to C as one vector (on every gradient path, across physical batches), the accountant runs
over patients, and the card, ledger and words say so."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dpcore.privacy import accounting
from dpcore.training import trainer
from dpcore.config import RunConfig
from dpcore.errors import ConfigError
from dpcore.privacy.ledger import RecordedUse
from dpcore.privacy.units import Chunk, Oversized, UnitPlan

C = 0.01  # small: every patient's gradient is clipped, so a wrong grouping cannot pass by luck


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _data(sizes, shape=(3, 6, 6), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    perm = np.random.default_rng(seed).permutation(n)  # a patient's images are not contiguous in the data
    return x[perm], y[perm], owner[perm]


def _reference(model: nn.Module, x, y, owner, clip: float):
    """Σ_p clip_C(mean over patient p's images of ∇ℓ), by plain per-patient autograd in float64."""
    ref = copy.deepcopy(model).double()
    params = [p for p in ref.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for u in np.unique(owner):
        rows = torch.as_tensor(np.flatnonzero(owner == u))
        loss = nn.functional.cross_entropy(ref(x[rows].double()), y[rows])  # mean over the patient's images
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        coef = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += coef * g
    return total


def _rel(got, ref) -> float:
    """Relative L2 distance of two gradient lists (float32 weight updates resolve ~1e-7 absolute)."""
    num = math.sqrt(sum(float((g.double() - r).pow(2).sum()) for g, r in zip(got, ref)))
    return num / math.sqrt(sum(float(r.pow(2).sum()) for r in ref))


def _one_step(model, x, y, owner, *, mode, monkeypatch, physical_batch, augmult=1, head_only=False, clip=C):
    """One patient-level DP-SGD step with σ = 0, q = 1 and SGD(lr=1): the update is −Σ_p clip(ḡ_p) / P."""
    monkeypatch.setattr(trainer.grad_modes, "choose_grad_sample_mode", lambda *a, **k: mode)
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=1.0, privacy_unit="patient", optimizer="sgd",
                    lr=1.0, momentum=0.0, clip_norm=clip, augmult=augmult, augment="none", batch_size=1, epochs=1,
                    device="cpu", scope="head" if head_only else "full")
    before = [p.detach().clone() for p in model.parameters()]
    plan = UnitPlan(owner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained, info = trainer.fit_arrays(cfg, model, x, y, spending=RecordedUse("patient-test"),
                                           mechanism=(0.0, 1.0, 1), physical_batch=physical_batch,
                                           head_only=head_only, units=plan)
    assert info["steps"] == 1 and info["expected_batch_size"] == plan.n_units
    return [(b - a.detach()) * plan.n_units for b, a in zip(before, trained.parameters())], trained


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bk"])
@pytest.mark.parametrize("augmult", [1, 3])
def test_each_patient_is_clipped_as_one_on_every_path(mode, augmult, monkeypatch):
    # patients of 1, 2, 3 and 7 images; a physical batch of 6 rows: the 7-image patient (and at K = 3 the
    # 2- and 3-image ones too) spans several physical batches, accumulated exactly before clipping.
    sizes = [1, 2, 3, 7, 1, 2]
    x, y, owner = _data(sizes)
    model = _conv_model()
    ref = _reference(model, x, y, owner, C)  # K identical views (augment none): their mean is the image's
    per_image = _reference(model, x, y, np.arange(len(y)), C)
    got, _ = _one_step(model, x, y, owner, mode=mode, monkeypatch=monkeypatch, physical_batch=6, augmult=augmult)
    assert _rel(got, ref) < 1e-3, (mode, augmult)
    assert _rel(got, per_image) > 0.05  # not the image-level answer: clipping images one by one gives another sum


def test_the_head_on_cached_features_clips_per_patient(monkeypatch):
    sizes = [4, 1, 9, 2]
    x, y, owner = _data(sizes, shape=(5,))
    head = nn.Linear(5, 3)
    ref = _reference(head, x, y, owner, C)
    got, _ = _one_step(head, x, y, owner, mode="hooks", monkeypatch=monkeypatch, physical_batch=4, head_only=True)
    assert _rel(got, ref) < 1e-3


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_one_patients_whole_contribution_is_at_most_c_with_augmented_views(mode, monkeypatch):
    """30 images × 4 random augmented views of ONE patient, in physical batches of 16 rows: the step moves the
    weights by exactly one clipped gradient, of norm ≤ C (= C here: the gradient is far larger than C)."""
    x, y, owner = _data([30], shape=(3, 8, 8))
    model = _conv_model(3)
    monkeypatch.setattr(trainer.augment, "resolve_policy",
                        lambda *a, **k: trainer.augment.make_policy("natural", "cifar10"))
    got, _ = _one_step(model, x, y, owner, mode=mode, monkeypatch=monkeypatch, physical_batch=16, augmult=4)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in got))
    assert norm <= C * (1 + 1e-4) and norm > 0.99 * C


def test_unit_plan_packs_patients_by_size_and_splits_the_oversized():
    owner = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 4])
    plan = UnitPlan(owner)
    assert plan.n_units == 5 and plan.largest == 7 and list(plan.sizes) == [1, 2, 3, 7, 1]
    chunks = plan.chunks(np.arange(5), budget_rows=8, views=2)  # 4 images a physical batch
    rows = []
    for c in chunks:
        if isinstance(c, Chunk):
            assert len(c.rows) == c.n * c.k and c.n * c.k * 2 <= 8
            assert all(len(set(owner[c.rows[i * c.k:(i + 1) * c.k]])) == 1 for i in range(c.n))  # unit-major
            rows += list(c.rows)
        else:
            assert isinstance(c, Oversized) and c.k == 7 and all(len(p) <= 4 for p in c.pieces)
            rows += [r for p in c.pieces for r in p]
    assert sorted(rows) == list(range(len(owner)))  # every image of every sampled patient, once
    with pytest.raises(ConfigError, match="max_physical_batch_size"):
        plan.chunks(np.arange(5), budget_rows=1, views=2)


def test_the_sampler_draws_patients_at_rate_q_whatever_their_size():
    sizes = np.array([30] * 50 + [1] * 150)
    plan = UnitPlan(np.repeat(np.arange(200), sizes))
    g = torch.Generator().manual_seed(0)
    q, draws = 0.1, 400
    counts = np.zeros(200)
    for _ in range(draws):
        counts[plan.sample(q, g)] += 1
    rate = counts / draws
    # each patient independently with probability q: the big ones no more often than the small ones
    assert abs(rate.mean() - q) < 0.005
    assert abs(rate[:50].mean() - rate[50:].mean()) < 0.01
    per_draw_images = [sizes[plan.sample(q, g)].sum() for _ in range(200)]
    assert abs(np.mean(per_draw_images) - q * sizes.sum()) < 0.1 * q * sizes.sum()  # images: q·n on average


def test_a_data_set_without_patients_refuses_patient_level_dp(tmp_path):
    from dpcore.store.runs import RunStore

    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", epsilon=2.0, privacy_unit="patient", epochs=1,
                    device="cpu")
    with pytest.raises(ConfigError, match="names no patient") as err:
        trainer.train(cfg, RunStore(tmp_path / "runs"))
    assert "--privacy-unit image" in str(err.value)


def test_config_refuses_a_non_private_patient_run_and_unknown_units():
    with pytest.raises(ConfigError, match="protects no one"):
        RunConfig(epsilon=None, privacy_unit="patient")
    with pytest.raises(ConfigError, match="privacy unit"):
        RunConfig(privacy_unit="family")


def test_replace_one_epsilon_is_dp_accountings():
    import dp_accounting
    from dp_accounting import pld

    acc = pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                            value_discretization_interval=1e-4)
    acc.compose(accounting.dp_sgd_event(1.1, 0.02, 300))
    assert accounting.epsilon_replace_one(1.1, 0.02, 300, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    assert accounting.epsilon_replace_one(1.1, 0.02, 300, 1e-5) > accounting.epsilon(1.1, 0.02, 300, 1e-5, "pld")


def _kermany_folder(root):
    """40 patients of 1-4 images (one of 13), Kermany names; a few also have an official test image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for p in range(1, 41):
        cls = "PNEUMONIA" if p % 2 else "NORMAL"
        for i in range(1 + p % 4 + (9 if p == 3 else 0)):
            name = f"person{p}_virus_{i}.png" if cls == "PNEUMONIA" else f"IM-{p:04d}-{i:04d}.png"
            for split in ("train",) + (("test",) if i == 0 and p % 3 == 0 else ()):
                d = root / split / cls
                d.mkdir(parents=True, exist_ok=True)
                arr = (rng.random((12, 12, 3)) * (120 if cls == "NORMAL" else 255)).astype("uint8")
                Image.fromarray(arr).save(d / name)
    return root


def test_a_patient_level_run_states_and_records_a_per_patient_guarantee(tmp_path, fresh_ledger):
    from dpcore.data import load_dataset
    from dpcore.data.groups import groups_of
    from dpcore.privacy.ledger import Ledger
    from dpcore.store.runs import RunStore

    root = _kermany_folder(tmp_path / "xr")
    cfg = RunConfig(dataset="folder", data_dir=str(root), backbone="tiny_cnn", epsilon=4.0, delta=1e-3, epochs=2,
                    batch_size=8, max_physical_batch_size=8, privacy_unit="patient", split="grouped", image_size=16,
                    device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        card = trainer.train(cfg, RunStore(tmp_path / "runs")).card
    splits = load_dataset("folder", root, split="grouped", seed=0)
    train_owners = groups_of(splits.train, splits.train_metadata, "folder")
    test_owners = groups_of(splits.test, splits.test_metadata, "folder")
    assert not train_owners.shared_with(test_owners)  # no patient in both splits
    P = train_owners.n_groups
    p = card["privacy"]
    assert p["unit"] == "patient" and p["n_units"] == P and card["dataset"]["n_train"] == len(splits.train)
    q = 1 / math.ceil(P / 8)  # the rate is over patients, not images
    assert p["sample_rate"] == pytest.approx(q) and p["steps"] == 2 * math.ceil(P / 8)
    assert p["expected_batch_size"] == pytest.approx(P * q)
    # the card's ε is dp-accounting's for the patient-level (σ, q, T, δ)
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(p["noise_multiplier"])), p["steps"])
    assert card["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    assert "per patient" in card["guarantee"] and "with all of their images" in card["guarantee"]
    assert "one patient" in p["adjacency"] and card["privacy_facts"]["unit"] == "patient"
    assert p["per_image"]["epsilon_replace_one"] > card["epsilon"]
    assert "group" not in p  # group privacy is the image-level runs' caveat

    ledger = Ledger()
    entry = ledger.entry(card["run_id"])
    assert entry.unit == "patient" and entry.per_unit
    owners = ledger.owners_of(card["run_id"])
    assert len(owners) == len(splits.train)
    counts = {o: list(owners.values()).count(o) for o in set(owners.values())}
    multi = [i for i, o in owners.items() if counts[o] > 1]
    single = [i for i, o in owners.items() if counts[o] == 1]
    ex = ledger.exposure_of(multi + single, 1e-3)
    by_id = dict(zip(ex.image_ids.tolist(), ex.epsilon.tolist()))
    sigma, steps = p["noise_multiplier"], p["steps"]
    assert by_id[multi[0]] == pytest.approx(accounting.epsilon_replace_one(sigma, q, steps, 1e-3), rel=1e-6)
    add_remove = min(accounting.epsilon(sigma, q, steps, 1e-3, "rdp"), accounting.epsilon(sigma, q, steps, 1e-3, "pld"))
    assert by_id[single[0]] == pytest.approx(add_remove, rel=1e-6)
    per_owner = ledger.owner_exposure(entry.dataset_key)
    assert len(per_owner.owners) == P and per_owner.epsilon.max() == pytest.approx(add_remove, rel=1e-6)

    # an image-level run on the same patients: a patient with k ≥ 2 images now also carries that run's group bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_card = trainer.train(cfg.replace(privacy_unit="image", batch_size=16), RunStore(tmp_path / "runs")).card
    assert image_card["privacy"]["unit"] == "image" and image_card["privacy"]["group"]["largest"] == train_owners.largest > 1
    after = ledger.owner_exposure(entry.dataset_key)
    k = int(after.images.max())
    from dpcore.privacy.group_privacy import group_guarantee

    ge, gd = group_guarantee(image_card["epsilon"], 1e-3, k)
    worst = int(np.argmax(after.images))
    assert after.epsilon[worst] == pytest.approx(add_remove + ge, rel=1e-6)
    assert after.delta[worst] == pytest.approx(1e-3 + gd, rel=1e-6)


def test_the_audit_of_a_patient_level_run_puts_whole_patients_in_or_out(monkeypatch):
    """Membership is per patient: each model trains patient-level DP-SGD on all images of its member patients
    (none of the others), and the bound is over patients."""
    from dpcore.analysis import audit

    sizes = [1 + (i % 4) for i in range(60)]
    x, y, owner = _data(sizes, shape=(6,), seed=5)
    seen = []
    real = trainer.fit_arrays

    def spy(config, model, tx, ty, **kw):
        seen.append((len(ty), kw["units"]))
        return real(config, model, tx, ty, **kw)

    monkeypatch.setattr(trainer, "fit_arrays", spy)
    q, steps = 0.25, 8
    sigma = accounting.calibrate_noise(2.0, 1e-3, q, steps, "rdp")
    cfg = RunConfig(dataset="digits", backbone="tiny_cnn", scope="head", device="cpu", epsilon=2.0, delta=1e-3,
                    privacy_unit="patient", batch_size=10, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = audit.audit_arrays(x, y, lambda seed: nn.Linear(6, 3), cfg, audit.AuditSettings(shadows=2, seed=0),
                                 spending=RecordedUse("audit-patients"), mechanism=(sigma, q, steps),
                                 physical_batch=64, head_only=True, owners=owner.astype(str))
    assert out["candidate_unit"] == "patient" and out["n_candidates"] == 60 and out["n_candidate_images"] == len(y)
    target_images, target_units = seen[0]
    member_units = target_units.n_units
    assert member_units == out["n_members"]  # the target trained on exactly its member patients ...
    names, counts = np.unique(owner.astype(str), return_counts=True)
    member = np.random.default_rng([0, 0]).random(60) < 0.5  # the audit's own draw, over patients
    assert sorted(target_units.sizes) == sorted(counts[member])  # ... with all of their images
    assert target_images == counts[member].sum()
    assert all(info["steps"] == steps and info["sample_rate"] == q for info in out["models"])
    assert out["target"]["epsilon"] == pytest.approx(accounting.epsilon(sigma, q, steps, 1e-3, "rdp"))
