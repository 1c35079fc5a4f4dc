"""Secret randomness for the DP mechanism: the Gaussian noise and the Poisson sampling masks.

DP-SGD is private only if the noise and the sampling cannot be replayed. The user's seed (written in
config.json and on the card) fixes the initialisation, the augmentations and the splits; it must not
reach these two draws, or anyone holding the card could rerun the training without one image and
compare weights exactly. So both generators here are seeded from the operating system's CSPRNG
(`secrets`, i.e. ``os.urandom``), reseeded with fresh OS entropy after every noisy step, and their
seeds are never stored, logged or returned.

What this is not: torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are not
cryptographic, and the noise is the plain floating-point Gaussian, as in Opacus without
``secure_mode`` (Opacus' secure mode needs torchcsprng, which is not maintained for current torch).
Reseeding each step from the OS bounds what a recovered generator state could reveal to one step.

``insecure_seed`` (the ``--insecure-reproducible-noise`` debug mode) derives both seeds from the user's
seed instead: runs are then replayable and carry NO DP guarantee (the card says so first).
"""
from __future__ import annotations

import hashlib
import secrets

import torch


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
            self.noise.manual_seed(secrets.randbits(63))
            self.sampling.manual_seed(secrets.randbits(63))
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
