"""Embeddings of the diffusion time shared by every network."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of continuous time t in [0, 1] (Vaswani et al. 2017; DDPM appendix B), in `dtype`
    (float32, or float64 for a network in float64).

    t is scaled by 1000 so that a discrete DDPM with T=1000 sees the integer timesteps it was designed for.
    """
    t = t.reshape(-1).to(dtype) * 1000.0  # (B,)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP, as in DDPM."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * dim
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.out_dim = hidden

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.dim, dtype=torch.float64 if weight.dtype == torch.float64
                                           else torch.float32))
