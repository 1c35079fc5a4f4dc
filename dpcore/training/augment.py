"""Batched, seeded image augmentation for augmentation multiplicity (De et al. 2022).

Every augmentation here is one random affine map per image (random-resized crop, rotation, flips,
90° turns, translation), applied to a whole batch (N, C, H, W) in a single ``grid_sample`` on the
batch's device: no PIL, no per-image Python. Random parameters come from torch's RNG (the trainer
seeds it with the run's seed), or from a ``torch.Generator`` when one is given.

Policies (``augment`` in the run config):

* ``xray``: chest X-rays. Random-resized crop of 85–100 % of the area (aspect 0.9–1.1), rotation
  within ±10°, horizontal flip (debatable for X-rays because of the heart's side; kept, as in most
  published CXR recipes); never a vertical flip.
* ``dermoscopy``: skin-lesion photographs have no canonical orientation: horizontal and vertical
  flips, 90° turns, random-resized crop of 75–100 % of the area (aspect 3/4–4/3).
* ``natural``: a random crop-and-translate of up to 1/8 of the side with reflection at the borders
  (the 4-pixel pad-and-crop of CIFAR at 32 px); a horizontal flip only for CIFAR-10 (digits must not
  be mirrored).
* ``none``: no augmentation.
* ``auto``: picked from the data set (see ``resolve_policy``): chest X-ray folders and PneumoniaMNIST →
  xray; HAM10000 / DermaMNIST / dermoscopy folders → dermoscopy; digits, CIFAR-10 and anything else →
  natural. With ``augmult = 1`` "auto" means no augmentation (so runs that ask for nothing get
  exactly the un-augmented images); name a policy to augment a single view.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from dpcore.config import AUGMENTS, MAX_AUGMULT  # noqa: F401 - the config's words, implemented here

_XRAY_WORDS = ("xray", "x-ray", "x_ray", "chest", "pneumonia", "cxr")
_DERM_WORDS = ("ham10000", "derm", "isic", "skin", "lesion")


@dataclass(frozen=True)
class Policy:
    """One augmentation policy: the ranges each random affine map is drawn from."""

    name: str
    scale: tuple[float, float] = (1.0, 1.0)  # area fraction kept by the random-resized crop
    ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio of the crop (drawn log-uniformly)
    rotate_deg: float = 0.0  # uniform in ±rotate_deg
    rot90: bool = False  # a random multiple of 90°
    hflip: bool = False
    vflip: bool = False
    translate: float = 0.0  # uniform shift of up to this fraction of the side, in x and y
    padding_mode: str = "reflection"

    @property
    def active(self) -> bool:
        return self.name != "none"

    def describe(self) -> dict:
        return asdict(self)


NONE = Policy("none")


def make_policy(name: str, dataset: str = "") -> Policy:
    """The named policy (not "auto"); ``dataset`` decides only whether "natural" flips (CIFAR-10 only)."""
    if name == "none":
        return NONE
    if name == "xray":
        return Policy("xray", scale=(0.85, 1.0), ratio=(0.9, 1.1), rotate_deg=10.0, hflip=True)
    if name == "dermoscopy":
        return Policy("dermoscopy", scale=(0.75, 1.0), ratio=(3 / 4, 4 / 3), rot90=True, hflip=True, vflip=True)
    if name == "natural":
        return Policy("natural", translate=0.125, hflip=dataset == "cifar10")
    raise ValueError(f"unknown augmentation {name!r}; use one of {AUGMENTS}")


def auto_policy_name(dataset: str, data_dir: str | None = None) -> str:
    """What ``augment = "auto"`` means for a data set (folders are recognised by their path's words)."""
    if dataset == "pneumoniamnist":
        return "xray"
    if dataset in ("ham10000", "dermamnist"):
        return "dermoscopy"
    if dataset == "folder" and data_dir:
        words = str(data_dir).lower()
        if any(w in words for w in _XRAY_WORDS):
            return "xray"
        if any(w in words for w in _DERM_WORDS):
            return "dermoscopy"
    return "natural"


def resolve_policy(augment: str, augmult: int, dataset: str, data_dir: str | None = None) -> Policy:
    """The policy a run uses: "auto" with ``augmult = 1`` is none, otherwise picked from the data set."""
    if augment == "auto":
        if augmult <= 1:
            return NONE
        augment = auto_policy_name(dataset, data_dir)
    return make_policy(augment, dataset)


def expand_views(x: torch.Tensor, k: int) -> torch.Tensor:
    """(n, ...) → (n·k, ...), example-major: row i·k + j is (a copy of) example i, for view j."""
    return x if k == 1 else x.repeat_interleave(k, dim=0)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def random_affine(n: int, policy: Policy, height: int, width: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, 3) ``affine_grid`` matrices (output → input, normalised coordinates) drawn from ``policy``."""
    g = generator
    # crop size as fractions of the side: area s, aspect r = w/h
    s = _uniform(n, *policy.scale, g)
    log_r = _uniform(n, math.log(policy.ratio[0]), math.log(policy.ratio[1]), g)
    r = torch.exp(log_r)
    cw = torch.sqrt(s * r).clamp(max=1.0)
    ch = torch.sqrt(s / r).clamp(max=1.0)
    # crop centre anywhere that keeps the crop inside the image, plus a translation
    cx = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * (1 - cw)
    cy = (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * (1 - ch)
    if policy.translate > 0:
        cx = cx + _uniform(n, -2 * policy.translate, 2 * policy.translate, g)
        cy = cy + _uniform(n, -2 * policy.translate, 2 * policy.translate, g)
    angle = torch.zeros(n, dtype=torch.float64)
    if policy.rotate_deg > 0:
        angle = angle + _uniform(n, -policy.rotate_deg, policy.rotate_deg, g) * math.pi / 180
    if policy.rot90:
        angle = angle + torch.randint(0, 4, (n,), generator=g).double() * (math.pi / 2)
    fx = torch.ones(n, dtype=torch.float64)
    fy = torch.ones(n, dtype=torch.float64)
    if policy.hflip:
        fx = torch.where(torch.rand(n, generator=g) < 0.5, -fx, fx)
    if policy.vflip:
        fy = torch.where(torch.rand(n, generator=g) < 0.5, -fy, fy)
    # rotation in pixel units (aspect-correct): R_norm = D⁻¹ R D with D = diag(W, H)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = height / width
    rot = torch.stack([torch.stack([cos, -sin * a], -1), torch.stack([sin / a, cos], -1)], -2)  # (n, 2, 2)
    lin = torch.diag_embed(torch.stack([cw, ch], -1)) @ rot @ torch.diag_embed(torch.stack([fx, fy], -1))
    theta = torch.cat([lin, torch.stack([cx, cy], -1).unsqueeze(-1)], dim=-1)
    return theta.float()


def augment_batch(x: torch.Tensor, policy: Policy, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random augmentation of each image of ``x`` (N, C, H, W), uint8 or float; same dtype and device out."""
    if not policy.active or x.shape[0] == 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    theta = random_affine(n, policy, h, w, generator).to(x.device)
    xf = x.float() if not x.is_floating_point() else x
    grid = F.affine_grid(theta.to(xf.dtype), list(xf.shape), align_corners=False)
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode=policy.padding_mode, align_corners=False)
    if not x.is_floating_point():
        return out.round_().clamp_(0, 255).to(x.dtype)
    return out


def views(x: torch.Tensor, k: int, policy: Policy, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` augmented views of each example, example-major (row i·k + j is view j of example i)."""
    return augment_batch(expand_views(x, k), policy, generator)
