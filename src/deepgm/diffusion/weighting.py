"""Denoising score matching in continuous time: a weighting over log-SNR plus the law of the training times.

Every loss here is a weighted eps-MSE, L = E_t[ omega(t) mean_d (eps_hat - eps)^2 ], written as an expectation
over t ~ U[t_min, 1] and estimated with times drawn from a proposal q(t) and weights omega(t) / q(t)
(Kingma & Gao 2023, eq. 2-6). omega is a function of lambda_t (times -dlambda/dt where the weighting is a density
over lambda), so the same weighting means the same objective on every schedule:

  simple   1                                           eps-MSE (Ho et al. 2020, eq. 14)
  elbo     (1 - t_min) (-dlambda/dt) / 2               continuous ELBO's diffusion term, nats/dim (VDM eq. 17)
  snr      max(1, e^-lambda)                            max(SNR, 1) x0-MSE, "truncated SNR" (Salimans & Ho 2022)
  min-snr  min(1, gamma e^-lambda)                      min(SNR, gamma) x0-MSE (Hang et al. 2023)
  v        1 + e^-lambda                                (SNR + 1) x0-MSE = v-MSE (Salimans & Ho 2022)
  edm      (1 - t_min)(-dlambda/dt) p(lambda) (1 + e^-lambda / sigma_data^2)
           EDM's loss weight lambda(sigma) ||D - x0||^2 under its log-normal sigma (Karras et al. 2022, sec. 5)

Time proposals: "schedule" (the schedule's own sample_t: integer timesteps for a DDPM), "uniform" and
"stratified" on [t_min, 1] (VDM's low-discrepancy sampler), "log-snr" (stratified and uniform in lambda: the
ELBO's importance sampler, which makes its weight the constant (lambda_max - lambda_min) / 2) and "lognormal"
(EDM's ln(sigma/alpha) ~ N(P_mean, P_std^2), truncated to the schedule's range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from deepgm.diffusion.grids import smallest_time
from deepgm.diffusion.losses import noise_data
from deepgm.diffusion.schedules import Schedule

WEIGHTINGS = ("simple", "vlb", "elbo", "snr", "min-snr", "v", "edm")
T_SAMPLINGS = ("schedule", "uniform", "stratified", "log-snr", "lognormal")
_DEFAULT_T_SAMPLING = {"elbo": "log-snr", "edm": "lognormal"}


def log_snr_slope(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """d lambda / dt at t: the schedule's closed form when it has one, else autograd through log_snr."""
    if hasattr(schedule, "log_snr_slope"):
        return schedule.log_snr_slope(t)
    t = torch.as_tensor(t, dtype=torch.float64).detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(schedule.log_snr(t).sum(), t)[0]


def log_snr_range(schedule: Schedule) -> tuple[float, float, float]:
    """(t_min, lambda(1), lambda(t_min)): the positive time range and its log-SNR ends."""
    t_min = smallest_time(schedule)
    lam = schedule.log_snr(torch.tensor([1.0, t_min], dtype=torch.float64)).detach()
    return t_min, float(lam[0]), float(lam[1])


def stratified_uniform(n: int, generator=None, device=None) -> torch.Tensor:
    """n low-discrepancy draws on [0, 1): (u0 + i/n) mod 1 with one u0 ~ U[0, 1) (VDM appendix, antithetic times)."""
    u0 = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    return torch.remainder(u0 + torch.arange(n, device=device, dtype=torch.float64) / n, 1.0)


