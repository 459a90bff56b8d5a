"""A denoiser answers every question a sampler or loss asks about x_t: x0, eps, v and the score.

It wraps a network (or any callable) and its parameterisation once; samplers never see raw outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepgm.diffusion.schedules import Schedule

PARAMETERIZATIONS = ("eps", "x0", "v", "edm")


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example scalars (B,) or () as x's dtype and device, shaped to broadcast over x."""
    v = torch.as_tensor(v).to(device=x.device, dtype=x.dtype)
    if v.dim() == 0:
        return v
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def edm_preconditioning(alpha, sigma, sigma_data: float = 0.5):
    """c_skip, c_out, c_in, c_noise of Karras et al. (2022), Table 1, at the noise level s = sigma/alpha of
    x_t / alpha = x0 + s n; c_in also absorbs that 1/alpha, so the network's input is c_in * x_t:
    c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(s^2 + sd^2), c_in = 1/(alpha sqrt(s^2 + sd^2)), c_noise = ln(s)/4."""
    s = sigma / alpha
    r = torch.sqrt(s**2 + sigma_data**2)
    c_noise = 0.25 * torch.log(torch.as_tensor(s).clamp(min=1e-20))  # s = 0 only at t = 0, where c_out = 0
    return sigma_data**2 / r**2, s * sigma_data / r, 1 / (alpha * r), c_noise


def to_x0_eps(out, x, alpha, sigma, parameterization: str, sigma_data: float = 0.5):
    """(x0, eps) from a network output in the given parameterisation, with x = alpha x0 + sigma eps.

    v is defined for any (alpha, sigma) with r = sqrt(alpha^2 + sigma^2): v = (alpha eps - sigma x0)/r,
    which is Salimans & Ho (2022)'s v when alpha^2 + sigma^2 = 1. "edm" is Karras et al. (2022) eq. 7:
    x0 = c_skip x/alpha + c_out F.
    """
    if parameterization == "edm":
        c_skip, c_out, _, _ = edm_preconditioning(alpha, sigma, sigma_data)
        x0 = c_skip * x / alpha + c_out * out
        return x0, (x - alpha * x0) / sigma
    if parameterization == "eps":
        return (x - sigma * out) / alpha, out
    if parameterization == "x0":
        return out, (x - alpha * out) / sigma
    if parameterization == "v":
        r = torch.sqrt(alpha**2 + sigma**2)
        a, s = alpha / r, sigma / r
        return a * x / r - s * out, s * x / r + a * out
    raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def from_x0_eps(x0, eps, alpha, sigma, parameterization: str, sigma_data: float = 0.5):
    """The network target in the given parameterisation, inverse of `to_x0_eps`."""
    if parameterization == "edm":  # Karras et al. (2022) eq. 8: F = (x0 - c_skip x/alpha) / c_out
        c_skip, c_out, _, _ = edm_preconditioning(alpha, sigma, sigma_data)
        return (x0 - c_skip * (alpha * x0 + sigma * eps) / alpha) / c_out
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        r = torch.sqrt(alpha**2 + sigma**2)
        return (alpha * eps - sigma * x0) / r
    raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


@dataclass
class Prediction:
    """What one network evaluation says about x_t: the clean image and the noise."""

    x0: torch.Tensor
    eps: torch.Tensor


class _FunctionNet(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, **cond):
        return self.fn(x, t, **cond)


