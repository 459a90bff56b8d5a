"""Tiny models with the trainer's `loss(batch, generator) -> (loss, terms)` contract, shared by the trainer tests."""

import torch
from torch import nn


class NoisyMLP(nn.Module):
    """A small denoiser whose loss draws noise from the trainer's generator (per rank under DDP)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 4))

    def loss(self, batch, generator):
        x = batch["x"]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        mse = (self.net(x + 0.5 * noise) - x).pow(2).mean()
        return mse, {"mse": mse.detach(), "noise_std": float(noise.std())}


class Regression(nn.Module):
    """Least squares y = W x with no randomness: an easy loss that must fall, the same on any number of ranks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def loss(self, batch, generator):
        mse = (self.fc(batch["x"]) - batch["y"]).pow(2).mean()
        return mse, {"mse": mse.detach()}