def _normal_logpdf(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z**2 - 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Weighting:
    """A weighting over log-SNR and the proposal its training times are drawn from (see the module docstring)."""

    name: str = "simple"
    t_sampling: str | None = None  # None: "log-snr" for elbo, "lognormal" for edm, else "schedule"
    gamma: float = 5.0  # min-snr
    sigma_data: float = 0.5  # edm
    p_mean: float = -1.2  # edm: ln(sigma/alpha) ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def __post_init__(self):
        if self.name not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.name!r}; choose one of {WEIGHTINGS}")
        if self.t_sampling is None:
            object.__setattr__(self, "t_sampling", _DEFAULT_T_SAMPLING.get(self.name, "schedule"))
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {self.t_sampling!r}; choose one of {T_SAMPLINGS}")
        if self.gamma <= 0 or self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError("gamma, sigma_data and p_std must be positive")

    @classmethod
    def from_config(cls, spec: str | dict | Weighting | None) -> Weighting:
        """'elbo' or {name: min-snr, gamma: 5} or a Weighting."""
        if isinstance(spec, Weighting):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            return cls(name=spec)
        spec = dict(spec)
        allowed = {f.name for f in fields(cls)}
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in weighting; valid keys are {sorted(allowed)}")
        return cls(**spec)

    def _lognormal_log_density(self, lam: torch.Tensor) -> torch.Tensor:
        """log p(lambda) when ln s ~ N(p_mean, p_std^2), s = e^{-lambda/2}."""
        z = (-0.5 * lam - self.p_mean) / self.p_std
        return _normal_logpdf(z) - math.log(2 * self.p_std)

    def omega(self, lam: torch.Tensor, slope: torch.Tensor | None, t_min: float) -> torch.Tensor:
        """Weight on the per-dimension eps-MSE at log-SNR lam for t ~ U[t_min, 1]; slope = dlambda/dt."""
        if self.name == "simple":
            return torch.ones_like(lam)
        if self.name == "snr":
            return torch.clamp(torch.exp(-lam), min=1.0)
        if self.name == "min-snr":
            return torch.clamp(self.gamma * torch.exp(-lam), max=1.0)
        if self.name == "v":
            return 1 + torch.exp(-lam)
        if self.name == "elbo":
            return 0.5 * (1 - t_min) * -slope
        if self.name == "edm":
            edm = 1 + torch.exp(-lam) / self.sigma_data**2
            return (1 - t_min) * -slope * torch.exp(self._lognormal_log_density(lam)) * edm
        raise ValueError(f"weighting {self.name!r} is not a weighted eps-MSE")

    def draw(self, schedule: Schedule, n: int, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """n training times and their weights omega(t) / q(t), both float64 (B,)."""
        if self.name == "vlb":
            raise ValueError("the discrete VLB draws integer timesteps itself (losses.vlb_loss)")
        t_min, lam_lo, lam_hi = log_snr_range(schedule)
        learned = any(True for _ in getattr(schedule, "parameters", lambda: [])())
        if self.t_sampling in ("log-snr", "lognormal") and learned:
            raise ValueError(f"t_sampling {self.t_sampling!r} draws log-SNRs, which a learned schedule's shape "
                             "cannot influence; use 'stratified' or 'uniform' with it")
        if self.t_sampling == "schedule":
            t = schedule.sample_t(n, generator, device)
            q = None
        elif self.t_sampling in ("uniform", "stratified"):
            u = (torch.rand(n, generator=generator, device=device, dtype=torch.float64)
                 if self.t_sampling == "uniform" else stratified_uniform(n, generator, device))
            t = 1.0 - u * (1.0 - t_min)
            q = None
        elif self.t_sampling == "log-snr":
            u = stratified_uniform(n, generator, device)
            lam = lam_hi - u * (lam_hi - lam_lo)
            t = schedule.t_from_log_snr(lam).clamp(t_min, 1.0)
            q = ("log-snr", lam_hi - lam_lo)
        else:  # lognormal: inverse-CDF draw of ln s truncated to the schedule's range
            normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                                torch.tensor(1.0, dtype=torch.float64))
            lo = normal.cdf(torch.tensor((-0.5 * lam_hi - self.p_mean) / self.p_std, dtype=torch.float64))
            hi = normal.cdf(torch.tensor((-0.5 * lam_lo - self.p_mean) / self.p_std, dtype=torch.float64))
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            z = normal.icdf((lo + u.cpu() * (hi - lo)).clamp(1e-15, 1 - 1e-15)).to(u.device)
            lam = -2 * (self.p_mean + self.p_std * z)
            t = schedule.t_from_log_snr(lam).clamp(t_min, 1.0)
            q = ("lognormal", float(hi - lo))
        t = t.to(device) if device is not None else t
        lam = schedule.log_snr(t)
        needs_slope = self.name in ("elbo", "edm") or q is not None
        slope = log_snr_slope(schedule, t) if needs_slope else None
        weight = self.omega(lam, slope, t_min)
        if q is not None:  # importance weights: divide by the proposal's density over t on [t_min, 1]
            kind, mass = q
            density = (1 - t_min) * -slope  # |dlambda/dt| (1 - t_min): turns a density over lambda into one over t
            if kind == "log-snr":
                density = density / mass
            else:
                density = density * torch.exp(self._lognormal_log_density(lam)) / mass
            weight = weight / density
        return t, weight


def weighted_loss(denoiser, x0: torch.Tensor, weighting: Weighting, generator=None, cond=None) -> torch.Tensor:
    """Per-example weighted denoising loss (B,): weight(t) * mean_d (eps_hat - eps)^2 (Kingma & Gao 2023, eq. 6)."""
    t, weight = weighting.draw(denoiser.schedule, x0.shape[0], generator, x0.device)
    x_t, eps = noise_data(denoiser.schedule, x0, t, generator)
    pred = denoiser(x_t, t, **(cond or {}))
    mse = (pred.eps - eps).pow(2).reshape(x0.shape[0], -1).mean(1)  # (B,)
    return weight.to(mse) * mse