class Denoiser(nn.Module):
    """A network with a parameterisation and the schedule it was trained with."""

    evaluations = 1  # network evaluations per call and sample (what samplers count as NFE)

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps", sigma_data: float = 0.5):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")
        self.net = net
        self.schedule = schedule
        self.parameterization = parameterization
        self.sigma_data = sigma_data  # the data's std, used by "edm" only

    @classmethod
    def from_fn(cls, fn: Callable, schedule: Schedule, parameterization: str = "x0",
                sigma_data: float = 0.5) -> Denoiser:
        """Wrap a plain callable fn(x_t, t, **cond) -> output, e.g. an analytic posterior mean."""
        return cls(_FunctionNet(fn), schedule, parameterization, sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> Prediction:
        """One network evaluation at (x_t, t); t is a scalar or (B,) tensor of times in [0, 1].

        The network sees (x_t, schedule.net_time(t)), or with "edm" (c_in x_t, c_noise) (Karras et al. 2022, eq. 7).
        """
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        alpha_t, sigma_t = self.schedule.alpha_sigma(t)  # (B,) each
        alpha, sigma = expand_like(alpha_t, x), expand_like(sigma_t, x)
        if self.parameterization == "edm":
            _, _, c_in, c_noise = edm_preconditioning(alpha_t, sigma_t, self.sigma_data)
            out = self.net(expand_like(c_in, x) * x, c_noise.to(x.dtype), **cond)
        else:
            out = self.net(x, self.schedule.net_time(t).to(x.dtype), **cond)
        if out.shape != x.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} differs from input {tuple(x.shape)}")
        return Prediction(*to_x0_eps(out.to(x.dtype), x, alpha, sigma, self.parameterization, self.sigma_data))

    def score(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """grad_x log p_t(x) = -eps / sigma_t."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        _, sigma = self.schedule.alpha_sigma(t)
        return -self(x, t, **cond).eps / expand_like(sigma, x)


class Thresholded(nn.Module):
    """Clips the x0 prediction (static: to [-1, 1]; dynamic: Saharia et al. 2022, sec. 2.3) and re-derives eps.

    Dynamic thresholding: s = max(1, the `percentile` quantile of |x0| per example); x0 <- clip(x0, -s, s) / s.
    Where no |x0| exceeds 1 (s = 1), both leave x0 unchanged."""

    def __init__(self, denoiser: nn.Module, percentile: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.percentile = percentile  # None: static clipping
        self.evaluations = getattr(denoiser, "evaluations", 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> Prediction:
        pred = self.denoiser(x, t, **cond)
        x0 = pred.x0
        if self.percentile is None:
            x0 = x0.clamp(-1, 1)
        else:
            s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), self.percentile, dim=1)
            s = expand_like(s.clamp(min=1.0), x0)
            x0 = x0.clamp(-s, s) / s
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        alpha, sigma = (expand_like(v, x) for v in self.schedule.alpha_sigma(t.expand(x.shape[0])))
        return Prediction(x0, (x - alpha * x0) / sigma)


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6, written for x0 and eps alike):
    x0 = x0_uncond + w (x0_cond - x0_uncond), eps likewise (both are affine in the network output, so the pair
    stays consistent with x_t = alpha x0 + sigma eps). w = 1 is the conditional model, w = 0 the unconditional one;
    for other w the conditional and unconditional inputs go through the network in one batch, two evaluations.
    `conditioning` says which keys of cond are dropped (deepgm.conditioning) and what their null values are.
    `weight` is a number, or a (B,) tensor of one weight per example (a guidance-distillation teacher)."""

    def __init__(self, denoiser: nn.Module, weight: float | torch.Tensor, conditioning):
        super().__init__()
        if torch.is_tensor(weight) and weight.dim() > 0:
            bad = not bool((torch.isfinite(weight) & (weight >= 0)).all())
        else:
            weight = float(weight)
            bad = not math.isfinite(weight) or weight < 0
        if bad:
            raise ValueError(f"guidance weight must be a finite number >= 0, got {weight}")
        if not conditioning.guidable:
            raise ValueError("classifier-free guidance needs a conditional model (class labels or text); this "
                             "model has no condition to drop")
        self.denoiser, self.weight, self.conditioning = denoiser, weight, conditioning
        self.schedule = denoiser.schedule
        inner = getattr(denoiser, "evaluations", 1)
        self.evaluations = inner if isinstance(weight, float) and weight in (0.0, 1.0) else 2 * inner

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> Prediction:
        if not cond:
            raise ValueError("guidance needs the condition of each sample (e.g. y=labels)")
        null = self.conditioning.null(cond)
        if isinstance(self.weight, float) and self.weight == 1.0:
            return self.denoiser(x, t, **cond)
        if isinstance(self.weight, float) and self.weight == 0.0:
            return self.denoiser(x, t, **null)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        t2 = t if t.dim() == 0 else torch.cat([t, t])
        both = {key: torch.cat([cond[key], null[key]]) for key in cond}
        pred = self.denoiser(torch.cat([x, x]), t2, **both)  # (2B, ...): conditional, then unconditional
        x0_c, x0_u = pred.x0.chunk(2)
        eps_c, eps_u = pred.eps.chunk(2)
        w = self.weight if isinstance(self.weight, float) else expand_like(self.weight, x0_c)
        return Prediction(x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u))
