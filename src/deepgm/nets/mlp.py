"""A residual MLP with a time embedding, for low-dimensional (toy) data."""

from __future__ import annotations

import torch
from torch import nn

from deepgm.conditioning import Conditioning, ContextReader
from deepgm.nets.embeddings import TimeEmbedding


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.act(self.fc1(self.norm(h)) + self.emb(emb))
        return h + self.fc2(self.act(z))


class MLP(nn.Module):
    """eps/x0/v network for vectors: (x_t (B, D), t (B,), **cond) -> (B, D); vector conditions (class labels)
    are added to the time embedding."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, time_dim: int = 64,
                 conditioning: Conditioning | None = None):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, self.time.out_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))
        self.conditioning = conditioning or Conditioning()
        if any(c.kind != "vector" for c in self.conditioning.conditions.values()):
            raise ValueError("the MLP reads vector conditions (class labels) only")
        self.context = ContextReader(self.conditioning, self.time.out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        emb = self.time(t.expand(x.shape[0]) if t.dim() == 0 else t)
        context = self.context(cond, x.shape[0])
        if context.vector is not None:
            emb = emb + context.vector
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
