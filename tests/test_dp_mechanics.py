"""DP-SGD as the trainer sets it up: clipping bound, noise scale, Poisson sampling, for each
per-example clipping mode the trainer can pick (Opacus hooks, book-keeping)."""
import math

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import TensorDataset

from dpcore.training.trainer import privatize, steps_per_epoch


def _toy(n=64, d=20, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 5  # large inputs: most per-example gradients exceed C
    y = torch.randint(0, k, (n,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, k))
    return TensorDataset(x, y), model


def _per_example_grads(model, x, y):
    """Reference per-example gradients by plain autograd, one example at a time."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    return torch.stack(out)


MODES = ["hooks", "bk"]


@pytest.mark.parametrize("mode", MODES)
def test_every_per_example_gradient_is_clipped_to_C(mode):
    data, model = _toy()
    clip = 0.1
    reference = _per_example_grads(model, *data.tensors)  # before wrapping; same weights
    norms = reference.norm(dim=1)
    assert (norms > clip).sum() > 10, "test needs gradients above C"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, dp_model, dp_opt, loader, criterion = privatize(model, opt, data, batch_size=16, noise_multiplier=0.0,
                                                            clip_norm=clip, grad_sample_mode=mode)
    x, y = data.tensors  # one batch holding every example, so each one's contribution is checked
    dp_opt.zero_grad()
    criterion(dp_model(x), y).backward()
    if mode == "hooks":  # what Opacus holds per example, before clipping, is the autograd gradient
        grad_sample = torch.cat([p.grad_sample.flatten(1) for p in dp_model.parameters()], dim=1)
        torch.testing.assert_close(grad_sample, reference, rtol=1e-4, atol=1e-6)
    else:  # book-keeping never forms them; its per-example norms must be theirs
        torch.testing.assert_close(dp_model.last_norms, norms, rtol=1e-4, atol=1e-6)
    assert dp_opt.pre_step()
    summed = torch.cat([p.grad.flatten() for p in dp_model.parameters()]) * dp_opt.expected_batch_size
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = reference * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()
    torch.testing.assert_close(summed, clipped.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_single_example_update_has_norm_at_most_C(mode):
    data, model = _toy(n=32)
    clip = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, dp_model, dp_opt, _, criterion = privatize(model, opt, data, batch_size=8, noise_multiplier=0.0,
                                                  clip_norm=clip, grad_sample_mode=mode)
    x, y = data.tensors
    for i in range(len(x)):
        dp_opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(dp_model(x[i:i + 1]), y[i:i + 1]) * 1000
        if mode == "hooks":
            loss.backward()
        else:  # the scaled loss directly (the criterion wrapper computes the plain one)
            dp_model.backward_and_clip(loss)
        dp_opt.pre_step()
        g = torch.cat([p.grad.flatten() for p in dp_model.parameters()]) * dp_opt.expected_batch_size
        assert g.norm() <= clip * (1 + 1e-5)
        assert g.norm() >= clip * (1 - 1e-3)  # the scaled loss makes every gradient exceed C


@pytest.mark.parametrize("mode", MODES)
def test_noise_has_std_sigma_times_C(mode):
    torch.manual_seed(0)
    data = TensorDataset(torch.zeros(100, 200), torch.zeros(100, dtype=torch.long))
    model = torch.nn.Linear(200, 50)  # 10,050 parameters: a tight estimate of the std
    sigma, clip = 1.7, 0.3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _, dp_model, dp_opt, _, criterion = privatize(model, opt, data, batch_size=20, noise_multiplier=sigma,
                                                  clip_norm=clip, grad_sample_mode=mode)
    x, y = data.tensors[0][:20], data.tensors[1][:20]
    dp_opt.zero_grad()
    criterion(dp_model(x) * 0.0, y).backward()  # zero gradient: what reaches the optimizer is the noise alone
    dp_opt.pre_step()
    noise = torch.cat([p.grad.flatten() for p in dp_model.parameters()]) * dp_opt.expected_batch_size
    assert abs(noise.mean().item()) < 4 * sigma * clip / math.sqrt(noise.numel())
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)


@pytest.mark.parametrize("mode", MODES)
def test_poisson_sampling_is_in_use(mode):
    data, model = _toy(n=200)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, _, dp_opt, loader, _ = privatize(model, opt, data, batch_size=20, noise_multiplier=1.0, clip_norm=1.0,
                                             grad_sample_mode=mode)
    assert dp_opt.expected_batch_size == 20
    assert isinstance(loader, DPDataLoader)
    assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)
    assert loader.sample_rate == pytest.approx(1 / steps_per_epoch(200, 20))
    sizes = [len(y) for _ in range(20) for _, y in loader]
    assert len(set(sizes)) > 5  # batch sizes vary, as independent per-example sampling implies
    assert np.mean(sizes) == pytest.approx(20, rel=0.1)
