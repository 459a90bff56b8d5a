"""Likelihood heads and unit conversions shared by VAE decoders and the diffusion L_0 term.

Conventions (stated once, used everywhere): data live in [-1, 1]; a dataset with K discrete levels
puts them at -1 + 2i/(K-1); discrete likelihoods integrate a density over the bin of width 2/(K-1)
around each level, with the two edge bins extended to infinity. Numbers are in nats unless a name
says bits; bits/dim divides a per-example negative log-likelihood by D ln 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def bernoulli_log_prob(x, logits) -> torch.Tensor:
    """Elementwise log Bernoulli(x; sigmoid(logits)) for x in {0, 1}: x l - softplus(l) (binarised data)."""
    return x * logits - torch.nn.functional.softplus(logits)


def _log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(b) - sigmoid(a)) for a < b, accurate in both tails (uses sigmoid(-x) = 1 - sigmoid(x))."""
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi, log_lo = torch.nn.functional.logsigmoid(hi), torch.nn.functional.logsigmoid(lo)
    d = (log_lo - log_hi).clamp(max=-1e-12)  # log of sigmoid(lo)/sigmoid(hi) < 0
    # log(1 - e^d): expm1 near 0 (tiny bins relative to the scale), log1p far from it
    log1mexp = torch.where(d > -0.6931, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
    return log_hi + log1mexp


def discretized_logistic_log_prob(x, mean, log_scale, levels: int) -> torch.Tensor:
    """Elementwise log-probability of the level x under Logistic(mean, e^log_scale) integrated over x's bin
    (Salimans et al. 2017, PixelCNN++ eq. 2, single component), edge bins open like the discretised Gaussian."""
    half_bin = 1.0 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = torch.where(x > 1 - half_bin, torch.full_like(x, math.inf), (x - mean + half_bin) * inv_scale)
    lower = torch.where(x < -1 + half_bin, torch.full_like(x, -math.inf), (x - mean - half_bin) * inv_scale)
    return _log_sigmoid_diff(lower, upper)


@dataclass
class NLL:
    """Per-example negative log-likelihoods (nats) and bits/dim, the network evaluations per example, and a note."""

    nats: torch.Tensor
    bpd: torch.Tensor
    nfe: int
    note: str

    def summary(self) -> dict:
        """Mean bits/dim with a 95% normal interval over examples."""
        n = len(self.bpd)
        ci = 1.96 * float(self.bpd.std()) / math.sqrt(n) if n > 1 else float("nan")
        return {"bpd": float(self.bpd.mean()), "bpd_ci95": ci, "nats": float(self.nats.mean()), "n": n,
                "nfe": self.nfe, "note": self.note}
