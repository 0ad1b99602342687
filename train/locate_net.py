"""The localiser's network, its target heatmaps, loss and decoding (docs/locate.md).

    volume (B, D, 3, H, W)  each slice with its two neighbours as channels (2.5D)
      -> timm encoder per slice (features_only, strides 4..32) -> a light FPN decoder at stride 4, with the cell's
         position (x, y) and the slice's relative depth as extra channels
      -> logits (B, C, D, h, w): one heatmap per point (C = 5 canal levels; 10 foramina; 2 recesses)
      -> per point, one softmax over every slice and cell together: where the point is, slice included

Trained with cross entropy against a Gaussian target over (slice, y, x) whose width is given in millimetres; decoded
by the most probable slice, then the peak on it refined to a sub-cell point, with the probability mass near it as the
confidence. Slices beyond a volume's depth (batches pad to the deepest volume) are masked out.
Pure torch: no data loading, no files.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from train.model import Backbone

STRIDE = 4  # heatmap cells per input pixel: a heatmap cell is 4 x 4 input pixels


class LocaliserNet(Backbone, nn.Module):
    def __init__(self, backbone: str, points: int, decoder: int = 64, pretrained: bool = False,
                 weights: str | None = None):
        super().__init__()
        kwargs = dict(features_only=True, out_indices=(1, 2, 3, 4))
        if weights is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        self.encoder = timm.create_model(backbone, pretrained=pretrained or weights is not None, **kwargs)
        if self.encoder.feature_info.reduction()[0] != STRIDE:
            raise ValueError(f"{backbone}: its first feature map has stride {self.encoder.feature_info.reduction()[0]}"
                             f", the localiser decodes at {STRIDE}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder, 1) for c in self.encoder.feature_info.channels())
        self.fuse = nn.Sequential(nn.Conv2d(decoder + 3, decoder, 3, padding=1), nn.BatchNorm2d(decoder), nn.GELU(),
                                  nn.Conv2d(decoder, decoder, 3, padding=1), nn.BatchNorm2d(decoder), nn.GELU())
        self.head = nn.Conv2d(decoder, points, 1)
        pcfg = getattr(self.encoder, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1),
                             persistent=False)
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float in [0, 1], (B, D, 3, H, W) -> logits (B, C, D, H / 4, W / 4)."""
        b, d = x.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            feats = self.encoder((x.flatten(0, 1) - self.mean) / self.std)
        size = feats[0].shape[-2:]
        y = sum(F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False) if i else lat(f)
                for i, (lat, f) in enumerate(zip(self.lateral, feats)))
        # where a cell is (levels are counted from the sacrum: absolute position helps) and which slice it is on
        # (the left foramina lie on one side of the volume, which runs to the patient's left)
        h, w = size
        yy = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b * d, 1, h, w)
        xx = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b * d, 1, h, w)
        depth = torch.linspace(-1, 1, d, device=x.device) if d > 1 else torch.zeros(1, device=x.device)
        zz = depth.repeat(b).view(b * d, 1, 1, 1).expand(b * d, 1, h, w)
        out = self.head(self.fuse(torch.cat([y, yy.to(y.dtype), xx.to(y.dtype), zz.to(y.dtype)], 1)))
        return out.view(b, d, -1, h, w).transpose(1, 2)


