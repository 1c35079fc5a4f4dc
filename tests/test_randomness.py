"""The noise and sampling generators hold a whole secret state, not a 32-bit seed (`dpcore.privacy.randomness`)."""
from __future__ import annotations

import numpy as np
import torch

from dpcore.privacy.randomness import SecretRandomness, fill_from_os


def _words(gen: torch.Generator) -> np.ndarray:
    return np.frombuffer(gen.get_state().numpy()[24:24 + 624 * 8].tobytes(), dtype=np.uint64)


def test_a_seed_is_32_bits_on_the_cpu_which_is_why_the_state_is_filled():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5 + 2 ** 32)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))  # torch's own truncation


def test_the_filled_state_is_the_os_entropy_and_nothing_of_it_can_be_read_back_as_a_seed():
    g, h = torch.Generator(), torch.Generator()
    fill_from_os(g)
    fill_from_os(h)
    wg, wh = _words(g), _words(h)
    assert (wg < 2 ** 32).all() and len(set(wg.tolist())) > 600  # 624 independent 32-bit words
    assert not np.array_equal(wg, wh)
    assert g.initial_seed() == 0  # nothing to read back
    seeded = torch.Generator().manual_seed(int(wg[0]))  # a seed's state: the MT initialisation from word 0
    assert not np.array_equal(_words(seeded)[1:], wg[1:])
    saved = g.get_state().clone()
    first = torch.randn(8, generator=g)
    g.set_state(saved)
    assert torch.equal(first, torch.randn(8, generator=g))  # a valid state: it draws deterministically from it


def test_draws_from_a_filled_state_are_standard_normal_and_uniform():
    r = SecretRandomness()
    z = torch.randn(200_000, generator=r.noise).double()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    u = torch.rand(200_000, generator=r.sampling).double()
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert float((counts - 20_000).abs().max()) < 800  # ≈ 5.6 sd of a bin count
    before = _words(r.noise).copy()
    r.reseed()  # every noisy step: a fresh whole state
    assert not np.array_equal(before, _words(r.noise))


def test_the_debug_mode_still_replays_from_the_users_seed():
    a, b = SecretRandomness(insecure_seed=3), SecretRandomness(insecure_seed=3)
    assert torch.equal(torch.randn(5, generator=a.noise), torch.randn(5, generator=b.noise))
