"""Secret randomness for the DP mechanism: the Gaussian noise and the Poisson sampling masks.

DP-SGD is private only if the noise and the sampling cannot be replayed. The user's seed (written in
config.json and on the card) fixes the initialisation, the augmentations and the splits; it must not
reach these two draws, or anyone holding the card could rerun the training without one image and
compare weights exactly. So both generators here are seeded from the operating system's CSPRNG
(`secrets`, i.e. ``os.urandom``), reseeded with fresh OS entropy after every noisy step, and their
seeds are never stored, logged or returned.

A seed is not enough on the CPU: torch's Mersenne Twister keeps only the low 32 bits of ``manual_seed``
(seeds 5 and 2³² + 5 draw the same numbers), so a seeded CPU generator is one of 2³² streams, few enough to
try them all against a released update. A CPU generator here is therefore given its whole state — the 624
words of MT19937, 19,968 bits — from the OS (`fill_from_os`), checked to round-trip before any draw; a CUDA
generator (Philox) takes a 64-bit seed, which it keeps whole.

What this is not: torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are not
cryptographic, and the noise is the plain floating-point Gaussian, as in Opacus without
``secure_mode`` (Opacus' secure mode needs torchcsprng, which is not maintained for current torch).
Reseeding each step from the OS bounds what a recovered generator state could reveal to one step.

``insecure_seed`` (the ``--insecure-reproducible-noise`` debug mode) derives both seeds from the user's
seed instead: runs are then replayable and carry NO DP guarantee (the card says so first).
"""
from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
import torch

# torch's CPU generator state (aten CPUGeneratorImpl, legacy layout): uint64 initial seed, int32 left, int32 seeded,
# uint64 next, 624 × uint64 words (each a 32-bit MT19937 word), then the cached normal samples and their flags.
_MT_STATE_BYTES = 5056
_MT_WORDS, _MT_WORDS_AT = 624, 24
_MT_LEFT_AT, _MT_NEXT_AT = 8, 16
_NORMAL_VALID_AT, _FLOAT_NORMAL_VALID_AT = 5040, 5052


def fill_from_os(gen: torch.Generator) -> None:
    """Give a CPU generator a whole MT19937 state from ``os.urandom`` (a CUDA one: a 64-bit seed).

    Fails closed: if this torch lays its generator state out differently, no draw is made from a generator
    that might hold only 32 bits of entropy."""
    if gen.device.type != "cpu":
        gen.manual_seed(secrets.randbits(64))
        return
    state = gen.get_state().clone()
    if state.numel() != _MT_STATE_BYTES or state.dtype != torch.uint8:
        raise RuntimeError(f"torch's CPU generator state has {state.numel()} bytes, not {_MT_STATE_BYTES}: the DP "
                           "noise cannot be given a full secret state, so no noisy step is taken. Fix: use the "
                           "pinned torch version (requirements.txt)")
    words = np.frombuffer(os.urandom(4 * _MT_WORDS), dtype=np.uint32).astype(np.uint64)
    raw = state.numpy()
    raw[:8] = 0  # the "initial seed" a caller could read back: none
    raw[_MT_LEFT_AT:_MT_LEFT_AT + 4] = np.array([1], dtype=np.int32).view(np.uint8)  # twist before the first draw
    raw[_MT_NEXT_AT:_MT_NEXT_AT + 8] = 0
    raw[_MT_WORDS_AT:_MT_WORDS_AT + 8 * _MT_WORDS] = words.view(np.uint8)
    raw[_NORMAL_VALID_AT:_NORMAL_VALID_AT + 4] = 0  # no cached Gaussian from an earlier state
    raw[_FLOAT_NORMAL_VALID_AT] = 0
    gen.set_state(state)
    back = np.frombuffer(gen.get_state().numpy()[_MT_WORDS_AT:_MT_WORDS_AT + 8 * _MT_WORDS].tobytes(),
                         dtype=np.uint64)
    if not np.array_equal(back, words):
        raise RuntimeError("torch did not keep the secret generator state it was given: no noisy step is taken. "
                           "Fix: use the pinned torch version (requirements.txt)")


def _derived_seed(seed: int, what: str, counter: int) -> int:
    digest = hashlib.sha256(f"dpcore-insecure:{seed}:{what}:{counter}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SecretRandomness:
    """The noise generator (on the parameters' device) and the sampling generator (CPU), kept apart
    from torch's global generator (which the user's seed drives)."""

    def __init__(self, device: torch.device | str = "cpu", insecure_seed: int | None = None):
        self.device = torch.device(device)
        self.insecure_seed = insecure_seed
        self.noise = torch.Generator(device=self.device)
        self.sampling = torch.Generator(device="cpu")
        self._count = 0
        self.reseed()

    @property
    def secure(self) -> bool:
        return self.insecure_seed is None

    def reseed(self) -> None:
        """Fresh OS entropy for the next draws (or the next derived seeds in insecure mode)."""
        if self.insecure_seed is None:
            fill_from_os(self.noise)
            fill_from_os(self.sampling)
        else:
            self.noise.manual_seed(_derived_seed(self.insecure_seed, "noise", self._count))
            self.sampling.manual_seed(_derived_seed(self.insecure_seed, "sampling", self._count))
        self._count += 1

    def attach(self, optimizer, loader) -> None:
        """Route the DP optimizer's noise and the Poisson loader's masks through these generators.

        Opacus' ``make_private`` gives its Poisson sampler the engine's secure generator only in
        ``secure_mode`` (otherwise torch's global one, i.e. the user's seed), so it is set here.
        """
        if not hasattr(optimizer, "generator"):
            raise TypeError(f"{type(optimizer).__name__} is not an Opacus DP optimizer (no noise generator)")
        optimizer.generator = self.noise
        if loader is None:  # the trainer samples itself (patients: dpcore.privacy.units), from self.sampling
            return
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is None or not hasattr(sampler, "generator"):
            raise TypeError("the loader is not a Poisson (DPDataLoader) loader: no sampling generator to set")
        optimizer.generator = self.noise
        sampler.generator = self.sampling
        if hasattr(loader, "generator"):
            loader.generator = self.sampling

    def __repr__(self) -> str:  # never show a seed
        return f"SecretRandomness(device={self.device}, secure={self.secure})"

    def __getstate__(self):  # a checkpoint or a pickle must not carry the generator states
        raise TypeError("the DP noise/sampling randomness is secret and is never serialised")


__all__ = ["SecretRandomness"]
