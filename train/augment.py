"""Augmentation on the GPU batch with torch ops. Every random draw is per sample and shared by its S slices, so
the stack stays a consistent 3-D neighbourhood (a rotation applied to one slice only would be a different patient).

x: float in [0, 1], (B, S, 3, H, W). All draws come from one `torch.Generator` on x's device (reproducible runs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cache.rsna import CONDITION_SERIES
from train.config import TrainConfig, mirror_condition


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _bernoulli(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def slice_window(x: torch.Tensor, slices: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The `slices` slices around the stack's centre moved by `offset` (per sample; None = centred): a cache built
    with more slices than the model reads lets training move the window as a localiser's slice error would."""
    b, s = x.shape[:2]
    if s == slices:
        return x
    start = (s - slices) // 2 + (offset if offset is not None else torch.zeros(b, dtype=torch.long, device=x.device))
    idx = start.view(b, 1) + torch.arange(slices, device=x.device).view(1, slices)
    return x[torch.arange(b, device=x.device).view(b, 1), idx]


def affine(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator, jitter: float = 0.0) -> torch.Tensor:
    """Shift / scale / rotate (with probability aug_p_affine) plus the always-on centre jitter (v8's, plus `jitter`, a
    fraction of the crop's side: aug_jitter_mm), one grid per sample."""
    b, s, c, h, w = x.shape
    dev = x.device
    on = _bernoulli(b, cfg.aug_p_affine, g, dev).float()
    angle = _uniform(b, -cfg.aug_rotate, cfg.aug_rotate, g, dev) * (math.pi / 180) * on
    scale = 1 + _uniform(b, -cfg.aug_scale, cfg.aug_scale, g, dev) * on
    # affine_grid works in [-1, 1] coordinates, so a shift of a fraction f of the size is 2f
    shift = _uniform(2 * b, -cfg.aug_shift, cfg.aug_shift, g, dev).view(b, 2) * on[:, None] * 2
    centre = cfg.aug_center_jitter + jitter
    shift = shift + _uniform(2 * b, -centre, centre, g, dev).view(b, 2) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.repeat_interleave(s, 0), [b * s, c, h, w], align_corners=False)
    out = F.grid_sample(x.flatten(0, 1), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.view(b, s, c, h, w)


def color(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """With probability aug_p_color: brightness/contrast or gamma (one of the two, as v8's OneOf)."""
    b, dev = x.shape[0], x.device
    on = _bernoulli(b, cfg.aug_p_color, g, dev)
    use_gamma = _bernoulli(b, 0.5, g, dev)
    contrast = 1 + _uniform(b, -cfg.aug_contrast, cfg.aug_contrast, g, dev)
    brightness = _uniform(b, -cfg.aug_brightness, cfg.aug_brightness, g, dev)
    gamma = 1 + _uniform(b, -cfg.aug_gamma, cfg.aug_gamma, g, dev)
    bc, gm = on & ~use_gamma, on & use_gamma
    contrast = torch.where(bc, contrast, 1.0).view(b, 1, 1, 1, 1)
    brightness = torch.where(bc, brightness, 0.0).view(b, 1, 1, 1, 1)
    gamma = torch.where(gm, gamma, 1.0).view(b, 1, 1, 1, 1)
    return (x.clamp(0, 1).pow(gamma) * contrast + brightness).clamp(0, 1)


def noise(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise with probability aug_p_noise (independent per pixel, as scanner noise is)."""
    on = _bernoulli(x.shape[0], cfg.aug_p_noise, g, x.device).float().view(-1, 1, 1, 1, 1)
    n = torch.randn(x.shape, generator=g, device=x.device) * cfg.aug_noise_std
    return (x + n * on).clamp(0, 1)


def mirror(x: torch.Tensor, condition: torch.Tensor, cfg: TrainConfig, g: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the patient left/right on half the samples; a sided condition becomes its mirror condition.

    Left/right is the image x axis on an axial slice, but the slice axis on a sagittal stack.
    """
    flip = _bernoulli(x.shape[0], 0.5, g, x.device)
    sagittal = CONDITION_SERIES[cfg.conditions[0]].startswith("Sagittal")
    flipped = x.flip(1) if sagittal else x.flip(-1)
    x = torch.where(flip.view(-1, 1, 1, 1, 1), flipped, x)
    swap = torch.tensor([cfg.conditions.index(mirror_condition(c)) for c in cfg.conditions], device=x.device)
    return x, torch.where(flip, swap[condition], condition)


def augment_batch(x: torch.Tensor, condition: torch.Tensor, cfg: TrainConfig, g: torch.Generator,
                  jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training augmentation: the slice window (moved by up to aug_slice_shift), geometry, then intensity, then
    noise; returns (images of cfg.slices slices, condition indices)."""
    if x.shape[1] > cfg.slices:
        shift = cfg.aug_slice_shift
        offset = torch.randint(-shift, shift + 1, (x.shape[0],), generator=g, device=x.device) if shift else None
        x = slice_window(x, cfg.slices, offset)
    x = affine(x, cfg, g, jitter)
    x = color(x, cfg, g)
    x = noise(x, cfg, g)
    if cfg.hflip:
        x, condition = mirror(x, condition, cfg, g)
    return x, condition


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """v8's test-time views: the plain image and a mild brightness/contrast change."""
    return [x, (x * 1.1 + 0.03).clamp(0, 1)]