def neighbours(volume: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, D, 3, H, W): each slice with the one before and after it (the edge slice repeated)."""
    before = torch.cat([volume[:, :1], volume[:, :-1]], 1)
    after = torch.cat([volume[:, 1:], volume[:, -1:]], 1)
    return torch.stack([before, volume, after], 2)


def gaussian_targets(k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, depth: int, h: int, w: int,
                     sigma_cells: torch.Tensor, sigma_slices: float, slice_mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """(B, C) target slice k and input-grid cell (u, v) -> a distribution over (D, h, w) per point, (B, C, D, h, w).

    sigma_cells: (B,) in-plane width in heatmap cells (from millimetres, per volume: its mm per cell differs).
    slice_mask (B, D): the volume's real slices; none of the target's mass lies on padding (a point on the last
    slice would otherwise ask for probability where the prediction is masked to none)."""
    cu = (u + 0.5) / STRIDE - 0.5  # input cell centre -> heatmap cell coordinates
    cv = (v + 0.5) / STRIDE - 0.5
    dev = k.device
    zz = torch.arange(depth, device=dev, dtype=torch.float32).view(1, 1, depth, 1, 1)
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, 1, 1, h, 1)
    xx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, 1, 1, w)
    s = sigma_cells.view(-1, 1, 1, 1, 1)
    logp = -((yy - cv[..., None, None, None]) ** 2 + (xx - cu[..., None, None, None]) ** 2) / (2 * s ** 2) \
        - (zz - k[..., None, None, None].float()) ** 2 / (2 * sigma_slices ** 2)
    p = logp.exp()
    if slice_mask is not None:
        p = p * slice_mask.view(-1, 1, depth, 1, 1)
    return p / p.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)


def masked_log_softmax(logits: torch.Tensor, slice_mask: torch.Tensor) -> torch.Tensor:
    """One log-softmax per point over (D, h, w), padded slices excluded. slice_mask: (B, D) bool."""
    b, c, d, h, w = logits.shape
    x = logits.float().masked_fill(~slice_mask.view(b, 1, d, 1, 1), -1e4)
    return x.flatten(2).log_softmax(-1).view(b, c, d, h, w)


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, point_mask: torch.Tensor,
                 slice_mask: torch.Tensor) -> torch.Tensor:
    """Cross entropy between the target distributions and the predicted ones, over the points that exist."""
    logp = masked_log_softmax(logits, slice_mask)
    ce = -(target * logp).flatten(2).sum(-1)  # (B, C)
    m = point_mask.float()
    return (ce * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def decode(logits: torch.Tensor, slice_mask: torch.Tensor, window: int = 2, shared_slice: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, C, D, h, w) -> slice k, input-grid (u, v) and confidence, each (B, C).

    The slice is the one holding most of the point's probability; on it, the peak cell refined to a sub-cell point by
    a parabola through the log-probabilities of its neighbours on each axis (exact for a Gaussian heatmap); the
    confidence is the probability within `window` cells of the peak on that slice (1: all of it). `shared_slice`:
    every point on the one slice that holds most of their probability together (readers mark the canal's five levels
    on one mid-sagittal slice)."""
    logp = masked_log_softmax(logits, slice_mask)
    b, c, d, h, w = logp.shape
    mass = logp.exp().sum(dim=(3, 4))  # (B, C, D)
    k = mass.sum(1, keepdim=True).argmax(-1).expand(b, c) if shared_slice else mass.argmax(-1)  # (B, C)
    plane = logp.gather(2, k.view(b, c, 1, 1, 1).expand(b, c, 1, h, w)).squeeze(2)  # (B, C, h, w)
    peak = plane.flatten(2).argmax(-1)
    py, px = peak // w, peak % w

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return plane.flatten(2).gather(2, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))[..., None]).squeeze(-1)

    def refine(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        curve = lo - 2 * mid + hi
        step = torch.where(inside & (curve < -1e-6), 0.5 * (lo - hi) / curve.clamp(max=-1e-6), 0.0)
        return step.clamp(-0.5, 0.5)

    centre = at(py, px)
    cx = px + refine(at(py, px - 1), centre, at(py, px + 1), (px > 0) & (px < w - 1))
    cy = py + refine(at(py - 1, px), centre, at(py + 1, px), (py > 0) & (py < h - 1))
    near = ((torch.arange(h, device=logp.device).view(1, 1, h, 1) - py[..., None, None]).abs() <= window) & \
        ((torch.arange(w, device=logp.device).view(1, 1, 1, w) - px[..., None, None]).abs() <= window)
    confidence = (plane.exp() * near).sum(dim=(2, 3)).clamp(0, 1)
    return k, (cx + 0.5) * STRIDE - 0.5, (cy + 0.5) * STRIDE - 0.5, confidence


def sigma_in_cells(sigma_mm: float, mm_per_cell: torch.Tensor) -> torch.Tensor:
    """A width in millimetres as heatmap cells of each volume (at least half a cell)."""
    return (sigma_mm / (mm_per_cell * STRIDE)).clamp_min(0.5)


def mm_per_cell(spacing_col: float, scale_x: float) -> float:
    """Millimetres per input-grid cell of a volume (cache.volume_geometry: one scale on both axes)."""
    return float(spacing_col / abs(scale_x)) if scale_x else math.nan
