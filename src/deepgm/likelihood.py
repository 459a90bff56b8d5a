"""Likelihood heads and unit conversions shared by VAE decoders and the diffusion L_0 term.

Conventions (stated once, used everywhere): data live in [-1, 1]; a dataset with K discrete levels
puts them at -1 + 2i/(K-1); discrete likelihoods integrate a density over the bin of width 2/(K-1)
around each level, with the two edge bins extended to infinity. Numbers are in nats unless a name
says bits; bits/dim divides a per-example negative log-likelihood by D ln 2.
"""

from __future__ import annotations

import math

import torch
from torch.special import log_ndtr

LOG_2PI = math.log(2 * math.pi)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def gaussian_log_prob(x, mean, logvar) -> torch.Tensor:
    """Elementwise log N(x; mean, e^logvar)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (uses the symmetry Phi(-x) = 1 - Phi(x))."""
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp(max=-1e-12)))


def discretized_gaussian_log_prob(x, mean, logvar, levels: int) -> torch.Tensor:
    """Elementwise log-probability of the level x under N(mean, e^logvar) integrated over x's bin."""
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * logvar)
    upper = torch.where(x > 1 - half_bin, torch.full_like(x, math.inf), (x - mean + half_bin) * inv_std)
    lower = torch.where(x < -1 + half_bin, torch.full_like(x, -math.inf), (x - mean - half_bin) * inv_std)
    return _log_diff_ndtr(lower, upper)


def bits_per_dim(nll_nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Convert a per-example negative log-likelihood in nats to bits per dimension."""
    return nll_nats / (dims * math.log(2))


def dequantized_to_discrete_nll(nll_density: torch.Tensor, dims: int, levels: int) -> torch.Tensor:
    """NLL bound of the discrete data from a density NLL of uniformly dequantised data in [-1, 1].

    With u ~ U(bin), log P(x) >= E_u log p(x + u) + D log(bin width), bin width 2/(K-1).
    """
    return nll_density - dims * math.log(2.0 / (levels - 1))
