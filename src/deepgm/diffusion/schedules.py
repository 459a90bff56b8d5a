"""Noise schedules: t in [0, 1] -> (alpha_t, sigma_t) of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I).

One time axis: a discrete DDPM with T steps is the grid t_i = i/T of its schedule. Between grid
points log(alpha_bar) is interpolated linearly, which is exactly a VP SDE with piecewise-constant
beta(t), so continuous-time samplers run on discrete models unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


class Schedule(ABC):
    """Maps time to (alpha, sigma); log-SNR, transitions, the SDE and time grids follow from it."""

    T: int | None = None  # number of discrete steps; None for a continuous-time schedule

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t as float64 tensors of t's shape."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (torch.log(alpha) - torch.log(sigma))

    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The time t in (0, 1] with log_snr(t) = lam, by float64 bisection on the decreasing log-SNR.

        lam below log_snr(1) gives 1; lam above every log_snr(t > 0) gives the smallest t > 0 bisection reaches.
        """
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(64):  # 64 halvings of [0, 1] reach float64 resolution
            mid = (lo + hi) / 2
            early = self.log_snr(mid) > lam  # less noise at mid than asked for: the answer lies later
            lo, hi = torch.where(early, mid, lo), torch.where(early, hi, mid)
        return hi

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at time t: t itself (a learned schedule uses its normalised log-SNR)."""
        return t

    def prior_std(self) -> float:
        """Standard deviation of the sampler's starting noise at t=1: sqrt(alpha_1^2 + sigma_1^2)."""
        alpha, sigma = self.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
        return float(torch.sqrt(alpha**2 + sigma**2))

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times: uniform over the grid {1/T, ..., 1} when discrete, else U(0, 1]."""
        if self.T is not None:
            i = torch.randint(1, self.T + 1, (n,), generator=generator, device=device)
            return i.double() / self.T
        return 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)

    def time_grid(self, steps: int) -> torch.Tensor:
        """Decreasing times from 1 to exactly 0, steps+1 points (integer timesteps when discrete)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.T is None:
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if steps > self.T:
            raise ValueError(f"steps={steps} exceeds this schedule's T={self.T} discrete steps")
        i = torch.round(torch.linspace(self.T, 0, steps + 1, dtype=torch.float64))
        return i / self.T

    def sde(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift coefficient f(t) and squared diffusion g(t)^2 of dx = f x dt + g dW, from alpha and sigma.

        f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, eq. 33 of VDM).
        """
        t = t.detach().double().requires_grad_(True)
        with torch.enable_grad():
            alpha, sigma = self.alpha_sigma(t)
            dlog_alpha, dsigma2 = (_d_dt(v, t) for v in (torch.log(alpha), sigma**2))
        return dlog_alpha, (dsigma2 - 2 * dlog_alpha * sigma**2).detach()


def _d_dt(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Elementwise dy/dt by autograd; zero where y does not depend on t (e.g. alpha = 1 of a VE schedule)."""
    if not y.requires_grad:
        return torch.zeros_like(t).detach()
    grad = torch.autograd.grad(y.sum(), t, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(t).detach() if grad is None else grad.detach()


class DiscreteVP(Schedule):
    """Variance-preserving DDPM schedule from betas beta_1..beta_T (Ho et al. 2020, eq. 4)."""

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.name = name
        self.T = len(betas)
        self.betas = betas
        # log alpha_bar at t_i = i/T for i = 0..T (alpha_bar_0 = 1)
        zero = torch.zeros(1, dtype=torch.float64)
        self.log_alpha_bar = torch.cat([zero, torch.cumsum(torch.log1p(-betas), 0)])

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """DDPM's linear betas, rescaled by 1000/T so every T discretises the same process."""
        scale = 1000.0 / T
        if beta_end * scale >= 1:
            raise ValueError(f"linear schedule with T={T} needs beta_T={beta_end * scale:.3g} >= 1; use a larger T")
        return cls(torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64), name="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
        """Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2), betas clipped."""
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, name="cosine")

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        table = self.log_alpha_bar.to(t.device)
        pos = (t * self.T).clamp(0, self.T)
        # snap to the grid so float32 times such as 0.002 hit their timestep exactly; the snap is
        # straight-through (value rounded, gradient kept) so sde() sees d/dt at grid times too
        snapped = pos + (pos.round() - pos).detach()
        pos = torch.where((pos - pos.round()).abs() < 1e-4, snapped, pos)
        i0 = pos.floor().clamp(max=self.T - 1).long()
        frac = pos - i0
        log_ab = table[i0] * (1 - frac) + table[i0 + 1] * frac
        return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))

    def t_from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """Exact inverse of log_snr: log alpha_bar = log sigmoid(lam) located on the piecewise-linear table."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        table = -self.log_alpha_bar.to(lam.device)  # increasing in t, 0 at t = 0
        target = torch.nn.functional.softplus(-lam)  # -log alpha_bar = -log sigmoid(lam)
        i0 = (torch.searchsorted(table, target) - 1).clamp(0, self.T - 1)
        frac = ((target - table[i0]) / (table[i0 + 1] - table[i0])).clamp(0, 1)
        return (i0 + frac) / self.T

    def __repr__(self) -> str:
        return f"DiscreteVP({self.name}, T={self.T})"


def transition(schedule: Schedule, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_{t|s} and sigma_{t|s}^2 of q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I), s < t."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_ts = alpha_t / alpha_s
    return alpha_ts, sigma_t**2 - alpha_ts**2 * sigma_s**2


def posterior(schedule: Schedule, t: torch.Tensor, s: torch.Tensor):
    """Coefficients of q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var I), s < t (DDPM eq. 7, any s)."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_ts, sigma2_ts = transition(schedule, t, s)
    c_x0 = alpha_s * sigma2_ts / sigma_t**2
    c_xt = alpha_ts * sigma_s**2 / sigma_t**2
    return c_x0, c_xt, sigma2_ts * sigma_s**2 / sigma_t**2
