"""The classifier's "heavy" augmentation, after the paper code's albumentations 1.3 pipeline, in torch.

Steps (each applied per image with its own probability, in this order):
horizontal flip (0.5); Gaussian noise with variance ~ U(0, 0.1), per channel (albumentations
``GaussNoise(var_limit=(0, 0.1))``); gamma ~ U(0.1, 1.0) (``RandomGamma((10, 100))``);
shift/scale/rotate with limits 0.1 / 0.2 / 45 degrees, reflect-101-like border
(``ShiftScaleRotate``); brightness/contrast +-0.2 (``RandomBrightnessContrast``); radial optical
distortion k ~ U(-0.05, 0.05) with focal length = width (``OpticalDistortion``); channel dropout
(one channel set to 0, p 0.8 by default). Works on float ``(N, C, H, W)`` batches in [0, 1] and
returns the same shape, clipped to [0, 1] (albumentations leaves float noise unclipped; the
classifier wants its inputs in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class HeavyAugmentConfig:
    """Probabilities and limits of each step (defaults: the paper code's values / albumentations defaults)."""

    p_flip: float = 0.5
    p_noise: float = 0.5
    noise_var_max: float = 0.1
    p_gamma: float = 0.5
    gamma_range: tuple = (0.1, 1.0)
    p_affine: float = 0.5
    shift_limit: float = 0.1
    scale_limit: float = 0.2
    rotate_limit_deg: float = 45.0
    p_brightness_contrast: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    p_distortion: float = 0.5
    distort_limit: float = 0.05
    p_channel_dropout: float = 0.8

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, lo: float, hi: float, g: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _chosen(n: int, p: float, g: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def _warp(x: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    warped = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    return torch.where(mask[:, None, None, None], warped, x)


def heavy_augment(x: torch.Tensor, config: HeavyAugmentConfig | None = None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Augment a float ``(N, C, H, W)`` batch in [0, 1]; returns a new tensor of the same shape in [0, 1]."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(x.shape)}")
    c = config or HeavyAugmentConfig()
    g = generator
    n, ch, h, w = x.shape
    x = x.float().clone()

    flip = _chosen(n, c.p_flip, g)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)

    noisy = _chosen(n, c.p_noise, g)
    sigma = _uniform(n, 0.0, c.noise_var_max, g).sqrt() * noisy
    x = (x + torch.randn(x.shape, generator=g) * sigma[:, None, None, None]).clamp(0, 1)

    gam = torch.where(_chosen(n, c.p_gamma, g), _uniform(n, *c.gamma_range, g), torch.ones(n))
    x = x.clamp_min(0).pow(gam[:, None, None, None])

    # shift / scale / rotate, in pixel units around the centre, expressed on normalised coordinates
    aff = _chosen(n, c.p_affine, g)
    if aff.any():
        angle = _uniform(n, -c.rotate_limit_deg, c.rotate_limit_deg, g) * math.pi / 180
        scale = 1 + _uniform(n, -c.scale_limit, c.scale_limit, g)
        dx, dy = _uniform(n, -c.shift_limit, c.shift_limit, g), _uniform(n, -c.shift_limit, c.shift_limit, g)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos, sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = -sin * w / h, cos
        # output point p maps to source A (p - 2 shift)
        theta[:, 0, 2] = -(theta[:, 0, 0] * 2 * dx + theta[:, 0, 1] * 2 * dy)
        theta[:, 1, 2] = -(theta[:, 1, 0] * 2 * dx + theta[:, 1, 1] * 2 * dy)
        grid = F.affine_grid(theta, [n, ch, h, w], align_corners=False)
        x = _warp(x, grid, aff)

    bc = _chosen(n, c.p_brightness_contrast, g)
    alpha = torch.where(bc, 1 + _uniform(n, -c.contrast_limit, c.contrast_limit, g), torch.ones(n))
    beta = torch.where(bc, _uniform(n, -c.brightness_limit, c.brightness_limit, g), torch.zeros(n))
    x = x * alpha[:, None, None, None] + beta[:, None, None, None]

    dist = _chosen(n, c.p_distortion, g)
    if dist.any():
        k = _uniform(n, -c.distort_limit, c.distort_limit, g)
        ident = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), [n, ch, h, w], align_corners=False)
        px, py = ident[..., 0] * (w / 2), ident[..., 1] * (h / 2)  # pixels from the centre
        r2 = (px / w) ** 2 + (py / w) ** 2  # normalised by focal length = width
        factor = 1 + k[:, None, None] * r2
        grid = torch.stack([ident[..., 0] * factor, ident[..., 1] * factor], dim=-1)
        x = _warp(x, grid, dist)

    drop = _chosen(n, c.p_channel_dropout, g) & (ch > 1)
    if drop.any():
        which = torch.randint(0, ch, (n,), generator=g)
        keep = torch.ones(n, ch)
        keep[torch.arange(n)[drop], which[drop]] = 0.0
        x = x * keep[:, :, None, None]
    return x.clamp(0, 1)
