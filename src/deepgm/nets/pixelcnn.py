"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

Two stacks of masked convolutions keep the model causal in raster order without a blind spot:
  - the vertical stack V sees only rows strictly above the current pixel (all columns in reach);
  - the horizontal stack H sees the current row to the left of the pixel, plus V through a 1x1 link.
The first layer excludes the current pixel ("mask A"), later layers may include the centre of their input
("mask B"), because their input already excludes it. Each masked kernel is stored as just its causal part with
asymmetric padding (`CausalConv2d`), which computes the same thing without the zero taps. Every layer is gated,
tanh(a) * sigmoid(b), with a per-layer bias from a conditioning vector (eq. 4: the latent z of a VAE, a one-hot
label, or both).
All channels of a pixel are predicted together from the pixels before it (no within-pixel ordering).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv2d(nn.Conv2d):
    """A convolution whose kernel covers only the causal part of a k x k (or 1 x k) window, padded asymmetrically
    so that output (i, j) sees exactly that part -- the masked convolution of the paper without its zero taps.

    stack="vertical": rows i - k//2 .. i - 1 (or .. i with include_centre), columns j - k//2 .. j + k//2;
    stack="horizontal": row i, columns j - k//2 .. j - 1 (or .. j with include_centre).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stack: str, include_centre: bool):
        c = kernel // 2
        if stack == "vertical":
            size, pad = (c + int(include_centre), kernel), (c, c, c, 0)  # (left, right, top, bottom)
        elif stack == "horizontal":
            size, pad = (1, c + int(include_centre)), (c, 0, 0, 0)
        else:
            raise ValueError(f"stack must be 'vertical' or 'horizontal', got {stack!r}")
        super().__init__(in_channels, out_channels, size)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        return super().forward(F.pad(x, self.pad))[..., :height, :width]  # without the centre: one extra row/column


def _gate(a: torch.Tensor) -> torch.Tensor:
    """tanh(first half) * sigmoid(second half) over channels (eq. 2)."""
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedBlock(nn.Module):
    """One gated layer of both stacks; `first` applies mask A and has no residual connection."""

    def __init__(self, in_channels: int, channels: int, kernel: int, cond_dim: int, first: bool = False):
        super().__init__()
        self.first = first
        self.v_conv = CausalConv2d(in_channels, 2 * channels, kernel, "vertical", include_centre=not first)
        self.h_conv = CausalConv2d(in_channels, 2 * channels, kernel, "horizontal", include_centre=not first)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Linear(cond_dim, 4 * channels) if cond_dim else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v_conv(v)  # (B, 2C, H, W), sees rows above only
        h_pre = self.h_conv(h) + self.v_to_h(v_pre)
        if self.cond is not None and c is not None:
            cv, ch = self.cond(c)[:, :, None, None].chunk(2, dim=1)  # (B, 2C, 1, 1) each
            v_pre, h_pre = v_pre + cv, h_pre + ch
        v_new = _gate(v_pre)
        h_new = self.h_out(_gate(h_pre))
        return v_new, h_new if self.first else h + h_new


class PixelCNN(nn.Module):
    """x (B, C, H, W) [, cond (B, cond_dim)] -> per-pixel outputs (B, out_channels, H, W); output (i, j)
    depends only on the pixels before (i, j) in raster order and on cond."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 32, layers: int = 5, kernel: int = 3,
                 cond_dim: int = 0):
        super().__init__()
        if kernel % 2 == 0 or layers < 1:
            raise ValueError(f"PixelCNN needs an odd kernel and at least one layer, got kernel={kernel}, "
                             f"layers={layers}")
        self.cond_dim = cond_dim
        self.blocks = nn.ModuleList(
            [GatedBlock(in_channels, channels, kernel, cond_dim, first=True)]
            + [GatedBlock(channels, channels, kernel, cond_dim) for _ in range(layers - 1)])
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                 nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        v = h = x
        for block in self.blocks:
            v, h = block(v, h, cond)
        return self.out(h)
